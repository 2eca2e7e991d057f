"""Convert raw Amazon 2018 review files into the LC-Rec directory format with LC-Rec's preprocessing recipe.

The recipe follows LC-Rec (Zheng et al. 2023, ``data_process/amazon18_data_process.py``):

1. stream reviews (``reviewerID``, ``asin``, ``unixReviewTime``) and meta (``asin``, ``title``, ...), gz or plain;
2. drop items without metadata (no meta line with a non-empty cleaned title);
3. drop repeated (user, item) pairs, keeping the earliest (equal times: the earlier line in the file);
4. iterative k-core: users need ``user_k`` and items ``item_k`` interactions, repeated until stable (the result
   is the unique maximal k-core, so the order of removals does not matter);
5. sort each user's interactions by time, equal times by line order in the reviews file;
6. number users and items densely by their *sorted original id* (Python string order), so the ids depend only
   on which users/items survive, never on the line order of the raw files.

Text cleaning: ``html.unescape``, HTML tags replaced by a space, whitespace collapsed, stripped; list fields
(descriptions) are cleaned piecewise and joined with a space, categories joined with ", ".
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.artifacts import atomic_write, manifest_matches, sha256_files, write_manifest
from datamodules.catalogue import DataFormatError, lcrec_paths, write_lcrec
from datamodules.text import clean_text

log = logging.getLogger(__name__)

#: Bump when the recipe changes so that converted directories are rebuilt.
CONVERTER_VERSION = "amazon_raw/1"
#: Preference order when several review files exist: LC-Rec filters the full file itself.
_REVIEW_NAMES = ("{}.json", "{}.json.gz", "{}_5.json", "{}_5.json.gz")
_META_NAMES = ("meta_{}.json", "meta_{}.json.gz")
_RAW_NAME = re.compile(r"^(?:meta_)?(?P<category>[^.]+?)(?:_5)?\.json(?:\.gz)?$")
_NOT_RAW = {"manifest"}  # our own output, in case processed_dir == data_dir
_FIX_LINE = "Fix or delete that line (each line must be one JSON object), or re-download the file."


@dataclass(frozen=True)
class RawFiles:
    """The raw files of one Amazon category."""

    category: str
    reviews: Path
    meta: Path


# ------------------------------------------------------------------------------------------ discovery
_HINT = "Download <Category>.json.gz (or <Category>_5.json.gz) and meta_<Category>.json.gz from the Amazon 2018 site"


def _existing(data_dir: Path, patterns: tuple[str, ...], category: str) -> list[Path]:
    return [data_dir / p.format(category) for p in patterns if (data_dir / p.format(category)).is_file()]


def _infer_category(data_dir: Path, required: bool) -> str | None:
    """The one category with raw files in ``data_dir`` (complete sets win over stray partial ones)."""
    names = sorted({m["category"] for path in data_dir.iterdir() if (m := _RAW_NAME.match(path.name))} - _NOT_RAW)
    reviews = {c for c in names if _existing(data_dir, _REVIEW_NAMES, c)}
    metas = {c for c in names if _existing(data_dir, _META_NAMES, c)}
    complete, partial = sorted(reviews & metas), sorted(reviews | metas)
    if len(complete) > 1:
        raise DataFormatError(
            f"{data_dir} holds raw files of several categories ({', '.join(complete)}); set "
            "`data.init_args.dataset` to the one to convert."
        )
    if len(partial) > 1 and not complete:
        raise DataFormatError(
            f"{data_dir} holds incomplete raw sets for {', '.join(partial)}; each needs reviews and meta. {_HINT}."
        )
    if not partial and required:
        raise DataFormatError(f"{data_dir} holds no raw Amazon files. {_HINT} into it.")
    return (complete or partial or [None])[0]


def find_raw_files(data_dir: str | Path, category: str | None = None, required: bool = False) -> RawFiles | None:
    """Locate ``<Category>[_5].json[.gz]`` and ``meta_<Category>.json[.gz]`` in ``data_dir``.

    Args:
        data_dir: directory holding the raw files.
        category: the category; inferred when ``data_dir`` holds exactly one complete set.
        required: raise instead of returning None when nothing is found.

    Returns:
        The files (the full reviews file preferred over ``_5``, plain over ``.gz``), or None.

    Raises:
        DataFormatError: the set is incomplete (e.g. reviews without meta) or ambiguous, or nothing was found
            and ``required`` is set.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        if required:
            raise DataFormatError(f"{data_dir}: directory not found. {_HINT} into it.")
        return None
    category = category or _infer_category(data_dir, required)
    if category is None:
        return None
    reviews, metas = _existing(data_dir, _REVIEW_NAMES, category), _existing(data_dir, _META_NAMES, category)
    if reviews and metas:
        return RawFiles(category, reviews[0], metas[0])
    if not reviews and not metas:
        if required:
            raise DataFormatError(f"{data_dir} holds no raw files for category {category!r}. {_HINT} into it.")
        return None
    have, missing = (reviews[0].name, "meta_{}.json[.gz]") if reviews else (metas[0].name, "{}.json[.gz]")
    raise DataFormatError(
        f"{data_dir}: found {have} but no {missing.format(category)}. {_HINT}, or point `data.init_args.data_dir` "
        "at a directory with both."
    )


