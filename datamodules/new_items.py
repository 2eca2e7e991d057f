"""New items for cold start: LC-Rec ``item.json`` entries of items the catalogue does not have yet.

A new-items file is the same object as ``<Name>.item.json``, for ids after the catalogue's::

    {"3527": {"title": "...", "description": "..."}, "3528": {...}}

Ids must continue the catalogue's numbering (``num_items``, ``num_items + 1``, ...) with no gap: cold start gives
new items the next ids of the index, and an id the catalogue already has names another item.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from datamodules.catalogue import DataFormatError, _read_json
from datamodules.llm_embeddings import item_texts


@dataclass
class NewItems:
    """New items to code: ids ``first_id ..``, their text and/or behaviour embeddings, and their codebook input."""

    first_id: int
    inputs: torch.Tensor
    texts: list[str] | None = None
    embeddings: torch.Tensor | None = None
    text_features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.inputs)


def read_new_items(path: str | Path, num_items: int, fields: list[str]) -> list[str]:
    """Texts of the new items of ``path`` in id order (``""``: an item without text), ids checked."""
    path = Path(path)
    field = "data.init_args.cold_start_items"
    if not path.is_file():
        raise DataFormatError(f'{field}: {path} not found (new item.json entries: {{"<id>": {{"title": ...}}}}).')
    raw = _read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise DataFormatError(
            f'{path}: expected a non-empty object {{"<item id>": {{"title": ..., "description": ...}}}}.'
        )
    try:
        ids = sorted(int(key) for key in raw)
    except ValueError:
        bad = next(key for key in raw if not key.lstrip("-").isdigit())
        raise DataFormatError(f"{path}: item id {bad!r} is not an integer.") from None
    clash = [item for item in ids if item < num_items]
    if clash:
        raise DataFormatError(
            f"{path}: new item {clash[0]} clashes with a catalogue item (the catalogue has ids 0..{num_items - 1}); "
            f"number new items from {num_items}."
        )
    expected = list(range(num_items, num_items + len(ids)))
    if ids != expected:
        gap = next(item for item, want in zip(ids, expected, strict=True) if item != want)
        raise DataFormatError(
            f"{path}: new item ids must be {num_items}..{expected[-1]} with no gap (item {gap} breaks the sequence); "
            "cold start gives new items the index's next ids."
        )
    bad = [key for key, value in raw.items() if not isinstance(value, dict)]
    if bad:
        raise DataFormatError(f'{path}: item {bad[0]} must be an object like {{"title": ..., "description": ...}}.')
    records = {int(key) - num_items: value for key, value in raw.items()}
    return item_texts(records, len(ids), fields)
