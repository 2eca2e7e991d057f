"""One writer and one reader for every stage artifact (item embeddings, code index, LLM export, caches).

An artifact is a directory whose ``manifest.json`` records its ``kind``, the fields that describe its inputs and
shape (dataset fingerprint, sizes, ...) and the SHA-256 of every other file in it. :class:`ArtifactWriter` builds
the directory in a staging directory beside the target and renames it into place whole, so a crash never leaves
a mix of old and new files; the previous artifact stays in place until the new one is complete. A lock file
beside the target refuses a second concurrent writer. :func:`read_artifact` checks the kind, every recorded hash
(a hand-edited file is refused) and the fields the next stage expects, in one place.

Single files outside artifact directories (metric tables, converted datasets) use :func:`atomic_write`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from datamodules.errors import ArtifactError

if TYPE_CHECKING:
    from typing import Self

MANIFEST_NAME = "manifest.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


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
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; the file gets what open() would have given it
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


def jsonable(value: Any) -> Any:
    """Plain JSON of hyperparameters and provenance: dataclasses become dicts, other objects strings."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """An artifact directory's manifest as written, with an error that says what is missing and what to do."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{path}: no manifest. The directory is not a complete artifact (the stage that writes it did not "
            "finish); rerun that stage."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: malformed JSON ({err}); delete the directory and rerun the stage.") from err
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: not a JSON object; delete the directory and rerun the stage.")
    return manifest


@dataclass(frozen=True)
class Artifact:
    """A verified artifact directory: its manifest and the paths of its files."""

    directory: Path
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        """Path of a file the manifest lists (its hash was checked when the artifact was read)."""
        if name not in self.manifest["files"]:
            raise ArtifactError(
                f"{self.directory / MANIFEST_NAME}: the artifact has no file {name!r} (it has "
                f"{sorted(self.manifest['files'])}); rerun the stage that writes it with this version of the code."
            )
        return self.directory / name


def read_artifact(
    directory: str | os.PathLike,
    kind: str,
    expected: Mapping[str, Any] | None = None,
    fix: str = "rerun the stage that writes it",
) -> Artifact:
    """Read and verify an artifact: its kind, the hash of every file it lists and the ``expected`` fields.

    Args:
        directory: the artifact directory.
        kind: the artifact kind the caller reads (``item_embeddings``, ``code_index``, ...).
        expected: manifest fields that must equal these values (dataset fingerprint, sizes, ...).
        fix: what the user should do about a mismatch (ends the error message).

    Raises:
        ArtifactError: no or malformed manifest, another kind, a missing or modified file, a field mismatch.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    where = directory / MANIFEST_NAME
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{where}: the artifact kind is {manifest.get('kind')!r}, not {kind!r}; {fix}.")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{where}: records no file hashes (an older format or a hand-written manifest); {fix}.")
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in {where} but missing; the artifact is incomplete: {fix}.")
        if sha256_file(path) != digest:
            raise ArtifactError(
                f"{path}: contents differ from the SHA-256 recorded in {where} (the file was changed after the "
                f"artifact was written); restore it or {fix}."
            )
    mismatches = [
        f"{key}: artifact has {manifest.get(key)!r}, this run expects {value!r}"
        for key, value in (expected or {}).items()
        if manifest.get(key) != value
    ]
    if mismatches:
        raise ArtifactError(f"{where} does not match this run ({'; '.join(mismatches)}); {fix}.")
    return Artifact(directory, manifest)


class ArtifactWriter:
    """Writes an artifact directory whole: stage files, then :meth:`commit` the manifest and swap it into place.

    Use as a context manager; leaving the block without :meth:`commit` (an exception) removes the staging
    directory and leaves any previous artifact untouched. Only one writer per target at a time: a second one
    (another process, or another writer in this one) is refused with an :class:`ArtifactError`.

    Args:
        target: the artifact directory to (re)place.
        kind: the artifact kind recorded in the manifest.
    """

    def __init__(self, target: str | os.PathLike, kind: str) -> None:
        self.target = Path(target)
        self.kind = kind
        self.staging: Path | None = None
        self._lock = None

    def __enter__(self) -> Self:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        if self.target.exists() and not self.target.is_dir():
            raise ArtifactError(f"{self.target} is a file; an artifact is a directory. Point the exporter at one.")
        if self.target.exists() and not (self.target / MANIFEST_NAME).is_file() and any(self.target.iterdir()):
            raise ArtifactError(
                f"{self.target} holds files but no {MANIFEST_NAME}: it is not an artifact this stage wrote, and "
                "writing would replace it as a whole. Point the exporter at an empty or new directory."
            )
        self._lock = open(self.target.with_name(f".{self.target.name}.lock"), "a")  # held until __exit__
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise ArtifactError(
                f"{self.target}: another process is writing this artifact right now. Wait for it to finish, or "
                "point this run at another directory."
            ) from None
        self.staging = self.target.with_name(f".{self.target.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.staging.mkdir()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)  # gone already after a commit
            self.staging = None
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def path(self, name: str) -> Path:
        """Where to write file ``name`` of the artifact (inside the staging directory)."""
        if self.staging is None:
            raise RuntimeError("ArtifactWriter.path() outside its `with` block")
        return self.staging / name

    def write_json(self, name: str, obj: Any, indent: int | None = 2) -> Path:
        """Stage ``obj`` as the JSON file ``name``."""
        path = self.path(name)
        path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False), encoding="utf-8")
        return path

    def save_torch(self, name: str, obj: Any) -> Path:
        """Stage ``obj`` as the ``torch.save`` file ``name``."""
        path = self.path(name)
        torch.save(obj, path)
        return path

    def copy(self, name: str, source: str | os.PathLike) -> Path:
        """Stage a copy of ``source`` as file ``name``."""
        path = self.path(name)
        shutil.copy2(source, path)
        return path

    def commit(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Record every staged file's hash in the manifest, then swap the staging directory in for the target.

        Args:
            fields: what describes the artifact's inputs and shape (dataset fingerprint, sizes, config, ...);
                ``kind`` and ``files`` are added.

        Returns:
            The manifest written.
        """
        staging = self.path(MANIFEST_NAME).parent
        staged = [path for path in sorted(staging.rglob("*")) if path.is_file() and path.name != MANIFEST_NAME]
        for path in staged:  # on disk before the rename makes them visible
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        files = {path.relative_to(staging).as_posix(): sha256_file(path) for path in staged}
        manifest = {**jsonable(dict(fields)), "kind": self.kind, "files": files}
        with open(staging / MANIFEST_NAME, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, ensure_ascii=False)
            handle.flush()
            os.fsync(handle.fileno())
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(self.target, old)  # the previous artifact stays whole until the new one is in place
        os.replace(staging, self.target)
        self.staging = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest


def manifest_matches(directory: str | os.PathLike, expected: Mapping[str, Any]) -> bool:
    """Whether a cache directory's manifest exists and holds the ``expected`` fields (False when unreadable)."""
    try:
        manifest = read_manifest(directory)
    except ArtifactError:
        return False
    return all(manifest.get(key) == value for key, value in expected.items())


def write_manifest(directory: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write the ``manifest.json`` of a converted dataset directory (atomically, last: it marks completion)."""
    return atomic_write_json(Path(directory) / MANIFEST_NAME, dict(manifest))
