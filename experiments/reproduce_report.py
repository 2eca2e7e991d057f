"""Markdown and plots for experiments/reproduce.py --collect: our rows beside the paper's.

Our numbers come from the stage records that ``semconv pipeline`` writes (``<run_dir>/stages/<stage>.json``: test
metrics, wall time, the command that ran), falling back to a stage's own ``test_metrics.json`` when it has no
record; the collision rate and token count of a codebook row come from its index artifact's manifest. Over several
seeds (one run directory each), every row that ran shows once per seed and then as the seeds' mean.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from datamodules.artifacts import atomic_write, read_artifact
from datamodules.code_index import INDEX_FILE, KIND, tokens_to_codes
from experiments.tables import Table

NAMES = {"hr@1": "HR@1", "hr@5": "HR@5", "hr@10": "HR@10", "ndcg@5": "NDCG@5", "ndcg@10": "NDCG@10"}
DASH = "—"


def stage_result(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """A finished stage's test metrics, wall time and command line; None while it has not finished."""
    path = run_dir / "stages" / f"{stage}.json"
    if path.is_file():
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("status") != "done" or record.get("metrics") is None:
            return None
        return {"metrics": record["metrics"], "wall_s": record.get("wall_s"), "command": record.get("command")}
    found = run_dir / stage / "csv" / "version_0" / "test_metrics.json"  # a stage run by hand, without a record
    if not found.is_file():
        return None
    return {"metrics": json.loads(found.read_text(encoding="utf-8"))["metrics"], "wall_s": None, "command": None}


def codebook_stats(directory: Path) -> dict[str, Any] | None:
    """Raw collision rate and added tokens (``L x K`` plus any extra disambiguation level) of an index artifact."""
    if not (directory / "manifest.json").is_file():
        return None
    artifact = read_artifact(directory, KIND)
    manifest, levels = artifact.manifest, int(artifact.manifest["num_levels"])
    tokens = levels * int(manifest["codebook_size"])
    if int(manifest.get("tokens_per_item", levels)) > levels:
        _, codes = tokens_to_codes(json.loads(artifact.file(INDEX_FILE).read_text(encoding="utf-8")))
        tokens += int((codes[:, levels:].max(0).values + 1).sum())
    return {"cr": float(manifest["raw_collision_rate"]), "tokens": tokens}


def gather(table: Table, root: Path) -> list[dict[str, Any]]:
    """Per row: label, stage, note, our metrics (None: pending or not run), wall time, CR and T.

    Args:
        table: the table's rows and stages.
        root: the directory the pipeline ran in (its paths are relative to it).
    """
    run_dir = root / table.run_dir
    artifacts = {stage.name: stage.artifact for stage in table.stages}
    rows = []
    for row in table.rows:
        result = stage_result(run_dir, row.stage) if row.stage else None
        stats = codebook_stats(root / artifacts[row.codebook]) if row.codebook else None
        rows.append(
            {
                "label": row.label,
                "stage": row.stage,
                "note": row.note,
                "x": row.x,
                "metrics": result and result["metrics"],
                "wall_s": result and result["wall_s"],
                "command": result and result["command"],
                **(stats or {"cr": None, "tokens": None}),
            }
        )
    return rows


