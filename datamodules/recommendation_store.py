"""The serving store: every user's pre-computed top-K, in versions published atomically.

A cache build writes a new version beside the one being served and switches the ``current`` pointer only when
every writer is done; readers resolve the pointer and the user's entry in one atomic read, so a lookup never mixes
versions and never sees a partial build. Two back ends share one interface:

* ``sqlite:///path/recommendations.sqlite`` (embedded default): WAL mode, batched upserts in transactions, the
  entries keyed by ``(version, user)``; the pointer switch and the pruning are one transaction.
* ``redis://host:port/db`` (at scale, :mod:`datamodules.redis_store`): pipelined writes, keys namespaced by version,
  the pointer swapped with MULTI/EXEC, old versions expired.

Users and items are original ids (strings). Each version carries its record (model artifact manifest hash,
dataset hash, K, item count, build time), the training-popularity fallback list and an optional title map.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from datamodules.errors import SemConvError

URL_FORMS = "sqlite:///path/to/recommendations.sqlite or redis://host:port/db"


class StoreError(SemConvError):
    """The store cannot serve as asked: no published version, a bad URL, an incompatible or discarded version."""


class KOutOfRange(StoreError):
    """A lookup asked for more items than the version caches, or fewer than one."""

    def __init__(self, k: int, limit: int, version: int) -> None:
        super().__init__(f"k must be between 1 and {limit} (the K cached in version {version}); got k={k}")
        self.k, self.limit = k, limit


@dataclass(frozen=True)
class VersionMeta:
    """What a build records about its inputs.

    Args:
        model_hash: SHA-256 of the model artifact's ``manifest.json`` (or of the checkpoint).
        dataset_hash: the catalogue's content hash.
        k: items cached per user.
        num_items: catalogue size.
        dataset: dataset name (informative).
        built_at: ISO-8601 UTC build start (now by default).
    """

    model_hash: str
    dataset_hash: str
    k: int
    num_items: int
    dataset: str = ""
    built_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        if self.k < 1:
            raise StoreError(f"VersionMeta.k must be >= 1, got {self.k}")


@dataclass(frozen=True)
class VersionRecord:
    """A version as stored: its meta, whether it is published, and how many users it holds."""

    version: int
    meta: VersionMeta
    published: bool
    num_users: int = 0
    published_at: str | None = None

    @property
    def k(self) -> int:
        return self.meta.k

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "published": self.published,
            "published_at": self.published_at,
            "num_users": self.num_users,
            **asdict(self.meta),
        }


class Lookup(NamedTuple):
    """One user's answer: ``k`` item ids with their scores, the version read, and whether it is the fallback."""

    items: list[str]
    scores: list[float]
    version: int
    fallback: bool


def encode_entry(items: Sequence[str], scores: Sequence[float]) -> str:
    return json.dumps([list(items), [float(score) for score in scores]], separators=(",", ":"))


def decode_entry(raw: str | bytes) -> tuple[list[str], list[float]]:
    items, scores = json.loads(raw)
    return items, scores


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _check_rows(
    users: Sequence[str], items: Sequence[Sequence[str]], scores: Sequence[Sequence[float]], k: int
) -> None:
    if not len(users) == len(items) == len(scores):
        raise StoreError(
            f"write(): {len(users)} users, {len(items)} item lists and {len(scores)} score lists; one each"
        )
    for user, row, row_scores in zip(users, items, scores, strict=False):
        if len(row) != len(row_scores) or len(row) > k:
            raise StoreError(
                f"write(): user {user!r} has {len(row)} items and {len(row_scores)} scores; "
                f"both must be equal and at most K={k}"
            )


class VersionWriter(ABC):
    """Writes one version; nothing of it is visible to readers until :meth:`publish`."""

    def __init__(self, version: int, meta: VersionMeta) -> None:
        self.version, self.meta = version, meta

    @abstractmethod
    def write(self, users: Sequence[str], items: Sequence[Sequence[str]], scores: Sequence[Sequence[float]]) -> None:
        """Upsert a batch of users' lists (each at most K items, best first)."""

    @abstractmethod
    def set_popular(self, items: Sequence[str], scores: Sequence[float]) -> None:
        """The fallback list served to users not in the cache (training popularity, best first)."""

    @abstractmethod
    def set_titles(self, titles: Mapping[str, str]) -> None:
        """Optional item titles shown with the lookups of this version."""

    @abstractmethod
    def publish(self) -> VersionRecord:
        """Make this version current (one transaction) and prune versions beyond the last ``keep_versions``."""

    @abstractmethod
    def abort(self) -> None:
        """Discard this version's rows; the current version is untouched."""


