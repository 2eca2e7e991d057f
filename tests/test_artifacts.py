"""Artifacts: one writer (staged, hashed, locked, swapped whole) and one reader; faults between writes; layering."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks import CodeIndexExporter, assign_codes, load_code_index
from datamodules import ItemDataModule, load_item_index, load_lcrec
from datamodules.artifacts import ArtifactWriter, jsonable, read_artifact, sha256_file
from datamodules.catalogue import DataFormatError
from datamodules.errors import ArtifactError
from datamodules.text import clean_text
from lightning_modules import AlignmentTokenizer
from tests.conftest import REPO, tiny_run_args, write_inter


class _Crash(RuntimeError):
    pass


def _fail_on_call(monkeypatch, name: str, call: int) -> None:
    """Make ``ArtifactWriter.<name>`` raise on its ``call``-th use (the earlier ones write as usual)."""
    original, calls = getattr(ArtifactWriter, name), []

    def write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise _Crash(f"killed at write {call}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ArtifactWriter, name, write)


def _leftovers(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir() if ".staging-" in path.name or ".old-" in path.name)


# ------------------------------------------------------------------------------------------ the mechanism
def test_writer_records_every_file_hash_and_the_reader_checks_them(tmp_path):
    target = tmp_path / "artifact"
    with ArtifactWriter(target, "demo") as writer:
        writer.write_json("a.json", {"x": 1})
        writer.path("sub").mkdir()
        writer.save_torch("sub/t.pt", torch.arange(3))
        manifest = writer.commit({"rows": 3})
    assert manifest["kind"] == "demo" and manifest["rows"] == 3
    assert manifest["files"] == {
        "a.json": sha256_file(target / "a.json"),
        "sub/t.pt": sha256_file(target / "sub" / "t.pt"),
    }
    artifact = read_artifact(target, "demo", {"rows": 3})
    assert torch.equal(torch.load(artifact.file("sub/t.pt"), weights_only=True), torch.arange(3))
    with pytest.raises(ArtifactError, match="kind is 'demo', not 'other'"):
        read_artifact(target, "other")
    with pytest.raises(ArtifactError, match=r"does not match this run \(rows: artifact has 3, this run expects 4\)"):
        read_artifact(target, "demo", {"rows": 4})
    with pytest.raises(ArtifactError, match="no file 'b.json'"):
        artifact.file("b.json")
    (target / "sub" / "t.pt").unlink()
    with pytest.raises(ArtifactError, match=r"t\.pt: listed in .* but missing"):
        read_artifact(target, "demo")
    with pytest.raises(ArtifactError, match="no manifest"):
        read_artifact(tmp_path / "absent", "demo")
    (tmp_path / "legacy").mkdir()  # a manifest written by hand or by an older version: no file hashes
    (tmp_path / "legacy" / "manifest.json").write_text(json.dumps({"kind": "demo"}))
    with pytest.raises(ArtifactError, match="records no file hashes"):
        read_artifact(tmp_path / "legacy", "demo")
    assert _leftovers(tmp_path) == []


def test_a_failed_write_keeps_the_previous_artifact(tmp_path):
    target = tmp_path / "artifact"
    with ArtifactWriter(target, "demo") as writer:
        writer.write_json("a.json", {"version": 1})
        writer.commit({})
    with pytest.raises(_Crash), ArtifactWriter(target, "demo") as writer:
        writer.write_json("a.json", {"version": 2})
        raise _Crash("between two writes")
    artifact = read_artifact(target, "demo")
    assert json.loads(artifact.file("a.json").read_text()) == {"version": 1} and _leftovers(tmp_path) == []


def test_a_second_writer_is_refused_while_the_first_writes(tmp_path):
    target = tmp_path / "artifact"
    with ArtifactWriter(target, "demo") as first:
        with pytest.raises(ArtifactError, match=f"{target}: another process is writing this artifact"):
            ArtifactWriter(target, "demo").__enter__()
        first.write_json("a.json", {"writer": 1})
        first.commit({})
    # another process holding the lock is refused the same way
    script = textwrap.dedent(f"""
        import sys, time
        from datamodules.artifacts import ArtifactWriter
        with ArtifactWriter({str(target)!r}, "demo"):
            print("locked", flush=True)
            sys.stdin.readline()
    """)
    holder = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ArtifactError, match="another process is writing"):
            ArtifactWriter(target, "demo").__enter__()
    finally:
        holder.communicate("done\n", timeout=60)
    with ArtifactWriter(target, "demo") as writer:  # the lock is released once the writer is done
        writer.write_json("a.json", {"writer": 3})
        writer.commit({})
    assert json.loads((target / "a.json").read_text()) == {"writer": 3}


def test_writer_refuses_to_replace_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="holds files but no manifest.json"):
        ArtifactWriter(tmp_path / "mine", "demo").__enter__()
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# -------------------------------------------------------------------------------------- the code index
@pytest.fixture(scope="module")
def codebook_run(synthetic_dir, tmp_path_factory):
    """A 1-epoch codebook (L=3, K=8) on the tiny catalogue, exported once; returns (export dir, module, datamodule)."""
    root = tmp_path_factory.mktemp("codebook")
    torch.save(torch.randn(120, 16, generator=torch.Generator().manual_seed(0)), root / "embeddings.pt")
    datamodule = ItemDataModule(
        data_dir=str(synthetic_dir), dataset="Synthetic", source="lcrec", embeddings=str(root / "embeddings.pt")
    )
    L.seed_everything(0)  # the same codebook whichever tests ran before (cold start below needs its codes in use)
    model = AlignmentTokenizer(num_levels=3, codebook_size=8)
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        num_sanity_val_steps=0,
        callbacks=[CodeIndexExporter(str(root / "export"))],
    )
    trainer.fit(model, datamodule)
    return root / "export", model, datamodule


def test_code_index_export_killed_between_two_writes_keeps_the_previous_artifact(codebook_run, monkeypatch):
    from callbacks.index_export import export_code_index

    export, model, datamodule = codebook_run
    catalogue = datamodule.catalogue
    before = load_item_index(export, catalogue)
    files = {
        name: sha256_file(export / name) for name in ("index.json", "codebook.pt", "code_vectors.pt", "manifest.json")
    }
    with torch.no_grad():
        model.quantizer.codebooks.add_(1.0)  # the next export would differ
    try:
        _fail_on_call(monkeypatch, "save_torch", call=2)  # codebook.pt staged, then killed
        with pytest.raises(_Crash):
            export_code_index(export, model, datamodule)
        monkeypatch.undo()
        assert {name: sha256_file(export / name) for name in files} == files and _leftovers(export.parent) == []
        after = load_item_index(export, catalogue)
        assert after.index_hash == before.index_hash and torch.equal(after.code_vectors(), before.code_vectors())
    finally:
        with torch.no_grad():
            model.quantizer.codebooks.sub_(1.0)


def test_cold_start_writes_a_new_complete_artifact_and_a_crash_keeps_the_old(codebook_run, tmp_path, monkeypatch):
    export, _, _ = codebook_run
    work = tmp_path / "index"
    shutil.copytree(export, work)
    original = load_code_index(work)
    new = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    _fail_on_call(monkeypatch, "write_json", call=1)  # codebook.pt and code_vectors.pt copied, index.json not written
    with pytest.raises(_Crash):
        assign_codes(work, new)
    monkeypatch.undo()
    assert load_code_index(work) == original and _leftovers(tmp_path) == []
    extended = assign_codes(work, new)  # in place: a new artifact swapped in whole
    artifact = read_artifact(work, "code_index")
    assert len(extended) == 124 and artifact.manifest["num_items"] == 124 and load_code_index(work) == extended
    assert artifact.manifest["files"]["code_vectors.pt"] == sha256_file(export / "code_vectors.pt")
    # stage 3 serves the extension with a model trained on the original: its catalogue part hashes as the original
    extended_index = load_item_index(work, codebook_run[2].catalogue, new_items=True)
    assert extended_index.new_items == 4 and extended_index.trained_index_hash == sha256_file(export / "index.json")


def test_hand_edited_index_is_refused(codebook_run, tmp_path):
    export, _, datamodule = codebook_run
    edited = tmp_path / "edited"
    shutil.copytree(export, edited)
    index = json.loads((edited / "index.json").read_text())
    index["0"], index["1"] = index["1"], index["0"]  # two items' codes swapped: still a valid, collision-free index
    (edited / "index.json").write_text(json.dumps(index))
    with pytest.raises(
        ArtifactError, match=r"edited/index\.json: contents differ from the SHA-256 recorded .*restore it or"
    ):
        load_item_index(edited, datamodule.catalogue)
    with pytest.raises(ArtifactError, match="index.json: contents differ"):
        assign_codes(edited, torch.randn(2, 16))


def test_index_of_another_dataset_is_refused(codebook_run, synthetic_dir, tmp_path):
    export, _, _ = codebook_run
    other = load_lcrec(synthetic_dir, "Synthetic")
    other = type(other)(**{**other.__dict__, "content_hash": "0" * 64})
    with pytest.raises(ArtifactError, match=r"does not match this run \(dataset: .*'0000"):
        load_item_index(export, other)


# --------------------------------------------------------------------------------------- LC-Rec loaders
def test_duplicate_keys_are_refused_naming_file_and_key(tmp_path):
    directory = write_inter(tmp_path / "data", "Dup", {})
    (directory / "Dup.inter.json").write_text('{"0": [0, 1, 2], "1": [1, 2, 0], "0": [2, 1, 0]}')
    with pytest.raises(DataFormatError, match=r'Dup\.inter\.json: key "0" appears more than once'):
        load_lcrec(directory, "Dup")
    (directory / "Dup.inter.json").write_text('{"0": [0, 1, 2], "1": [1, 2, 0]}')
    (directory / "Dup.item.json").write_text('{"0": {"title": "a", "title": "b"}, "1": {}, "2": {}}')
    with pytest.raises(DataFormatError, match=r'Dup\.item\.json: key "title" appears more than once'):
        load_lcrec(directory, "Dup")
    (directory / "Dup.item.json").unlink()
    catalogue = load_lcrec(directory, "Dup")
    (tmp_path / "index.json").write_text('{"0": ["<a_0>"], "1": ["<a_1>"], "2": ["<a_2>"], "1": ["<a_3>"]}')
    with pytest.raises(DataFormatError, match=r'index\.json: key "1" appears more than once'):
        load_item_index(tmp_path / "index.json", catalogue)


def test_fingerprint_is_name_hash_and_size(synthetic_dir):
    catalogue = load_lcrec(synthetic_dir, "Synthetic")
    assert catalogue.fingerprint() == {"name": "Synthetic", "content_hash": catalogue.content_hash, "num_items": 120}


def test_clean_text_hand_cases():
    assert clean_text(None) == "" and clean_text("  a \n\t b ") == "a b"
    assert clean_text("Tom &amp; Jerry<br>line") == "Tom & Jerry line"
    assert clean_text(["first ", None, "", "second<p>"]) == "first second"
    assert clean_text("['first', 'second']") == "first second" and clean_text("[not a list") == "[not a list"


def test_jsonable_turns_objects_into_plain_json():
    from datamodules.synthetic import SyntheticSpec

    value = jsonable({"spec": SyntheticSpec(num_users=3), "path": Path("/x"), "pair": (1, 2.5), 3: None})
    assert (
        value["spec"]["num_users"] == 3 and value["path"] == "/x" and value["pair"] == [1, 2.5] and value["3"] is None
    )


# ----------------------------------------------------------------------------------------------- layers
def test_datamodules_import_neither_models_nor_transformers():
    # `import lightning` imports transformers itself (torchmetrics' BERTScore, when transformers is installed), so the
    # check is that importing datamodules on top of lightning adds no transformers module and no lightning_modules one
    code = (
        "import sys, lightning; before = set(sys.modules); import datamodules; "
        "new = sorted(m for m in set(sys.modules) - before "
        "if m.split('.')[0] in ('transformers', 'lightning_modules')); "
        "assert not new, new"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
    sources = [path for path in (REPO / "datamodules").glob("*.py") if "lightning_modules" in path.read_text()]
    offenders = [
        path.name
        for path in sources
        if any(
            line.lstrip().startswith(("import lightning_modules", "from lightning_modules"))
            for line in path.read_text().splitlines()
        )
    ]
    assert offenders == []


# ------------------------------------------------------------------------------------------ DDP exports
def _run_ddp(tmp_path: Path, config: str, callbacks: str, data_dir: Path, *extra: str) -> None:
    """``lightning fit`` of a shipped config on 2 CPU processes under DDP, with its callbacks replaced."""
    override = tmp_path / "callbacks.yaml"
    override.write_text("trainer:\n  enable_progress_bar: false\n  callbacks:\n" + callbacks)
    args = [
        "fit",
        *tiny_run_args(
            config,
            data_dir,
            tmp_path / "run",
            "--config",
            str(override),
            "--trainer.max_epochs=1",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            *extra,
        ),
    ]
    script = tmp_path / "run.py"  # DDP relaunches the script for rank 1, so it must be a file
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom lightning_modules.cli import main\nmain({args!r})\n"
    )
    # a deadlock fails the test at the timeout instead of hanging the suite; the whole process group (rank 1 is a
    # grandchild) is killed then
    process = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the 2-process run did not finish in 300 s (a rank waits in a collective the others never join)")
    assert process.returncode == 0, stderr[-3000:]


def test_two_process_ddp_embedding_export_finishes(synthetic_dir, tmp_path):
    """DCCF with its exporter: the export reads trainer.log_dir (a broadcast) on every rank, then rank 0 writes."""
    out = tmp_path / "embeddings"
    _run_ddp(
        tmp_path,
        "synthetic/dccf.yaml",
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {monitor: val/ndcg@10, mode: max}\n"
        f"    - {{class_path: callbacks.ItemEmbeddingExporter, init_args: {{output_dir: '{out}'}}}}\n",
        synthetic_dir,
        "--test_after_fit=false",
        "--trainer.limit_train_batches=2",
    )
    manifest = read_artifact(out, "item_embeddings").manifest
    assert manifest["dataset"]["num_items"] == 120 and manifest["config_file"] is not None


def test_two_process_ddp_code_index_export_finishes(synthetic_dir, tmp_path):
    """The codebook with k-means init, the collision logger (gathers codes, writes its table) and the exporter."""
    torch.save(torch.randn(120, 16, generator=torch.Generator().manual_seed(0)), tmp_path / "embeddings.pt")
    out = tmp_path / "codebook"
    _run_ddp(
        tmp_path,
        "synthetic/codebook.yaml",
        "    - {class_path: callbacks.KMeansInit, init_args: {num_samples: 0, iters: 3}}\n"
        "    - class_path: callbacks.CollisionLogger\n"
        f"    - {{class_path: callbacks.CodeIndexExporter, init_args: {{output_dir: '{out}'}}}}\n",
        synthetic_dir,
        "--data.init_args.embeddings",
        str(tmp_path / "embeddings.pt"),
        "--model.init_args.num_levels=3",
        "--model.init_args.codebook_size=8",
    )
    manifest = read_artifact(out, "code_index").manifest
    assert manifest["num_items"] == 120 and manifest["final_collision_rate"] == 0
    assert len(load_code_index(out)) == 120
    assert (tmp_path / "run" / "csv" / "version_0" / "collisions.csv").is_file()
