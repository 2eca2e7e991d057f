"""The paper's tables as pipeline stages: which stacked configs each row trains, and the paper's own numbers.

Every row is a chain of ordinary configs: a dataset's shipped stage configs (``configs/<dataset>/{dccf,codebook,
llm}.yaml``) plus small override pieces from ``configs/tables/``. A stage is defined by one builder method, so a
stage that several tables share (the DCCF embeddings, the default codebook, the "Ours" LLM) has the same name,
configs and arguments in every table's pipeline file, and ``semconv pipeline`` skips it once it is done. Every
artifact of a table run lives under ``<run_dir>/artifacts/<stage>``, so variant codebooks never overwrite the
shipped ``artifacts/<dataset>/...`` directories or each other. The stages themselves: experiments/table_stages.py.

Table 1 also runs the generative baselines of issue 25 from their shipped configs: P5 (``p5.yaml``), LC-Rec (its
own RQ-VAE codebook ``codebook_lcrec``, then ``lcrec.yaml``; on Games the dataset's published LC-Rec index) and
TIGER (``tiger.yaml`` on the default codebook; not in the paper). A seed (``build_table(seed=S)``) gives every
lightning stage ``--seed_everything S`` and its own ``run_dir`` (``runs/reproduce/<dataset>/seed<S>``).
"""

from __future__ import annotations

import re

from datamodules.errors import ConfigError
from experiments.paper_numbers import FOUR, FULL, PAPER
from experiments.table_stages import DATASETS, REPO, DatasetSpec, Row, StageBuilder, Table
from lightning_modules.pipeline_spec import Stage

TABLES = (1, 3, 4, 5, 6, 7, 8)


def catalogue_size(dataset: DatasetSpec) -> int:
    """Number of items of the dataset's catalogue (Table 5's C=1 row gives every item its own code)."""
    data = dataset.value(dataset.codebook, "data", "init_args") or {}
    if data.get("source") == "synthetic":
        from datamodules.synthetic import SyntheticSpec

        return SyntheticSpec(**(data.get("synthetic") or {})).num_items
    from datamodules.catalogue import load_lcrec

    directory = REPO / data["data_dir"]
    if not directory.is_dir():
        raise ConfigError(
            f"{dataset.codebook}: data.init_args.data_dir {data['data_dir']} does not exist (resolved to {directory});"
            " Table 5's C=1 row needs the catalogue size. Put the dataset there or run another table."
        )
    return load_lcrec(directory, data["dataset"]).num_items


def slug(name: str) -> str:
    """A stage-name-safe form of a row label (``Llama-2-7B`` -> ``llama_2_7b``)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _shipped(dataset: DatasetSpec, path: str, section: str, key: str, default: int) -> int:
    value = dataset.value(path, section, "init_args", key)
    return default if value is None else int(value)  # None: the module's default


MODELS = {  # a Table 1 row's shipped config, configs/<dataset>/<model>.yaml
    "SASRec": "sasrec",
    "BERT4Rec": "bert4rec",
    "FMLP-Rec": "fmlp",
    "P5": "p5",
    "LC-Rec": "lcrec",
    "TIGER": "tiger",
    "most popular": "most_popular",
}


def _row(b: StageBuilder, label: str, stage: Stage | None) -> Row:
    """A row of ``stage``; a missing stage is a dataset without the row's shipped config."""
    missing = f"not run (no configs/{b.dataset.name}/{MODELS.get(label)}.yaml)"
    return Row(label, stage and stage.name, note=None if stage else missing)


def _generative_note(b: StageBuilder, stages: dict[str, Stage | None]) -> str:
    """What the P5, LC-Rec and TIGER rows run, and which budget (``--steps`` caps only the LLM stage-3 runs)."""
    name, parts = b.dataset.name, []
    if stages.get("P5"):
        parts.append(f"P5: `configs/{name}/p5.yaml` (item ids computed in its setup)")
    lcrec = stages.get("LC-Rec")
    if lcrec and "--data.init_args.index" not in lcrec.args:  # Games: LC-Rec's published index
        parts.append(f"LC-Rec: `configs/{name}/lcrec.yaml` on the dataset's own LC-Rec index (a stage-3 LLM run)")
    elif lcrec:
        own = b.dataset.config("codebook_lcrec")  # else synthetic's recipe: no item text embedding there
        source = f"`{own}`" if own else f"`{b.dataset.codebook}` + `ed.yaml` + Sinkhorn mapping, over DCCF"
        parts.append(f"LC-Rec: `codebook_lcrec` ({source}), then `configs/{name}/lcrec.yaml` (a stage-3 LLM run)")
    if stages.get("TIGER"):
        parts.append(
            f"TIGER (not in the paper, so no paper number): `configs/{name}/tiger.yaml` on this run's default "
            "`codebook`"
        )
    budget = "P5 and TIGER train for their shipped budgets (`--steps` caps the LLM stage-3 runs only)"
    wall = "wall time: the row's own stage (without the codebook stage it reads)"
    return "; ".join([*parts, budget, wall]) + "."


