"""Shared fixtures: seeded synthetic data in LC-Rec format, the shared real data, tiny config runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.synthetic import SyntheticSpec, write_synthetic

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "llama2"
CONFIGS = REPO / "configs"
TINY_SPEC = SyntheticSpec(num_users=300, num_items=120, num_categories=6, seed=3)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset (300 users, 120 items) written once per session."""
    return write_synthetic(tmp_path_factory.mktemp("synthetic"), TINY_SPEC)


def shared_dataset(name: str) -> Path:
    """Directory of a dataset in ../shared/data, skipping the test cleanly when it is absent."""
    path = SHARED_DATA / name
    if not (path / f"{name}.inter.json").is_file():
        pytest.skip(f"shared dataset {name} not available at {path}")
    return path


def shared_tokenizer() -> Path:
    """The real Llama-2 tokenizer directory in ../shared, skipping the test cleanly when it is absent."""
    if not (SHARED_TOKENIZER / "tokenizer.model").is_file():
        pytest.skip(f"shared tokenizer not available at {SHARED_TOKENIZER}")
    return SHARED_TOKENIZER


def write_inter(directory: Path, name: str, sequences: dict, item_text: dict | None = None) -> Path:
    """Write raw JSON (possibly invalid on purpose) as ``<name>.inter.json`` (and ``.item.json``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.inter.json").write_text(json.dumps(sequences))
    if item_text is not None:
        (directory / f"{name}.item.json").write_text(json.dumps(item_text))
    return directory


def tiny_run_args(config: str, data_dir: Path, root: Path, *extra: str) -> list[str]:
    """CLI arguments for a fast run of a shipped config on the tiny synthetic dataset."""
    return [
        "--config",
        str(CONFIGS / config),
        "--data.init_args.data_dir",
        str(data_dir),
        "--data.init_args.source",
        "lcrec",
        "--data.init_args.dataset",
        "Synthetic",
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]


TINY_TOKENIZER_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
    "### Instruction: ### Response: The user has interacted with items in chronological order. Can you predict the "
    "next possible item that the user may expect? Which item would the user like, title, description, category, "
    "not interested, recommend, purchase, history, query, search 0123456789 , . ? ! : ; ' \" ( ) - _ < > / & %"
)


def write_tiny_tokenizer(directory: Path) -> Path:
    """Save a small Llama-like fast tokenizer built in code (byte-level BPE, ~600 tokens) into ``directory``.

    It has ``<s>``/``</s>``/``<unk>`` and prepends ``<s>`` like Llama's, but no pad token (the LLM module adds one),
    so tests of the LLM stage run without the real tokenizer in ``../shared``. Byte-level: any text encodes. It is
    trained on the prompt templates, so their wording takes a few tokens as on Llama-2 and a prompt's length follows
    its history (what ``PromptTasks.approx_lengths`` assumes); item text falls back to short pieces and bytes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from datamodules import prompt_templates as templates

    wording = [templates.FRAME, *templates.SEQUENTIAL, *templates.NEGATIVE, *templates.QUERY]
    wording += [template for group, _, _ in templates.TEXT_KINDS for template in group]

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([TINY_TOKENIZER_TEXT, *wording] * 4, trainer=trainer)  # stops when no pair repeats
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """Directory of :func:`write_tiny_tokenizer`'s tokenizer, written once per session."""
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))
