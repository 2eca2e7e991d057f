"""The cold-start protocol: items held out of every fit, coded by cold start, then ranked by the stage-3 model.

    python experiments/cold_start.py --dataset industrial --seeds 42 43 44            # run (resumes) and report
    python experiments/cold_start.py --dataset industrial --seeds 42 --steps 2000     # a shorter stage 3
    python experiments/cold_start.py unseen runs/.../topk_test.rank0.jsonl  # standard split: unseen-target users

Per seed, a seeded share of the catalogue (``--share``, default 5%) becomes the held-out set ``H``
(``cold_items.json``). With ``data.init_args.cold_items`` every stage reads the catalogue with ``H`` removed from
every sequence except as a user's last item (:mod:`datamodules.cold_items`): no training sequence, training
interaction, validation target, negative, text sample or codebook fit contains an item of ``H``. Then:

1. DCCF and the text-grounded codebook fit on the rest; the codebook export codes ``H`` from their text alone.
2. Two more indexes differ only in ``H``'s codes (:func:`callbacks.cold_start.assign_codes` with ``items``): the
   codes the behaviour-only input gives them (their untrained DCCF rows: what the codebook did for an item it
   never saw before text grounding), and random unique codes.
3. Stage 3 trains once (on the other items' codes, which the three indexes share) and is tested with each index:
   only the trie differs, no retraining. Each index is tested twice: the beam search alone, and with the held-out
   items retrieved by code prefix (``model.init_args.cold_start_prefix 1``, :mod:`lightning_modules.components.
   cold_ranking`): a model never trained to generate an item's codes rarely reaches them by beam search.
4. SASRec and most popular run on the same split, for the same users.

Every run is a stage of a generated pipeline file (``<run_dir>/seed<S>/pipeline.yaml``, run by ``semconv
pipeline``: finished stages are skipped on a rerun, a killed one resumes). The report gives HR@10 and NDCG@10 on
the test users whose target is in ``H`` and HR@10 over all users, per seed and averaged. Its last line::

    cold-target HR@10: text-grounded X, current Y, random Z; all users HR@10 W
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from callbacks.cold_start import assign_codes, load_codebook  # noqa: E402
from datamodules.base import RecDataModule  # noqa: E402
from datamodules.items import read_matrix  # noqa: E402
from datamodules.split import LeaveLastOutSplit  # noqa: E402

DATASETS = {
    "industrial": ("../shared/data/Industrial_and_Scientific", "Industrial_and_Scientific", "configs/industrial"),
}
# codes of the held-out items -> the stage whose top-K lists score them: the beam search alone, then with the held-out
# items retrieved by code prefix (``model.init_args.cold_start_prefix``; the method's cold-start path)
VARIANTS = {
    "text-grounded": "llm",
    "current": "llm_current",
    "random": "llm_random",
    "text-grounded, prefix retrieval": "llm_grounded_prefix",
    "current, prefix retrieval": "llm_current_prefix",
    "random, prefix retrieval": "llm_random_prefix",
}
BASELINES = {"SASRec": "sasrec_topk", "most popular": "most_popular"}
PREFIX = ["--model.init_args.cold_start_prefix", "1"]
BEAM_ONLY = ["--model.init_args.cold_start_prefix", "0"]
GROUNDED, CURRENT, RANDOM = (f"{name}, prefix retrieval" for name in ("text-grounded", "current", "random"))
K = 10


def choose_cold_items(num_items: int, share: float, seed: int) -> np.ndarray:
    """A seeded ``share`` of the item ids, sorted."""
    count = max(1, round(share * num_items))
    return np.sort(np.random.default_rng(seed).choice(num_items, count, replace=False))


def pipeline_file(options: argparse.Namespace, seed: int) -> Path:
    """Write the seed's pipeline file (its stages are the protocol's runs) and return its path."""
    data_dir, name, configs = DATASETS[options.dataset]
    run = Path(options.run_dir) / f"seed{seed}"
    cold = run / "cold_items.json"
    if not cold.is_file():
        catalogue = RecDataModule(data_dir, name).load_catalogue()
        run.mkdir(parents=True, exist_ok=True)
        items = choose_cold_items(catalogue.num_items, options.share, seed)
        cold.write_text(json.dumps({"seed": seed, "share": options.share, "items": items.tolist()}))
    held = ["--data.init_args.cold_items", str(cold), "--seed_everything", str(seed)]
    art = run / "artifacts"
    script = "experiments/cold_start.py"

    def recode(variant: str) -> dict:
        out = str(art / f"codebook_{variant}")
        args = ["recode", "--variant", variant, "--codebook", str(art / "codebook"), "--out", out, "--seed", str(seed)]
        return {
            "name": f"codebook_{variant}",
            "command": "python",
            "script": script,
            "args": args + ["--embeddings", str(art / "dccf_embeddings")],
            "inputs": [str(art / "codebook")],
            "artifact": out,
        }

    def llm_test(variant: str, extra: tuple[str, ...] = ()) -> dict:
        index = art / ("codebook" if variant == "grounded" else f"codebook_{variant}")
        return {
            "name": f"llm_{variant}" + ("_prefix" if extra == tuple(PREFIX) else ""),
            "command": "test",
            "config": [f"{configs}/llm.yaml"],
            "args": [*held, "--data.init_args.index", str(index), "--ckpt_path", "{llm.checkpoint}", *extra],
            "inputs": [str(index)],
        }

    steps = ["--trainer.max_time", "null", "--trainer.max_steps", str(options.steps)] if options.steps else []
    stages = [
        {
            "name": "dccf",
            "command": "fit",
            "config": [f"{configs}/dccf.yaml"],
            "args": [*held, "--trainer.callbacks.init_args.output_dir", str(art / "dccf_embeddings")],
            "inputs": [data_dir, str(cold)],
            "artifact": str(art / "dccf_embeddings"),
        },
        {
            "name": "codebook",
            "command": "fit",
            "config": [f"{configs}/codebook.yaml"],
            "args": [*held, "--data.init_args.embeddings", str(art / "dccf_embeddings")]
            + ["--trainer.callbacks.init_args.output_dir", str(art / "codebook")],
            "inputs": [str(art / "dccf_embeddings")],
            "artifact": str(art / "codebook"),
        },
        recode("current"),
        recode("random"),
        {
            "name": "llm",
            "command": "fit",
            "config": [f"{configs}/llm.yaml"],
            "args": [*held, "--data.init_args.seed", str(seed), "--data.init_args.index", str(art / "codebook")]
            + steps
            + BEAM_ONLY
            + ["--trainer.callbacks.init_args.output_dir", str(art / "llm")],
            "inputs": [str(art / "codebook")],
            "artifact": str(art / "llm"),
            "row": "generative, text-grounded codes",
        },
        llm_test("current", tuple(BEAM_ONLY)),
        llm_test("random", tuple(BEAM_ONLY)),
        {"name": "sasrec", "command": "fit", "config": [f"{configs}/sasrec.yaml"], "args": held, "row": "SASRec"},
        {
            "name": "sasrec_topk",
            "command": "predict",
            "config": [f"{configs}/sasrec.yaml"],
            "args": [*held, "--ckpt_path", "{sasrec.checkpoint}"],
        },
        {
            "name": "most_popular",
            "command": "predict",
            "config": [f"{configs}/most_popular.yaml"],
            "args": [*held, "--trainer.callbacks+=callbacks.TopKWriter"],
        },
        *(llm_test(variant, tuple(PREFIX)) for variant in ("grounded", "current", "random")),
    ]
    for stage in stages:
        if stage["command"] != "python":
            stage["args"] = [*stage["args"], *options.extra_args]
    path = run / "pipeline.yaml"
    spec = {"name": f"{name} cold start, seed {seed}", "run_dir": str(run), "stages": stages}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def recode(options: argparse.Namespace) -> None:
    """A pipeline stage: the same index with the held-out items coded another way (``current`` or ``random``)."""
    codebook = load_codebook(options.codebook)
    records = [r for r in codebook.artifact.manifest.get("cold_start", []) if r.get("source") == "cold_items"]
    if not records:
        raise SystemExit(f"{options.codebook}: no held-out items (was stage 2 run with data.init_args.cold_items?)")
    items = np.asarray(records[0]["items"])
    if options.variant == "current":
        behaviour = read_matrix(Path(options.embeddings) / "item_embeddings.pt")
        assign_codes(options.codebook, embeddings=behaviour[items], items=items, output_dir=options.out)
    else:
        quantizer = codebook.quantizer
        shape = (len(items), quantizer.num_levels)
        codes = np.random.default_rng(options.seed).integers(0, quantizer.codebook_size, shape)
        assign_codes(options.codebook, codes=torch.from_numpy(codes), items=items, output_dir=options.out)


def topk_file(stage_dir: Path) -> Path:
    files = sorted(stage_dir.glob("csv/version_0/topk_test.rank*.jsonl"))
    files += sorted(stage_dir.glob("**/top_k.rank*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{stage_dir}: no top-K file (did the stage finish?)")
    return files[0]


def user_metrics(path: Path, targets: dict[int, int]) -> dict[int, tuple[float, float]]:
    """Per original user id: (hit@K, ndcg@K) of the user's test target in the top-K list of ``path``."""
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        items = record["items"][:K]
        target = targets[int(record["user"])]
        rank = items.index(target) if target in items else None
        out[int(record["user"])] = (0.0, 0.0) if rank is None else (1.0, 1.0 / math.log2(rank + 2))
    return out