# ------------------------------------------------------------------------------------------ reading
def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, line)`` of a plain or gzipped text file, skipping blank lines."""
    lineno = 0
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if line.strip():
                    yield lineno, line
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataFormatError(
            f"{path}: unreadable after line {lineno} ({err}). Re-download the file (truncated gzip or not UTF-8)."
        ) from err


def _parse(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        try:  # several Amazon meta dumps hold Python dict literals rather than JSON
            record = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise DataFormatError(f"{path}: line {lineno} is not valid JSON ({err.msg}). {_FIX_LINE}") from None
    if not isinstance(record, dict):
        raise DataFormatError(f"{path}: line {lineno} is a {type(record).__name__}, not an object. {_FIX_LINE}")
    return record


def _required(path: Path, lineno: int, record: dict[str, Any], field: str) -> Any:
    value = record.get(field)
    if value is None or value == "":
        raise DataFormatError(f'{path}: line {lineno} misses the required field "{field}". {_FIX_LINE}')
    return value


def _read_reviews(path: Path) -> tuple[dict[str, int], dict[str, int], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stream the reviews into id codes (first appearance) and int arrays: user, item, time, line number."""
    user_code: dict[str, int] = {}
    item_code: dict[str, int] = {}
    users, items, times, lines = array("q"), array("q"), array("q"), array("q")  # 8 bytes per review, not a PyObject
    for lineno, line in _lines(path):
        record = _parse(path, lineno, line)
        user, item = str(_required(path, lineno, record, "reviewerID")), str(_required(path, lineno, record, "asin"))
        time = _required(path, lineno, record, "unixReviewTime")
        try:
            times.append(int(time))
        except (TypeError, ValueError):
            raise DataFormatError(f'{path}: line {lineno}: "unixReviewTime" must be an integer. {_FIX_LINE}') from None
        users.append(user_code.setdefault(user, len(user_code)))
        items.append(item_code.setdefault(item, len(item_code)))
        lines.append(lineno)
    return user_code, item_code, *(np.frombuffer(a, dtype=np.int64) for a in (users, items, times, lines))


def _item_text(record: dict[str, Any]) -> dict[str, str]:
    raw_categories = record.get("category", record.get("categories")) or []
    # 2018 dumps hold a list of names, 2014 dumps a list of paths (lists); a bare string is one name
    groups = [raw_categories] if isinstance(raw_categories, str) else raw_categories
    flat = [c for group in groups for c in (group if isinstance(group, list) else [group])]
    categories = list(dict.fromkeys(c for c in map(clean_text, flat) if c))  # dedupe, keep order
    return {
        "title": clean_text(record.get("title")),
        "description": clean_text(record.get("description")),
        "brand": clean_text(record.get("brand")),
        "categories": ", ".join(categories),
    }


