"""Rows per second of the Amazon 2023 converter (DuckDB) against the 2018 converter (Python) on the same content.

Generates, once, a category of ``--rows`` reviews with power-law users and items (plus the meta lines) in both
layouts under ``--dir``: ``Bench.jsonl.gz``/``meta_Bench.jsonl.gz`` (2023) and ``Bench.json.gz``/
``meta_Bench.json.gz`` (2018, the same records renamed). Each converter then runs in its own process (so that its
peak memory is its own), and the outputs are compared file by file.

    python experiments/bench_convert.py                       # 2M rows, generated once under /tmp/bench_convert
    python experiments/bench_convert.py --rows 200000 --threads 2 --memory-limit 4GB
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORDS = np.array(
    [
        "good",
        "great",
        "fine",
        "works",
        "broke",
        "cheap",
        "soft",
        "smell",
        "skin",
        "color",
        "size",
        "fit",
        "love",
        "hate",
        "return",
        "again",
        "quality",
        "price",
        "small",
        "large",
        "daily",
        "gift",
        "nice",
        "bad",
        "okay",
        "would",
        "buy",
        "recommend",
    ]
)
OUTPUTS = ("inter.json", "item.json", "review.json", "item2id", "user2id")


def _sentence(rng: np.random.Generator, low: int, high: int) -> str:
    return " ".join(WORDS[rng.integers(0, len(WORDS), rng.integers(low, high))])


def _power_law(n: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


def generate(directory: Path, rows: int, seed: int = 0) -> None:
    """Write the 2023 and the 2018 layout of one generated category (skipped when already there)."""
    done = directory / f"done.{rows}"
    if done.is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    num_users, num_items = max(rows // 8, 10), max(rows // 40, 10)
    users = rng.choice(num_users, rows, p=_power_law(num_users, 0.7))  # long-tailed activity and popularity
    items = rng.permutation(num_items)[rng.choice(num_items, rows, p=_power_law(num_items, 0.9))]
    times = 1_500_000_000_000 + rng.integers(0, 10**11, rows)
    with (
        gzip.open(directory / "Bench.jsonl.gz", "wt", compresslevel=1) as new,
        gzip.open(directory / "Bench.json.gz", "wt", compresslevel=1) as old,
    ):
        for user, item, ms in zip(users.tolist(), items.tolist(), times.tolist(), strict=False):
            title, text = _sentence(rng, 1, 5), _sentence(rng, 5, 60)
            if rng.random() < 0.2:  # markup as in real reviews: these take the slower Python cleaning path
                text += "<br /><br />Smells &amp; feels fine"
            user_id, asin = f"AG{user:012d}", f"B{item:09d}"
            new.write(
                json.dumps(
                    {
                        "rating": 5.0,
                        "title": title,
                        "text": text,
                        "images": [],
                        "asin": asin,
                        "parent_asin": asin,
                        "user_id": user_id,
                        "timestamp": ms,
                        "helpful_vote": 0,
                        "verified_purchase": True,
                    }
                )
                + "\n"
            )
            old.write(
                json.dumps(
                    {
                        "overall": 5.0,
                        "verified": True,
                        "reviewTime": "",
                        "reviewerID": user_id,
                        "asin": asin,
                        "summary": title,
                        "reviewText": text,
                        "unixReviewTime": ms,
                    }
                )
                + "\n"
            )
    with (
        gzip.open(directory / "meta_Bench.jsonl.gz", "wt", compresslevel=1) as new,
        gzip.open(directory / "meta_Bench.json.gz", "wt", compresslevel=1) as old,
    ):
        for item in range(num_items):
            if item % 50 == 7:  # some items have no metadata
                continue
            title, description, store = _sentence(rng, 2, 8), [_sentence(rng, 10, 40)], f"Store {item % 97}"
            asin = f"B{item:09d}"
            new.write(
                json.dumps(
                    {
                        "main_category": "Bench",
                        "title": title,
                        "features": [],
                        "description": description,
                        "store": store,
                        "categories": ["Bench"],
                        "details": {},
                        "parent_asin": asin,
                    }
                )
                + "\n"
            )
            old.write(
                json.dumps(
                    {"asin": asin, "title": title, "description": description, "brand": store, "category": ["Bench"]}
                )
                + "\n"
            )
    done.touch()


def run_one(kind: str, directory: Path, out: Path, threads: int | None, memory_limit: str) -> None:
    """Convert in this process and print seconds and peak RSS as JSON (the child side)."""
    from datamodules.amazon2023 import convert_amazon2023  # imported before the clock starts
    from datamodules.amazon_raw import convert_amazon_raw

    before = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before, start = before.ru_utime + before.ru_stime, time.perf_counter()
    if kind == "2023":
        convert_amazon2023(directory, "Bench", out, threads=threads, memory_limit=memory_limit)
    else:
        convert_amazon_raw(directory, "Bench", out)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu_before  # all threads: compare it with the wall time under load
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": usage.ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="reviews to generate")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench_convert"), help="where the files are generated")
    parser.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all cores)")
    parser.add_argument("--memory-limit", default="8GB", help="DuckDB memory_limit")
    parser.add_argument("--child", choices=["2023", "2018"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = args.dir / f"rows{args.rows}"
    if args.child:
        run_one(args.child, directory, args.out, args.threads, args.memory_limit)
        return

    start = time.perf_counter()
    generate(directory, args.rows)
    print(f"data: {directory} ({args.rows} reviews; generated/checked in {time.perf_counter() - start:.0f}s)")
    results = {}
    for kind in ("2023", "2018"):
        out = directory / f"out{kind}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        command = [
            sys.executable,
            __file__,
            "--child",
            kind,
            "--rows",
            str(args.rows),
            "--dir",
            str(args.dir),
            "--out",
            str(out),
            "--memory-limit",
            args.memory_limit,
            *(["--threads", str(args.threads)] if args.threads else []),
        ]
        done = subprocess.run(
            command, check=True, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
        )
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        counts = json.loads((out / "manifest.json").read_text())["counts"]
        seconds, cpu = results[kind]["seconds"], results[kind]["cpu_seconds"]
        print(
            f"{kind} converter: {seconds:.1f}s wall ({cpu:.1f}s CPU), {args.rows / seconds:,.0f} rows/s, "
            f"peak RSS {results[kind]['peak_rss_mib']:,.0f} MiB -> {counts}"
        )
    same = all(
        (directory / "out2023" / f"Bench.{name}").read_bytes() == (directory / "out2018" / f"Bench.{name}").read_bytes()
        for name in OUTPUTS
    )
    print(f"speed-up {results['2018']['seconds'] / results['2023']['seconds']:.1f}x; identical outputs: {same}")


if __name__ == "__main__":
    main()
