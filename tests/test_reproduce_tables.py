"""experiments/reproduce.py: every table's pipeline parses with the CLI, shared stages agree, collect's markdown."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml

from datamodules.artifacts import ArtifactWriter
from datamodules.code_index import INDEX_FILE, KIND
from experiments import reproduce
from experiments.tables import DATASETS, TABLES, build_table
from lightning_modules.cli import build_cli
from lightning_modules.pipeline_spec import load_pipeline
from tests.conftest import CONFIGS, REPO, shared_dataset

MODEL_DIRS = {"Llama-7B": "/models/llama-7b", "Llama-13B": "/models/llama-13b"}
_PARSED: dict[tuple[str, ...], dict] = {}  # one parse per distinct stack: shared stages recur in every table


def _table(number: int, dataset: str, **kwargs):
    if number == 5 and dataset != "synthetic":  # C=1 reads the catalogue size from the data
        shared_dataset(DATASETS[dataset].title)
    llm_path = "/models/llama-7b" if dataset == "games" else None
    return build_table(number, dataset, llm_path=llm_path, model_dirs=MODEL_DIRS if number == 6 else None, **kwargs)


def _parse(stage, run_dir: str) -> dict:
    """The resolved config of a lightning stage, with the arguments `semconv pipeline` adds."""
    argv = [arg for config in stage.config for arg in ("--config", config)] + list(stage.args)
    argv += ["--trainer.default_root_dir", f"{run_dir}/{stage.name}", "--trainer.logger.init_args.version", "0"]
    if tuple(argv) not in _PARSED:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_info:
            build_cli([*argv, "--print_config"], run=False)
        assert exit_info.value.code in (0, None), f"stage {stage.name}: {argv} does not parse"
        _PARSED[tuple(argv)] = yaml.safe_load(printed.getvalue())
    return _PARSED[tuple(argv)]


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("number", TABLES)
def test_every_stage_of_every_table_parses(number, dataset):
    table = _table(number, dataset, steps=7)
    artifacts = {stage.name: stage.artifact for stage in table.stages}
    written: set[str] = set()  # what earlier python stages write (a tiny Llama, a tokenizer)
    for stage in table.stages:
        if stage.command == "python":
            assert (REPO / stage.script).is_file()
            written.add(stage.artifact)
            continue
        config = _parse(stage, table.run_dir)
        model = config["model"]["init_args"]
        for key in ("model_path", "tokenizer_path"):  # a model directory is a placeholder, or an earlier stage's
            if model.get(key) and not model[key].startswith("/models/"):
                assert model[key] in written and model[key] in stage.inputs, f"{stage.name}: {key} {model[key]}"
        callbacks = config["trainer"]["callbacks"]
        if stage.artifact:  # the override reached the exporter (the last callback), so variants never share a dir
            assert callbacks[-1]["class_path"].endswith("Exporter")
            assert (
                callbacks[-1]["init_args"]["output_dir"] == stage.artifact == f"{table.run_dir}/artifacts/{stage.name}"
            )
        data = config["data"]["init_args"]
        if "--data.init_args.index" in stage.args:  # stage 3 and TIGER: on one of the run's codebooks
            assert data["index"] in artifacts.values() and data["index"].split("/")[-1].startswith("codebook")
        if stage.name in table.llm_stages:  # stage-3 LLM runs: within the step budget
            assert config["trainer"]["max_steps"] == 7 and config["trainer"]["max_time"] is None
        if stage.name.startswith("codebook") and stage.config[0] != f"configs/{dataset}/codebook_lcrec.yaml":
            assert data["embeddings"] == artifacts["dccf"]  # LC-Rec's own tokenizer reads text embeddings instead
    assert len({stage.name for stage in table.stages}) == len(table.stages)
    assert all(row.stage is None or row.stage in artifacts for row in table.rows)


def test_rows_train_what_the_paper_varies():
    table = _table(3, "industrial")
    stages = {stage.name: stage for stage in table.stages}
    ed, no_la = (_parse(stages[name], table.run_dir) for name in ("codebook_rqvae", "codebook_no_la"))
    assert ed["model"]["init_args"]["variant"] == "rqvae"
    assert no_la["model"]["init_args"]["llm_alignment_weight"] == 0.0
    codebook = _parse(stages["codebook"], table.run_dir)
    assert codebook["model"]["init_args"]["llm_alignment_weight"] == 0.1
    # the paper's behaviour-only codebook input in every table, though the shipped Industrial config grounds it in text
    assert codebook["data"]["init_args"]["text_grounding"] is None and ed["data"]["init_args"]["text_grounding"] is None
    assert _parse(stages["llm_neg0"], table.run_dir)["data"]["init_args"]["negative_ratio"] == 0
    assert [(row.label, row.stage) for row in table.rows] == [
        ("ED", "llm_rqvae"),
        ("w/o LA", "llm_no_la"),
        ("w/o NS", "llm_neg0"),
        ("Ours", "llm"),
    ]
    # on synthetic the shipped codebook already has no LLM alignment: w/o LA is the Ours stage, said in the note
    synthetic = {row.label: row for row in _table(3, "synthetic").rows}
    assert synthetic["w/o LA"].stage == "llm" and "no LLM alignment" in synthetic["w/o LA"].note

    levels = _table(5, "synthetic")
    stages = {stage.name: stage for stage in levels.stages}
    one = _parse(stages["codebook_levels1"], levels.run_dir)["model"]["init_args"]
    assert (one["num_levels"], one["codebook_size"]) == (1, 500)  # one code per synthetic item
    assert [row.codebook for row in levels.rows] == [
        "codebook_levels1",
        "codebook_levels2",
        "codebook_levels3",
        "codebook",
        "codebook_levels5",
    ]
    behaviour = _parse({s.name: s for s in _table(8, "industrial").stages}["llm_behaviour"], levels.run_dir)
    assert (
        behaviour["data"]["init_args"]["preset"] == "behaviour_only" and behaviour["data"]["init_args"]["tasks"] is None
    )
    main = {row.label: (row.stage, row.note) for row in _table(1, "industrial").rows}
    assert main["most popular"] == ("most_popular", None) and main["P5"] == ("p5", None)
    assert main["BERT4Rec"] == (None, "not run (no configs/industrial/bert4rec.yaml)")
    scale = {s.name: s for s in _table(6, "synthetic").stages}["llm_scale_llama_13b"]
    parsed = _parse(scale, levels.run_dir)
    assert (
        parsed["model"]["init_args"]["model_path"] == "/models/llama-13b" and parsed["trainer"]["accelerator"] == "gpu"
    )


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_shared_stages_are_identical_across_tables(dataset):
    seen: dict[str, object] = {}
    for number in TABLES:
        for stage in _table(number, dataset).stages:
            assert seen.setdefault(stage.name, stage) == stage, f"{stage.name} differs in table {number}"
    for number in (1, 3, 4, 5, 7, 8):  # the Ours stage and its codebook are the same stages everywhere
        names = {stage.name for stage in _table(number, dataset).stages}
        assert {"dccf", "codebook", "llm"} <= names


def test_pipeline_file_follows_the_contract(tmp_path, monkeypatch):
    table = _table(4, "industrial", steps=50)
    path = reproduce.write_pipeline(table, tmp_path)
    assert path == tmp_path / "runs/reproduce/industrial/table4.pipeline.yaml"
    written = yaml.safe_load(path.read_text())
    assert written["name"] == "reproduce_table4_industrial" and written["run_dir"] == "runs/reproduce/industrial"
    assert [stage["name"] for stage in written["stages"]] == [s.name for s in table.stages]
    assert written["stages"][0] == {
        "name": "tiny_llama",
        "command": "python",
        "script": "experiments/make_tiny_llama.py",
        "args": ["--out", "artifacts/industrial/tiny_llama"],
        "inputs": [],
        "artifact": "artifacts/industrial/tiny_llama",
        "row": None,
    }
    neg0 = next(stage for stage in written["stages"] if stage["name"] == "llm_neg0")
    assert neg0["config"] == ["configs/industrial/llm.yaml", "configs/tables/negative_ratio_0.yaml"]
    assert neg0["inputs"][0] == "runs/reproduce/industrial/artifacts/codebook" and neg0["row"] == "negatives 1:0"
    pipeline = pytest.importorskip("lightning_modules.pipeline")  # the real parser, once it is in this checkout
    monkeypatch.chdir(REPO)
    assert pipeline.load_pipeline(path).stage_names == tuple(s.name for s in table.stages)


def _record(root, stage, metrics, wall=90.0, steps=50, run_dir="runs/reproduce/synthetic"):
    command = ["python", "-m", "lightning_modules.cli", "fit", "--trainer.max_steps", str(steps)]
    record = {"key": "k", "status": "done", "command": command, "wall_s": wall, "metrics": metrics}
    path = root / run_dir / "stages" / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _index(root, stage, levels, size, raw, extra_codes=None):
    codes = [[0] * levels + ([code] if extra_codes else []) for code in (extra_codes or [0])]
    letters = "abcdef"
    index = {str(i): [f"<{letters[level]}_{c}>" for level, c in enumerate(row)] for i, row in enumerate(codes)}
    with ArtifactWriter(root / "runs/reproduce/synthetic/artifacts" / stage, KIND) as writer:
        writer.write_json(INDEX_FILE, index)
        tokens = levels + (1 if extra_codes else 0)
        writer.commit(
            {"num_levels": levels, "codebook_size": size, "tokens_per_item": tokens, "raw_collision_rate": raw}
        )


def _metrics(hr10):
    return {"hr@1": 0.01, "hr@5": hr10 / 2, "hr@10": hr10, "ndcg@5": hr10 / 4, "ndcg@10": hr10 / 3}


def test_collect_writes_the_numbers_the_records_hold(tmp_path):
    run_dir = tmp_path / "runs/reproduce/synthetic"
    for ratio, hr10 in ((0, 0.08), (1, 0.09), (3, 0.1)):
        # configs/synthetic/llm.yaml ships 1:1, so that row is the shared "llm" stage
        _record(tmp_path, "llm" if ratio == 1 else f"llm_neg{ratio}", _metrics(hr10))
    (run_dir / "table4.results.json").write_text(json.dumps({"machine": {"cpus": 2, "gpus": [], "torch": "2.13.0"}}))
    docs = tmp_path / "results.md"
    docs.write_text(
        "# Results\n\nkept\n\n<!-- reproduce:table4:synthetic -->\nold\n<!-- /reproduce:table4:synthetic -->\n"
    )
    table = build_table(4, "synthetic")
    markdown = reproduce.collect(table, tmp_path, tmp_path / "figures", docs)
    lines = markdown.splitlines()
    assert lines[0] == "<!-- reproduce:table4:synthetic -->" and lines[-1] == "<!-- /reproduce:table4:synthetic -->"
    assert "machine: 2 CPU cores (torch 2.13.0)" in markdown
    assert "stage 3 capped at 50 optimiser steps per run (`--steps 50`)" in markdown
    assert (
        "| NSR | HR@5 | HR@10 | NDCG@5 | NDCG@10 | paper HR@5 | paper HR@10 | paper NDCG@5 | paper NDCG@10 |"
        in markdown
    )
    assert (
        "| 1:0 | 0.0400 | 0.0800 | 0.0200 | 0.0267 | 0.0791 | 0.1195 | 0.0548 | 0.0677 | `llm_neg0` | 1.5 min |"
        in lines
    )
    assert (
        "| 1:3 | 0.0500 | 0.1000 | 0.0250 | 0.0333 | 0.0858 | 0.1274 | 0.0591 | 0.0724 | `llm_neg3` | 1.5 min |"
        in lines
    )
    assert "| 1:2 | — | — | — | — | 0.0830 | 0.1256 | 0.0574 | 0.0711 | `llm_neg2` (pending) | — |" in lines
    assert (run_dir / "table4.md").read_text() == markdown.replace("](figures/", "](../../../figures/")
    figure = tmp_path / "figures" / "table4_synthetic.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
    document = docs.read_text()
    assert document.startswith("# Results\n\nkept\n\n<!-- reproduce:table4:synthetic -->") and "\nold\n" not in document
    assert "![Table 4: negative sampling ratio on synthetic](figures/table4_synthetic.png)" in document
    reproduce.collect(build_table(8, "synthetic"), tmp_path, tmp_path / "figures", docs)  # appended after
    document = docs.read_text()
    assert document.index("/reproduce:table4:synthetic") < document.index("reproduce:table8:synthetic -->")
    assert "| P5 | — | — | — | — | 0.0495 | 0.0789 | 0.0329 | 0.0423 | `p5` (pending) | — |" in document
    assert "budget: stage 3 capped at 50 optimiser steps per run" in document  # the shared Ours stage ran so
    shipped = reproduce.collect(build_table(3, "synthetic"), tmp_path / "fresh", tmp_path / "figures")
    assert "budget: stage 3 as shipped (`configs/synthetic/llm.yaml`: max_epochs 6); stages 1-2 as shipped" in shipped


def test_collect_reports_collision_rate_and_added_tokens(tmp_path):
    _index(tmp_path, "codebook_levels1", 1, 500, 0.0)
    _index(tmp_path, "codebook_levels2", 2, 32, 0.125, extra_codes=[0, 1, 2])  # 3 codes on an extra level
    _record(tmp_path, "llm_levels2", _metrics(0.06), wall=30.0, steps=20)
    markdown = reproduce.collect(build_table(5, "synthetic"), tmp_path, tmp_path / "figures")
    lines = markdown.splitlines()
    assert "| C | CR | T | HR@5 | HR@10 | NDCG@5 | NDCG@10 | paper CR | paper T | paper HR@5 |" in markdown
    assert "| 1 | 0.00% | 500 | — | — | — | — | — | 16859 | 0.0700 | 0.1111 | 0.0470 | 0.0602 |" in markdown
    expected = "| 2 | 12.50% | 67 | 0.0300 | 0.0600 | 0.0150 | 0.0200 | 10.80% | 512 | 0.0789 | 0.1198 | 0.0537 |"
    assert any(line.startswith(expected) and line.endswith("| `llm_levels2` | 0.5 min |") for line in lines)
    assert (tmp_path / "figures" / "table5_synthetic.png").stat().st_size > 10_000
    assert "machine: unknown (no results.json" in markdown


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--table", "2", "--dataset", "industrial"],
            "--table 2: not a table this script reproduces; choose one of 1,",
        ),
        (["--table", "x", "--dataset", "industrial"], "--table x: expected a table number"),
        (
            ["--table", "3", "--dataset", "beauty"],
            "--dataset beauty: unknown; choose one of industrial, synthetic, games",
        ),
        (["--table", "3", "--dataset", "industrial", "--steps", "0"], "--steps 0: must be >= 1"),
        (["--table", "6", "--dataset", "industrial", "--model-dir", "llama"], "--model-dir 'llama': expected NAME=DIR"),
        (["--table", "6", "--dataset", "industrial", "--run"], "--table 6 trains one stage 3 per model"),
        (["--table", "4", "--dataset", "games", "--run"], "pass --llm-path /path/to/llama-7b"),
        (["--table", "3", "--dataset", "industrial", "--docs"], "--docs updates docs/results.md"),
        (["--table", "1", "--dataset", "industrial", "--seed", "42", "42"], "--seed 42 42: a seed is given twice"),
        (["--table", "1", "--dataset", "industrial", "--seed", "-1"], "--seed -1: must be in [0, 2**32)"),
    ],
)
def test_bad_flags_give_one_clear_error(argv, message, capsys):
    assert reproduce.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err and "Traceback" not in captured.err


def test_model_scale_refuses_a_machine_without_gpu(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert reproduce.main(["--table", "6", "--dataset", "synthetic", "--run", "--model-dir", "Llama-7B=/m"]) == 2
    assert "Table 6 (7B-13B LLMs) needs a GPU" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_every_stage_config_lists_its_exporter_last(dataset):
    """`--trainer.callbacks.init_args.output_dir` sets the last callback listed: the exporter must be last."""
    spec = DATASETS[dataset]
    for path in (spec.dccf, spec.codebook, spec.llm[0]):
        callbacks = yaml.safe_load((CONFIGS.parent / path).read_text())["trainer"]["callbacks"]
        assert callbacks[-1]["class_path"].endswith("Exporter"), path


@pytest.mark.parametrize("dataset", ["industrial", "synthetic"])
def test_table1_trains_p5_lcrec_and_tiger_on_the_runs_own_artifacts(dataset):
    table = _table(1, dataset, steps=7)
    run, stages = table.run_dir, {stage.name: stage for stage in table.stages}
    assert [name for name in stages if name in ("p5", "codebook_lcrec", "lcrec", "tiger")] == [
        "p5",
        "codebook_lcrec",
        "lcrec",
        "tiger",
    ]
    assert [stages[name].config for name in ("p5", "lcrec", "tiger")] == [
        (f"configs/{dataset}/p5.yaml",),
        (f"configs/{dataset}/lcrec.yaml",),
        (f"configs/{dataset}/tiger.yaml",),
    ]
    rows = {row.label: (row.stage, row.note) for row in table.rows}
    assert (rows["P5"], rows["LC-Rec"], rows["TIGER"]) == (("p5", None), ("lcrec", None), ("tiger", None))
    assert "TIGER" not in table.paper and "TIGER (not in the paper, so no paper number)" in table.notes[-1]
    assert table.llm_stages == {"llm", "lcrec"}  # what --steps caps
    p5, codebook, lcrec, tiger = (_parse(stages[name], run) for name in ("p5", "codebook_lcrec", "lcrec", "tiger"))
    assert p5["data"]["init_args"]["export_dir"] == f"{run}/artifacts/p5"  # not the shipped artifacts/<dataset>/...
    assert codebook["trainer"]["callbacks"][-1]["init_args"]["output_dir"] == f"{run}/artifacts/codebook_lcrec"
    assert codebook["model"]["init_args"]["variant"] == "rqvae"
    assert codebook["model"]["init_args"]["collision_mapping"] == "sinkhorn"
    assert lcrec["data"]["init_args"]["index"] == stages["codebook_lcrec"].artifact == f"{run}/artifacts/codebook_lcrec"
    assert lcrec["trainer"]["callbacks"][-1]["init_args"]["output_dir"] == f"{run}/artifacts/lcrec"
    assert lcrec["data"]["init_args"]["task_preset"] == "lcrec" and lcrec["trainer"]["max_steps"] == 7
    assert tiger["data"]["init_args"]["index"] == stages["codebook"].artifact == f"{run}/artifacts/codebook"
    assert stages["tiger"].inputs[0] == stages["codebook"].artifact
    for parsed, model in ((p5, "p5"), (tiger, "tiger")):  # not LLM runs: their shipped budgets, whatever --steps
        shipped = DATASETS[dataset].value(f"configs/{dataset}/{model}.yaml", "trainer")
        assert parsed["trainer"]["max_steps"] == -1 and parsed["trainer"]["max_epochs"] == shipped["max_epochs"]
        assert parsed["trainer"]["max_time"] == shipped.get("max_time")
    if dataset == "industrial":  # LC-Rec's own tokenizer over the tiny Llama's text embeddings
        assert stages["codebook_lcrec"].config == ("configs/industrial/codebook_lcrec.yaml",)
        assert stages["codebook_lcrec"].inputs[0] == "artifacts/industrial/tiny_llama"
        assert codebook["data"]["init_args"]["embeddings"].endswith("llm_embeddings.pt")
    else:  # no text embedding: the shipped codebook as an RQ-VAE over DCCF, as configs/synthetic/lcrec.yaml says
        assert stages["codebook_lcrec"].config[-1] == "configs/tables/ed.yaml"
        assert codebook["data"]["init_args"]["embeddings"] == stages["dccf"].artifact
    table8 = _table(8, dataset, steps=7)
    assert all(stage == stages[stage.name] for stage in table8.stages if stage.name in stages)
    assert [(row.label, row.stage) for row in table8.rows][1:3] == [("P5", "p5"), ("LC-Rec", "lcrec")]


def test_games_table1_runs_lcrec_on_the_published_lcrec_index():
    """Games ships LC-Rec's own RQ-VAE codes (Games.index.json): LC-Rec fine-tunes the 7B model on them directly."""
    table = _table(1, "games")
    rows = {row.label: (row.stage, row.note) for row in table.rows}
    assert rows["LC-Rec"] == ("lcrec", None) and rows["P5"] == ("p5", None) and rows["TIGER"] == ("tiger", None)
    stages = {stage.name: stage for stage in table.stages}
    assert "codebook_lcrec" not in stages and "codebook" not in stages["lcrec"].inputs[0]
    assert "--data.init_args.index" not in stages["lcrec"].args and "lcrec" in table.llm_stages
    assert "on the dataset's own LC-Rec index" in table.notes[-1]
    parsed = _parse(stages["lcrec"], table.run_dir)
    model, data = parsed["model"]["init_args"], parsed["data"]["init_args"]
    assert model["model_path"] == "/models/llama-7b" and model["full_finetune"] and not model["lora"]
    assert (data["index"], data["dedupe_collisions"], data["task_preset"]) == (None, True, "lcrec")
    assert parsed["trainer"]["max_epochs"] == 4 and model["lr"] == 5e-5  # LC-Rec's run.sh


