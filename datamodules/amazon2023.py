"""Convert Amazon Reviews 2023 JSONL files into the LC-Rec directory format, in DuckDB, with LC-Rec's recipe.

Input (McAuley Lab's 2023 release): ``<Category>.jsonl[.gz]`` with one review per line (``user_id``,
``parent_asin``, ``timestamp`` in ms, ``rating``, ``title``, ``text``) and ``meta_<Category>.jsonl[.gz]``
(``parent_asin``, ``title``, ``description`` (list), ``features``, ``categories``, ``store``, ...).

The recipe and the output are those of :mod:`datamodules.amazon_raw` (the 2018 converter):

1. drop items without metadata: no meta line whose title is non-empty after :func:`clean_text`;
2. drop repeated (user, item) pairs, keeping the earliest (equal times: the earlier line of the file);
3. iterative ``user_k``/``item_k``-core until stable (the unique maximal core);
4. each user's interactions by time, equal times by line order (a deterministic tie-break);
5. users and items numbered densely by their sorted original id (byte order = Python's string order);
6. item text ``title``/``description``/``brand`` (the ``store``)/``categories``, review text ``title. text``
   per kept interaction for the query tasks, ``.item2id``/``.user2id`` and, last, ``manifest.json``.

DuckDB reads the JSONL (plain or gz) directly; steps 1-5 run in SQL on typed columns, spilling to a temporary
directory beyond ``memory_limit``, so tens of millions of reviews fit a 24 GiB machine. Only the surviving
items' and reviews' text passes through Python (for the same cleaning as the 2018 converter). DuckDB's own
messages about bad lines do not count blank lines, so on any bad input the file is rescanned in Python to name
the exact line and field.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from datamodules.amazon_raw import RawFiles, clean_text, finish_conversion, start_conversion
from datamodules.artifacts import atomic_write
from datamodules.catalogue import DataFormatError, write_lcrec

log = logging.getLogger(__name__)

#: Bump when the recipe changes so that converted directories are rebuilt.
CONVERTER_VERSION = "amazon2023/1"
_REVIEW_NAMES = ("{}.jsonl", "{}.jsonl.gz")
_META_NAMES = ("meta_{}.jsonl", "meta_{}.jsonl.gz")
_RAW_NAME = re.compile(r"^(?:meta_)?(?P<category>[^.]+)\.jsonl(?:\.gz)?$")
_HINT = "Download <Category>.jsonl.gz and meta_<Category>.jsonl.gz from the Amazon Reviews 2023 site"
_FIX_LINE = "Fix or delete that line (each line must be one JSON object), or re-download the file."
#: Required review fields and their SQL types; ``timestamp`` is milliseconds since the epoch.
REVIEW_COLUMNS = {"user_id": "VARCHAR", "parent_asin": "VARCHAR", "timestamp": "BIGINT"}


def fast_clean(value: str | None) -> str:
    """:func:`clean_text` of one string, faster on the usual text: without ``&`` or ``<`` there is no entity or tag,
    only whitespace to collapse, and ``str.split()`` splits on exactly the characters that ``\\s`` matches."""
    if value is None:
        return ""
    if "&" in value or "<" in value:
        return clean_text(value)
    return " ".join(value.split())


# ------------------------------------------------------------------------------------------ discovery
def _existing(data_dir: Path, patterns: tuple[str, ...], category: str) -> list[Path]:
    return [data_dir / p.format(category) for p in patterns if (data_dir / p.format(category)).is_file()]


def find_amazon2023_files(data_dir: str | Path, category: str | None = None, required: bool = False) -> RawFiles | None:
    """Locate ``<Category>.jsonl[.gz]`` and ``meta_<Category>.jsonl[.gz]`` in ``data_dir``.

    Args:
        data_dir: directory holding the downloaded files.
        category: the category; inferred when ``data_dir`` holds exactly one set.
        required: raise instead of returning None when nothing is found.

    Returns:
        The files (plain preferred over ``.gz``), or None.

    Raises:
        DataFormatError: reviews without meta (or meta without reviews), several categories, or nothing found
            while ``required``.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        if required:
            raise DataFormatError(f"{data_dir}: directory not found. {_HINT} into it.")
        return None
    if category is None:
        names = sorted({m["category"] for path in data_dir.iterdir() if (m := _RAW_NAME.match(path.name))})
        complete = [c for c in names if _existing(data_dir, _REVIEW_NAMES, c) and _existing(data_dir, _META_NAMES, c)]
        if len(complete) > 1 or (not complete and len(names) > 1):
            raise DataFormatError(
                f"{data_dir} holds Amazon 2023 files of several categories ({', '.join(complete or names)}); set "
                "`data.init_args.dataset` to the one to convert."
            )
        category = (complete or names or [None])[0]
    reviews = _existing(data_dir, _REVIEW_NAMES, category) if category else []
    metas = _existing(data_dir, _META_NAMES, category) if category else []
    if reviews and metas:
        return RawFiles(category, reviews[0], metas[0])
    if not reviews and not metas:
        if required:
            wanted = f"category {category!r}" if category else "any category"
            raise DataFormatError(f"{data_dir} holds no Amazon 2023 files for {wanted}. {_HINT} into it.")
        return None
    have = (reviews or metas)[0].name
    missing = f"meta_{category}.jsonl[.gz]" if reviews else f"{category}.jsonl[.gz]"
    raise DataFormatError(
        f"{data_dir}: found {have} but no {missing}. {_HINT}, or point `data.init_args.data_dir` at a directory "
        "with both."
    )