def _read_meta(path: Path, wanted: dict[str, int]) -> dict[int, dict[str, str]]:
    """Cleaned text of the reviewed items that have a title (the first such line per asin wins)."""
    text: dict[int, dict[str, str]] = {}
    for lineno, line in _lines(path):
        record = _parse(path, lineno, line)
        code = wanted.get(str(_required(path, lineno, record, "asin")))
        if code is None or code in text:
            continue
        fields = _item_text(record)
        if fields["title"]:  # no title = no metadata, dropped as in LC-Rec
            text[code] = fields
    return text


def _review_text(record: dict[str, Any]) -> str:
    summary, body = clean_text(record.get("summary")), clean_text(record.get("reviewText"))
    if summary and body:
        return f"{summary} {body}" if summary[-1] in ".!?" else f"{summary}. {body}"
    return summary or body


# ------------------------------------------------------------------------------------------ recipe
def k_core(users: np.ndarray, items: np.ndarray, user_k: int, item_k: int) -> np.ndarray:
    """Mask of the interactions in the maximal (user_k, item_k)-core; one vectorised pass per round."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        user_count = np.bincount(users[keep], minlength=int(users.max(initial=-1)) + 1)
        item_count = np.bincount(items[keep], minlength=int(items.max(initial=-1)) + 1)
        new = keep & (user_count[users] >= user_k) & (item_count[items] >= item_k)
        if new.sum() == keep.sum():
            return keep
        keep = new


def _dense_ids(codes: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Renumber the surviving codes 0..n-1 in sorted-name order. Returns the new ids and the code of each id."""
    present = np.unique(codes).tolist()
    by_name = np.array(sorted(present, key=names.__getitem__), dtype=np.int64)
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[by_name] = np.arange(len(by_name))
    return remap[codes], by_name


def _write_ids(path: Path, names: list[str]) -> Path:
    return atomic_write(path, lambda handle: handle.writelines(f"{name}\t{idx}\n" for idx, name in enumerate(names)))


def _collect_reviews(path: Path, lines: np.ndarray, users: np.ndarray, items: np.ndarray) -> dict[int, dict[int, str]]:
    """Second pass over the reviews file: cleaned text of the kept lines only (not held in memory on pass one)."""
    order = np.argsort(lines)
    wanted, users, items = lines[order].tolist(), users[order].tolist(), items[order].tolist()
    reviews: dict[int, dict[int, str]] = {}
    pos = 0
    for lineno, line in _lines(path):
        if pos == len(wanted):
            break
        if lineno != wanted[pos]:
            continue
        if text := _review_text(_parse(path, lineno, line)):
            reviews.setdefault(users[pos], {})[items[pos]] = text
        pos += 1
    return {user: dict(sorted(reviews[user].items())) for user in sorted(reviews)}


def _filter(
    raw: RawFiles,
    meta: dict[int, dict[str, str]],
    users: np.ndarray,
    items: np.ndarray,
    times: np.ndarray,
    lines: np.ndarray,
    user_k: int,
    item_k: int,
) -> tuple[np.ndarray, ...]:
    """LC-Rec's filters in order: items with metadata, first of each repeated pair, then the k-core."""
    has_meta = np.zeros(int(items.max(initial=-1)) + 1, dtype=bool)
    has_meta[list(meta)] = True
    columns = [c[has_meta[items]] for c in (users, items, times, lines)]
    order = np.lexsort(columns[::-1])  # by user, item, time, line: each pair's earliest review first
    columns = [c[order] for c in columns]
    users, items = columns[:2]
    first = np.ones(len(users), dtype=bool)
    first[1:] = (users[1:] != users[:-1]) | (items[1:] != items[:-1])
    columns = [c[first] for c in columns]
    keep = k_core(columns[0], columns[1], user_k, item_k)
    if not keep.any():
        raise DataFormatError(
            f"{raw.reviews}: no interactions left after dropping items without a title in {raw.meta.name}, "
            f"repeated pairs and {user_k}/{item_k}-core filtering. Use a smaller user_k/item_k or a larger category."
        )
    return tuple(c[keep] for c in columns)


