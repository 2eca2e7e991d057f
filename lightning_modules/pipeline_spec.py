"""The pipeline file of ``semconv pipeline``: its stages, their checks, and the fingerprints that key them.

A pipeline file is YAML::

    name: synthetic                       # shown in the results table
    run_dir: runs/synthetic/pipeline      # stage records, logs, per-stage run directories, results.md/json
    stages:                               # run in order
      - name: codebook                    # unique, [a-z0-9_]+
        command: fit                      # fit | test | validate | predict | python (a script)
        config: [configs/synthetic/codebook.yaml]   # the --config files, stacked in order
        args: [--trainer.max_epochs, "5"]           # extra arguments; {run_dir}, {stage_dir}, {<stage>.checkpoint}
                                                    # and {<stage>.artifact} name earlier outputs
        script: null                      # the script of a `python` stage (its args follow it)
        inputs: [artifacts/synthetic/dccf_embeddings]  # files/directories whose content keys the stage
        artifact: artifacts/synthetic/codebook       # the directory (with manifest.json) the stage writes
        row: null                         # the label of the stage's test metrics in the results table
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from datamodules.artifacts import MANIFEST_NAME, sha256_file
from datamodules.errors import ConfigError, SemConvError

COMMANDS = ("fit", "test", "validate", "predict", "python")
METRICS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10")
_NAME = re.compile(r"[a-z0-9_]+")
PLACEHOLDER = re.compile(r"\{([a-z0-9_]+)\.(checkpoint|artifact)\}")
#: Files above this size are fingerprinted by size and modification time instead of their bytes.
HASH_LIMIT = 256 << 20


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline file (see the module docstring)."""

    name: str
    command: str
    config: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    artifact: str | None = None
    row: str | None = None
    script: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The stage as a pipeline-file entry (what :func:`load_pipeline` reads back)."""
        entry: dict[str, Any] = {"name": self.name, "command": self.command}
        if self.script:
            entry["script"] = self.script
        if self.config:
            entry["config"] = list(self.config)
        entry.update(args=list(self.args), inputs=list(self.inputs), artifact=self.artifact, row=self.row)
        return entry


@dataclass(frozen=True)
class Pipeline:
    """A parsed pipeline file."""

    name: str
    run_dir: Path
    stages: tuple[Stage, ...]
    source: str = ""

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(item, (str, int, float, bool)) for item in value):
        raise ConfigError(f"{where} must be a string or a list of strings, got {value!r}.")
    return tuple(str(item).lower() if isinstance(item, bool) else str(item) for item in value)


def load_pipeline(path: str | os.PathLike) -> Pipeline:
    """Parse and check a pipeline file; every error names the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such pipeline file (the shipped ones are configs/<dataset>/pipeline.yaml).")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}).") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a pipeline file is a mapping with name, run_dir and stages.")
    unknown = set(raw) - {"name", "run_dir", "stages"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level field(s) {sorted(unknown)}; allowed: name, run_dir, stages.")
    for key in ("name", "run_dir"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"{path}: field `{key}` must be a non-empty string.")
    if not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise ConfigError(f"{path}: field `stages` must be a non-empty list.")
    stages: list[Stage] = []
    allowed = set(Stage.__dataclass_fields__)
    for position, entry in enumerate(raw["stages"]):
        where = f"{path}: stages[{position}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping (name, command, config, ...).")
        unknown = set(entry) - allowed
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}.")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"{where}.name must match [a-z0-9_]+, got {name!r}.")
        if name in {stage.name for stage in stages}:
            raise ConfigError(f"{where}.name: {name!r} is used twice; stage names are unique.")
        command = entry.get("command", "fit")
        if command not in COMMANDS:
            raise ConfigError(f"{where}.command must be one of {list(COMMANDS)}, got {command!r}.")
        stage = Stage(
            name=name,
            command=command,
            config=_strings(entry.get("config"), f"{where}.config"),
            args=_strings(entry.get("args"), f"{where}.args"),
            script=entry.get("script"),
            inputs=_strings(entry.get("inputs"), f"{where}.inputs"),
            artifact=entry.get("artifact"),
            row=entry.get("row"),
        )
        if command == "python" and not stage.script:
            raise ConfigError(f"{where}: command `python` needs `script` (the path of the script to run).")
        if command != "python" and not stage.config:
            raise ConfigError(f"{where}: command `{command}` needs `config` (one or more --config files).")
        for config in (*stage.config, *([stage.script] if stage.script else [])):
            if not Path(config).is_file():
                raise ConfigError(f"{where}: {config} does not exist (paths are relative to the working directory).")
        for arg in stage.args:
            for match in PLACEHOLDER.finditer(arg):
                if match.group(1) not in {earlier.name for earlier in stages}:
                    raise ConfigError(f"{where}.args: {match.group(0)} names no earlier stage.")
        stages.append(stage)
    return Pipeline(name=raw["name"], run_dir=Path(raw["run_dir"]), stages=tuple(stages), source=str(path))


def fingerprint(path: str | os.PathLike) -> str:
    """What a path contributes to a stage's key: an artifact directory's manifest hash (the manifest hashes every
    file), otherwise the bytes of the file or of every file under the directory (size and modification time for
    files above :data:`HASH_LIMIT`), so a seeded stage that rewrites identical files changes nothing downstream."""
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return "manifest:" + sha256_file(path / MANIFEST_NAME)
    if path.is_file():
        return "file:" + _file_digest(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{item.relative_to(path)}:{_file_digest(item)}\n".encode())
        return "dir:" + digest.hexdigest()
    return "missing"


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}" if stat.st_size > HASH_LIMIT else sha256_file(path)


class PipelineError(SemConvError):
    """A stage failed or left no output; the message names the stage and its log."""
