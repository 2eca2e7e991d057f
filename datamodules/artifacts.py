"""Atomic file writes, content hashes and manifests shared by every stage's artifacts.

Every artifact a stage writes is written to a temporary file in the destination directory and renamed
into place, so a crash never leaves a half-written file that the next stage would read. Each artifact
directory carries a ``manifest.json`` describing its inputs (hashes) and shape parameters; the next stage
checks it with :func:`check_manifest`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> Path:
    """Write ``path`` atomically: ``write(handle)`` fills a temp file that is then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Serialise ``obj`` as JSON into ``path`` atomically."""
    return atomic_write(path, lambda handle: json.dump(obj, handle, indent=indent, ensure_ascii=False))


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike]) -> str:
    """One hash over several files (names excluded, so a renamed copy hashes the same)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest.json`` into an artifact directory (atomically, last, so its presence marks completion)."""
    return atomic_write_json(Path(directory) / MANIFEST_NAME, dict(manifest))


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read an artifact directory's manifest, with an error that says what is missing and what to do."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no manifest. The directory is not a complete artifact (the stage that writes it did not "
            "finish); rerun that stage."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON ({err}); delete the directory and rerun the stage.") from err


def check_manifest(directory: str | os.PathLike, expected: Mapping[str, Any]) -> dict[str, Any]:
    """Read a manifest and verify the given fields, naming every mismatch in one error."""
    manifest = read_manifest(directory)
    mismatches = [
        f"{key}: artifact has {manifest.get(key)!r}, expected {value!r}"
        for key, value in expected.items()
        if manifest.get(key) != value
    ]
    if mismatches:
        raise ValueError(
            f"{Path(directory) / MANIFEST_NAME} does not match this run ({'; '.join(mismatches)}). "
            "Point the config at the artifact produced for these inputs, or rerun the stage that writes it."
        )
    return manifest
