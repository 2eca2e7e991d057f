"""The item index the LLM stage uses: every catalogue item as a unique tuple of code tokens.

Two inputs are accepted:

* a stage-2 export directory (``callbacks.CodeIndexExporter``): ``index.json`` + ``codebook.pt`` +
  ``manifest.json``. The manifest must name this dataset's content hash, report no collisions, and agree with
  the tuples on the number of levels ``L`` and codes per level ``K``;
* a bare LC-Rec ``<Name>.index.json`` (e.g. LC-Rec's own RQ-VAE codes). ``L`` is the tuple length and ``K``
  the largest code + 1.

Generated codes must identify one item, so a colliding index is an error. ``dedupe_collisions`` is the
explicit escape for peer indices that do collide (the shared Games / Industrial indices): it appends one
extra level that numbers the items sharing a tuple (``<d_0>``, ``<d_1>``, ...; every other item gets the
level's ``0`` code), the same convention as the stage-2 exporter's last-resort level, so tuples stay equal
length and the existing codes are untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.artifacts import read_manifest, sha256_file
from datamodules.catalogue import Catalogue, DataFormatError, _read_json
from lightning_modules.components.code_index import codes_to_tokens, level_letter, shared_mask, tokens_to_codes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemIndex:
    """Code tuples of every catalogue item (row ``i`` = item ``i``).

    Attributes:
        codes: ``[num_items, T]`` integer codes; ``T`` is ``num_levels`` or ``num_levels + 1`` (extra level).
        num_levels: quantiser levels ``L``.
        codebook_size: codes per quantiser level ``K``.
        source: the directory or file the index was read from.
        index_hash: SHA-256 of the index file (stored with checkpoints and exports).
        codebook_path: ``codebook.pt`` of a stage-2 export (code vectors for embedding initialisation), else None.
        manifest: the stage-2 manifest, else None.
        deduplicated: number of items that got a non-zero code on an appended disambiguation level.
    """

    codes: np.ndarray
    num_levels: int
    codebook_size: int
    source: str
    index_hash: str
    codebook_path: str | None = None
    manifest: dict[str, Any] | None = None
    deduplicated: int = 0

    @property
    def tokens_per_item(self) -> int:
        return int(self.codes.shape[1])

    def level_sizes(self) -> list[int]:
        """Codes per position: ``K`` for the quantiser levels, the used range for an extra level."""
        extra = [int(self.codes[:, level].max()) + 1 for level in range(self.num_levels, self.tokens_per_item)]
        return [self.codebook_size] * self.num_levels + extra

    def vocabulary(self) -> list[str]:
        """Every code token, level by level: the ``L x K`` quantiser tokens, then any extra-level tokens."""
        return [f"<{level_letter(level)}_{code}>" for level, size in enumerate(self.level_sizes()) for code in range(size)]

    def tokens(self) -> list[list[str]]:
        """Per item, its code-token strings (the LC-Rec ``index.json`` values)."""
        return codes_to_tokens(torch.from_numpy(self.codes))

    def level_token_ids(self, token_to_id: dict[str, int]) -> np.ndarray:
        """``[T, max level size]`` token id of code ``c`` at position ``t`` (0 beyond a level's size)."""
        sizes = self.level_sizes()
        table = np.zeros((len(sizes), max(sizes)), dtype=np.int64)
        for level, size in enumerate(sizes):
            table[level, :size] = [token_to_id[f"<{level_letter(level)}_{code}>"] for code in range(size)]
        return table

    def token_ids(self, token_to_id: dict[str, int]) -> np.ndarray:
        """``[num_items, T]`` token ids of the items' codes (one table lookup, no per-item loop)."""
        return self.level_token_ids(token_to_id)[np.arange(self.tokens_per_item)[None, :], self.codes]


def _read_index_json(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise DataFormatError(f"{path}: index file not found. Set `data.init_args.index` to a stage-2 export directory or an LC-Rec index.json.")
    raw = _read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise DataFormatError(f'{path}: expected a non-empty JSON object {{"<item_idx>": ["<a_1>", ...]}}.')
    return raw


def _check_manifest(directory: Path, manifest: dict[str, Any], catalogue: Catalogue) -> tuple[int, int]:
    """Validate a stage-2 manifest against this catalogue; returns (L, K)."""
    problems = []
    if manifest.get("kind", "code_index") != "code_index":
        problems.append(f"kind is {manifest.get('kind')!r}, not 'code_index'")
    if manifest.get("content_hash") != catalogue.content_hash:
        problems.append(
            f"dataset hash {str(manifest.get('content_hash'))[:12]} (dataset {manifest.get('dataset')!r}) differs from this "
            f"catalogue's {catalogue.content_hash[:12]} ({catalogue.name!r}): the index was built for other data"
        )
    if float(manifest.get("final_collision_rate", 0.0)) != 0.0:
        problems.append(f"final collision rate is {manifest['final_collision_rate']}, must be 0")
    for key in ("num_levels", "codebook_size"):
        if not isinstance(manifest.get(key), int) or manifest[key] < 1:
            problems.append(f"{key} missing or not a positive integer ({manifest.get(key)!r})")
    if problems:
        raise DataFormatError(
            f"{directory / 'manifest.json'}: {'; '.join(problems)}. Point `data.init_args.index` at the stage-2 export "
            "made from this dataset (configs/*/codebook.yaml), or rerun stage 2."
        )
    return manifest["num_levels"], manifest["codebook_size"]


def _append_disambiguation_level(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """Number the items within each group sharing a tuple (item order); returns the new codes and the moved count."""
    _, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(inverse[order])) + 1]
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - np.repeat(starts, np.diff(np.r_[starts, len(codes)]))
    return np.concatenate([codes, rank[:, None]], axis=1), int((rank > 0).sum())


def load_item_index(path: str | Path | None, catalogue: Catalogue, dedupe_collisions: bool = False) -> ItemIndex:
    """Read, validate and (optionally) deduplicate the item index for ``catalogue``.

    Args:
        path: a stage-2 export directory, an LC-Rec ``index.json``, or None for the dataset's own ``<Name>.index.json``.
        catalogue: the dataset; every item ``0..num_items-1`` must have a code tuple.
        dedupe_collisions: append a disambiguating level instead of failing on shared tuples (see module docstring).

    Raises:
        DataFormatError: missing/malformed file, manifest mismatch (dataset hash, collisions, L/K), items without
            codes, or collisions without ``dedupe_collisions``.
    """
    if path is None:
        path = Path(catalogue.source_dir) / f"{catalogue.name}.index.json"
    path = Path(path)
    manifest, codebook_path = None, None
    if path.is_dir():
        manifest = read_manifest(path)
        num_levels, codebook_size = _check_manifest(path, manifest, catalogue)
        index_file = path / "index.json"
        codebook_path = str(path / "codebook.pt") if (path / "codebook.pt").is_file() else None
    else:
        index_file = path
    raw = _read_index_json(index_file)
    try:
        items, codes_t = tokens_to_codes(raw)
    except ValueError as err:
        raise DataFormatError(f"{index_file}: {err}. Code tokens must be <a_N>, <b_N>, ... level by level.") from None
    items, codes = items.numpy(), codes_t.numpy()
    if len(items) != catalogue.num_items or not np.array_equal(items, np.arange(catalogue.num_items)):
        missing = np.setdiff1d(np.arange(catalogue.num_items), items)[:5].tolist()
        raise DataFormatError(
            f"{index_file}: codes for {len(items)} items, the catalogue has {catalogue.num_items} (ids 0..{catalogue.num_items - 1}; "
            f"first missing: {missing}). Every item needs a code tuple: use the index built for this dataset."
        )
    width = codes.shape[1]
    if manifest is None:
        num_levels, codebook_size = width, int(codes.max()) + 1
    else:
        expected = manifest.get("tokens_per_item", num_levels)
        if width != expected or width not in (num_levels, num_levels + 1):
            raise DataFormatError(
                f"{index_file}: tuples have {width} codes but the manifest says num_levels={num_levels}, tokens_per_item={expected}. "
                "The index and manifest come from different exports; rerun stage 2."
            )
        too_big = codes[:, :num_levels].max()
        if too_big >= codebook_size:
            raise DataFormatError(
                f"{index_file}: code {int(too_big)} is outside the manifest's codebook_size={codebook_size}. The index and manifest "
                "come from different exports; rerun stage 2."
            )
    deduplicated = 0
    shared = shared_mask(torch.from_numpy(codes))
    if shared.any():
        first = np.flatnonzero(shared.numpy())[:2].tolist()
        if not dedupe_collisions:
            raise DataFormatError(
                f"{index_file}: {int(shared.sum())} items share a code tuple with another item (e.g. items {first}), so generated "
                "codes could not name one item. Use a collision-free stage-2 export, or set "
                "`data.init_args.dedupe_collisions: true` to append a disambiguating code level."
            )
        codes, deduplicated = _append_disambiguation_level(codes)
        log.warning(
            "%s: %d items shared a code tuple; appended level <%s_*> (%d items moved off code 0)",
            index_file, int(shared.sum()), level_letter(width), deduplicated,
        )
    return ItemIndex(
        codes=codes, num_levels=num_levels, codebook_size=codebook_size, source=str(path.resolve()),
        index_hash=sha256_file(index_file), codebook_path=codebook_path, manifest=manifest, deduplicated=deduplicated,
    )