class RecommendationStore(ABC):
    """The top-K cache: :meth:`begin_version` writes, :meth:`lookup` reads the current version.

    Args:
        keep_versions: published versions kept after a publish (the current one included).
    """

    def __init__(self, keep_versions: int = 2) -> None:
        if keep_versions < 1:
            raise StoreError(f"keep_versions must be >= 1, got {keep_versions}")
        self.keep_versions = keep_versions
        self._records: dict[int, VersionRecord] = {}  # published versions are immutable: cached by id
        self._popular: dict[int, tuple[list[str], list[float]]] = {}
        self._titles: dict[int, dict[str, str]] = {}

    @abstractmethod
    def begin_version(self, meta: VersionMeta) -> VersionWriter:
        """Start a new, invisible version."""

    @abstractmethod
    def attach_version(self, version: int) -> VersionWriter:
        """A writer for a version another process began (DDP ranks other than 0 write into rank 0's version)."""

    @abstractmethod
    def _current_id(self) -> int | None:
        """The id the ``current`` pointer holds (None before the first publish)."""

    def current_version(self) -> VersionRecord | None:
        """The published version readers are served, or None if nothing was published yet."""
        version = self._current_id()
        return None if version is None else self._version_data(version)

    @abstractmethod
    def versions(self) -> list[VersionRecord]:
        """Every version still stored (published and in progress), oldest first."""

    @abstractmethod
    def _read(self, user_id: str) -> tuple[int, str | bytes | None] | None:
        """(current version, the user's encoded entry or None) in one atomic read; None when nothing is published."""

    @abstractmethod
    def _load_version(self, version: int) -> tuple[VersionRecord, tuple[list[str], list[float]], dict[str, str]]:
        """A published version's record, fallback list and titles."""

    def _version_data(self, version: int) -> VersionRecord:
        if version not in self._records:
            record, popular, titles = self._load_version(version)
            self._popular[version], self._titles[version], self._records[version] = popular, titles, record
        return self._records[version]

    def require_current(self) -> VersionRecord:
        """The current version, or a :class:`StoreError` saying how to publish one."""
        record = self.current_version()
        if record is None:
            raise StoreError(
                f"{self.url}: the store has no published version. Build the cache first: lightning predict "
                "--config configs/<ds>/llm.yaml --config configs/serving/cache.yaml --ckpt_path <ckpt>"
            )
        return record

    def lookup(self, user_id: str, k: int = 10) -> Lookup:
        """The user's top-``k`` of the current version, or the version's popular fallback for an unknown user.

        Raises:
            KOutOfRange: ``k`` < 1 or above the version's K (the message names the limit).
            StoreError: nothing published yet.
        """
        read = self._read(str(user_id))
        if read is None:
            self.require_current()
        version, raw = read
        record = self._version_data(version)
        if not 1 <= k <= record.k:
            raise KOutOfRange(k, record.k, version)
        if raw is None:
            items, scores = self._popular[version]
            return Lookup(items[:k], scores[:k], version, True)
        items, scores = decode_entry(raw)
        return Lookup(items[:k], scores[:k], version, False)

    def titles(self, version: int, items: Sequence[str]) -> list[str | None]:
        """Titles of ``items`` in ``version`` (None where the version has no title)."""
        self._version_data(version)
        titles = self._titles[version]
        return [titles.get(item) for item in items]

    def check_compatible(self, dataset_hash: str | None = None, model_hash: str | None = None) -> VersionRecord:
        """Refuse a current version built from another dataset or model artifact than the ones named."""
        record = self.require_current()
        for what, expected, stored in (
            ("dataset", dataset_hash, record.meta.dataset_hash),
            ("model", model_hash, record.meta.model_hash),
        ):
            if expected is not None and expected != stored:
                raise StoreError(
                    f"{self.url}: version {record.version} was built for {what} hash {stored[:16]}..., not the "
                    f"{expected[:16]}... named at serve time. Rebuild the cache with this {what}, or serve the "
                    f"{what} it was built for."
                )
        return record

    url: str = ""

    def close(self) -> None:  # noqa: B027 (optional hook: stores without connections keep it empty)
        """Release connections."""


def open_store(url: str, keep_versions: int = 2) -> RecommendationStore:
    """Open the store at ``url``: ``sqlite:///path`` or ``redis://host:port/db``.

    Raises:
        StoreError: any other form (the message names the accepted ones).
    """
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        from datamodules.sqlite_store import SQLiteStore

        return SQLiteStore(url[len("sqlite:///") :], keep_versions)
    if url.startswith("redis://"):
        from datamodules.redis_store import RedisStore

        return RedisStore(url, keep_versions)
    raise StoreError(f"store URL {url!r} is not supported; use {URL_FORMS}")


def artifact_hashes(model_dir: str | Path) -> tuple[str, str]:
    """``(model_hash, dataset_hash)`` of an exported stage-3 directory: its manifest's SHA-256 and its dataset hash."""
    from datamodules.artifacts import MANIFEST_NAME, sha256_file

    manifest = Path(model_dir) / MANIFEST_NAME
    if not manifest.is_file():
        raise StoreError(
            f"{manifest}: not found; --model must be an exported stage-3 directory (callbacks.LLMExporter)"
        )
    record = json.loads(manifest.read_text(encoding="utf-8"))
    dataset = record.get("dataset") if isinstance(record.get("dataset"), dict) else record  # LLMExporter nests it
    return sha256_file(manifest), str(dataset.get("content_hash", ""))
