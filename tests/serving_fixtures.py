"""Shared serving fixtures: a real redis-server on a free loopback port, and small versions to publish."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

from datamodules.recommendation_store import RecommendationStore, VersionMeta


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """``redis://127.0.0.1:<port>/0`` of a redis-server started for the session; skips without one (fails under CI)."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (Debian: apt-get install -y redis-server)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail(f"redis-server did not answer PING on port {port}")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    client.close()
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    """A fresh, empty store of each kind (Redis: a fresh namespace on the session server)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'recommendations.sqlite'}"
    base = request.getfixturevalue("redis_url")
    import redis

    redis.Redis.from_url(base).flushdb()
    return base


def meta(k: int = 5, model_hash: str = "m" * 64, dataset_hash: str = "d" * 64, num_items: int = 100) -> VersionMeta:
    return VersionMeta(model_hash=model_hash, dataset_hash=dataset_hash, k=k, num_items=num_items, dataset="Tiny")


def publish_version(store: RecommendationStore, users: list[str], offset: int, k: int = 5, **meta_args) -> int:
    """Publish a version where user ``u``'s list is items ``offset+u .. offset+u+k-1`` (scores descending)."""
    writer = store.begin_version(meta(k, **meta_args))
    items = [[f"i{offset + int(user[1:]) + j}" for j in range(k)] for user in users]
    scores = [[float(k - j) + offset for j in range(k)] for _ in users]
    for start in range(0, len(users), 100):
        writer.write(users[start : start + 100], items[start : start + 100], scores[start : start + 100])
    writer.set_popular([f"p{offset}_{j}" for j in range(k)], [float(k - j) for j in range(k)])
    writer.set_titles({f"i{offset + j}": f"Title {offset + j}" for j in range(3)})
    return writer.publish().version
