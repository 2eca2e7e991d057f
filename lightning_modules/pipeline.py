"""``semconv pipeline --config configs/<dataset>/pipeline.yaml``: the whole method, then one table of results.

A pipeline file lists stages; each stage is an ordinary ``lightning fit|test|predict --config ...`` (or a Python
script) with the artifact it writes, and the stages run in order in their own processes. The pipeline adds three
things the single commands lack:

- **skipping**: a stage whose record (``<run_dir>/stages/<name>.json``) holds the same key, i.e. the same command,
  config file bytes, arguments and input fingerprints (an artifact directory is fingerprinted by its manifest, which
  hashes every file in it), and whose artifact manifest is unchanged since it ran, is skipped and says so.
  ``--force NAME`` (or ``--force all``) reruns it; code changes are not in the key, so force after editing code;
- **resuming**: a killed ``fit`` stage restarts from its ``last.ckpt``; finished stages are skipped;
- **one table**: the test metrics of every stage with a ``row`` go into ``results.md`` and ``results.json``.

A thin subcommand rather than Make or DVC: the skip rule is "the artifact manifest matches the inputs and config",
which needs the manifests the stages already write (Make compares timestamps; DVC would hash the artifacts a second
time and add a dependency and its cache to every user's install), and a stage must be the same ``lightning`` command
a user can run by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from datamodules.artifacts import atomic_write, atomic_write_json, sha256_file
from datamodules.errors import ConfigError
from lightning_modules.pipeline_spec import (
    METRICS,
    PLACEHOLDER,
    Pipeline,
    PipelineError,
    Stage,
    fingerprint,
    load_pipeline,
)


class PipelineRunner:
    """Runs a :class:`Pipeline`'s stages in order, skipping and resuming as the module docstring says.

    Args:
        pipeline: the parsed pipeline file.
        force: stage names to rerun even when their record matches (``"all"`` for every stage).
        verbose: stream every stage's output to the console as well as its log file.
    """

    def __init__(self, pipeline: Pipeline, force: tuple[str, ...] = (), verbose: bool = False) -> None:
        unknown = set(force) - set(pipeline.stage_names) - {"all"}
        if unknown:
            raise ConfigError(
                f"--force {sorted(unknown)}: no such stage in {pipeline.source}; stages are "
                f"{list(pipeline.stage_names)} (or `all`)."
            )
        self.pipeline, self.verbose = pipeline, verbose
        self.force = set(pipeline.stage_names) if "all" in force else set(force)
        self.outcomes: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ paths and records
    def stage_dir(self, stage: Stage) -> Path:
        return self.pipeline.run_dir / stage.name

    def record_path(self, stage: Stage) -> Path:
        return self.pipeline.run_dir / "stages" / f"{stage.name}.json"

    def log_path(self, stage: Stage) -> Path:
        return self.pipeline.run_dir / "logs" / f"{stage.name}.log"

    def read_record(self, stage: Stage) -> dict[str, Any] | None:
        path = self.record_path(stage)
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except json.JSONDecodeError:
            return None  # a damaged record only costs a rerun

    def checkpoint(self, stage: Stage) -> Path | None:
        """The stage's ``last.ckpt`` (else its newest checkpoint), or None."""
        directory = self.stage_dir(stage) / "csv" / "version_0" / "checkpoints"
        if (directory / "last.ckpt").is_file():
            return directory / "last.ckpt"
        found = sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    # ------------------------------------------------------------------ commands and keys
    def _substitute(self, stage: Stage, arg: str) -> str:
        def replace(match: re.Match) -> str:
            earlier = next(s for s in self.pipeline.stages if s.name == match.group(1))
            if match.group(2) == "artifact":
                if earlier.artifact is None:
                    raise ConfigError(
                        f"{self.pipeline.source}: stage {stage.name!r} uses {match.group(0)}, but "
                        f"stage {earlier.name!r} declares no artifact."
                    )
                return earlier.artifact
            found = self.checkpoint(earlier)
            if found is None:
                raise PipelineError(
                    f"stage {stage.name!r} needs {match.group(0)}, but stage {earlier.name!r} left "
                    f"no checkpoint under {self.stage_dir(earlier)}; rerun it with --force "
                    f"{earlier.name}."
                )
            return str(found)

        arg = arg.replace("{run_dir}", str(self.pipeline.run_dir)).replace("{stage_dir}", str(self.stage_dir(stage)))
        return PLACEHOLDER.sub(replace, arg)

    def command_line(self, stage: Stage, resume_from: Path | None = None) -> list[str]:
        """The argument vector of the stage's process."""
        args = [self._substitute(stage, arg) for arg in stage.args]
        if stage.command == "python":
            return [sys.executable, str(stage.script), *args]
        argv = [sys.executable, "-m", "lightning_modules.cli", stage.command]
        for config in stage.config:
            argv += ["--config", config]
        argv += args
        # every stage logs to its own fixed directory, so its metrics and checkpoints are where the pipeline looks
        argv += ["--trainer.default_root_dir", str(self.stage_dir(stage)), "--trainer.logger.init_args.version", "0"]
        if resume_from is not None:
            argv += ["--ckpt_path", str(resume_from)]
        return argv

    def key(self, stage: Stage) -> str:
        """Hash of what the stage's output depends on: command, config bytes, arguments, input fingerprints."""
        digest = hashlib.sha256()
        parts: list[str] = [stage.command, *(f"config:{sha256_file(c)}" for c in stage.config)]
        if stage.script:
            parts.append(f"script:{sha256_file(stage.script)}")
        for arg in stage.args:
            value = self._substitute(stage, arg)
            parts.append(f"arg:{value}")
            if PLACEHOLDER.search(arg) and ".checkpoint}" in arg:
                parts.append(f"checkpoint:{fingerprint(value)}")  # the same path holds new weights after a rerun
        parts += [f"input:{path}={fingerprint(path)}" for path in stage.inputs]
        for part in parts:
            digest.update(part.encode() + b"\0")
        return digest.hexdigest()

    def artifact_hash(self, stage: Stage) -> str | None:
        """The artifact's :func:`fingerprint` (its manifest's hash for a manifest-bearing artifact), None if absent."""
        if stage.artifact is None:
            return None
        found = fingerprint(stage.artifact)
        return None if found == "missing" else found

    def test_metrics(self, stage: Stage) -> dict[str, float] | None:
        found = sorted(self.stage_dir(stage).rglob("test_metrics.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            return None
        metrics = json.loads(found[-1].read_text(encoding="utf-8"))["metrics"]
        return {name: float(metrics[name]) for name in METRICS if name in metrics}

    # ------------------------------------------------------------------ running
    def up_to_date(self, stage: Stage, key: str, record: dict[str, Any] | None) -> bool:
        """Whether the stage's record says it finished with this key and its outputs are still the ones it wrote."""
        if stage.name in self.force or record is None or record.get("status") != "done" or record.get("key") != key:
            return False
        if stage.artifact is not None and record.get("artifact_manifest") != self.artifact_hash(stage):
            return False  # the artifact was rewritten (or deleted) by another run since
        return stage.row is None or record.get("metrics") is not None

    def _execute(self, stage: Stage, argv: list[str]) -> None:
        log_path = self.log_path(stage)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            process = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, errors="replace"
            )
            assert process.stdout is not None
            try:
                for line in process.stdout:
                    log.write(line)
                    if self.verbose:
                        sys.stdout.write(line)
                status = process.wait()
            finally:  # interrupted or terminated: stop the stage too (its record stays "running": resume later)
                if process.poll() is None:
                    process.terminate()
                    process.wait()
        if status != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
            raise PipelineError(
                "\n".join(
                    [
                        *tail,
                        f"stage {stage.name!r} failed (exit {status}); its full output is "
                        f"in {log_path}. Fix it and rerun the pipeline: finished stages are "
                        "skipped.",
                    ]
                )
            )

    def run_stage(self, stage: Stage, position: int) -> dict[str, Any]:
        """Run (or skip) one stage and return its outcome."""
        label = f"[pipeline] {position}/{len(self.pipeline.stages)} {stage.name}"
        key, record = self.key(stage), self.read_record(stage)
        if self.up_to_date(stage, key, record):
            what = f"its artifact {stage.artifact}" if stage.artifact else "its last run"
            print(f"{label}: skipped, {what} still matches its inputs and config", flush=True)
            return {**record, "skipped": True}
        resume_from = None
        if (
            record is not None
            and record.get("status") == "running"
            and record.get("key") == key
            and stage.command == "fit"
            and stage.name not in self.force
        ):
            resume_from = self.checkpoint(stage)
        if resume_from is None and self.stage_dir(stage).exists():
            shutil.rmtree(self.stage_dir(stage))  # a fresh run: no stale metrics or checkpoints from an older one
        if resume_from is None:
            self.log_path(stage).unlink(missing_ok=True)
        argv = self.command_line(stage, resume_from)
        how = f"resuming from {resume_from}" if resume_from else "running"
        print(f"{label}: {how} (log: {self.log_path(stage)})", flush=True)
        atomic_write_json(self.record_path(stage), {"key": key, "status": "running", "command": argv})
        begin = time.perf_counter()
        self._execute(stage, argv)
        wall = time.perf_counter() - begin
        if stage.artifact is not None and self.artifact_hash(stage) is None:
            raise PipelineError(
                f"stage {stage.name!r} finished but wrote nothing at {stage.artifact}; check where its config "
                f"writes its output (e.g. its exporter callback's output_dir) and {self.log_path(stage)}."
            )
        metrics = self.test_metrics(stage) if stage.row else None
        if stage.row and metrics is None:
            raise PipelineError(
                f"stage {stage.name!r} has row {stage.row!r} but wrote no test_metrics.json under "
                f"{self.stage_dir(stage)}: its config needs callbacks.MetricsWriter and a test run."
            )
        outcome = {
            "key": key,
            "status": "done",
            "command": argv,
            "wall_s": round(wall, 1),
            "artifact_manifest": self.artifact_hash(stage),
            "metrics": metrics,
        }
        atomic_write_json(self.record_path(stage), outcome)
        print(f"{label}: done in {wall:.0f} s", flush=True)
        return {**outcome, "skipped": False}

    def run(self, dry_run: bool = False) -> dict[str, Any] | None:
        """Run every stage, then write ``results.json`` / ``results.md`` in the run directory and return them."""
        if dry_run:
            for position, stage in enumerate(self.pipeline.stages, 1):
                record = self.read_record(stage)
                try:
                    state = "skip" if self.up_to_date(stage, self.key(stage), record) else "run"
                except PipelineError:  # it needs an earlier stage's output that does not exist yet
                    state = "run"
                if state == "run" and record is not None and record.get("status") == "running":
                    state = "resume" if stage.command == "fit" and self.checkpoint(stage) else "run"
                print(f"{position}. {stage.name}: {state}")
            return None
        begin = time.perf_counter()
        for position, stage in enumerate(self.pipeline.stages, 1):
            self.outcomes[stage.name] = self.run_stage(stage, position)
        results = self.results(time.perf_counter() - begin)
        write_results(self.pipeline.run_dir, results)
        print(render_markdown(results), flush=True)
        print(f"[pipeline] results: {self.pipeline.run_dir / 'results.md'} and results.json", flush=True)
        return results

    def results(self, wall: float) -> dict[str, Any]:
        rows = [
            {
                "name": stage.row,
                "stage": stage.name,
                "metrics": self.outcomes[stage.name]["metrics"],
                "wall_s": self.outcomes[stage.name].get("wall_s"),
                "skipped": self.outcomes[stage.name]["skipped"],
            }
            for stage in self.pipeline.stages
            if stage.row
        ]
        stages = [
            {
                "name": stage.name,
                "wall_s": self.outcomes[stage.name].get("wall_s"),
                "skipped": self.outcomes[stage.name]["skipped"],
                "artifact": stage.artifact,
            }
            for stage in self.pipeline.stages
        ]
        return {
            "pipeline": self.pipeline.name,
            "config": self.pipeline.source,
            "rows": rows,
            "stages": stages,
            "wall_s": round(wall, 1),
            "machine": machine(),
        }


def machine() -> dict[str, Any]:
    """The machine the numbers were measured on."""
    import torch

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "cpus": os.cpu_count(),
        "gpus": gpus,
        "python": platform.python_version(),
        "torch": torch.__version__.split("+")[0],
        "platform": platform.platform(terse=True),
    }