def _mean(values: list[Any]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def _mean_row(versions: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """The seeds' mean of one row: metrics over the seeds that finished, wall time, CR and T likewise."""
    done = [row["metrics"] for row in versions if row["metrics"]]
    metrics = {key: _mean([found.get(key) for found in done]) for key in done[0]} if done else None
    count = f"{len(done)} seeds" if len(done) == len(versions) else f"{len(done)} of {len(versions)} seeds"
    notes = [f"(mean of {count})" if done else None, versions[0]["note"]]
    mean = {key: _mean([row[key] for row in versions]) for key in ("wall_s", "cr", "tokens")}
    return {**versions[0], **mean, "metrics": metrics, "command": None, "note": " ".join(filter(None, notes)) or None}


def seed_rows(per_seed: list[list[dict[str, Any]]], seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    """:func:`gather`'s rows of each seed's run as one list: per row, ``<label> (seed S)`` for each seed (no paper
    numbers: the label is not the paper's), then their mean under the row's own label; a row not run shows once."""
    rows = []
    for versions in zip(*per_seed, strict=True):
        if versions[0]["stage"] is None:
            rows.append(versions[0])
            continue
        for row, seed in zip(versions, seeds, strict=True):
            rows.append({**row, "label": f"{row['label']} (seed {seed})", "seed": seed})
        rows.append(_mean_row(versions))
    return rows


def machine(run_dir: Path, number: int) -> str:
    """The machine of the table's last pipeline run, from its results.json."""
    for path in (run_dir / f"table{number}.results.json", run_dir / "results.json"):
        if path.is_file():
            info = json.loads(path.read_text(encoding="utf-8")).get("machine") or {}
            hardware = ", ".join(info.get("gpus") or []) or f"{info.get('cpus', '?')} CPU cores"
            return f"{hardware} (torch {info.get('torch', '?')})"
    return f"unknown (no results.json in {run_dir} yet)"


def budget(table: Table, rows: list[dict[str, Any]]) -> str:
    """Stage 3's budget as it ran (the records' command lines), else as the pipeline file asks."""
    llm = {stage.name: stage for stage in table.stages if stage.name in table.llm_stages}
    ran = {row["stage"]: row["command"] for row in rows if row["stage"] in llm and row["command"]}
    caps = set()
    for argv in ran.values() if ran else (stage.args for stage in llm.values()):  # what ran, else what will
        caps.add(argv[argv.index("--trainer.max_steps") + 1] if "--trainer.max_steps" in argv else None)
    if caps == {None} or not caps:
        config = table.dataset.llm[0]
        trainer = {key: table.dataset.value(config, "trainer", key) for key in ("max_time", "max_epochs")}
        shipped = ", ".join(f"{key} {value}" for key, value in trainer.items() if value is not None)
        return f"stage 3 as shipped (`{config}`: {shipped}); stages 1-2 as shipped"
    if len(caps) == 1:
        steps = caps.pop()
        return f"stage 3 capped at {steps} optimiser steps per run (`--steps {steps}`); stages 1-2 as shipped"
    return f"stage 3 budgets differ between rows ({sorted(map(str, caps))} steps; rerun with one --steps)"


def _cell(value: Any, kind: str = "metric") -> str:
    if value is None:
        return DASH
    if kind == "cr":
        return f"{100 * value:.2f}%"
    return str(int(value)) if kind == "tokens" else f"{value:.4f}"


def _runs(table: Table, seeds: tuple[int, ...]) -> tuple[str, str, str]:
    """The heading's seed part, the run directory of the pipeline file(s), and the ``--seed`` flag that ran them."""
    if not seeds:
        return "", table.run_dir, ""
    listed = ", ".join(map(str, seeds))
    braces = "{" + ",".join(map(str, seeds)) + "}"  # shell brace expansion: seed{42,43}
    run_dir = table.run_dir if len(seeds) == 1 else f"{Path(table.run_dir).parent.as_posix()}/seed{braces}"
    return f", seed{'s' if len(seeds) > 1 else ''} {listed}", run_dir, " --seed " + " ".join(map(str, seeds))


def render(
    table: Table, rows: list[dict[str, Any]], root: Path, figure: str | None, seeds: tuple[int, ...] = ()
) -> str:
    """The table's markdown section between its ``<!-- reproduce:table<N>:<dataset> -->`` markers.

    Args:
        table: the table's rows and stages (the first seed's, over several seeds).
        rows: :func:`gather`'s rows (:func:`seed_rows`' over several seeds).
        root: the directory the pipeline ran in.
        figure: the plot's link from where the markdown goes, or None.
        seeds: the seeds the rows ran with (default: the table's own ``--seed``, if any).
    """
    seeds = seeds or (() if table.seed is None else (table.seed,))
    heading, run_dir, flag = _runs(table, seeds)
    marker = f"reproduce:table{table.number}:{table.dataset.name}"
    metrics, extra = table.metrics, ("cr", "tokens") if table.number == 5 else ()
    header = [table.row_header, *(e.upper() if e == "cr" else "T" for e in extra), *(NAMES[m] for m in metrics)]
    header += [f"paper {'CR' if e == 'cr' else 'T'}" for e in extra] + [f"paper {NAMES[m]}" for m in metrics]
    lines = [
        f"<!-- {marker} -->",
        f"### {table.title} ({table.dataset.name}{heading})",
        "",
        f"Ours: {table.dataset.title} (test split); machine: {machine(root / table.run_dir, table.number)}; budget:"
        f" {budget(table, rows)}. Paper: Games, Llama-7B (its Table {table.number}).",
        f"Pipeline: `{run_dir}/table{table.number}.pipeline.yaml` (`python experiments/reproduce.py --table "
        f"{table.number} --dataset {table.dataset.name}{flag} --run`).",
        "",
        "| " + " | ".join([*header, "stage", "wall time"]) + " |",
        "|" + "---|" * (len(header) + 2),
    ]
    for row in rows:
        paper = table.paper.get(row["label"], {})
        ours = row["metrics"] or {}
        cells = [row["label"], *(_cell(row[e], e) for e in extra), *(_cell(ours.get(m)) for m in metrics)]
        cells += [_cell(paper.get(e), e) for e in extra] + [_cell(paper.get(m)) for m in metrics]
        if row["stage"] is None:
            where = row["note"] or "not run"
        else:
            state = "" if row["metrics"] else " (pending)"
            where = f"`{row['stage']}`{state}" + (f" {row['note']}" if row["note"] else "")
        wall = DASH if row["wall_s"] is None else f"{row['wall_s'] / 60:.1f} min"
        lines.append("| " + " | ".join([*cells, where, wall]) + " |")
    lines += [""] + [f"{note}" for note in table.notes] + ([""] if table.notes else [])
    if figure:
        lines += [f"![{table.title} on {table.dataset.name}]({figure})", ""]
    lines.append(f"<!-- /{marker} -->")
    return "\n".join(lines) + "\n"


def plot(table: Table, rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Table 4: HR@10 / NDCG@10 vs the negative ratio; Table 5: collision rate / HR@10 vs code levels."""
    if table.number not in (4, 5):
        return None
    rows = [row for row in rows if row.get("seed") is None]  # over several seeds: their means
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if table.number == 4:
        panels = [("hr@10", "HR@10", 1.0), ("ndcg@10", "NDCG@10", 1.0)]
        xlabel = "negative samples per positive (1:N)"
    else:
        panels = [("cr", "raw collision rate (%)", 100.0), ("hr@10", "HR@10", 1.0)]
        xlabel = "code levels C"
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, (key, name, scale) in zip(axes, panels, strict=True):
        ticks = [row["x"] for row in rows]
        axis.set_xticks(ticks, [f"1:{x:g}" if table.number == 4 else f"{x:g}" for x in ticks])
        for who, style in ((f"ours ({table.dataset.name})", "o-"), ("paper (Games)", "s--")):
            points = []
            for row in rows:
                source = row if key == "cr" else (row["metrics"] or {})
                value = source.get(key) if who != "paper (Games)" else table.paper.get(row["label"], {}).get(key)
                if value is not None:
                    points.append((row["x"], scale * value))
            if points:
                axis.plot(*zip(*points, strict=True), style, label=who)
        axis.set(xlabel=xlabel, ylabel=name, title=f"{name} vs {xlabel.split(' (')[0]}")
        axis.legend()
    figure.suptitle(f"{table.title}: {table.dataset.name} vs the paper")
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png"), mode="wb")
    plt.close(figure)
    return path


def replace_section(document: str, section: str, marker: str) -> str:
    """``document`` with the ``<!-- marker -->`` ... ``<!-- /marker -->`` section replaced (appended if absent)."""
    pattern = re.compile(rf"<!-- {re.escape(marker)} -->.*?<!-- /{re.escape(marker)} -->\n?", re.DOTALL)
    if pattern.search(document):
        return pattern.sub(lambda _: section, document, count=1)
    return document.rstrip("\n") + "\n\n" + section


def relative(target: Path, start: Path) -> str:
    """``target`` as a markdown link from a file in ``start``."""
    return Path(os.path.relpath(target, start)).as_posix()
