"""The Redis back end of :mod:`datamodules.recommendation_store` (redis-py), for serving at scale.

Keys, all under one namespace (``semconv`` by default)::

    <ns>:current                 id of the published version readers are served
    <ns>:next                    version id counter (INCR)
    <ns>:versions                sorted set of every stored version (score = id); <ns>:published: the published ones
    <ns>:v:<id>:meta             the version's :class:`VersionMeta` as JSON; <ns>:v:<id>:published_at
    <ns>:v:<id>:u:<user>         the user's entry ``[[items], [scores]]`` as JSON
    <ns>:v:<id>:popular          the fallback list, same encoding; <ns>:v:<id>:titles: hash item -> title
    <ns>:v:<id>:users            users written

A lookup is one Lua script (atomic on the server): it reads the pointer and the entry of that version, so it can
never mix versions. Pruned versions' keys get a short expiry (``prune_grace_s``) rather than an instant delete,
so a reader that resolved the old pointer a moment earlier still finds its version.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from urllib.parse import urlparse

import redis

from datamodules.recommendation_store import (
    URL_FORMS,
    RecommendationStore,
    StoreError,
    VersionMeta,
    VersionRecord,
    VersionWriter,
    _check_rows,
    _now,
    decode_entry,
    encode_entry,
)

_LOOKUP = """
local version = redis.call('GET', KEYS[1])
if not version then return false end
local prefix = ARGV[1] .. version
local entry = redis.call('GET', prefix .. ':u:' .. ARGV[2])
return {version, entry}
"""


class RedisStore(RecommendationStore):
    """The store on a Redis server.

    Args:
        url: ``redis://host:port/db``.
        keep_versions: see :class:`datamodules.recommendation_store.RecommendationStore`.
        namespace: key prefix (several caches can share one database).
        prune_grace_s: seconds a pruned version's keys live on for readers in flight (0 deletes at once).
    """

    def __init__(self, url: str, keep_versions: int = 2, namespace: str = "semconv", prune_grace_s: int = 30) -> None:
        super().__init__(keep_versions)
        parsed = urlparse(url)
        if parsed.scheme != "redis" or not parsed.hostname:
            raise StoreError(f"store URL {url!r} is not supported; use {URL_FORMS}")
        self.url, self.ns, self.prune_grace_s = url, namespace, prune_grace_s
        self.client = redis.Redis.from_url(url, socket_connect_timeout=5)
        try:
            self.client.ping()
        except redis.exceptions.ConnectionError as err:
            raise StoreError(f"{url}: no Redis server answers ({err}). Start redis-server or fix the URL") from None
        self._lookup = self.client.register_script(_LOOKUP)

    def key(self, version: int, *parts: str) -> str:
        return ":".join((self.ns, "v", str(version), *parts))

    def begin_version(self, meta: VersionMeta) -> RedisWriter:
        version = int(self.client.incr(f"{self.ns}:next"))
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.key(version, "meta"), json.dumps(asdict(meta)))
            pipe.zadd(f"{self.ns}:versions", {str(version): version})
            pipe.execute()
        return RedisWriter(self, version, meta)

    def attach_version(self, version: int) -> RedisWriter:
        raw = self.client.get(self.key(version, "meta"))
        if raw is None or self.client.exists(self.key(version, "published_at")):
            raise StoreError(f"{self.url}: version {version} is not a build in progress; cannot write into it")
        return RedisWriter(self, version, VersionMeta(**json.loads(raw)))

    def _current_id(self) -> int | None:
        raw = self.client.get(f"{self.ns}:current")
        return None if raw is None else int(raw)

    def _record(self, version: int) -> VersionRecord | None:
        meta, published_at, users = self.client.mget(
            [self.key(version, "meta"), self.key(version, "published_at"), self.key(version, "users")]
        )
        if meta is None:
            return None
        published_at = published_at.decode() if published_at is not None else None
        return VersionRecord(
            version, VersionMeta(**json.loads(meta)), published_at is not None, int(users or 0), published_at
        )

    def versions(self) -> list[VersionRecord]:
        ids = [int(version) for version in self.client.zrange(f"{self.ns}:versions", 0, -1)]
        return [record for version in ids if (record := self._record(version)) is not None]

    def _read(self, user_id: str) -> tuple[int, bytes | None] | None:
        result = self._lookup(keys=[f"{self.ns}:current"], args=[f"{self.ns}:v:", user_id])
        return None if not result else (int(result[0]), result[1])

    def _load_version(self, version: int) -> tuple[VersionRecord, tuple[list[str], list[float]], dict[str, str]]:
        record = self._record(version)
        if record is None:
            raise StoreError(f"{self.url}: version {version} was pruned while being read; retry the lookup")
        popular = self.client.get(self.key(version, "popular"))
        titles = {
            item.decode(): title.decode() for item, title in self.client.hgetall(self.key(version, "titles")).items()
        }
        return record, decode_entry(popular) if popular else ([], []), titles

    def drop_versions(self, versions: Sequence[int], grace_s: int) -> None:
        """Expire (or, with ``grace_s`` 0, delete) every key of ``versions`` and forget them."""
        for version in versions:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.zrem(f"{self.ns}:versions", str(version))
                pipe.zrem(f"{self.ns}:published", str(version))
                for keys in _chunks(self.client.scan_iter(match=f"{self.key(version)}:*", count=1000), 1000):
                    if grace_s > 0:
                        for key in keys:
                            pipe.expire(key, grace_s)
                    else:
                        pipe.unlink(*keys)
                pipe.execute()

    def close(self) -> None:
        self.client.close()


def _chunks(iterable, size: int):
    chunk = []
    for value in iterable:
        chunk.append(value)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class RedisWriter(VersionWriter):
    """Writes one Redis version with pipelined SETs (one round trip per batch)."""

    def __init__(self, store: RedisStore, version: int, meta: VersionMeta) -> None:
        super().__init__(version, meta)
        self.store = store

    def write(self, users: Sequence[str], items: Sequence[Sequence[str]], scores: Sequence[Sequence[float]]) -> None:
        _check_rows(users, items, scores, self.meta.k)
        with self.store.client.pipeline(transaction=False) as pipe:
            for user, row, row_scores in zip(users, items, scores, strict=False):
                pipe.set(self.store.key(self.version, "u", str(user)), encode_entry(row, row_scores))
            pipe.incrby(self.store.key(self.version, "users"), len(users))
            pipe.execute()

    def set_popular(self, items: Sequence[str], scores: Sequence[float]) -> None:
        self.store.client.set(self.store.key(self.version, "popular"), encode_entry(items, scores))

    def set_titles(self, titles: Mapping[str, str]) -> None:
        if titles:
            self.store.client.hset(
                self.store.key(self.version, "titles"), mapping={str(k): str(v) for k, v in titles.items()}
            )

    def publish(self) -> VersionRecord:
        store, ns = self.store, self.store.ns
        with store.client.pipeline(transaction=True) as pipe:
            # WATCH: a concurrent publish that discards this version aborts the EXEC (redis.WatchError)
            pipe.watch(f"{ns}:versions", f"{ns}:published")
            if pipe.zscore(f"{ns}:versions", str(self.version)) is None or pipe.exists(
                store.key(self.version, "published_at")
            ):
                raise StoreError(
                    f"{store.url}: version {self.version} was discarded or already published "
                    "(a newer build published meanwhile); run the build again"
                )
            pipe.multi()
            pipe.set(store.key(self.version, "published_at"), _now())
            pipe.zadd(f"{ns}:published", {str(self.version): self.version})
            pipe.set(f"{ns}:current", self.version)
            pipe.execute()
        published = [int(version) for version in store.client.zrevrange(f"{ns}:published", 0, -1)]
        everything = [int(version) for version in store.client.zrange(f"{ns}:versions", 0, -1)]
        kept = set(published[: store.keep_versions])
        stale = [v for v in everything if v not in kept and (v in published or v < self.version)]
        store.drop_versions(stale, store.prune_grace_s)
        return store.current_version()

    def abort(self) -> None:
        self.store.drop_versions([self.version], grace_s=0)
