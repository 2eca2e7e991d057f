"""The catalogue: users' chronological interaction sequences plus optional item text and reviews.

Stored in CSR form (``offsets`` into one flat ``items`` array) so that every split and view is built with
vectorised numpy instead of per-user Python loops. Reads and writes the LC-Rec directory format::

    <Name>.inter.json   {"<user_idx>": [item_idx, ...]}      chronological, required
    <Name>.item.json    {"<item_idx>": {"title": ..., "description": ...}}   optional
    <Name>.index.json   {"<item_idx>": ["<a_12>", "<b_3>", ...]}             optional (read by datamodules.item_index)
    <Name>.review.json  {"<user_idx>": {"<item_idx>": "review text"}}         optional (query alignment)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.artifacts import atomic_write_json, sha256_files
from datamodules.errors import SemConvError

log = logging.getLogger(__name__)

#: Fewest interactions a user needs for leave-last-out: one history item, one validation and one test target.
MIN_SEQUENCE_LENGTH = 3


class DataFormatError(SemConvError):
    """Input data that cannot be used as given; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class DatasetStatistics:
    """The numbers of the paper's Table 2 for one dataset."""

    num_users: int
    num_items: int
    num_interactions: int
    mean_length: float
    long_user_share: float  # share of users with more than ``long_threshold`` interactions
    long_threshold: int = 20

    def as_dict(self) -> dict[str, float]:
        return {
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.num_interactions,
            "mean_length": round(self.mean_length, 3),
            f"long_users(>{self.long_threshold})": round(self.long_user_share, 4),
        }


