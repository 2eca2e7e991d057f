"""The lookup service (FastAPI TestClient): lookups, fallback, k limits, JSON errors, API key, live path, CLI."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from datamodules.recommendation_store import StoreError, open_store
from lightning_modules.cli import main
from lightning_modules.service import create_app
from tests import serving_fixtures
from tests.serving_fixtures import publish_version

redis_url, store_url = serving_fixtures.redis_url, serving_fixtures.store_url  # fixtures
USERS = [f"u{i}" for i in range(20)]


@pytest.fixture
def published(store_url):
    store = open_store(store_url)
    version = publish_version(store, USERS, offset=0)
    return store, version


def test_known_user_gets_the_cached_list_with_titles(published):
    store, version = published
    response = TestClient(create_app(store)).get("/v1/users/u1/recommendations?k=3")
    assert response.status_code == 200
    assert response.json() == {
        "user": "u1",
        "version": version,
        "fallback": False,
        "items": [
            {"item": "i1", "title": "Title 1", "score": 5.0},
            {"item": "i2", "title": "Title 2", "score": 4.0},
            {"item": "i3", "title": None, "score": 3.0},
        ],
    }
    assert len(TestClient(create_app(store)).get("/v1/users/u1/recommendations").json()["items"]) == 5  # K=5 < 10


def test_unknown_user_gets_the_popular_fallback(published):
    store, version = published
    body = TestClient(create_app(store)).get("/v1/users/stranger/recommendations?k=2").json()
    assert body == {
        "user": "stranger",
        "version": version,
        "fallback": True,
        "items": [{"item": "p0_0", "title": None, "score": 5.0}, {"item": "p0_1", "title": None, "score": 4.0}],
    }


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("k=6", "k must be between 1 and 5"),
        ("k=0", "k must be between 1 and 5"),
        ("k=-3", "between 1 and 5"),
        ("k=abc", "k must be an integer between 1 and 5; got 'abc'"),
        ("k=2.5", "k must be an integer"),
    ],
)
def test_bad_k_is_a_422_naming_the_limit(published, query, message):
    response = TestClient(create_app(published[0])).get(f"/v1/users/u1/recommendations?{query}")
    assert response.status_code == 422 and message in response.json()["error"]


def test_errors_are_json_4xx_never_a_trace(published):
    client = TestClient(create_app(published[0]), raise_server_exceptions=False)
    for method, path, status in [
        ("get", "/nope", 404),
        ("get", "/v1/users/u1", 404),
        ("delete", "/v1/version", 405),
        ("post", "/v1/users/u1/recommendations", 405),
        ("get", "/v1/users/" + "x" * 300 + "/recommendations", 422),
        ("get", "/v1/users/a%01b/recommendations", 422),
    ]:
        response = getattr(client, method)(path)
        assert response.status_code == status, path
        assert set(response.json()) == {"error"} and "Traceback" not in response.text


def test_version_and_health(published):
    store, version = published
    client = TestClient(create_app(store))
    record = client.get("/v1/version").json()
    assert (record["version"], record["k"], record["num_users"], record["dataset_hash"]) == (version, 5, 20, "d" * 64)
    assert client.get("/healthz").json() == {"status": "ok", "version": version}


def test_api_key_is_required_when_set(published, monkeypatch):
    monkeypatch.setenv("SEMCONV_API_KEY", "s3cret")
    client = TestClient(create_app(published[0]))
    for headers in ({}, {"X-API-Key": "wrong"}):
        response = client.get("/healthz", headers=headers)
        assert response.status_code == 401 and "X-API-Key" in response.json()["error"]
    assert client.get("/v1/users/u1/recommendations?k=1", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_live_path_is_501_without_a_model_and_calls_the_recommender(published):
    store, _ = published
    client = TestClient(create_app(store))
    response = client.post("/v1/recommendations", json={"history": ["i1", "i2"]})
    assert response.status_code == 501 and "--model" in response.json()["error"]
    for body, status in [
        (b"{not json", 400),
        (b'{"history": []}', 422),
        (b'{"history": "i1"}', 422),
        (b'{"history": ["i1"], "k": 99}', 422),
    ]:
        assert client.post("/v1/recommendations", content=body).status_code == status
    calls = []

    def live(history, k):
        calls.append((history, k))
        return ["i0", "i9"][:k], [0.5, 0.25][:k]

    body = TestClient(create_app(store, live)).post("/v1/recommendations", json={"history": ["i1", 7], "k": 2}).json()
    assert calls == [(["i1", "7"], 2)]
    assert body["items"] == [
        {"item": "i0", "title": "Title 0", "score": 0.5},
        {"item": "i9", "title": None, "score": 0.25},
    ]


def test_an_empty_store_is_refused_at_start(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    with pytest.raises(StoreError, match="no published version"):
        create_app(open_store(url))
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--store", url, "--port", "1"])
    assert exit_info.value.code == 2 and "no published version" in capsys.readouterr().err


def test_serve_refuses_a_store_for_another_dataset_or_a_bad_url(published, capsys):
    store, _ = published
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--store", store.url, "--dataset-hash", "e" * 64])
    assert exit_info.value.code == 2 and "built for dataset hash" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--store", "mysql://x"])
    assert "sqlite:///" in capsys.readouterr().err


def test_semconv_serve_answers_over_http(published, tmp_path):
    """The real command: uvicorn on a free loopback port, one lookup, then stopped."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    from tests.conftest import REPO
    from tests.serving_fixtures import free_port

    store, version = published
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "lightning_modules.cli", "serve", "--store", store.url, "--port", str(port)]
    server = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/v1/users/u2/recommendations?k=2", timeout=5)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "semconv serve did not answer within 120 s"
                time.sleep(0.2)
        assert response.status_code == 200
        assert [entry["item"] for entry in response.json()["items"]] == ["i2", "i3"]
        assert response.json()["version"] == version
    finally:
        server.terminate()
        server.wait(timeout=30)
