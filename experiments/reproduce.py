"""Regenerate the paper's tables: one ``semconv pipeline`` file per table, run it, and collect markdown and plots.

    python experiments/reproduce.py --table 4 --dataset industrial              # write the pipeline file, show the plan
    python experiments/reproduce.py --table 4 --dataset industrial --run        # run it (finished stages are skipped)
    python experiments/reproduce.py --table 4 --dataset industrial --collect --docs   # markdown (+ docs/results.md)
    python experiments/reproduce.py --table 1 --dataset industrial --seed 42 43 44 --run      # one run per seed
    python experiments/reproduce.py --table 1 --dataset industrial --seed 42 43 44 --collect  # per-seed rows + mean

Rows and stages: experiments/tables.py; the paper's numbers: experiments/paper_numbers.py. Every table of a dataset
shares ``run_dir: runs/reproduce/<dataset>``, so a stage common to several tables (the DCCF embeddings, the default
codebook, the "Ours" LLM) runs once. ``--steps N`` caps every stage-3 LLM run at N optimiser steps (the markdown
says so). ``--collect`` writes ``runs/reproduce/<dataset>/table<N>.md`` and, for Tables 4 and 5, a plot under
``docs/figures/``; ``--docs`` also replaces the table's marked section of docs/results.md.

``--seed S [S ...]`` (alias ``--seeds``; default: none, the configs' own seeds) gives every fit/test stage
``--seed_everything S`` (and ``--data.init_args.seed S`` where its DataModule takes one) and its own run directory,
``runs/reproduce/<dataset>/seed<S>``, so seeds never share stage records. Without ``--collect`` each seed's pipeline
is written (and, with ``--run``, run) in turn; ``--collect`` with one seed writes that run's ``seed<S>/table<N>.md``,
with several ``runs/reproduce/<dataset>/table<N>.seeds_<S1>_<S2>....md``: every row that ran once per seed, then the
seeds' mean under the row's own label (beside the paper's numbers).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the project's packages live at the repository root
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from datamodules.artifacts import atomic_write  # noqa: E402
from datamodules.errors import ConfigError  # noqa: E402
from experiments import reproduce_report as report  # noqa: E402
from experiments.tables import DATASETS, TABLES, Table, build_table  # noqa: E402


def pipeline_path(table: Table, root: Path = REPO) -> Path:
    return root / table.run_dir / f"table{table.number}.pipeline.yaml"


def write_pipeline(table: Table, root: Path = REPO) -> Path:
    """Write the table's pipeline file (the ``semconv pipeline`` format) and return its path."""
    body = {
        "name": table.pipeline_name,
        "run_dir": table.run_dir,
        "stages": [stage.as_dict() for stage in table.stages],
    }
    header = (
        f"# {table.title} on {table.dataset.name}, written by experiments/reproduce.py (edits are overwritten).\n"
        f"#   python -m lightning_modules.cli pipeline --config {table.run_dir}/table{table.number}.pipeline.yaml\n"
    )
    text = header + yaml.safe_dump(body, sort_keys=False, width=120)
    return atomic_write(pipeline_path(table, root), lambda handle: handle.write(text))


def check_runnable(table: Table, llm_path: str | None) -> None:
    """Refuse a run that cannot work here, before anything starts (GPU-only stages, a missing model path)."""
    trains_llm = bool(table.llm_stages)
    if table.number == 6 and not any(row.stage for row in table.rows):
        raise ConfigError(
            "--table 6 trains one stage 3 per model: name local Hugging Face directories with --model-dir NAME=DIR "
            "(repeatable), e.g. --model-dir Llama-7B=/data/llama-7b --model-dir Llama-13B=/data/llama-13b."
        )
    if table.dataset.llm_gpu and trains_llm and llm_path is None:
        raise ConfigError(
            f"--dataset {table.dataset.name}: stage 3 is {table.dataset.llm[0]} (a pretrained LLM with LoRA): pass "
            "--llm-path /path/to/llama-7b (a local Hugging Face directory with weights and tokenizer)."
        )
    if table.number == 6 or (table.dataset.llm_gpu and trains_llm):
        import torch

        if not torch.cuda.is_available():
            what = "Table 6 (7B-13B LLMs)" if table.number == 6 else f"stage 3 on {table.dataset.name}"
            raise ConfigError(
                f"{what} needs a GPU, and torch sees none on this machine (torch.cuda.is_available() is False). "
                f"Run it on a GPU machine; the pipeline file is written with: python experiments/reproduce.py "
                f"--table {table.number} --dataset {table.dataset.name}"
            )


def run(table: Table, llm_path: str | None, root: Path = REPO) -> int:
    """Write the pipeline file, run ``semconv pipeline`` on it, keep a copy of its results.json; its exit code."""
    check_runnable(table, llm_path)
    path = write_pipeline(table, root)
    relative = path.relative_to(root).as_posix()
    if not (root / "lightning_modules" / "pipeline.py").is_file():
        raise ConfigError(
            f"`semconv pipeline` is not in this checkout yet (lightning_modules/pipeline.py is missing). The pipeline "
            f"file is written: run `python -m lightning_modules.cli pipeline --config {relative}` once it exists."
        )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "lightning_modules.cli", "pipeline", "--config", relative]
    print("$ " + " ".join(command), flush=True)
    status = subprocess.call(command, cwd=root, env=env)
    results = root / table.run_dir / "results.json"
    if status == 0 and results.is_file():  # the next table's run rewrites results.json: keep this one's
        shutil.copyfile(results, root / table.run_dir / f"table{table.number}.results.json")
    return status