# ------------------------------------------------------------------------------------------ bad input
def _locate_bad_line(path: Path, fields: dict[str, str]) -> DataFormatError | None:
    """Rescan ``path`` in Python for the first malformed line or missing/mistyped field (the error path only)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    return DataFormatError(f"{path}: line {lineno} is not valid JSON ({err.msg}). {_FIX_LINE}")
                if not isinstance(record, dict):
                    kind = type(record).__name__
                    return DataFormatError(f"{path}: line {lineno} is a {kind}, not an object. {_FIX_LINE}")
                for field, sql_type in fields.items():
                    value = record.get(field)
                    if value is None or value == "":
                        return DataFormatError(
                            f'{path}: line {lineno} misses the required field "{field}". {_FIX_LINE}'
                        )
                    if sql_type == "BIGINT" and not _is_integer(value):
                        return DataFormatError(f'{path}: line {lineno}: "{field}" must be an integer. {_FIX_LINE}')
    except (OSError, EOFError, UnicodeDecodeError) as err:
        return DataFormatError(
            f"{path}: unreadable after line {lineno} ({err}). Re-download the file (truncated gzip or not UTF-8)."
        )
    return None


def _is_integer(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and float(value) == int(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def _scan(con: duckdb.DuckDBPyConnection, sql: str, path: Path, fields: dict[str, str]) -> None:
    """Run a statement that reads ``path``; a DuckDB read error becomes a DataFormatError naming the line."""
    try:
        con.execute(sql)
    except (duckdb.InvalidInputException, duckdb.IOException, duckdb.ConversionException) as err:
        located = _locate_bad_line(path, fields)
        raise located or DataFormatError(f"{path}: cannot be read as JSON lines ({err}). {_FIX_LINE}") from err


def _reader(path: Path, columns: dict[str, str]) -> str:
    """``read_json`` over one JSONL file, numbering records in file order (blank lines are not records)."""
    spec = ", ".join(f"'{name}': '{sql_type}'" for name, sql_type in columns.items())
    selected = ", ".join(f'"{name}"' for name in columns)
    source = str(path).replace("'", "''")
    return (
        f"SELECT {selected}, row_number() OVER () AS rec "
        f"FROM read_json('{source}', format='newline_delimited', columns={{{spec}}})"
    )


def _check_required(con: duckdb.DuckDBPyConnection, table: str, path: Path, fields: dict[str, str]) -> None:
    missing = " OR ".join(f'"{f}" IS NULL' + (f" OR \"{f}\" = ''" if t == "VARCHAR" else "") for f, t in fields.items())
    if con.execute(f"SELECT count(*) FROM {table} WHERE {missing}").fetchall()[0][0]:
        located = _locate_bad_line(path, fields)
        raise located or DataFormatError(f"{path}: a line misses one of {list(fields)}. {_FIX_LINE}")


# ------------------------------------------------------------------------------------------ the recipe
def _load(con: duckdb.DuckDBPyConnection, raw: RawFiles) -> int:
    """Tables ``r`` (every review's keys) and ``m`` (first titled meta line of each reviewed item).

    Returns:
        The number of reviews read.
    """
    _scan(con, f"CREATE TEMP TABLE r AS {_reader(raw.reviews, REVIEW_COLUMNS)}", raw.reviews, REVIEW_COLUMNS)
    _check_required(con, "r", raw.reviews, REVIEW_COLUMNS)
    meta_keys = {"parent_asin": "VARCHAR"}
    _scan(con, f"CREATE TEMP TABLE mm AS {_reader(raw.meta, {**meta_keys, 'title': 'VARCHAR'})}", raw.meta, meta_keys)
    _check_required(con, "mm", raw.meta, meta_keys)
    con.execute("""
        CREATE TEMP TABLE m AS
        SELECT parent_asin, min(rec) AS mrec FROM mm
        WHERE parent_asin IN (SELECT DISTINCT parent_asin FROM r) AND has_text(title)
        GROUP BY parent_asin""")
    con.execute("DROP TABLE mm")
    return con.execute("SELECT count(*) FROM r").fetchall()[0][0]


def _filter(con: duckdb.DuckDBPyConnection, raw: RawFiles, user_k: int, item_k: int) -> int:
    """Table ``kept``: items with metadata, each pair's earliest review, then the iterated k-core, with dense ids.

    Users and items get integer codes in sorted-id order before the k-core (its rounds join integers, not
    strings); the dense ids of the survivors are then their rank among the surviving codes.
    """
    con.execute("""
        CREATE TEMP TABLE pairs AS
        SELECT user_id, parent_asin, "timestamp", rec FROM r
        WHERE parent_asin IN (SELECT parent_asin FROM m)
        QUALIFY row_number() OVER (PARTITION BY user_id, parent_asin ORDER BY "timestamp", rec) = 1;
        DROP TABLE r;
        CREATE TEMP TABLE users AS
        SELECT user_id, (row_number() OVER (ORDER BY user_id))::INTEGER AS u FROM (SELECT DISTINCT user_id FROM pairs);
        CREATE TEMP TABLE items AS SELECT parent_asin, (row_number() OVER (ORDER BY parent_asin))::INTEGER AS i
        FROM (SELECT DISTINCT parent_asin FROM pairs);
        CREATE TEMP TABLE k AS
        SELECT u, i, "timestamp", rec FROM pairs JOIN users USING (user_id) JOIN items USING (parent_asin);
        DROP TABLE pairs""")
    size = con.execute("SELECT count(*) FROM k").fetchall()[0][0]
    while size:
        con.execute(
            """
            CREATE TEMP TABLE k_next AS SELECT * FROM k
            WHERE u IN (SELECT u FROM k GROUP BY u HAVING count(*) >= $user_k)
              AND i IN (SELECT i FROM k GROUP BY i HAVING count(*) >= $item_k)""",
            {"user_k": user_k, "item_k": item_k},
        )
        con.execute("DROP TABLE k; ALTER TABLE k_next RENAME TO k")
        size, before = con.execute("SELECT count(*) FROM k").fetchall()[0][0], size
        if size == before:
            break
    if not size:
        raise DataFormatError(
            f"{raw.reviews}: no interactions left after dropping items without a title in {raw.meta.name}, "
            f"repeated pairs and {user_k}/{item_k}-core filtering. Use a smaller user_k/item_k or a larger category."
        )
    con.execute("""
        CREATE TEMP TABLE kept AS
        SELECT dense_rank() OVER (ORDER BY u) - 1 AS uid, dense_rank() OVER (ORDER BY i) - 1 AS iid, *
        FROM k JOIN users USING (u) JOIN items USING (i)""")
    return size


def _sequences(con: duckdb.DuckDBPyConnection) -> tuple[dict[int, list[int]], list[str], list[str]]:
    """Chronological item ids per user, and the original user/item id of each dense id."""
    columns = con.execute('SELECT uid, iid FROM kept ORDER BY uid, "timestamp", rec').fetchnumpy()
    users, items = np.asarray(columns["uid"], dtype=np.int64), np.asarray(columns["iid"], dtype=np.int64)
    user_names = [row[1] for row in con.execute("SELECT DISTINCT uid, user_id FROM kept ORDER BY uid").fetchall()]
    item_names = [row[1] for row in con.execute("SELECT DISTINCT iid, parent_asin FROM kept ORDER BY iid").fetchall()]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=len(user_names)))]).tolist()
    flat = items.tolist()
    return {u: flat[offsets[u] : offsets[u + 1]] for u in range(len(user_names))}, user_names, item_names


def _json_list(value: str | None) -> Any:
    return json.loads(value) if value is not None else None


def _item_text(con: duckdb.DuckDBPyConnection, meta: Path) -> dict[int, dict[str, str]]:
    """Cleaned text of the kept items, from the meta line that qualified them."""
    columns = {"title": "VARCHAR", "description": "JSON", "store": "JSON", "categories": "JSON"}
    rows = con.execute(f"""
        SELECT i.iid, t.title, t.description, t.store, t.categories
        FROM ({_reader(meta, columns)}) t
        JOIN m ON t.rec = m.mrec JOIN (SELECT DISTINCT iid, parent_asin FROM kept) i USING (parent_asin)
        ORDER BY i.iid""").fetchall()
    text = {}
    for iid, title, description, store, categories in rows:
        groups = _json_list(categories) or []
        groups = [groups] if isinstance(groups, str) else groups  # a list of names; a bare string is one name
        names = [c for group in groups for c in (group if isinstance(group, list) else [group])]
        text[iid] = {
            "title": fast_clean(title),
            "description": clean_text(_json_list(description)),
            "brand": clean_text(_json_list(store)),
            "categories": ", ".join(dict.fromkeys(c for c in map(clean_text, names) if c)),  # dedupe, keep order
        }
    return text


def _reviews(con: duckdb.DuckDBPyConnection, path: Path, batch: int = 100_000) -> dict[int, dict[int, str]]:
    """Cleaned review text of the kept interactions, streamed in batches (the second pass over the reviews).

    The 2018 converter's rule, with the 2023 review ``title`` in the place of the 2018 ``summary``: both cleaned,
    joined by ". " (by " " when the title ends in ".", "!" or "?"); reviews with neither are left out.
    """
    con.execute(f"""
        SELECT k.uid, k.iid, t.title, t.text FROM ({_reader(path, {"title": "VARCHAR", "text": "VARCHAR"})}) t
        JOIN kept k USING (rec)""")  # streamed: no ORDER BY, which would hold all the text at once
    reviews: dict[int, dict[int, str]] = {}
    while rows := con.fetchmany(batch):
        for uid, iid, title, body in rows:
            title, body = fast_clean(title), fast_clean(body)
            if title and body:
                reviews.setdefault(uid, {})[iid] = f"{title} {body}" if title[-1] in ".!?" else f"{title}. {body}"
            elif title or body:
                reviews.setdefault(uid, {})[iid] = title or body
    return {uid: dict(sorted(reviews[uid].items())) for uid in sorted(reviews)}


def connect(memory_limit: str, threads: int | None, spill_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with bounded memory (spilling to ``spill_dir``) and the ``has_text`` title test."""
    config = {"memory_limit": memory_limit, "temp_directory": str(spill_dir)}
    if threads:
        config["threads"] = threads
    con = duckdb.connect(":memory:", config=config)
    # the 2018 converter's title test: non-empty after HTML unescaping, tag removal and stripping
    con.create_function("has_text", lambda value: bool(fast_clean(value)), ["VARCHAR"], "BOOLEAN")
    return con


# ------------------------------------------------------------------------------------------ entry point
def convert_amazon2023(
    raw_dir: str | Path,
    category: str,
    out_dir: str | Path,
    user_k: int = 5,
    item_k: int = 5,
    memory_limit: str = "8GB",
    threads: int | None = None,
) -> Path:
    """Convert one category's 2023 files into ``out_dir`` in LC-Rec format (skipped when already up to date).

    Args:
        raw_dir: directory with ``<Category>.jsonl[.gz]`` and ``meta_<Category>.jsonl[.gz]``.
        category: the category (the ``<Name>`` of the output files).
        out_dir: output directory; DuckDB spills to a temporary directory inside it.
        user_k: fewest interactions a user keeps after the core filter.
        item_k: fewest interactions an item keeps after the core filter.
        memory_limit: DuckDB's memory cap (beyond it, joins and sorts spill to disk).
        threads: DuckDB worker threads (default: DuckDB's, the number of cores).

    Returns:
        ``out_dir``.

    Raises:
        DataFormatError: missing files (e.g. no meta file), a malformed line or a missing field (file, line,
            field and fix), or nothing left after filtering.
    """
    if user_k < 1 or item_k < 1:
        raise ValueError(f"user_k and item_k must be >= 1, got {user_k}, {item_k}")
    raw = find_amazon2023_files(raw_dir, category, required=True)
    out_dir = Path(out_dir)
    expected = start_conversion(raw, category, out_dir, user_k, item_k, CONVERTER_VERSION)
    if expected is None:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    spill = tempfile.TemporaryDirectory(prefix=".duckdb-", dir=out_dir)
    with spill, connect(memory_limit, threads, spill.name) as con:
        reviews_read = _load(con, raw)
        log.info(
            "%s: %d reviews read, %d interactions left after the metadata, repeat and %d/%d-core filters",
            category,
            reviews_read,
            _filter(con, raw, user_k, item_k),
            user_k,
            item_k,
        )
        sequences, user_names, item_names = _sequences(con)
        item_text = _item_text(con, raw.meta)
        reviews = _reviews(con, raw.reviews)

    write_lcrec(out_dir, category, sequences, item_text, reviews)
    for kind, names in (("item2id", item_names), ("user2id", user_names)):
        atomic_write(
            out_dir / f"{category}.{kind}",
            lambda handle, names=names: handle.writelines(f"{n}\t{i}\n" for i, n in enumerate(names)),
        )
    counts = {"users": len(user_names), "items": len(item_names), "interactions": sum(map(len, sequences.values()))}
    return finish_conversion(raw, category, out_dir, expected, counts)
