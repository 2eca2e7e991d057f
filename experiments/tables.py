"""The paper's tables as pipeline stages: which stacked configs each row trains, and the paper's own numbers.

Every row is a chain of ordinary configs: a dataset's shipped stage configs (``configs/<dataset>/{dccf,codebook,
llm}.yaml``) plus small override pieces from ``configs/tables/``. A stage is defined by one builder method, so a
stage that several tables share (the DCCF embeddings, the default codebook, the "Ours" LLM) has the same name,
configs and arguments in every table's pipeline file, and ``semconv pipeline`` skips it once it is done. Every
artifact of a table run lives under ``<run_dir>/artifacts/<stage>``, so variant codebooks never overwrite the
shipped ``artifacts/<dataset>/...`` directories or each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datamodules.errors import ConfigError
from experiments.paper_numbers import FOUR, FULL, PAPER
from lightning_modules.pipeline_spec import Stage

REPO = Path(__file__).resolve().parents[1]
TABLES = (1, 3, 4, 5, 6, 7, 8)
PIECES = "configs/tables"
NOT_IN_FRAMEWORK = "not run (issue 25)"  # P5 and LC-Rec are not models of this framework yet


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset's shipped stage configs: ``configs/<name>/dccf.yaml``, ``codebook.yaml`` and the stage-3 ones.

    Attributes:
        name: the ``--dataset`` value (and the directory under ``configs/``).
        title: the dataset as the markdown names it.
        llm: stage-3 configs, stacked in order.
        llm_gpu: stage 3 runs on GPUs only (a 7B model); it also needs ``--llm-path`` (a placeholder model path).
        tiny_llama: a from-scratch LLM directory that a ``python`` stage writes first (its input embeddings
            align stage 2's codes, stage 3 fine-tunes it).
    """

    name: str
    title: str
    llm: tuple[str, ...]
    llm_gpu: bool = False
    tiny_llama: str | None = None

    @property
    def dccf(self) -> str:
        return f"configs/{self.name}/dccf.yaml"

    @property
    def codebook(self) -> str:
        return f"configs/{self.name}/codebook.yaml"

    def value(self, path: str, *keys: str) -> Any:
        """A nested value of a shipped config file (None when absent)."""
        node: Any = yaml.safe_load((REPO / path).read_text(encoding="utf-8"))
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node


DATASETS = {
    "industrial": DatasetSpec(
        "industrial",
        "Industrial_and_Scientific",
        ("configs/industrial/llm.yaml",),
        tiny_llama="artifacts/industrial/tiny_llama",
    ),
    "synthetic": DatasetSpec("synthetic", "synthetic", ("configs/synthetic/llm.yaml",)),
    "games": DatasetSpec("games", "Games", ("configs/llm/lora_7b.yaml", "configs/trainer/gpu.yaml"), llm_gpu=True),
}


@dataclass(frozen=True)
class Row:
    """A row: its label as the paper names it, the stage with its test metrics (None: not run, see ``note``), the
    stage-2 stage whose index gives its collision rate and token count (Table 5), and its abscissa in a plot."""

    label: str
    stage: str | None
    codebook: str | None = None
    note: str | None = None
    x: float | None = None


@dataclass
class Table:
    """A table's rows, the stages they need (in run order) and the paper's numbers."""

    number: int
    title: str
    dataset: DatasetSpec
    run_dir: str
    rows: list[Row]
    stages: list[Stage]
    metrics: tuple[str, ...]
    paper: dict[str, dict[str, Any]]
    row_header: str = "model"
    notes: list[str] = field(default_factory=list)

    @property
    def pipeline_name(self) -> str:
        return f"reproduce_table{self.number}_{self.dataset.name}"


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


