"""The serving store (SQLite and a real redis-server) and the lookup service: round trips, atomic publish, faults."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from datamodules.recommendation_store import KOutOfRange, StoreError, VersionMeta, open_store
from tests import serving_fixtures
from tests.conftest import REPO
from tests.serving_fixtures import meta, publish_version

redis_url, store_url = serving_fixtures.redis_url, serving_fixtures.store_url  # fixtures

USERS = [f"u{i}" for i in range(250)]


def test_publish_then_lookup_round_trip(store_url):
    store = open_store(store_url)
    assert store.current_version() is None
    with pytest.raises(StoreError, match="no published version"):
        store.lookup("u1", 3)
    version = publish_version(store, USERS, offset=0)
    found = store.lookup("u7", 3)
    assert (found.items, found.scores, found.version, found.fallback) == (
        ["i7", "i8", "i9"],
        [5.0, 4.0, 3.0],
        version,
        False,
    )
    assert store.lookup("u7", 5).items == [f"i{7 + j}" for j in range(5)]
    unknown = store.lookup("nobody", 2)
    assert (unknown.items, unknown.scores, unknown.fallback) == (["p0_0", "p0_1"], [5.0, 4.0], True)
    assert store.titles(version, ["i0", "i2", "i5"]) == ["Title 0", "Title 2", None]
    record = store.current_version()
    assert (record.version, record.k, record.num_users, record.meta.dataset_hash) == (version, 5, 250, "d" * 64)
    # a second process (a fresh connection) reads the same
    assert open_store(store_url).lookup("u7", 1).items == ["i7"]


@pytest.mark.parametrize("k", [0, -1, 6])
def test_k_outside_the_cached_range_names_the_limit(store_url, k):
    store = open_store(store_url)
    publish_version(store, USERS[:10], offset=0)
    with pytest.raises(KOutOfRange, match=r"between 1 and 5 .*got k=" + str(k)):
        store.lookup("u1", k)


def test_versions_are_pruned_to_keep_versions(store_url):
    store = open_store(store_url, keep_versions=2)
    if hasattr(store, "prune_grace_s"):
        store.prune_grace_s = 0  # Redis: delete at once so the keys can be counted
    published = [publish_version(store, USERS[:20], offset=1000 * n) for n in range(4)]
    assert [record.version for record in store.versions()] == published[-2:]
    assert store.current_version().version == published[-1]
    assert store.lookup("u1", 1).items == ["i3001"]
    if hasattr(store, "client"):
        leftovers = [
            key
            for key in store.client.scan_iter(match="semconv:v:*")
            if not key.startswith(tuple(f"semconv:v:{v}:".encode() for v in published[-2:]))
        ]
        assert leftovers == []
    else:
        rows = store.connection().execute("SELECT DISTINCT version FROM entries ORDER BY version").fetchall()
        assert [row[0] for row in rows] == published[-2:]


def test_abort_leaves_the_current_version(store_url):
    store = open_store(store_url)
    first = publish_version(store, USERS[:10], offset=0)
    writer = store.begin_version(meta())
    writer.write(["u1"], [["x"]], [[1.0]])
    writer.abort()
    assert [record.version for record in store.versions()] == [first]
    assert store.lookup("u1", 1).items == ["i1"]


def test_bad_urls_and_bad_rows_are_named(tmp_path):
    for url in ("postgres://x/y", "sqlite://", "recommendations.sqlite"):
        with pytest.raises(StoreError, match="sqlite:///.*redis://host:port/db"):
            open_store(url)
    writer = open_store(f"sqlite:///{tmp_path / 's.sqlite'}").begin_version(meta(k=2))
    with pytest.raises(StoreError, match="at most K=2"):
        writer.write(["u1"], [["a", "b", "c"]], [[3.0, 2.0, 1.0]])
    with pytest.raises(StoreError, match="k must be >= 1"):
        VersionMeta("m", "d", k=0, num_items=3)


def test_a_store_for_another_dataset_or_model_is_refused(store_url):
    store = open_store(store_url)
    publish_version(store, USERS[:10], offset=0)
    assert store.check_compatible(dataset_hash="d" * 64, model_hash="m" * 64).version >= 1
    with pytest.raises(StoreError, match="built for dataset hash dddd"):
        store.check_compatible(dataset_hash="e" * 64)
    with pytest.raises(StoreError, match="built for model hash mmmm"):
        store.check_compatible(model_hash="n" * 64)


def test_readers_during_a_publish_see_one_whole_version(store_url):
    """A reader thread loops lookups while versions whose every list differs are published: no read mixes them."""
    store = open_store(store_url, keep_versions=2)
    publish_version(store, USERS, offset=0)
    offsets, seen, errors, stop = {}, [], [], threading.Event()

    def read() -> None:
        reader = open_store(store_url)
        while not stop.is_set():
            for user in ("u3", "u120", "u249"):
                try:
                    found = reader.lookup(user, 5)
                except Exception as err:  # noqa: BLE001 - collected and asserted below
                    errors.append(err)
                    return
                seen.append((user, found))

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for n in range(1, 6):
            offsets[publish_version(store, USERS, offset=1000 * n)] = 1000 * n
            # let the reader read after each publish (a busy machine may not schedule it otherwise)
            wanted, deadline = len(seen) + 3, time.monotonic() + 30
            while len(seen) < wanted and thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.001)
    finally:
        stop.set()
        thread.join(timeout=30)
    offsets.update({min(offsets) - 1: 0})  # the first version's id precedes the rest
    assert not errors and len(seen) > 10
    for user, found in seen:
        offset = offsets[found.version]
        base = offset + int(user[1:])
        assert found.items == [f"i{base + j}" for j in range(5)] and found.scores == [
            5.0 + offset - j for j in range(5)
        ]
    assert len({found.version for _, found in seen}) >= 2


_KILLED_BUILD = """
import sys, time
from datamodules.recommendation_store import open_store
from tests.serving_fixtures import meta
store = open_store(sys.argv[1])
writer = store.begin_version(meta())
for n in range(10**6):
    writer.write([f"u{n}"], [["partial"]], [[1.0]])
    if n == 50:
        print("writing", flush=True)
"""


def test_a_build_killed_mid_way_leaves_the_previous_version(store_url):
    store = open_store(store_url)
    first = publish_version(store, USERS[:100], offset=0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    build = subprocess.Popen(
        [sys.executable, "-c", _KILLED_BUILD, store_url], stdout=subprocess.PIPE, cwd=REPO, env=env
    )
    try:
        assert build.stdout.readline().strip() == b"writing"
        time.sleep(0.2)
    finally:
        build.kill()  # SIGKILL: no cleanup, no publish
        build.wait(timeout=30)
    reader = open_store(store_url)
    assert reader.current_version().version == first
    assert reader.lookup("u1", 2).items == ["i1", "i2"] and reader.lookup("u150", 1).fallback
    assert [record.version for record in reader.versions() if record.published] == [first]
    # the next build publishes and discards the orphaned partial version
    second = publish_version(reader, USERS[:100], offset=1000)
    assert [record.version for record in reader.versions()] == [first, second]
