"""The stages of experiments/tables.py: the datasets' shipped configs, and the builder that turns them into stages.

One builder method per stage name (see experiments/tables.py's docstring), so a stage that several tables share has
the same configs and arguments in every table's pipeline file. Every artifact of a table run goes under
``<run_dir>/artifacts/<stage>``; with a seed, every lightning stage also gets ``--seed_everything S`` (and
``--data.init_args.seed S`` when its DataModule takes a seed).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from lightning_modules.pipeline_spec import Stage

REPO = Path(__file__).resolve().parents[1]
PIECES = "configs/tables"


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
        tiny_tokenizer: a tokenizer directory that a ``python`` stage trains first, for stage-3 configs that build
            their LLM from a ``llama_config`` (its ``tokenizer_path``).
    """

    name: str
    title: str
    llm: tuple[str, ...]
    llm_gpu: bool = False
    tiny_llama: str | None = None
    tiny_tokenizer: str | None = None

    @property
    def dccf(self) -> str:
        return f"configs/{self.name}/dccf.yaml"

    @property
    def codebook(self) -> str:
        return f"configs/{self.name}/codebook.yaml"

    def config(self, model: str) -> str | None:
        """The shipped ``configs/<dataset>/<model>.yaml``, or None when the dataset has none."""
        path = f"configs/{self.name}/{model}.yaml"
        return path if (REPO / path).is_file() else None

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
    "synthetic": DatasetSpec(
        "synthetic", "synthetic", ("configs/synthetic/llm.yaml",), tiny_tokenizer="artifacts/synthetic/tokenizer"
    ),
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
    """A table's rows, the stages they need (in run order), the paper's numbers, and which stages are stage-3 LLM
    runs (the ones ``--steps`` caps); ``seed``: the ``--seed`` every lightning stage runs with (None: the configs')."""

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
    llm_stages: frozenset[str] = frozenset()
    seed: int | None = None

    @property
    def pipeline_name(self) -> str:
        return f"reproduce_table{self.number}_{self.dataset.name}"


@functools.cache
def takes_seed(class_path: str) -> bool:
    """Whether a DataModule (``datamodules.X``) has a ``seed`` argument (every RecDataModule has)."""
    module, _, name = class_path.rpartition(".")
    return "seed" in inspect.signature(getattr(importlib.import_module(module), name)).parameters


@functools.cache
def data_class(config: tuple[str, ...]) -> str | None:
    """The ``data.class_path`` a stacked config resolves to: the last file of the stack that names one."""
    found = None
    for path in config:
        node = yaml.safe_load((REPO / path).read_text(encoding="utf-8")) or {}
        found = (node.get("data") or {}).get("class_path") or found
    return found