def evaluate_seed(options: argparse.Namespace, seed: int) -> dict[str, dict[str, float]]:
    data_dir, name, _ = DATASETS[options.dataset]
    run = Path(options.run_dir) / f"seed{seed}"
    catalogue = RecDataModule(data_dir, name, cold_items=str(run / "cold_items.json")).load_catalogue()
    split = LeaveLastOutSplit(catalogue)
    test = split.samples("test")
    target_of = catalogue.items[test.target_pos]
    users = catalogue.user_ids[test.user]
    targets = dict(zip(users.tolist(), target_of.tolist(), strict=True))
    cold = set(json.loads((run / "cold_items.json").read_text())["items"])
    cold_users = [user for user, target in targets.items() if target in cold]
    rows = {}
    for label, stage in {**VARIANTS, **BASELINES}.items():
        per_user = user_metrics(topk_file(run / stage), targets)
        missing = set(targets) - set(per_user)
        if missing:
            raise ValueError(f"{run / stage}: {len(missing)} test users have no top-K list")
        rows[label] = {
            "cold_hr@10": float(np.mean([per_user[u][0] for u in cold_users])),
            "cold_ndcg@10": float(np.mean([per_user[u][1] for u in cold_users])),
            "all_hr@10": float(np.mean([hit for hit, _ in per_user.values()])),
            "all_ndcg@10": float(np.mean([gain for _, gain in per_user.values()])),
            "cold_users": len(cold_users),
        }
    return rows


