"""Shared fixtures: seeded synthetic data in LC-Rec format, the shared real data, tiny config runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.synthetic import SyntheticSpec, write_synthetic
from lightning_modules.components.tiny_tokenizer import write_tiny_tokenizer

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


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """Directory of :func:`write_tiny_tokenizer`'s tokenizer, written once per session."""
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))