def test_seed_reaches_every_lightning_stage_in_its_own_run_dir(tmp_path, monkeypatch):
    table = _table(1, "industrial", seed=43)
    assert table.run_dir == "runs/reproduce/industrial/seed43" and table.seed == 43
    for stage in table.stages:
        if stage.command == "python":  # the tiny Llama seeds itself
            assert "--seed_everything" not in stage.args
            continue
        assert stage.args[-4:] == ("--seed_everything", "43", "--data.init_args.seed", "43"), stage.name
        assert stage.artifact is None or stage.artifact.startswith("runs/reproduce/industrial/seed43/artifacts/")
    stages = {stage.name: stage for stage in table.stages}
    for name in ("p5", "lcrec", "tiger", "most_popular"):  # fit and test stages, each DataModule
        parsed = _parse(stages[name], table.run_dir)
        assert parsed["seed_everything"] == 43 and parsed["data"]["init_args"]["seed"] == 43
    assert {stage.name: stage for stage in _table(1, "industrial").stages}["sasrec"].args == ()  # no --seed: as is
    assert reproduce.parse_args(["--table", "1", "--dataset", "industrial", "--seed", "42", "43"]).seed == [42, 43]
    assert reproduce.parse_args(["--table", "1", "--dataset", "industrial", "--seeds", "44"]).seed == [44]
    monkeypatch.chdir(REPO)  # the pipeline files' config paths are relative to the repository
    for built in (table, _table(1, "industrial"), _table(1, "synthetic", seed=44)):
        path = reproduce.write_pipeline(built, tmp_path)
        assert path == tmp_path / built.run_dir / "table1.pipeline.yaml"
        pipeline = load_pipeline(path)
        assert pipeline.stages == tuple(built.stages) and pipeline.run_dir == Path(built.run_dir)