def render_markdown(results: dict[str, Any]) -> str:
    """The results table (HR@1/5/10, NDCG@5/10 and wall time per row) and the stage timings as markdown."""
    info = results["machine"]
    hardware = ", ".join(info["gpus"]) if info["gpus"] else f"{info['cpus']} CPU cores"
    lines = [
        f"# {results['pipeline']}: test results",
        "",
        f"`semconv pipeline --config {results['config']}` on {hardware} (torch {info['torch']}); "
        "leave-last-out, every test user.",
        "",
        "| model | HR@1 | HR@5 | HR@10 | NDCG@5 | NDCG@10 | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        cells = [f"{row['metrics'][name]:.4f}" for name in METRICS]
        wall = "skipped (done before)" if row["skipped"] else f"{row['wall_s']:.0f} s"
        lines.append(f"| {row['name']} | {' | '.join(cells)} | {wall} |")
    lines += ["", "| stage | wall time |", "|---|---|"]
    for stage in results["stages"]:
        lines.append(
            f"| {stage['name']} | {'skipped' if stage['skipped'] else format(stage['wall_s'], '.0f') + ' s'} |"
        )
    lines.append(f"\nTotal: {results['wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    atomic_write_json(run_dir / "results.json", results)
    atomic_write(run_dir / "results.md", lambda handle: handle.write(render_markdown(results)))


def pipeline_main(argv: list[str]) -> int:
    """``semconv pipeline``: parse the flags, run the pipeline, return the exit status."""
    parser = argparse.ArgumentParser(prog="semconv pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the pipeline file, e.g. configs/synthetic/pipeline.yaml")
    parser.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="rerun this stage even if its record matches (repeatable; `all` for every stage)",
    )
    parser.add_argument("--dry_run", action="store_true", help="print which stages would run, skip or resume")
    parser.add_argument("--verbose", action="store_true", help="stream every stage's output to the console too")
    options = parser.parse_args(argv)
    # a terminated pipeline (kill, a scheduler's preemption) unwinds like Ctrl-C, so the running stage stops with it
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    runner = PipelineRunner(load_pipeline(options.config), force=tuple(options.force), verbose=options.verbose)
    runner.run(dry_run=options.dry_run)
    return 0