class StageBuilder:
    """Builds the stages of one table; each stage name has exactly one definition (see the module docstring).

    Args:
        dataset: the dataset's shipped configs.
        run_dir: the pipeline's ``run_dir``, shared by every table of the dataset (and seed).
        steps: cap every stage-3 LLM run at this many optimiser steps (None: the shipped budget).
        llm_path: a local LLM directory for stage 3 (and for stage 2's LLM embeddings when the codebook config
            reads one); None keeps the configs' own.
        seed: ``--seed_everything`` (and the DataModule's ``seed``) of every lightning stage; None keeps the configs'.
    """

    def __init__(
        self, dataset: DatasetSpec, run_dir: str, steps: int | None, llm_path: str | None, seed: int | None = None
    ) -> None:
        self.dataset, self.run_dir, self.steps, self.llm_path, self.seed = dataset, run_dir, steps, llm_path, seed
        self.stages: dict[str, Stage] = {}  # in run order
        self.llm_stages: set[str] = set()  # the stage-3 LLM runs (what --steps caps)
        self.codebook_llm_path = dataset.value(dataset.codebook, "data", "init_args", "llm_path") is not None
        self.shipped_la = float(dataset.value(dataset.codebook, "model", "init_args", "llm_alignment_weight") or 0)
        data = dataset.value(dataset.dccf, "data", "init_args") or {}
        # generated data is keyed by the configs themselves; a data directory by its files
        self.data = () if data.get("source") == "synthetic" else (data["data_dir"],)

    def _seeded(self, stage: Stage) -> Stage:
        """The stage with the run's seed (a ``python`` stage keeps its own: the tiny Llama is seeded by itself)."""
        if self.seed is None or stage.command == "python":
            return stage
        args = ("--seed_everything", str(self.seed))
        data = data_class(stage.config)
        if data is not None and takes_seed(data):
            args += ("--data.init_args.seed", str(self.seed))
        return replace(stage, args=(*stage.args, *args))

    def _add(self, stage: Stage) -> Stage:
        stage = self._seeded(stage)
        if self.stages.setdefault(stage.name, stage) != stage:
            raise AssertionError(f"stage {stage.name!r} is defined twice with different settings")
        return stage

    def artifact(self, name: str) -> str:
        return f"{self.run_dir}/artifacts/{name}"

    def _from_scratch(self, name: str, out: str | None, script: str) -> tuple[str, ...]:
        """A ``python`` stage writing ``out`` for the configs that build their LLM in code (none when the dataset
        needs none, or ``--llm-path`` names a real LLM); returns the inputs it adds to later stages."""
        if out is None or self.llm_path is not None:
            return ()
        # its output is its artifact: a deleted or changed directory no longer matches the record and is rebuilt
        self._add(Stage(name, "python", args=("--out", out), artifact=out, script=script))
        return (out,)

    def tiny_llama(self) -> tuple[str, ...]:
        """The from-scratch LLM whose input embeddings align stage 2's codes and which stage 3 fine-tunes."""
        return self._from_scratch("tiny_llama", self.dataset.tiny_llama, "experiments/make_tiny_llama.py")

    def tiny_tokenizer(self) -> tuple[str, ...]:
        """The tokenizer of stage-3 configs that build their LLM from a ``llama_config``."""
        return self._from_scratch("tokenizer", self.dataset.tiny_tokenizer, "experiments/make_tiny_tokenizer.py")

    def dccf(self) -> Stage:
        """Stage 1: behaviour embeddings (tested too: the DCCF row of Tables 1 and 8)."""
        self.tiny_llama(), self.tiny_tokenizer()  # the python stages first, as the pipeline files list them
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
        codebook: Stage | None,
        pieces: tuple[str, ...] = (),
        args: tuple[str, ...] = (),
        base: tuple[str, ...] | None = None,
    ) -> Stage:
        """Stage 3 on ``codebook``'s index (None: the config's own, e.g. the dataset's published index), with override
        pieces; ``base`` replaces the dataset's stage-3 configs."""
        out = self.artifact(name)
        index = ("--data.init_args.index", codebook.artifact) if codebook is not None else ()
        args = (*index, "--trainer.callbacks.init_args.output_dir", out, *args)
        if self.llm_path is not None and base is None:
            args += ("--model.init_args.model_path", self.llm_path)
        if self.steps is not None:
            args += ("--trainer.max_time", "null", "--trainer.max_steps", str(self.steps))
        config = (*(base or self.dataset.llm), *(f"{PIECES}/{piece}.yaml" for piece in pieces))
        index_input = (codebook.artifact,) if codebook is not None else ()
        inputs = (*index_input, *self.tiny_llama(), *self.tiny_tokenizer(), *self.data)
        self.llm_stages.add(name)
        return self._add(Stage(name, "fit", config, args, inputs, out, row))

    def ours(self) -> Stage:
        """The paper's full method: the shipped stage-3 config on the shipped codebook."""
        return self.llm("llm", "Ours", self.codebook())

    def baseline(self, model: str, row: str) -> Stage | None:
        """A baseline's shipped config (``configs/<dataset>/<model>.yaml``), or None when the dataset has none."""
        path = self.dataset.config(model)
        if path is None:
            return None
        command = "test" if model == "most_popular" else "fit"  # nothing to train
        return self._add(Stage(model, command, (path,), (), self.data, None, row))

    def p5(self) -> Stage | None:
        """P5 (``configs/<dataset>/p5.yaml``) at its shipped budget; its item ids are computed in setup, so no
        earlier stage. Its tokenizer and ids go to the run's artifacts, not the shipped ``export_dir``."""
        path = self.dataset.config("p5")
        if path is None:
            return None
        args = ("--data.init_args.export_dir", self.artifact("p5"))
        return self._add(Stage("p5", "fit", (path,), args, self.data, None, "P5"))

    def tiger(self) -> Stage | None:
        """TIGER (``configs/<dataset>/tiger.yaml``) at its shipped budget, on this run's default codebook."""
        path = self.dataset.config("tiger")
        if path is None:
            return None
        codebook = self.codebook()
        args = ("--data.init_args.index", codebook.artifact)
        return self._add(Stage("tiger", "fit", (path,), args, (codebook.artifact, *self.data), None, "TIGER"))

    def codebook_lcrec(self) -> Stage:
        """LC-Rec's RQ-VAE tokenizer: ``configs/<dataset>/codebook_lcrec.yaml`` (over the LLM's text embeddings),
        else (synthetic: no item text embedding) the shipped codebook as an RQ-VAE with the Sinkhorn mapping over the
        behaviour embeddings, as ``configs/synthetic/lcrec.yaml``'s header runs it."""
        path = self.dataset.config("codebook_lcrec")
        if path is None:
            return self.codebook("_lcrec", ("ed",), ("--model.init_args.collision_mapping", "sinkhorn"))
        out = self.artifact("codebook_lcrec")
        llm_inputs = self.tiny_llama()  # the text embeddings' LLM (the config's llm_path)
        args: tuple[str, ...] = ("--trainer.callbacks.init_args.output_dir", out)
        if self.llm_path is not None:
            args += ("--data.init_args.llm_path", self.llm_path)
        return self._add(Stage("codebook_lcrec", "fit", (path,), args, (*llm_inputs, *self.data), out))

    def lcrec(self) -> Stage | None:
        """LC-Rec's stage 3 (``configs/<dataset>/lcrec.yaml``) on its own codebook (or on the dataset's published
        LC-Rec index when the config reads ``index: null``); an LLM run, so ``--steps`` caps it and ``--llm-path``
        replaces its model as it does Ours'. None when the dataset has no such config."""
        path = self.dataset.config("lcrec")
        if path is None:
            return None
        args = ("--model.init_args.model_path", self.llm_path) if self.llm_path is not None else ()
        # `index: null` is the dataset's own index: Games ships LC-Rec's published codes, so no tokenizer stage
        own_index = self.dataset.value(path, "data", "init_args", "index") is None
        codebook = None if own_index else self.codebook_lcrec()
        return self.llm("lcrec", "LC-Rec", codebook, args=args, base=(path,))