def test_collect_table1_shows_the_generative_rows_and_wall_time(tmp_path):
    for stage, hr10, wall in (("p5", 0.08, 60.0), ("lcrec", 0.12, 120.0), ("tiger", 0.06, 30.0), ("llm", 0.1, 600)):
        _record(tmp_path, stage, _metrics(hr10), wall=wall)
    markdown = reproduce.collect(build_table(1, "synthetic"), tmp_path, tmp_path / "figures")
    lines = markdown.splitlines()
    metrics = "HR@1 | HR@5 | HR@10 | NDCG@5 | NDCG@10"
    assert f"| model | {metrics} | paper {metrics.replace(' | ', ' | paper ')} | stage | wall time |" in lines
    assert (
        "| P5 | 0.0100 | 0.0400 | 0.0800 | 0.0200 | 0.0267 | 0.0158 | 0.0495 | 0.0789 | 0.0329 | 0.0423 | `p5` "
        "| 1.0 min |" in lines
    )
    assert (
        "| LC-Rec | 0.0100 | 0.0600 | 0.1200 | 0.0300 | 0.0400 | 0.0279 | 0.0755 | 0.1167 | 0.0518 | 0.0651 | `lcrec` "
        "| 2.0 min |" in lines
    )
    assert "| TIGER | 0.0100 | 0.0300 | 0.0600 | 0.0150 | 0.0200 | — | — | — | — | — | `tiger` | 0.5 min |" in lines
    assert (
        "| SASRec | — | — | — | — | — | 0.0013 | 0.0296 | 0.0576 | 0.0153 | 0.0243 | `sasrec` (pending) | — |" in lines
    )
    assert "budget: stage 3 capped at 50 optimiser steps per run" in markdown  # Ours and LC-Rec; not P5 or TIGER
    assert "P5 and TIGER train for their shipped budgets" in markdown