class StageBuilder:
    """Builds the stages of one table; each stage name has exactly one definition (see the module docstring).

    Args:
        dataset: the dataset's shipped configs.
        run_dir: the pipeline's ``run_dir``, shared by every table of the dataset.
        steps: cap every stage-3 run at this many optimiser steps (None: the shipped budget).
        llm_path: a local LLM directory for stage 3 (and for stage 2's LLM embeddings when the codebook config
            reads one); None keeps the configs' own.
    """

    def __init__(self, dataset: DatasetSpec, run_dir: str, steps: int | None, llm_path: str | None) -> None:
        self.dataset, self.run_dir, self.steps, self.llm_path = dataset, run_dir, steps, llm_path
        self.stages: dict[str, Stage] = {}  # in run order
        self.codebook_llm_path = dataset.value(dataset.codebook, "data", "init_args", "llm_path") is not None
        self.shipped_la = float(dataset.value(dataset.codebook, "model", "init_args", "llm_alignment_weight") or 0)
        data = dataset.value(dataset.dccf, "data", "init_args") or {}
        # generated data is keyed by the configs themselves; a data directory by its files
        self.data = () if data.get("source") == "synthetic" else (data["data_dir"],)

    def _add(self, stage: Stage) -> Stage:
        if self.stages.setdefault(stage.name, stage) != stage:
            raise AssertionError(f"stage {stage.name!r} is defined twice with different settings")
        return stage

    def artifact(self, name: str) -> str:
        return f"{self.run_dir}/artifacts/{name}"

    def tiny_llama(self) -> tuple[str, ...]:
        """The from-scratch LLM stage when the dataset uses one; returns the inputs it adds to later stages."""
        if self.dataset.tiny_llama is None or self.llm_path is not None:
            return ()
        out = self.dataset.tiny_llama
        # its output is its artifact: a deleted or changed directory no longer matches the record and is rebuilt
        self._add(
            Stage("tiny_llama", "python", args=("--out", out), artifact=out, script="experiments/make_tiny_llama.py")
        )
        return (out,)

    def dccf(self) -> Stage:
        """Stage 1: behaviour embeddings (tested too: the DCCF row of Tables 1 and 8)."""
        self.tiny_llama()
        out = self.artifact("dccf")
        args = ("--trainer.callbacks.init_args.output_dir", out)
        return self._add(Stage("dccf", "fit", (self.dataset.dccf,), args, self.data, out, "DCCF"))

    def codebook(self, suffix: str = "", pieces: tuple[str, ...] = (), args: tuple[str, ...] = ()) -> Stage:
        """Stage 2 with override pieces (``configs/tables/<piece>.yaml``); ``suffix`` names the variant."""
        llm_inputs = self.tiny_llama()
        dccf = self.dccf()
        name, out = "codebook" + suffix, self.artifact("codebook" + suffix)
        args = ("--data.init_args.embeddings", dccf.artifact, "--trainer.callbacks.init_args.output_dir", out, *args)
        if self.llm_path is not None and self.codebook_llm_path:
            args += ("--data.init_args.llm_path", self.llm_path)
        # the paper's behaviour-only input first, so a piece can still turn text grounding back on
        config = (self.dataset.codebook, *(f"{PIECES}/{piece}.yaml" for piece in ("paper_input", *pieces)))
        inputs = (dccf.artifact, *llm_inputs, *self.data)
        return self._add(Stage(name, "fit", config, args, inputs, out))

    def codebook_without_la(self) -> Stage:
        """The codebook without the LLM alignment loss (Table 3's w/o LA, Table 8's behaviour-only codebook)."""
        return self.codebook("_no_la", ("wo_la",)) if self.shipped_la > 0 else self.codebook()

    def llm(
        self,
        name: str,
        row: str,
        codebook: Stage,
        pieces: tuple[str, ...] = (),
        args: tuple[str, ...] = (),
        base: tuple[str, ...] | None = None,
    ) -> Stage:
        """Stage 3 on ``codebook``'s index, with override pieces; ``base`` replaces the dataset's stage-3 configs."""
        out = self.artifact(name)
        args = ("--data.init_args.index", codebook.artifact, "--trainer.callbacks.init_args.output_dir", out, *args)
        if self.llm_path is not None and base is None:
            args += ("--model.init_args.model_path", self.llm_path)
        if self.steps is not None:
            args += ("--trainer.max_time", "null", "--trainer.max_steps", str(self.steps))
        config = (*(base or self.dataset.llm), *(f"{PIECES}/{piece}.yaml" for piece in pieces))
        inputs = (codebook.artifact, *self.tiny_llama(), *self.data)
        return self._add(Stage(name, "fit", config, args, inputs, out, row))

    def ours(self) -> Stage:
        """The paper's full method: the shipped stage-3 config on the shipped codebook."""
        return self.llm("llm", "Ours", self.codebook())

    def baseline(self, model: str, row: str) -> Stage | None:
        """A baseline's shipped config (``configs/<dataset>/<model>.yaml``), or None when the dataset has none."""
        path = f"configs/{self.dataset.name}/{model}.yaml"
        if not (REPO / path).is_file():
            return None
        command = "test" if model == "most_popular" else "fit"  # nothing to train
        return self._add(Stage(model, command, (path,), (), self.data, None, row))