@dataclass(frozen=True)
class Catalogue:
    """Users, items and the chronological interactions between them.

    Attributes:
        name: dataset name (the ``<Name>`` of the LC-Rec files).
        num_items: catalogue size; item ids are ``0 .. num_items - 1``.
        user_ids: original user index (the JSON key) of row ``u``.
        offsets: ``[num_users + 1]`` CSR offsets; user ``u``'s items are ``items[offsets[u]:offsets[u + 1]]``.
        items: flat chronological item ids.
        item_text: optional ``{item_id: {"title": str, "description": str, ...}}``.
        reviews: optional ``{(user_row, item_id): text}`` used as query text.
        content_hash: hash of the source files; stored in every downstream artifact's manifest.
    """

    name: str
    num_items: int
    user_ids: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    item_text: dict[int, dict[str, str]] | None = None
    reviews: dict[tuple[int, int], str] | None = None
    content_hash: str = ""
    source_dir: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the dataset in checkpoints and artifact manifests: name, content hash, item count."""
        return {"name": self.name, "content_hash": self.content_hash, "num_items": self.num_items}

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def pad_item(self) -> int:
        """Index used to pad item histories (one past the last real item)."""
        return self.num_items

    def sequence(self, user_row: int) -> np.ndarray:
        return self.items[self.offsets[user_row] : self.offsets[user_row + 1]]

    def statistics(self, long_threshold: int = 20) -> DatasetStatistics:
        lengths = self.lengths
        return DatasetStatistics(
            num_users=self.num_users,
            num_items=self.num_items,
            num_interactions=int(lengths.sum()),
            mean_length=float(lengths.mean()),
            long_user_share=float((lengths > long_threshold).mean()),
            long_threshold=long_threshold,
        )


def lcrec_paths(data_dir: str | Path, name: str) -> dict[str, Path]:
    data_dir = Path(data_dir)
    return {kind: data_dir / f"{name}.{kind}.json" for kind in ("inter", "item", "index", "review")}


def find_lcrec_name(data_dir: str | Path) -> str | None:
    """The ``<Name>`` of the single ``<Name>.inter.json`` in ``data_dir`` (None if there is none)."""
    candidates = sorted(Path(data_dir).glob("*.inter.json"))
    if len(candidates) > 1:
        names = ", ".join(path.name for path in candidates)
        raise DataFormatError(
            f"{data_dir} holds several interaction files ({names}); set `data.init_args.dataset` to the one to use."
        )
    return candidates[0].name[: -len(".inter.json")] if candidates else None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` object hook: a repeated key would silently keep only its last value, so it is an error."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return obj


def _read_json(path: Path) -> Any:
    """Parse an LC-Rec JSON file; malformed JSON and repeated keys are a :class:`DataFormatError` naming the file."""
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found. Check `data.init_args.data_dir` and `data.init_args.dataset`.")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle, object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise DataFormatError(
            f'{path}: key "{err.args[0]}" appears more than once in one object, so one of its values would be lost. '
            "Merge the entries under one key (or re-export the file)."
        ) from None
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno} ({err.msg}). "
            "Re-export the file or restore it from the source."
        ) from err
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err}). Re-export the file as UTF-8 JSON.") from err


def _int_key(path: Path, key: str, what: str) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise DataFormatError(
            f'{path}: key "{key}" is not an integer {what} index; keys must be "0", "1", ...'
        ) from None


def _parse_interactions(path: Path, raw: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not isinstance(raw, dict):
        raise DataFormatError(
            f'{path}: expected a JSON object {{"<user_idx>": [item_idx, ...]}}, got {type(raw).__name__}.'
        )
    if not raw:
        raise DataFormatError(
            f"{path}: the dataset is empty (no users). Point `data.init_args.data_dir` at a non-empty dataset."
        )
    keyed = sorted(((_int_key(path, key, "user"), key) for key in raw), key=lambda pair: pair[0])
    user_ids = np.fromiter((user for user, _ in keyed), dtype=np.int64, count=len(keyed))
    lengths = np.empty(len(keyed), dtype=np.int64)
    sequences = []
    for row, (_, key) in enumerate(keyed):
        sequence = raw[key]
        if not isinstance(sequence, list) or not all(type(item) is int for item in sequence):
            raise DataFormatError(
                f'{path}: user "{key}" must map to a list of integer item indices, got {str(sequence)[:80]}. '
                "Fix that user's entry (items as ints, chronological)."
            )
        lengths[row] = len(sequence)
        sequences.append(sequence)
    offsets = np.zeros(len(keyed) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    items = np.fromiter((item for sequence in sequences for item in sequence), dtype=np.int64, count=int(offsets[-1]))
    return user_ids, offsets, items


def _parse_item_text(path: Path, raw: Any) -> dict[int, dict[str, str]]:
    if not isinstance(raw, dict):
        raise DataFormatError(f'{path}: expected a JSON object {{"<item_idx>": {{"title": ..., "description": ...}}}}.')
    text = {}
    for key, value in raw.items():
        item = _int_key(path, key, "item")
        if not isinstance(value, dict):
            raise DataFormatError(f'{path}: item "{key}" must map to an object with "title"/"description" strings.')
        text[item] = {field_: str(value.get(field_) or "") for field_ in value}
    return text


def load_lcrec(data_dir: str | Path, name: str, min_length: int = MIN_SEQUENCE_LENGTH) -> Catalogue:
    """Load and validate an LC-Rec-format dataset directory.

    Args:
        data_dir: directory holding ``<name>.inter.json`` and optional item/index/review files.
        name: dataset name.
        min_length: fewest interactions per user (3 for leave-last-out).

    Raises:
        DataFormatError: naming the file, the offending field and the fix.
    """
    paths = lcrec_paths(data_dir, name)
    user_ids, offsets, items = _parse_interactions(paths["inter"], _read_json(paths["inter"]))
    item_text = _parse_item_text(paths["item"], _read_json(paths["item"])) if paths["item"].is_file() else None

    if item_text is not None:
        num_items = max(item_text) + 1 if item_text else 0
        if len(item_text) != num_items:
            missing = sorted(set(range(num_items)) - set(item_text))[:5]
            raise DataFormatError(
                f"{paths['item']}: item indices must be dense 0..N-1; missing {missing}. Re-index the items."
            )
        bound_source = f"{paths['item'].name} defines {num_items} items"
    else:
        num_items = int(items.max()) + 1 if len(items) else 0
        bound_source = "items are numbered from 0"
    bad = np.flatnonzero((items < 0) | (items >= num_items))
    if len(bad):
        row = int(np.searchsorted(offsets, bad[0], side="right") - 1)
        raise DataFormatError(
            f'{paths["inter"]}: user "{user_ids[row]}" has item index {int(items[bad[0]])} outside the catalogue '
            f"({bound_source}, valid indices 0..{num_items - 1}). Fix the interaction or add the item to the item file."
        )
    lengths = np.diff(offsets)
    short = np.flatnonzero(lengths < min_length)
    if len(short):
        raise DataFormatError(
            f"{paths['inter']}: {len(short)} user(s) have fewer than {min_length} interactions (first: user "
            f'"{user_ids[short[0]]}" with {int(lengths[short[0]])}); leave-last-out needs a history item, a '
            "validation and a test target. Filter them out (k-core) before training."
        )
    reviews = None
    if paths["review"].is_file():
        raw_reviews = _read_json(paths["review"])
        row_of_user = {int(user): row for row, user in enumerate(user_ids)}
        reviews = {
            (row_of_user[int(user)], int(item)): str(text)
            for user, by_item in raw_reviews.items()
            if int(user) in row_of_user
            for item, text in by_item.items()
        }
    hashed = [path for path in paths.values() if path.is_file()]
    return Catalogue(
        name=name,
        num_items=num_items,
        user_ids=user_ids,
        offsets=offsets,
        items=items,
        item_text=item_text,
        reviews=reviews,
        content_hash=sha256_files(hashed),
        source_dir=str(Path(data_dir).resolve()),
    )


def write_lcrec(
    out_dir: str | Path,
    name: str,
    sequences: dict[int, list[int]],
    item_text: dict[int, dict[str, str]] | None = None,
    reviews: dict[int, dict[int, str]] | None = None,
) -> dict[str, Path]:
    """Write a dataset in LC-Rec format (each file atomically). Returns the written paths."""
    paths = lcrec_paths(out_dir, name)
    written = {
        "inter": atomic_write_json(
            paths["inter"], {str(user): list(map(int, seq)) for user, seq in sequences.items()}, indent=None
        )
    }
    if item_text is not None:
        written["item"] = atomic_write_json(
            paths["item"], {str(item): text for item, text in item_text.items()}, indent=None
        )
    if reviews is not None:
        written["review"] = atomic_write_json(
            paths["review"],
            {str(user): {str(item): text for item, text in by_item.items()} for user, by_item in reviews.items()},
            indent=None,
        )
    return written
