"""The item index the LLM stage uses: every catalogue item as a unique tuple of code tokens.

Two inputs are accepted:

* a stage-2 ``code_index`` artifact (``callbacks.CodeIndexExporter``): ``index.json``, ``code_vectors.pt``,
  ``codebook.pt`` and ``manifest.json``, read through :func:`datamodules.artifacts.read_artifact` (file hashes,
  this dataset's fingerprint, no collisions); the tuples must agree with the manifest's ``L`` and ``K``;
* a bare LC-Rec ``<Name>.index.json`` (e.g. LC-Rec's own RQ-VAE codes). ``L`` is the tuple length and ``K``
  the largest code + 1.

Generated codes must identify one item, so a colliding index is an error. ``dedupe_collisions`` is the
explicit escape for peer indices that do collide (the shared Games / Industrial indices): it appends one
extra level that numbers the items sharing a tuple (``<d_0>``, ``<d_1>``, ...; every other item gets the
level's ``0`` code), the same convention as the stage-2 exporter's last-resort level, so tuples stay equal
length and the existing codes are untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.artifacts import read_artifact, sha256_file
from datamodules.catalogue import Catalogue, DataFormatError, _read_json
from datamodules.code_index import INDEX_FILE, KIND, codes_to_tokens, level_letter, shared_mask, tokens_to_codes
from datamodules.errors import ArtifactError

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
        code_vectors_path: ``code_vectors.pt`` of a stage-2 artifact (see :meth:`code_vectors`), else None.
        manifest: the stage-2 manifest, else None.
        deduplicated: number of items that got a non-zero code on an appended disambiguation level.
        catalogue_items: items ``0..catalogue_items-1`` are the catalogue's; rows beyond are cold-start items coded
            after training (no interactions), accepted for ``lightning predict`` only.
        base_index_hash: hash of the index without its cold-start items (see :func:`_base_hash`): what a model
            trained on it is fingerprinted with, so the cold-start items' codes can change or grow after training.
    """

    codes: np.ndarray
    num_levels: int
    codebook_size: int
    source: str
    index_hash: str
    code_vectors_path: str | None = None
    manifest: dict[str, Any] | None = None
    deduplicated: int = 0
    catalogue_items: int | None = None
    base_index_hash: str | None = None

    @property
    def new_items(self) -> int:
        """Cold-start items after the catalogue's (0 for an index of the catalogue alone)."""
        return 0 if self.catalogue_items is None else len(self.codes) - self.catalogue_items

    def cold_start_items(self) -> np.ndarray:
        """Sorted ids of the items coded by cold start (the manifest's ``cold_start`` records)."""
        records = (self.manifest or {}).get("cold_start") or []
        parts = [
            np.asarray(record["items"], dtype=np.int64)
            if "items" in record
            else np.arange(record["first_item"], record["last_item"] + 1, dtype=np.int64)
            for record in records
        ]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    @property
    def trained_index_hash(self) -> str:
        """The hash a model trained on this index's catalogue items carries (``base_index_hash`` when extended)."""
        return self.base_index_hash or self.index_hash

    def code_vectors(self) -> torch.Tensor:
        """``[L, K, dim]`` float32 stage-2 code vectors (code ``k`` of level ``l``), for code-row initialisation.

        Raises:
            ArtifactError: a bare ``index.json`` (no code vectors), or a file whose shape is not ``[L, K, dim]``.
        """
        if self.code_vectors_path is None:
            raise ArtifactError(
                f"{self.source} is a bare index without code vectors: point `data.init_args.index` at a stage-2 "
                "export directory (configs/*/codebook.yaml writes one), or use `code_embedding_init: random`."
            )
        vectors = torch.load(self.code_vectors_path, map_location="cpu", weights_only=True)
        shape = list(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        expected = [self.num_levels, self.codebook_size]
        if not isinstance(vectors, torch.Tensor) or vectors.dim() != 3 or shape[:2] != expected:
            raise ArtifactError(
                f"{self.code_vectors_path}: expected a [{self.num_levels}, {self.codebook_size}, dim] tensor, got "
                f"{shape}; rerun stage 2."
            )
        return vectors.float()

    @property
    def tokens_per_item(self) -> int:
        return int(self.codes.shape[1])

    def level_sizes(self) -> list[int]:
        """Codes per position: ``K`` for the quantiser levels, the used range for an extra level."""
        extra = [int(self.codes[:, level].max()) + 1 for level in range(self.num_levels, self.tokens_per_item)]
        return [self.codebook_size] * self.num_levels + extra

    def vocabulary(self) -> list[str]:
        """Every code token, level by level: the ``L x K`` quantiser tokens, then any extra-level tokens."""
        return [
            f"<{level_letter(level)}_{code}>" for level, size in enumerate(self.level_sizes()) for code in range(size)
        ]

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
        raise DataFormatError(
            f"{path}: index file not found. Set `data.init_args.index` to a stage-2 export directory or an LC-Rec "
            "index.json."
        )
    raw = _read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise DataFormatError(f'{path}: expected a non-empty JSON object {{"<item_idx>": ["<a_1>", ...]}}.')
    return raw


def _read_export(directory: Path, catalogue: Catalogue) -> tuple[dict[str, Any], int, int, str | None]:
    """Verify a stage-2 artifact against this catalogue; returns its manifest, ``L``, ``K`` and code-vector file."""
    fix = (
        "point `data.init_args.index` at the stage-2 export made from this dataset (configs/*/codebook.yaml), "
        "or rerun stage 2"
    )
    expected = {"dataset": catalogue.fingerprint(), "final_collision_rate": 0.0}
    artifact = read_artifact(directory, KIND, expected, fix)
    manifest = artifact.manifest
    for key in ("num_levels", "codebook_size"):
        if not isinstance(manifest.get(key), int) or manifest[key] < 1:
            raise ArtifactError(
                f"{directory / 'manifest.json'}: {key} missing or not a positive integer ({manifest.get(key)!r}); "
                f"{fix}."
            )
    vectors = str(artifact.file(manifest["code_vectors"])) if manifest.get("code_vectors") else None
    return manifest, manifest["num_levels"], manifest["codebook_size"], vectors


def _append_disambiguation_level(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """Number the items within each group sharing a tuple (item order); returns the new codes and the moved count."""
    _, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(inverse[order])) + 1]
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - np.repeat(starts, np.diff(np.r_[starts, len(codes)]))
    return np.concatenate([codes, rank[:, None]], axis=1), int((rank > 0).sum())


