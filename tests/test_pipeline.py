"""`semconv pipeline`: parsing, skip/rerun/resume rules and the results table, on script stages and a tiny CLI run."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from datamodules.errors import ConfigError
from lightning_modules.cli import main
from lightning_modules.pipeline import PipelineError, PipelineRunner, load_pipeline, render_markdown
from tests.conftest import CONFIGS, REPO

# A stage script: writes an artifact directory (one data file + a manifest hashing it) from its arguments, and
# optionally test metrics, so the pipeline's rules are tested without training anything.
PRODUCER = textwrap.dedent(
    """
    import hashlib, json, sys
    from pathlib import Path
    out, value, stage_dir, fail = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "1"
    if fail:
        sys.exit("boom: " + value)
    inputs = "".join(Path(p).read_text() for p in sys.argv[5:])
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.txt").write_text(value + inputs)
    digest = hashlib.sha256((out / "data.txt").read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps({"kind": "test", "files": {"data.txt": digest}}))
    runs = stage_dir / "csv" / "version_0"
    runs.mkdir(parents=True, exist_ok=True)
    metrics = {"hr@1": 0.1, "hr@5": 0.25, "hr@10": 0.5, "ndcg@5": 0.125, "ndcg@10": float(len(value)) / 100}
    (runs / "test_metrics.json").write_text(json.dumps({"metrics": metrics}))
    with open(stage_dir.parent / "calls.txt", "a") as calls:
        calls.write(stage_dir.name + "\\n")
    """
)


def _write_pipeline(tmp_path: Path, first_value: str = "a", fail: str = "0") -> Path:
    script = tmp_path / "produce.py"
    script.write_text(PRODUCER)
    run_dir, art = tmp_path / "run", tmp_path / "artifacts"
    text = f"""
    name: toy
    run_dir: {run_dir}
    stages:
      - name: first
        command: python
        script: {script}
        args: [{art}/first, "{first_value}", "{{stage_dir}}", "0"]
        artifact: {art}/first
        row: first model
      - name: second
        command: python
        script: {script}
        args: [{art}/second, b, "{{stage_dir}}", "{fail}", "{{first.artifact}}/data.txt"]
        inputs: ["{{first.artifact}}"]
        artifact: {art}/second
        row: second model
    """
    # inputs take paths, not placeholders: write the real path there
    text = text.replace('inputs: ["{first.artifact}"]', f"inputs: [{art}/first]")
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _calls(tmp_path: Path) -> list[str]:
    calls = tmp_path / "run" / "calls.txt"
    return calls.read_text().split() if calls.exists() else []


def test_runs_in_order_then_skips_and_writes_the_table(tmp_path, capsys):
    config = _write_pipeline(tmp_path)
    results = PipelineRunner(load_pipeline(config)).run()
    assert _calls(tmp_path) == ["first", "second"]
    assert (tmp_path / "artifacts/second/data.txt").read_text() == "ba"  # the second stage read the first's output
    assert [row["name"] for row in results["rows"]] == ["first model", "second model"]
    assert results["rows"][0]["metrics"] == {"hr@1": 0.1, "hr@5": 0.25, "hr@10": 0.5, "ndcg@5": 0.125, "ndcg@10": 0.01}
    on_disk = json.loads((tmp_path / "run/results.json").read_text())
    assert on_disk["rows"] == results["rows"] and on_disk["machine"]["cpus"] >= 1
    table = (tmp_path / "run/results.md").read_text()
    assert "| first model | 0.1000 | 0.2500 | 0.5000 | 0.1250 | 0.0100 |" in table

    PipelineRunner(load_pipeline(config)).run()
    assert _calls(tmp_path) == ["first", "second"]  # nothing reran
    assert "first: skipped" in capsys.readouterr().out
    again = json.loads((tmp_path / "run/results.json").read_text())
    assert [row["skipped"] for row in again["rows"]] == [True, True]
    assert again["rows"][1]["metrics"] == results["rows"][1]["metrics"]


def test_a_changed_argument_reruns_the_stage_and_what_reads_its_artifact(tmp_path):
    PipelineRunner(load_pipeline(_write_pipeline(tmp_path))).run()
    PipelineRunner(load_pipeline(_write_pipeline(tmp_path, first_value="aa"))).run()
    assert _calls(tmp_path) == ["first", "second", "first", "second"]
    assert (tmp_path / "artifacts/second/data.txt").read_text() == "baa"


def test_force_reruns_one_stage_and_a_replaced_artifact_reruns_its_stage(tmp_path):
    config = _write_pipeline(tmp_path)
    PipelineRunner(load_pipeline(config)).run()
    PipelineRunner(load_pipeline(config), force=("second",)).run()
    assert _calls(tmp_path) == ["first", "second", "second"]
    # another run rewrote the first artifact (same content, new manifest bytes): the first stage's record no longer
    # describes what is on disk, so it reruns; the rerun writes identical bytes, so the second stays skipped
    manifest = tmp_path / "artifacts/first/manifest.json"
    manifest.write_text(manifest.read_text() + " ")
    PipelineRunner(load_pipeline(config)).run()
    assert _calls(tmp_path) == ["first", "second", "second", "first"]
    with pytest.raises(ConfigError, match="no such stage"):
        PipelineRunner(load_pipeline(config), force=("thrid",))


def test_a_failing_stage_names_itself_and_its_log_and_the_rerun_continues(tmp_path):
    with pytest.raises(PipelineError, match=r"stage 'second' failed \(exit 1\).*logs/second.log") as info:
        PipelineRunner(load_pipeline(_write_pipeline(tmp_path, fail="1"))).run()
    assert "boom: b" in str(info.value)  # the log's tail is in the message
    assert json.loads((tmp_path / "run/stages/second.json").read_text())["status"] == "running"
    PipelineRunner(load_pipeline(_write_pipeline(tmp_path))).run()
    assert _calls(tmp_path) == ["first", "second"]  # the finished first stage was not rerun


def test_a_killed_fit_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"name: t\nrun_dir: {tmp_path / 'run'}\nstages:\n"
        f"  - name: sasrec\n    config: {CONFIGS / 'synthetic/sasrec.yaml'}\n"
    )
    runner = PipelineRunner(load_pipeline(config))
    stage = runner.pipeline.stages[0]
    seen: list[list[str]] = []
    monkeypatch.setattr(runner, "_execute", lambda stage, argv: seen.append(argv))
    checkpoints = tmp_path / "run/sasrec/csv/version_0/checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_text("weights")
    record = tmp_path / "run/stages/sasrec.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"key": runner.key(stage), "status": "running"}))
    runner.run_stage(stage, 1)
    assert seen[-1][-2:] == ["--ckpt_path", str(checkpoints / "last.ckpt")]
    assert seen[-1][seen[-1].index("--trainer.default_root_dir") + 1] == str(tmp_path / "run/sasrec")
    # a record with another key (the config changed) starts over: the stale run directory is removed
    record.write_text(json.dumps({"key": "older", "status": "running"}))
    runner.run_stage(stage, 1)
    assert "--ckpt_path" not in seen[-1] and not checkpoints.exists()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("name: x\nrun_dir: r\nstages: []\n", "`stages` must be a non-empty list"),
        ("name: x\nrun_dir: r\nstagez: [1]\n", "unknown top-level field"),
        ("name: x\nrun_dir: r\nstages:\n  - name: A\n    config: c.yaml\n", r"stages\[0\].name must match"),
        ("name: x\nrun_dir: r\nstages:\n  - name: a\n    command: train\n", r"stages\[0\].command must be one of"),
        ("name: x\nrun_dir: r\nstages:\n  - name: a\n    config: missing.yaml\n", "missing.yaml does not exist"),
        ("name: x\nrun_dir: r\nstages:\n  - name: a\n    command: python\n", "needs `script`"),
        ("name: x\nrun_dir: r\nstages:\n  - name: a\n    confg: c.yaml\n", r"unknown field\(s\) \['confg'\]"),
    ],
)
def test_bad_pipeline_files_are_refused_naming_the_field(tmp_path, body, message):
    path = tmp_path / "pipeline.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message) as info:
        load_pipeline(path)
    assert str(path) in str(info.value)


def test_a_placeholder_must_name_an_earlier_stage(tmp_path):
    path = tmp_path / "pipeline.yaml"
    sasrec = CONFIGS / "synthetic/sasrec.yaml"
    path.write_text(
        f"name: x\nrun_dir: r\nstages:\n  - name: a\n    config: {sasrec}\n    args: ['{{b.checkpoint}}']\n"
    )
    with pytest.raises(ConfigError, match=r"\{b.checkpoint\} names no earlier stage"):
        load_pipeline(path)


SHIPPED = sorted(CONFIGS.glob("*/pipeline.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parent.name for p in SHIPPED])
def test_shipped_pipelines_load_and_every_stage_parses(path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    runner = PipelineRunner(load_pipeline(path.relative_to(REPO)))
    monkeypatch.setattr(runner, "checkpoint", lambda stage: Path("last.ckpt"))  # stands in for a finished stage
    for stage in runner.pipeline.stages:
        argv = runner.command_line(stage)
        if stage.command == "python":
            assert Path(argv[1]).is_file()
            continue
        with pytest.raises(SystemExit) as exit_info:
            main([*argv[3:], "--print_config"])
        assert exit_info.value.code in (0, None), f"{path}: stage {stage.name} does not parse"
        assert "default_root_dir: " + str(runner.stage_dir(stage)) in capsys.readouterr().out


def test_the_cli_runs_a_pipeline_of_real_stages(tmp_path, capsys):
    """`semconv pipeline` end to end on two tiny real stages (most popular and a 1-epoch SASRec)."""
    data = [
        "--data.init_args.data_dir",
        str(tmp_path / "data"),
        "--data.init_args.synthetic.num_users",
        "120",
        "--data.init_args.synthetic.num_items",
        "40",
    ]
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        f"name: tiny\nrun_dir: {tmp_path / 'run'}\nstages:\n"
        f"  - name: most_popular\n    command: test\n    config: {CONFIGS / 'synthetic/most_popular.yaml'}\n"
        f"    args: {json.dumps(data)}\n    row: most popular\n"
        f"  - name: sasrec\n    config: {CONFIGS / 'synthetic/sasrec.yaml'}\n    row: SASRec\n"
        f"    args: {json.dumps([*data, '--trainer.max_epochs', '1'])}\n"
    )
    main(["pipeline", "--config", str(path)])
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert [row["name"] for row in results["rows"]] == ["most popular", "SASRec"]
    for row in results["rows"]:
        assert set(row["metrics"]) == {"hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10"}
        assert 0.0 <= row["metrics"]["hr@1"] <= row["metrics"]["hr@5"] <= row["metrics"]["hr@10"] <= 1.0
    assert "| most popular |" in capsys.readouterr().out
    assert render_markdown(results) == (tmp_path / "run/results.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["pipeline", "--config", str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_the_synthetic_pipeline_runs_the_method_and_beats_most_popular(tmp_path, monkeypatch):
    """The README's first command, in a scratch directory: every stage runs, the cache is built, and the generative
    row beats most popular (its wall time is in results.md; the bar is 10 minutes on 2 cores)."""
    shutil.copytree(CONFIGS, tmp_path / "configs")
    (tmp_path / "experiments").symlink_to(REPO / "experiments")  # the tokenizer stage's script
    monkeypatch.chdir(tmp_path)
    main(["pipeline", "--config", "configs/synthetic/pipeline.yaml"])
    results = json.loads(Path("runs/synthetic/pipeline/results.json").read_text())
    rows = {row["name"]: row["metrics"] for row in results["rows"]}
    assert set(rows) == {"DCCF", "generative (ours)", "SASRec", "most popular"}
    for metric in ("hr@10", "ndcg@10"):
        assert rows["generative (ours)"][metric] > rows["most popular"][metric], rows
    assert list(Path("runs/synthetic/pipeline/cache").glob("recommendations.sqlite"))
    main(["pipeline", "--config", "configs/synthetic/pipeline.yaml"])  # all done: every stage is skipped
    again = json.loads(Path("runs/synthetic/pipeline/results.json").read_text())
    assert all(stage["skipped"] for stage in again["stages"] if stage["name"] != "tokenizer")
