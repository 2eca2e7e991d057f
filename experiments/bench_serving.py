"""Load-test ``semconv serve`` on loopback: requests/s, p50 and p99 per store and concurrency level.

Generates a store (``--users`` x ``--k`` random lists, SQLite and/or a redis-server started here), starts
``semconv serve`` on a free port, checks a few answers with httpx, then runs a bounded load test: ``--concurrency``
asyncio connections (HTTP/1.1 keep-alive over raw streams, so the client costs less CPU than an httpx client on the
same cores) each sending lookups for random users, stopping at ``--duration`` seconds OR ``--requests`` requests,
whichever comes first. A share ``--unknown`` of the users is not cached (fallback path).

    python experiments/bench_serving.py --stores sqlite,redis --concurrency 1,4,16 --duration 5 --requests 20000

With ``--live-model DIR`` (an exported stage-3 model) the server also loads the live path (``semconv serve
--model``; the generated store records that model's hashes so the compatibility check passes) and, after the load
test, one client times ``--live-requests`` sequential ``POST /v1/recommendations`` for one history (``--live-history``,
default ten seeded items of the model's index) and as many cached lookups, and prints both p50s and live / cached.

    python experiments/bench_serving.py --stores sqlite --live-model artifacts/synthetic/llm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datamodules.recommendation_store import VersionMeta, artifact_hashes, open_store  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001, S110 - not up yet: poll again
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up within {timeout_s:.0f}s")
        time.sleep(0.1)


def fill_store(url: str, users: int, k: int, num_items: int, seed: int, hashes: tuple[str, str] | None = None) -> float:
    """Publish one version of ``users`` random top-``k`` lists (recording ``hashes`` = (model, dataset) if given);
    returns the users/s of the write."""
    rng = np.random.default_rng(seed)
    store = open_store(url)
    model_hash, dataset_hash = hashes or ("bench-model", "bench-data")
    writer = store.begin_version(VersionMeta(model_hash, dataset_hash, k, num_items, "bench"))
    start = time.perf_counter()
    for first in range(0, users, 2000):
        rows = range(first, min(first + 2000, users))
        items = rng.integers(0, num_items, size=(len(rows), k)).astype(str).tolist()
        scores = np.sort(rng.random((len(rows), k)))[:, ::-1].round(5).tolist()
        writer.write([f"user{row}" for row in rows], items, scores)
    writer.set_popular([str(item) for item in range(k)], [float(k - j) for j in range(k)])
    writer.set_titles({str(item): f"Item {item}" for item in range(num_items)})
    writer.publish()
    elapsed = time.perf_counter() - start
    store.close()
    return users / elapsed


async def _connection(port: int, paths: list[str], deadline: float, budget: list[int], latencies: list[float]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    errors = 0
    try:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            path = random.choice(paths)
            start = time.perf_counter()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            errors += not status.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    return errors


async def load(port: int, paths: list[str], concurrency: int, duration_s: float, requests: int) -> dict[str, float]:
    latencies: list[float] = []
    budget = [requests]
    start = time.perf_counter()
    errors = await asyncio.gather(
        *(_connection(port, paths, start + duration_s, budget, latencies) for _ in range(concurrency))
    )
    elapsed = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {
        "requests": len(ms),
        "errors": sum(errors),
        "rps": len(ms) / elapsed,
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
    }


def serve(url: str, port: int, workers: int, http: str, live: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "lightning_modules.cli",
        "serve",
        "--store",
        url,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--http",
        http,
        *live,
    ]
    return subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.DEVNULL)


def time_live_path(base: str, history: list[str], requests: int) -> None:
    """p50 of ``requests`` sequential live POSTs for ``history``, of as many cached GETs (one client); the ratio."""
    import httpx

    def p50(call) -> float:
        call()  # warm: first request pays one-off costs
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            response = call()
            times.append(time.perf_counter() - start)
            assert response.status_code == 200, response.text
        return float(np.percentile(np.asarray(times) * 1000, 50))

    with httpx.Client(base_url=base, timeout=600) as client:
        live_ms = p50(lambda: client.post("/v1/recommendations", json={"history": history, "k": 10}))
        cached_ms = p50(lambda: client.get("/v1/users/user1/recommendations?k=10"))
    print(
        f"live path ({len(history)}-item history, {requests} sequential requests): p50 {live_ms:.1f} ms; "
        f"cached p50 {cached_ms:.2f} ms; live / cached = {live_ms / cached_ms:,.0f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="sqlite,redis")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per level (upper bound)")
    parser.add_argument("--requests", type=int, default=20_000, help="requests per level (upper bound)")
    parser.add_argument("--unknown", type=float, default=0.1, help="share of lookups for uncached users")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--http", default="auto", help="uvicorn HTTP implementation")
    parser.add_argument("--live-model", default=None, help="exported stage-3 dir: also time the live path")
    parser.add_argument("--live-history", default=None, help="comma-separated item ids POSTed to the live path")
    parser.add_argument("--live-requests", type=int, default=20, help="sequential live requests timed")
    parser.add_argument("--live-args", default="", help="extra `semconv serve` flags, e.g. '--code-softmax trie'")
    args = parser.parse_args()
    import httpx

    live, hashes, history = [], None, []
    if args.live_model:
        live = ["--model", args.live_model, *args.live_args.split()]
        hashes = artifact_hashes(args.live_model)
        known = sorted(json.loads((Path(args.live_model) / "index.json").read_text()), key=int)
        args.items = len(known)
        history = args.live_history.split(",") if args.live_history else random.Random(1).sample(known, 10)

    workdir = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    processes: list[subprocess.Popen] = []
    rng = random.Random(0)
    paths = [f"/v1/users/user{rng.randrange(args.users)}/recommendations?k=10" for _ in range(5000)]
    paths += [f"/v1/users/stranger{n}/recommendations?k=10" for n in range(int(len(paths) * args.unknown))]
    print(
        f"users={args.users} K={args.k} workers={args.workers} http={args.http} unknown={args.unknown:.0%} "
        f"duration<={args.duration}s requests<={args.requests} per level; cpus={os.cpu_count()}"
    )
    try:
        for kind in args.stores.split(","):
            if kind == "sqlite":
                url = f"sqlite:///{workdir / 'bench.sqlite'}"
            else:
                port = free_port()
                processes.append(
                    subprocess.Popen(
                        [
                            shutil.which("redis-server") or "redis-server",
                            "--port",
                            str(port),
                            "--bind",
                            "127.0.0.1",
                            "--save",
                            "",
                            "--appendonly",
                            "no",
                        ],
                        stdout=subprocess.DEVNULL,
                    )
                )
                url = f"redis://127.0.0.1:{port}/0"
                wait_until(lambda url=url: open_store(url) is not None, 10, "redis-server")
            write_rate = fill_store(url, args.users, args.k, args.items, seed=0, hashes=hashes)
            port = free_port()
            server = serve(url, port, args.workers, args.http, live)
            processes.append(server)
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda base=base: httpx.get(f"{base}/healthz").status_code == 200, 180, "semconv serve")
            with httpx.Client(base_url=base) as client:
                known, unknown = client.get("/v1/users/user1/recommendations?k=10").json(), client.get(paths[-1]).json()
                assert len(known["items"]) == 10 and not known["fallback"] and unknown["fallback"], (known, unknown)
            print(f"\n[{kind}] cache write {write_rate:,.0f} users/s")
            print(f"{'concurrency':>11} {'requests':>9} {'errors':>6} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7}")
            for level in (int(value) for value in args.concurrency.split(",")):
                result = asyncio.run(load(port, paths, level, args.duration, args.requests))
                print(
                    f"{level:>11} {result['requests']:>9} {result['errors']:>6} {result['rps']:>8.0f} "
                    f"{result['p50']:>7.2f} {result['p99']:>7.2f}"
                )
            if live:
                time_live_path(base, history, args.live_requests)
            server.terminate()
            server.wait(timeout=30)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
