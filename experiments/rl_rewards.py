"""Stage 4's reward table: the SFT model against GRPO with each reward alone and combined, over seeds.

    python experiments/rl_rewards.py --seeds 42 43 44                     # SFT + every RL row, then the table
    python experiments/rl_rewards.py --seeds 42 --rows hit combined       # some rows only
    python experiments/rl_rewards.py --seeds 42 43 44 --sft_run 'runs/sft/seed{seed}'   # reuse finished SFT runs
    python experiments/rl_rewards.py --seeds 42 43 44 --report_only       # collect finished runs

Per seed, a generated pipeline file (``<run_dir>/seed<S>/pipeline.yaml``, run by ``semconv pipeline``: finished
stages are skipped on a rerun) holds stage 3 (``configs/<ds>/llm.yaml`` with that seed, its export in
``<run_dir>/seed<S>/artifacts/llm``) and one ``configs/<ds>/rl.yaml`` fit per row of :data:`ROWS`, each starting from
that export. ``--sft_run`` points at finished stage-3 runs instead (a directory with ``export/`` and
``csv/version_0/test_metrics.json``, ``{seed}`` filled in). Every row is tested on every test user by stage 3's
beam search; the table gives each seed and the mean, then the rows whose mean HR@10 stays within SFT's seed
spread, and its last line names the best of those by NDCG@10::

    NDCG@10: SFT X (spread a-b), RL: <row> Y (spread c-d); HR@10: SFT Z (spread ...), RL: <row> W (spread ...)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"industrial": "configs/industrial"}
METRICS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10")
#: row -> (reward weights hit, rank, negative, distance; extra arguments). Rows with one reward use GRPO's
#: std-scaled advantages; the combined row uses Dr. GRPO's centred advantages, so the dense distance penalty keeps the
#: small share its weight gives it (scaled, it would reach unit size in every group without a hit), with the learning
#: rate raised to give the hit reward the same step size.
ROWS: dict[str, tuple[tuple[float, float, float, float], tuple[str, ...]]] = {
    "hit": ((1.0, 0.0, 0.0, 0.0), ("--model.init_args.lr", "0.0001")),
    "rank": ((0.0, 1.0, 0.0, 0.0), ("--model.init_args.lr", "0.0001")),
    "negative": ((0.0, 0.0, 1.0, 0.0), ("--model.init_args.lr", "0.0001")),
    "distance": ((0.0, 0.0, 0.0, 1.0), ("--model.init_args.lr", "0.0001")),
    "combined": (
        (1.0, 1.0, 0.2, 0.1),
        ("--model.init_args.lr", "0.0003", "--model.init_args.scale_advantages", "false"),
    ),
}
REWARDS = ("hit", "rank", "negative", "distance")


def rl_args(seed: int, row: str, init_from: str, out_dir: str) -> list[str]:
    """The ``lightning fit --config configs/<ds>/rl.yaml`` arguments of one row and seed."""
    weights, extra = ROWS[row]
    args = [
        "--seed_everything",
        str(seed),
        "--data.init_args.seed",
        str(seed),
        "--model.init_args.init_from",
        init_from,
    ]
    for name, weight in zip(REWARDS, weights, strict=True):
        args += [f"--model.init_args.rewards.{name}", str(weight)]
    return [*args, *extra, "--trainer.callbacks.init_args.output_dir", out_dir]


def pipeline_file(options: argparse.Namespace, seed: int) -> Path:
    configs = DATASETS[options.dataset]
    run = Path(options.run_dir) / f"seed{seed}"
    art = run / "artifacts"
    stages = []
    if options.sft_run:
        init_from = str(Path(options.sft_run.format(seed=seed)) / "export")
    else:
        init_from = str(art / "llm")
        steps = ["--trainer.max_time", "null", "--trainer.max_steps", str(options.steps)] if options.steps else []
        stages.append(
            {
                "name": "llm",
                "command": "fit",
                "config": [f"{configs}/llm.yaml"],
                "args": ["--seed_everything", str(seed), "--data.init_args.seed", str(seed), *steps]
                + ["--trainer.callbacks.init_args.output_dir", init_from],
                "artifact": init_from,
                "row": "SFT (stage 3)",
            }
        )
    for row in options.rows:
        out = str(art / f"rl_{row}")
        stage = {"name": f"rl_{row}", "command": "fit", "config": [f"{configs}/rl.yaml"], "artifact": out}
        stage["args"] = rl_args(seed, row, init_from, out) + options.extra_args
        stage["inputs"] = [init_from] if options.sft_run else []
        stage["row"] = f"RL: {row}"
        stages.append(stage)
    run.mkdir(parents=True, exist_ok=True)
    path = run / "pipeline.yaml"
    spec = {"name": f"{options.dataset} stage-4 rewards, seed {seed}", "run_dir": str(run), "stages": stages}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_metrics(directory: Path) -> dict[str, float]:
    files = sorted(directory.glob("csv/version_*/test_metrics.json"))
    if not files:
        raise FileNotFoundError(f"{directory}: no csv/version_*/test_metrics.json (did the run finish?)")
    return json.loads(files[-1].read_text())["metrics"]


def collect(options: argparse.Namespace, seed: int) -> dict[str, dict[str, float]]:
    run = Path(options.run_dir) / f"seed{seed}"
    sft = Path(options.sft_run.format(seed=seed)) if options.sft_run else run / "llm"
    rows = {"SFT": test_metrics(sft)}
    for row in options.rows:
        rows[f"RL: {row}"] = test_metrics(run / f"rl_{row}")
    return rows


def report(options: argparse.Namespace, results: dict[int, dict[str, dict[str, float]]]) -> str:
    labels = list(next(iter(results.values())))
    seeds = sorted(results)
    header = " | ".join(m.upper() for m in METRICS)
    lines = [
        f"# Stage 4 rewards: {options.dataset}, seeds {seeds}",
        "",
        f"| model | seed | {header} |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for label in labels:
        for seed in seeds:
            values = " | ".join(f"{results[seed][label][m]:.4f}" for m in METRICS)
            lines.append(f"| {label} | {seed} | {values} |")
        means = " | ".join(f"{np.mean([results[s][label][m] for s in seeds]):.4f}" for m in METRICS)
        lines.append(f"| **{label}** | mean | {means} |")

    def summary(label: str, metric: str) -> str:
        values = [results[s][label][metric] for s in seeds]
        return f"{np.mean(values):.4f} (spread {min(values):.4f}-{max(values):.4f})"

    def mean(label: str, metric: str) -> float:
        return float(np.mean([results[s][label][metric] for s in seeds]))

    # the row the last line names: the best NDCG@10 among rows whose mean HR@10 stays within SFT's seed spread
    floor = min(results[s]["SFT"]["hr@10"] for s in seeds)
    keeping = [label for label in labels[1:] if mean(label, "hr@10") >= floor]
    best = max(keeping or labels[1:], key=lambda label: mean(label, "ndcg@10"))
    lines += [
        "",
        f"Rows whose mean HR@10 stays at or above SFT's lowest seed ({floor:.4f}): {', '.join(keeping) or 'none'}.",
        "",
        f"NDCG@10: SFT {summary('SFT', 'ndcg@10')}, {best} {summary(best, 'ndcg@10')}; "
        f"HR@10: SFT {summary('SFT', 'hr@10')}, {best} {summary(best, 'hr@10')}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="industrial")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--steps", type=int, default=None, help="stage-3 optimiser steps (default: the config's)")
    parser.add_argument("--sft_run", default=None, help="finished stage-3 runs, '{seed}' filled in (skips stage 3)")
    parser.add_argument("--run_dir", default=None, help="default runs/rl_rewards/<dataset>")
    parser.add_argument("--report_only", action="store_true", help="collect finished runs without running")
    parser.add_argument("--extra_args", nargs=argparse.REMAINDER, default=[], help="appended to every RL fit")
    options = parser.parse_args(argv)
    options.run_dir = options.run_dir or f"runs/rl_rewards/{options.dataset}"
    results = {}
    for seed in options.seeds:
        path = pipeline_file(options, seed)
        if not options.report_only:
            command = [sys.executable, "-m", "lightning_modules.cli", "pipeline", "--config", str(path)]
            subprocess.run(command, check=True, cwd=ROOT)
        results[seed] = collect(options, seed)
    text = report(options, results)
    out = Path(options.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