def convert_amazon_raw(
    raw_dir: str | Path, category: str, out_dir: str | Path, user_k: int = 5, item_k: int = 5
) -> Path:
    """Convert one category's raw files into ``out_dir`` in LC-Rec format (skipped when already up to date).

    Writes ``<Category>.inter/.item/.review.json``, ``<Category>.item2id``/``.user2id`` (``original_id<TAB>idx``)
    and, last, ``manifest.json`` with the raw files' hash, ``user_k``, ``item_k`` and the counts.

    Raises:
        DataFormatError: missing/incomplete raw files, a malformed line (file, line, field and fix), or nothing
            left after filtering.
    """
    if user_k < 1 or item_k < 1:
        raise ValueError(f"user_k and item_k must be >= 1, got {user_k}, {item_k}")
    raw = find_raw_files(raw_dir, category, required=True)
    out_dir = Path(out_dir)
    expected = start_conversion(raw, category, out_dir, user_k, item_k, CONVERTER_VERSION)
    if expected is None:
        return out_dir

    user_code, item_code, users, items, times, lines = _read_reviews(raw.reviews)
    meta = _read_meta(raw.meta, item_code)
    users, items, times, lines = _filter(raw, meta, users, items, times, lines, user_k, item_k)

    users, user_by_id = _dense_ids(users, user_names := list(user_code))
    item_ids, item_by_id = _dense_ids(items, item_names := list(item_code))
    order = np.lexsort((lines, times, users))  # chronological per user; equal times keep file order
    users, item_ids, lines = users[order], item_ids[order], lines[order]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=len(user_by_id)))]).tolist()
    flat = item_ids.tolist()
    sequences = {u: flat[offsets[u] : offsets[u + 1]] for u in range(len(user_by_id))}
    item_text = {idx: meta[code] for idx, code in enumerate(item_by_id.tolist())}

    write_lcrec(out_dir, category, sequences, item_text, _collect_reviews(raw.reviews, lines, users, item_ids))
    _write_ids(out_dir / f"{category}.item2id", [item_names[c] for c in item_by_id.tolist()])
    _write_ids(out_dir / f"{category}.user2id", [user_names[c] for c in user_by_id.tolist()])
    counts = {"users": len(user_by_id), "items": len(item_by_id), "interactions": len(flat)}
    return finish_conversion(raw, category, out_dir, expected, counts)


def start_conversion(
    raw: RawFiles, category: str, out_dir: Path, user_k: int, item_k: int, converter: str
) -> dict[str, Any] | None:
    """The manifest fields of converting ``raw`` into ``out_dir``, or None when ``out_dir`` already holds exactly
    that conversion. Otherwise the stale manifest is removed first, so it never vouches for half-rewritten files."""
    expected = {
        "converter": converter,
        "category": category,
        "raw_sha256": sha256_files([raw.reviews, raw.meta]),
        "user_k": user_k,
        "item_k": item_k,
    }
    outputs = [
        *(lcrec_paths(out_dir, category)[k] for k in ("inter", "item", "review")),
        out_dir / f"{category}.item2id",
        out_dir / f"{category}.user2id",
    ]
    if manifest_matches(out_dir, expected) and all(path.is_file() for path in outputs):
        log.info("%s: up to date with %s, not reconverting", out_dir, raw.reviews.name)
        return None
    (out_dir / "manifest.json").unlink(missing_ok=True)
    return expected


def finish_conversion(
    raw: RawFiles, category: str, out_dir: Path, expected: dict[str, Any], counts: dict[str, int]
) -> Path:
    """Write the manifest that marks ``out_dir`` a complete conversion (after every data file)."""
    if lcrec_paths(out_dir, category)["index"].is_file():
        log.warning(
            "%s: item codes predate this conversion and may not match the new item ids; regenerate them.",
            lcrec_paths(out_dir, category)["index"],
        )
    write_manifest(out_dir, {**expected, "raw_files": [raw.reviews.name, raw.meta.name], "counts": counts})
    log.info("%s: converted %s -> %s %s", category, raw.reviews.name, out_dir, counts)
    return out_dir