def _table1(b: StageBuilder, table: Table) -> None:
    b.ours()  # first: the run order of the shared stages (tiny Llama, DCCF, codebook, Ours) as in every table
    builders = {"DCCF": b.dccf, "P5": b.p5, "LC-Rec": b.lcrec, "TIGER": b.tiger, "Ours": b.ours}
    stages: dict[str, Stage | None] = {}
    for label in ("SASRec", "BERT4Rec", "FMLP-Rec", "DCCF", "P5", "LC-Rec", "TIGER", "most popular", "Ours"):
        stages[label] = builders[label]() if label in builders else b.baseline(MODELS[label], label)
        table.rows.append(_row(b, label, stages[label]))
    table.notes.append(_generative_note(b, stages))


def _negatives(b: StageBuilder, ratio: int) -> Stage:
    if ratio == _shipped(b.dataset, b.dataset.llm[0], "data", "negative_ratio", 3):
        return b.ours()
    return b.llm(f"llm_neg{ratio}", f"negatives 1:{ratio}", b.codebook(), (f"negative_ratio_{ratio}",))


def _table3(b: StageBuilder, table: Table) -> None:
    ours = b.ours()
    ed = b.llm("llm_rqvae", "ED", b.codebook("_rqvae", ("ed",)))
    codebook = b.codebook_without_la()
    shared = codebook.name == "codebook"
    no_la = ours if shared else b.llm("llm_no_la", "w/o LA", codebook)
    note = f"= Ours: {b.dataset.codebook} has no LLM alignment loss" if shared else None
    table.rows += [Row("ED", ed.name), Row("w/o LA", no_la.name, note=note)]
    table.rows += [Row("w/o NS", _negatives(b, 0).name), Row("Ours", ours.name)]
    table.notes.append(
        "ED: `configs/tables/ed.yaml` (encoder/decoder tokenizer, `variant: rqvae`); w/o LA: `wo_la.yaml` "
        "(`llm_alignment_weight: 0`); w/o NS: `negative_ratio_0.yaml`; each on the shipped stage configs."
    )


def _table4(b: StageBuilder, table: Table) -> None:
    table.rows += [Row(f"1:{ratio}", _negatives(b, ratio).name, x=ratio) for ratio in range(6)]


def _table5(b: StageBuilder, table: Table) -> None:
    shipped = _shipped(b.dataset, b.dataset.codebook, "model", "num_levels", 4)
    for levels in range(1, 6):
        if levels == shipped:
            codebook, llm = b.codebook(), b.ours()
        else:
            size = ("--model.init_args.codebook_size", str(catalogue_size(b.dataset))) if levels == 1 else ()
            codebook = b.codebook(f"_levels{levels}", (f"levels_{levels}",), size)
            llm = b.llm(f"llm_levels{levels}", f"levels {levels}", codebook)
        table.rows.append(Row(str(levels), llm.name, codebook=codebook.name, x=levels))
    table.notes.append(
        "C=1: one level with `codebook_size` = the number of items (`levels_1.yaml` plus the catalogue size), i.e. "
        "one token per item as in the paper. CR: raw collision rate of the stage-2 codes before resolution (the "
        "index manifest's `raw_collision_rate`; the exported index is collision-free). T: code tokens added to the "
        "LLM (L x K, plus an extra disambiguation level if one was needed)."
    )


def _table6(b: StageBuilder, table: Table, model_dirs: dict[str, str]) -> None:
    codebook = b.codebook()
    given = {slug(name): name for name in model_dirs}
    base = tuple(dict.fromkeys((*b.dataset.llm, "configs/trainer/gpu.yaml")))  # GPU trainer once
    for name, directory in model_dirs.items():
        label = next((paper for paper in PAPER[6] if slug(paper) == slug(name)), name)
        args = ("--model.init_args.model_path", directory)
        stage = b.llm(f"llm_scale_{slug(name)}", label, codebook, ("pretrained_lora",), args, base=base)
        table.rows.append(Row(label, stage.name))
    hint = "not run (pass --model-dir NAME=DIR)"
    table.rows += [Row(paper, None, note=hint) for paper in PAPER[6] if slug(paper) not in given]
    table.notes.append(
        "Each row: the stage-3 config + `configs/tables/pretrained_lora.yaml` + `configs/trainer/gpu.yaml` with "
        "`--model.init_args.model_path DIR`, on the default codebook."
    )