def slug(name: str) -> str:
    """A stage-name-safe form of a row label (``Llama-2-7B`` -> ``llama_2_7b``)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _shipped(dataset: DatasetSpec, path: str, section: str, key: str, default: int) -> int:
    value = dataset.value(path, section, "init_args", key)
    return default if value is None else int(value)  # None: the module's default


def _table1(b: StageBuilder, table: Table) -> None:
    ours = b.ours()
    models = {"SASRec": "sasrec", "BERT4Rec": "bert4rec", "FMLP-Rec": "fmlp", "most popular": "most_popular"}
    baselines = {label: b.baseline(model, label) for label, model in models.items()}  # None: no shipped config
    for label in ("SASRec", "BERT4Rec", "FMLP-Rec", "DCCF", "P5", "LC-Rec", "most popular", "Ours"):
        stage = {"DCCF": b.dccf(), "Ours": ours}.get(label) or baselines.get(label)
        missing = f"not run (no configs/{b.dataset.name}/{models[label]}.yaml)" if label in models else None
        table.rows.append(Row(label, stage and stage.name, note=None if stage else missing or NOT_IN_FRAMEWORK))


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
    table.rows += [Row("DCCF", b.dccf().name), Row("P5", None, note=NOT_IN_FRAMEWORK)]
    table.rows += [Row("LC-Rec", None, note=NOT_IN_FRAMEWORK), Row("Ours", behaviour.name)]
    table.rows.append(Row("Ours w/ T", ours.name))
    tokenizer = "`wo_la.yaml`" if codebook.name != "codebook" else f"the shipped `{b.dataset.codebook}`"
    table.notes.append(
        f"Ours: sequential + negative tasks only (`behaviour_only.yaml`) on a codebook without LLM alignment "
        f"({tokenizer}); Ours w/ T: every task on the shipped codebook (the Ours row of Tables 3-5, 7)."
    )


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
) -> Table:
    """The rows and stages of one table on one dataset.

    Args:
        number: the paper's table number (1, 3, 4, 5, 6, 7 or 8).
        dataset: a key of :data:`DATASETS`.
        run_dir: the pipeline's run directory (default ``runs/reproduce/<dataset>``).
        steps: optimiser steps per stage-3 run (None: the shipped budget).
        llm_path: a local LLM directory for stages 2-3 (required on Games, whose stage-3 config is for Llama-7B).
        model_dirs: Table 6's rows, ``{name: local model directory}``.

    Raises:
        ConfigError: an unknown table or dataset, or a bad ``steps``.
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
    spec = DATASETS[dataset]
    run_dir = run_dir or f"runs/reproduce/{dataset}"
    builder = StageBuilder(spec, run_dir, steps, llm_path)
    title, header = TITLES[number]
    metrics = FULL if number == 1 else FOUR
    table = Table(number, title, spec, run_dir, [], [], metrics, PAPER[number], header)
    if number == 6:
        _table6(builder, table, dict(model_dirs or {}))
    else:
        {1: _table1, 3: _table3, 4: _table4, 5: _table5, 7: _table7, 8: _table8}[number](builder, table)
    table.stages = list(builder.stages.values())
    return table