def collect(
    tables: Table | Sequence[Table], root: Path = REPO, figures: Path | None = None, docs: Path | None = None
) -> str:
    """Write the table's markdown (and plot) from the pipeline's records; return the markdown.

    Args:
        tables: the table's rows and stages, or one table per seed (each with its own ``seed`` and run directory):
            then every row that ran shows once per seed and as the seeds' mean.
        root: the directory the pipeline ran in.
        figures: where plots go (default ``<root>/docs/figures``).
        docs: a markdown file whose ``<!-- reproduce:table<N>:<dataset> -->`` section is replaced (appended if
            absent), or None.
    """
    tables = [tables] if isinstance(tables, Table) else list(tables)
    table, seeds = tables[0], tuple(t.seed for t in tables if t.seed is not None)
    if len(tables) > 1:
        if len(set(seeds)) != len(tables):
            raise ConfigError(f"--collect over several runs needs one distinct --seed per run, got {list(seeds)}.")
        rows = report.seed_rows([report.gather(t, root) for t in tables], seeds)
        out = root / Path(table.run_dir).parent / f"table{table.number}.seeds_{'_'.join(map(str, seeds))}.md"
    else:
        rows, out = report.gather(table, root), root / table.run_dir / f"table{table.number}.md"
    figures = figures or root / "docs" / "figures"
    figure = report.plot(table, rows, figures / f"table{table.number}_{table.dataset.name}.png")
    markdown = report.render(table, rows, root, figure and report.relative(figure, out.parent), seeds)
    atomic_write(out, lambda handle: handle.write(markdown))
    if docs is not None:
        section = report.render(table, rows, root, figure and report.relative(figure, docs.parent), seeds)
        marker = f"reproduce:table{table.number}:{table.dataset.name}"
        document = docs.read_text(encoding="utf-8") if docs.is_file() else ""
        updated = report.replace_section(document, section, marker)
        atomic_write(docs, lambda handle: handle.write(updated))
    print(markdown, end="")
    print(f"written to {out}" + (f" and {figure}" if figure else "") + (f"; {docs} updated" if docs else ""))
    return markdown


def show(table: Table) -> int:
    """Write the table's pipeline file and print it (the plan); exit status 0."""
    path = write_pipeline(table)
    print(path.read_text(encoding="utf-8"))
    print(f"written to {path}; run it with --run, then --collect")
    return 0


def model_dirs(values: list[str]) -> dict[str, str]:
    """``--model-dir NAME=DIR`` values as ``{NAME: DIR}``."""
    parsed = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"--model-dir {value!r}: expected NAME=DIR, e.g. --model-dir Llama-7B=/data/llama-7b.")
        parsed[name] = directory
    return parsed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", required=True, help=f"the paper's table: {', '.join(map(str, TABLES))}")
    parser.add_argument("--dataset", required=True, help=f"one of {', '.join(DATASETS)}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="run the table's pipeline (finished stages are skipped)")
    mode.add_argument("--collect", action="store_true", help="write the markdown (and plot) from the run's records")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimiser steps per stage-3 LLM run (default: shipped)"
    )
    parser.add_argument(
        "--seed",
        "--seeds",  # as experiments/cold_start.py and rl_rewards.py spell it
        type=int,
        nargs="+",
        default=None,
        metavar="S",
        help="seed(s) of every fit/test stage, one run directory each (default: the configs' own); with --collect "
        "and several seeds: per-seed rows and their mean",
    )
    parser.add_argument("--llm-path", default=None, help="local LLM directory for stages 2-3 (required on games)")
    parser.add_argument(
        "--model-dir", action="append", default=[], metavar="NAME=DIR", help="Table 6: a row per local LLM directory"
    )
    parser.add_argument("--docs", action="store_true", help="with --collect: update docs/results.md as well")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a bad flag, named in one message)."""
    options = parse_args(argv)
    try:
        if not options.table.isdigit():
            raise ConfigError(f"--table {options.table}: expected a table number, one of {TABLES}.")
        seeds = options.seed or [None]
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"--seed {' '.join(map(str, seeds))}: a seed is given twice; list each once.")
        directories = model_dirs(options.model_dir)
        tables = [
            build_table(int(options.table), options.dataset, None, options.steps, options.llm_path, directories, seed)
            for seed in seeds
        ]
        if options.docs and not options.collect:
            raise ConfigError("--docs updates docs/results.md from collected results: use it with --collect.")
        if options.collect:
            collect(tables, docs=REPO / "docs" / "results.md" if options.docs else None)
            return 0
        for table in tables:  # one seed after the other; a failed run stops the rest
            status = run(table, options.llm_path) if options.run else show(table)
            if status:
                return status
        return 0
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