def _table7(b: StageBuilder, table: Table) -> None:
    for layers in (2, 3):
        stage = b.llm(f"llm_mlp{layers}", f"code init mlp{layers}", b.codebook(), (f"code_init_mlp{layers}",))
        table.rows.append(Row(f"{layers}-layer", stage.name))
    table.rows.append(Row("Ours", b.ours().name, note="code_embedding_init: random"))


def _table8(b: StageBuilder, table: Table) -> None:
    ours, codebook = b.ours(), b.codebook_without_la()
    behaviour = b.llm("llm_behaviour", "behaviour only", codebook, ("behaviour_only",))
    stages = {"P5": b.p5(), "LC-Rec": b.lcrec()}  # the stages of Table 1's rows
    table.rows += [Row("DCCF", b.dccf().name), _row(b, "P5", stages["P5"]), _row(b, "LC-Rec", stages["LC-Rec"])]
    table.rows += [Row("Ours", behaviour.name), Row("Ours w/ T", ours.name)]
    tokenizer = "`wo_la.yaml`" if codebook.name != "codebook" else f"the shipped `{b.dataset.codebook}`"
    table.notes.append(
        f"Ours: sequential + negative tasks only (`behaviour_only.yaml`) on a codebook without LLM alignment "
        f"({tokenizer}); Ours w/ T: every task on the shipped codebook (the Ours row of Tables 3-5, 7)."
    )
    table.notes.append(_generative_note(b, stages))


def run_dir_of(dataset: str, seed: int | None = None) -> str:
    """The run directory every table of a dataset shares; one per seed, so seeds never share stage records."""
    return f"runs/reproduce/{dataset}" + ("" if seed is None else f"/seed{seed}")


TITLES = {
    1: ("Table 1: main comparison", "model"),
    3: ("Table 3: ablation", "variant"),
    4: ("Table 4: negative sampling ratio", "NSR"),
    5: ("Table 5: number of codebooks (code levels)", "C"),
    6: ("Table 6: model scale", "model"),
    7: ("Table 7: code-embedding initialisation", "method"),
    8: ("Table 8: behaviour-only training", "method"),
}


def build_table(
    number: int,
    dataset: str,
    run_dir: str | None = None,
    steps: int | None = None,
    llm_path: str | None = None,
    model_dirs: dict[str, str] | None = None,
    seed: int | None = None,
) -> Table:
    """The rows and stages of one table on one dataset.

    Args:
        number: the paper's table number (1, 3, 4, 5, 6, 7 or 8).
        dataset: a key of :data:`DATASETS`.
        run_dir: the pipeline's run directory (default :func:`run_dir_of`).
        steps: optimiser steps per stage-3 LLM run (None: the shipped budget).
        llm_path: a local LLM directory for stages 2-3 (required on Games, whose stage-3 config is for Llama-7B).
        model_dirs: Table 6's rows, ``{name: local model directory}``.
        seed: ``--seed_everything`` (and DataModule ``seed``) of every lightning stage; None: the configs' own.

    Raises:
        ConfigError: an unknown table or dataset, or a bad ``steps`` or ``seed``.
    """
    if number not in TABLES:
        raise ConfigError(
            f"--table {number}: not a table this script reproduces; choose one of {', '.join(map(str, TABLES))} "
            "(Table 2 is the datasets' statistics, logged by every run at setup)."
        )
    if dataset not in DATASETS:
        raise ConfigError(
            f"--dataset {dataset}: unknown; choose one of {', '.join(DATASETS)} (their shipped stage configs are "
            "configs/<dataset>/{dccf,codebook}.yaml and a stage-3 config)."
        )
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps {steps}: must be >= 1 (optimiser steps per stage-3 run), or left out.")
    if seed is not None and not 0 <= seed < 2**32:
        raise ConfigError(f"--seed {seed}: must be in [0, 2**32) (a seed_everything value), or left out.")
    spec = DATASETS[dataset]
    run_dir = run_dir or run_dir_of(dataset, seed)
    builder = StageBuilder(spec, run_dir, steps, llm_path, seed)
    title, header = TITLES[number]
    metrics = FULL if number == 1 else FOUR
    table = Table(number, title, spec, run_dir, [], [], metrics, PAPER[number], header, seed=seed)
    if number == 6:
        _table6(builder, table, dict(model_dirs or {}))
    else:
        {1: _table1, 3: _table3, 4: _table4, 5: _table5, 7: _table7, 8: _table8}[number](builder, table)
    table.stages = list(builder.stages.values())
    table.llm_stages = frozenset(builder.llm_stages)
    return table