def test_collect_over_seeds_writes_each_seed_and_their_mean(tmp_path):
    seed42, seed43 = "runs/reproduce/industrial/seed42", "runs/reproduce/industrial/seed43"
    _record(tmp_path, "p5", _metrics(0.08), wall=60.0, run_dir=seed42)
    _record(tmp_path, "p5", _metrics(0.12), wall=180.0, run_dir=seed43)
    _record(tmp_path, "lcrec", _metrics(0.12), wall=120.0, run_dir=seed42)  # seed 43's still running
    tables = [build_table(1, "industrial", seed=seed) for seed in (42, 43)]
    markdown = reproduce.collect(tables, tmp_path, tmp_path / "figures")
    assert (tmp_path / "runs/reproduce/industrial/table1.seeds_42_43.md").read_text() == markdown
    lines = markdown.splitlines()
    assert "### Table 1: main comparison (industrial, seeds 42, 43)" in lines
    assert (
        "Pipeline: `runs/reproduce/industrial/seed{42,43}/table1.pipeline.yaml` (`python experiments/reproduce.py "
        "--table 1 --dataset industrial --seed 42 43 --run`)." in lines
    )
    dashes = " | ".join(["—"] * 5)
    p5 = lines.index(f"| P5 (seed 42) | 0.0100 | 0.0400 | 0.0800 | 0.0200 | 0.0267 | {dashes} | `p5` | 1.0 min |")
    assert lines[p5 + 1] == f"| P5 (seed 43) | 0.0100 | 0.0600 | 0.1200 | 0.0300 | 0.0400 | {dashes} | `p5` | 3.0 min |"
    assert lines[p5 + 2] == (
        "| P5 | 0.0100 | 0.0500 | 0.1000 | 0.0250 | 0.0333 | 0.0158 | 0.0495 | 0.0789 | 0.0329 | 0.0423 "
        "| `p5` (mean of 2 seeds) | 2.0 min |"
    )
    assert lines[p5 + 4] == f"| LC-Rec (seed 43) | {dashes} | {dashes} | `lcrec` (pending) | — |"
    assert lines[p5 + 5] == (
        "| LC-Rec | 0.0100 | 0.0600 | 0.1200 | 0.0300 | 0.0400 | 0.0279 | 0.0755 | 0.1167 | 0.0518 | 0.0651 "
        "| `lcrec` (mean of 1 of 2 seeds) | 2.0 min |"
    )
    assert f"| TIGER | {dashes} | {dashes} | `tiger` (pending) | — |" in lines
    not_run = [line for line in lines if line.startswith("| BERT4Rec")]  # a row not run shows once
    assert not_run == [
        f"| BERT4Rec | {dashes} | 0.0136 | 0.0468 | 0.0773 | 0.0302 | 0.0400 "
        "| not run (no configs/industrial/bert4rec.yaml) | — |"
    ]
    single = reproduce.collect(tables[1], tmp_path, tmp_path / "figures")  # one seed: that run's own table
    assert "### Table 1: main comparison (industrial, seed 43)" in single and "--seed 43 --run" in single
    assert (tmp_path / seed43 / "table1.md").read_text() == single