def report(options: argparse.Namespace, results: dict[int, dict[str, dict[str, float]]]) -> str:
    labels = list(next(iter(results.values())))
    keys = ("cold_hr@10", "cold_ndcg@10", "all_hr@10", "all_ndcg@10")
    lines = [
        f"# Cold-start protocol: {options.dataset}, {options.share:.0%} of items held out, seeds {sorted(results)}",
        "",
        "| codes / model | seed | cold-target users | cold HR@10 | cold NDCG@10 | all HR@10 | all NDCG@10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        for seed, rows in sorted(results.items()):
            row = rows[label]
            values = " | ".join(f"{row[key]:.4f}" for key in keys)
            lines.append(f"| {label} | {seed} | {row['cold_users']} | {values} |")
        means = " | ".join(f"{np.mean([rows[label][key] for rows in results.values()]):.4f}" for key in keys)
        lines.append(f"| **{label}** | mean | | {means} |")
    mean = {
        label: {key: float(np.mean([rows[label][key] for rows in results.values()])) for key in keys}
        for label in labels
    }
    lines += [
        "",
        "The last line compares the codes under the method's cold-start path (beam search + prefix retrieval):",
        "",
        f"cold-target HR@10: text-grounded {mean[GROUNDED]['cold_hr@10']:.4f}, current "
        f"{mean[CURRENT]['cold_hr@10']:.4f}, random {mean[RANDOM]['cold_hr@10']:.4f}; all users HR@10 "
        f"{mean[GROUNDED]['all_hr@10']:.4f}",
    ]
    return "\n".join(lines)


def unseen_targets(options: argparse.Namespace) -> None:
    """On the standard split: HR@10 over all users and over those whose test target has no training interaction."""
    data_dir, name, _ = DATASETS[options.dataset]
    catalogue = RecDataModule(data_dir, name).load_catalogue()
    split = LeaveLastOutSplit(catalogue)
    counts = np.bincount(split.train_interactions()[1], minlength=catalogue.num_items)
    test = split.samples("test")
    target_of = catalogue.items[test.target_pos]
    targets = dict(zip(catalogue.user_ids[test.user].tolist(), target_of.tolist(), strict=True))
    unseen = [user for user, target in targets.items() if counts[target] == 0]
    for path in options.topk:
        per_user = user_metrics(Path(path), targets)
        everyone = np.mean([hit for hit, _ in per_user.values()])
        cold = np.mean([per_user[user][0] for user in unseen])
        print(f"{path}: all users HR@10 {everyone:.4f}; unseen-target users ({len(unseen)}) HR@10 {cold:.4f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["unseen"]:
        parser = argparse.ArgumentParser(prog="cold_start.py unseen", description=unseen_targets.__doc__)
        parser.add_argument("--dataset", choices=sorted(DATASETS), default="industrial")
        parser.add_argument("topk", nargs="+", help="topk_test.rank0.jsonl files of stage-3 runs")
        unseen_targets(parser.parse_args(argv[1:]))
        return 0
    if argv[:1] == ["recode"]:
        parser = argparse.ArgumentParser(prog="cold_start.py recode")
        parser.add_argument("--variant", choices=("current", "random"), required=True)
        parser.add_argument("--codebook", required=True)
        parser.add_argument("--embeddings", required=True)
        parser.add_argument("--out", required=True)
        parser.add_argument("--seed", type=int, default=0)
        recode(parser.parse_args(argv[1:]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="industrial")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--share", type=float, default=0.05, help="share of the items held out")
    parser.add_argument("--steps", type=int, default=None, help="stage-3 optimiser steps (default: the config's)")
    parser.add_argument("--run_dir", default=None, help="default runs/cold_start/<dataset>")
    parser.add_argument("--report_only", action="store_true", help="collect finished seeds without running")
    parser.add_argument(
        "--extra_args", nargs=argparse.REMAINDER, default=[], help="appended to every fit/test/predict (smoke runs)"
    )
    options = parser.parse_args(argv)
    if not 0 < options.share < 1:
        parser.error("--share must be in (0, 1)")
    options.run_dir = options.run_dir or f"runs/cold_start/{options.dataset}"
    results = {}
    for seed in options.seeds:
        path = pipeline_file(options, seed)
        if not options.report_only:
            command = [sys.executable, "-m", "lightning_modules.cli", "pipeline", "--config", str(path)]
            subprocess.run(command, check=True, cwd=ROOT)
        results[seed] = evaluate_seed(options, seed)
    text = report(options, results)
    out = Path(options.run_dir)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