def _base_hash(raw: dict[str, list[str]], cold: np.ndarray) -> str:
    """Hash of an index without its cold-start items, serialised as the stage-2 exporter writes an index.

    ``callbacks.index_export`` writes ``json.dumps(index, ensure_ascii=False)`` (items in order) and cold start
    only adds items or re-codes cold-start ones: re-serialising the other entries gives back the training index's
    bytes exactly when their codes are unchanged (and the same bytes for every code source of the cold-start
    items), so equal hashes prove that a model was trained on these codes.
    """
    skip = set(cold.tolist())
    base = json.dumps({key: raw[key] for key in sorted(raw, key=int) if int(key) not in skip}, ensure_ascii=False)
    return hashlib.sha256(base.encode("utf-8")).hexdigest()


def load_item_index(
    path: str | Path | None, catalogue: Catalogue, dedupe_collisions: bool = False, new_items: bool = False
) -> ItemIndex:
    """Read, validate and (optionally) deduplicate the item index for ``catalogue``.

    Args:
        path: a stage-2 export directory, an LC-Rec ``index.json``, or None for the dataset's own ``<Name>.index.json``.
        catalogue: the dataset; every item ``0..num_items-1`` must have a code tuple.
        dedupe_collisions: append a disambiguating level instead of failing on shared tuples (see module docstring).
        new_items: accept a stage-2 export extended with cold-start items (``assign_codes``): items ``num_items..``
            with codes but no interactions, decoded and recommended by a model trained before they were coded.
            Their codes must use the code tokens of the catalogue's items (the trained model has no others).

    Raises:
        ArtifactError: a stage-2 artifact that is incomplete, edited, or written for other data or with collisions.
        DataFormatError: missing/malformed file, tuples that disagree with the manifest's L/K, items without
            codes, or collisions without ``dedupe_collisions``.
    """
    if path is None:
        path = Path(catalogue.source_dir) / f"{catalogue.name}.index.json"
    path = Path(path)
    manifest, vectors_path = None, None
    if path.is_dir():
        manifest, num_levels, codebook_size, vectors_path = _read_export(path, catalogue)
        index_file = path / INDEX_FILE
    else:
        index_file = path
    raw = _read_index_json(index_file)
    try:
        items, codes_t = tokens_to_codes(raw)
    except ValueError as err:
        raise DataFormatError(f"{index_file}: {err}. Code tokens must be <a_N>, <b_N>, ... level by level.") from None
    items, codes = items.numpy(), codes_t.numpy()
    num_items = catalogue.num_items
    extended = bool(new_items and manifest is not None and manifest.get("cold_start") and len(items) > num_items)
    extra_refused = len(items) > num_items and not extended
    if not np.array_equal(items, np.arange(len(items))) or len(items) < num_items or extra_refused:
        missing = np.setdiff1d(np.arange(num_items), items)[:5].tolist()
        raise DataFormatError(
            f"{index_file}: codes for {len(items)} items, the catalogue has {num_items} (ids 0..{num_items - 1}; "
            f"first missing: {missing}). Every item needs a code tuple: use the index built for this dataset"
            + (
                " (an index extended with cold-start items by assign_codes is read with `new_items=True`)."
                if len(items) > num_items
                else "."
            )
        )
    width = codes.shape[1]
    if manifest is None:
        num_levels, codebook_size = width, int(codes.max()) + 1
    else:
        expected = manifest.get("tokens_per_item", num_levels)
        if width != expected or width not in (num_levels, num_levels + 1):
            raise DataFormatError(
                f"{index_file}: tuples have {width} codes but the manifest says num_levels={num_levels}, "
                f"tokens_per_item={expected}. "
                "The index and manifest come from different exports; rerun stage 2."
            )
        too_big = codes[:, :num_levels].max()
        if too_big >= codebook_size:
            raise DataFormatError(
                f"{index_file}: code {int(too_big)} is outside the manifest's codebook_size={codebook_size}. The "
                "index and manifest "
                "come from different exports; rerun stage 2."
            )
    deduplicated = 0
    shared = shared_mask(torch.from_numpy(codes))
    if shared.any():
        first = np.flatnonzero(shared.numpy())[:2].tolist()
        if not dedupe_collisions:
            raise DataFormatError(
                f"{index_file}: {int(shared.sum())} items share a code tuple with another item (e.g. items {first}), "
                "so generated "
                "codes could not name one item. Use a collision-free stage-2 export, or set "
                "`data.init_args.dedupe_collisions: true` to append a disambiguating code level."
            )
        codes, deduplicated = _append_disambiguation_level(codes)
        log.warning(
            "%s: %d items shared a code tuple; appended level <%s_*> (%d items moved off code 0)",
            index_file,
            int(shared.sum()),
            level_letter(width),
            deduplicated,
        )
    for level in range(num_levels, codes.shape[1] if extended else num_levels):  # an extra level's size can grow
        if codes[num_items:, level].max() > codes[:num_items, level].max():
            raise DataFormatError(
                f"{index_file}: cold-start items use code "
                f"<{level_letter(level)}_{int(codes[num_items:, level].max())}>, "
                "which the catalogue's items do not, so a model trained on them has no such token; code the new "
                "items against this index again or retrain stage 3 on an index that has it."
            )
    index = ItemIndex(
        codes=codes,
        num_levels=num_levels,
        codebook_size=codebook_size,
        source=str(path.resolve()),
        index_hash=sha256_file(index_file),
        code_vectors_path=vectors_path,
        manifest=manifest,
        deduplicated=deduplicated,
        catalogue_items=num_items if extended else None,
    )
    cold = index.cold_start_items()
    return replace(index, base_index_hash=_base_hash(raw, cold)) if cold.size else index
