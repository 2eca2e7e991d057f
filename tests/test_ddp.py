"""Every shipped config family runs as a 2-process CPU DDP job through the CLI and gives the 1-process numbers.

Each run is a subprocess under a timeout: a deadlock (a rank waiting in a collective the others never join) fails
the test instead of hanging the suite. Full-catalogue ranking of one checkpoint is deterministic, so testing the
same checkpoint with 1 and 2 processes must give the same metrics (the evaluation sampler never repeats a user and
the metric states are sums); the codebook compares the validation metrics of its last checkpoint the same way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, REPO, tiny_run_args

TIMEOUT_S = 180
DDP = ("--config", str(CONFIGS / "strategy" / "ddp.yaml"), "--trainer.accelerator=cpu", "--trainer.devices=2")
SINGLE = ("--trainer.accelerator=cpu", "--trainer.devices=1")


def cli(subcommand: str, args: list[str], cwd: Path) -> None:
    """Run ``python -m lightning_modules.cli`` in a new process group; kill the whole group on timeout."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "lightning_modules.cli", subcommand, *args]
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the DDP launcher's worker ranks are in this group too
        output, _ = process.communicate()
        pytest.fail(
            f"`{subcommand}` did not finish in {TIMEOUT_S}s (a rank waiting in a collective?):\n{output[-3000:]}"
        )
    assert process.returncode == 0, f"`{subcommand}` failed ({process.returncode}):\n{output[-4000:]}"
    if "--trainer.devices=2" in args:
        assert "MEMBER: 2/2" in output, output[-3000:]  # Lightning's line for the second rank: really 2 processes


def metrics(root: Path, stage: str) -> dict:
    return json.loads((root / "csv" / "version_0" / f"{stage}_metrics.json").read_text())


def fit_ddp_then_test_single(config: str, data_dir: Path, tmp_path: Path, *extra: str) -> tuple[dict, dict]:
    """Fit (and test the best checkpoint) with 2 processes, then test that checkpoint with 1; both test records."""
    ddp_root, single_root = tmp_path / "ddp", tmp_path / "single"
    cli("fit", [*tiny_run_args(config, data_dir, ddp_root, *extra), *DDP, "--test_after_fit=true"], tmp_path)
    two = metrics(ddp_root, "test")
    cli(
        "test",
        [*tiny_run_args(config, data_dir, single_root, *extra), *SINGLE, "--ckpt_path", two["best_checkpoint"]],
        tmp_path,
    )
    return two, metrics(single_root, "test")


def assert_same_metrics(two: dict, one: dict) -> None:
    assert set(two["metrics"]) == set(one["metrics"]) >= {"hr@10", "ndcg@10"}
    assert two["metrics"] == pytest.approx(one["metrics"], abs=1e-6)


@pytest.mark.parametrize("config", ["synthetic/sasrec.yaml", "synthetic/bert4rec.yaml", "synthetic/fmlp.yaml"])
def test_id_baseline_ddp_matches_single_process(config, synthetic_dir, tmp_path):
    two, one = fit_ddp_then_test_single(
        config, synthetic_dir, tmp_path, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"
    )
    assert_same_metrics(two, one)
    assert two["dataset"]["users"] == 300


def test_most_popular_ddp_matches_single_process(synthetic_dir, tmp_path):
    """Nothing to train: the 2-process and 1-process tests of the same counts agree."""
    config = "industrial/most_popular.yaml"
    cli("test", [*tiny_run_args(config, synthetic_dir, tmp_path / "ddp"), *DDP], tmp_path)
    cli("test", [*tiny_run_args(config, synthetic_dir, tmp_path / "single"), *SINGLE], tmp_path)
    assert_same_metrics(metrics(tmp_path / "ddp", "test"), metrics(tmp_path / "single", "test"))


def exporter_override(tmp_path: Path, class_path: str, output_dir: Path, *callbacks: str) -> list[str]:
    """Replace a config's callbacks with its exporter writing to ``output_dir``, a checkpoint, the writer and
    ``callbacks`` (class paths, e.g. the LLM's evaluator)."""
    override = tmp_path / "callbacks.yaml"
    override.write_text(
        "trainer:\n  enable_progress_bar: false\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {monitor: val/ndcg@10, mode: max}\n"
        "    - class_path: callbacks.MetricsWriter\n"
        f"    - {{class_path: {class_path}, init_args: {{output_dir: '{output_dir}'}}}}\n"
        + "".join(f"    - class_path: {callback}\n" for callback in callbacks)
    )
    return ["--config", str(override)]


def test_dccf_ddp_exports_and_matches_single_process(synthetic_dir, tmp_path):
    export = tmp_path / "embeddings"
    two, one = fit_ddp_then_test_single(
        "synthetic/dccf.yaml",
        synthetic_dir,
        tmp_path,
        *exporter_override(tmp_path, "callbacks.ItemEmbeddingExporter", export),
        "--trainer.max_epochs=2",
        "--model.init_args.num_intents=16",
    )
    assert_same_metrics(two, one)
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["num_items"] == 120 and manifest["checkpoint"] == two["best_checkpoint"]
    assert torch.load(export / manifest["file"]).shape == (120, 32)


def test_codebook_ddp_exports_and_its_validation_matches_single_process(synthetic_dir, tmp_path):
    """The collision statistics gather every item's codes: 2 processes see the catalogue 1 process sees (the
    validation losses are each rank's own mean, not synced, so they are not compared)."""
    torch.save(torch.randn(120, 16, generator=torch.Generator().manual_seed(0)), tmp_path / "item_embeddings.pt")
    export, ddp_root, single_root = tmp_path / "codebook", tmp_path / "ddp", tmp_path / "single"
    override = tmp_path / "codebook.yaml"
    override.write_text(
        "trainer:\n  enable_progress_bar: false\n  callbacks:\n"
        "    - {class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true}}\n"
        "    - {class_path: callbacks.KMeansInit, init_args: {num_samples: 0}}\n"
        "    - class_path: callbacks.CollisionLogger\n"
        f"    - {{class_path: callbacks.CodeIndexExporter, init_args: {{output_dir: '{export}'}}}}\n"
        "    - class_path: callbacks.MetricsWriter\n"
    )
    args = [
        "--config",
        str(override),
        "--data.init_args.embeddings",
        str(tmp_path / "item_embeddings.pt"),
        "--model.init_args.num_levels=3",
        "--model.init_args.codebook_size=8",
    ]
    cli(
        "fit",
        [*tiny_run_args("synthetic/codebook.yaml", synthetic_dir, ddp_root, *args, "--trainer.max_epochs=2"), *DDP],
        tmp_path,
    )
    index = json.loads((export / "index.json").read_text())
    assert sorted(map(int, index)) == list(range(120)) and all(len(codes) == 3 for codes in index.values())
    assert json.loads((export / "manifest.json").read_text())["num_items"] == 120
    last = ddp_root / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    cli(
        "validate",
        [
            *tiny_run_args("synthetic/codebook.yaml", synthetic_dir, single_root, *args),
            *SINGLE,
            "--ckpt_path",
            str(last),
        ],
        tmp_path,
    )
    two, one = (
        {
            key: value
            for key, value in metrics(root, "val")["metrics"].items()
            if key == "collision_rate" or key.startswith("level")
        }
        for root in (ddp_root, single_root)
    )
    assert "collision_rate" in one and "level3/perplexity" in one and two == pytest.approx(one, abs=1e-6)


def test_llm_ddp_evaluates_exports_and_matches_single_process(synthetic_dir, tiny_tokenizer, tmp_path):
    """Stage 3 from a written index: 2-process fit, beam-search test and export; the 1-process test agrees."""
    from tests.test_prompts_llm import synthetic_codes, write_index

    index = write_index(tmp_path / "index.json", synthetic_codes())
    export = tmp_path / "llm"
    two, one = fit_ddp_then_test_single(
        "synthetic/llm.yaml",
        synthetic_dir,
        tmp_path,
        *exporter_override(tmp_path, "callbacks.LLMExporter", export, "callbacks.BeamSearchEvaluator"),
        "--data.init_args.index",
        str(index),
        "--data.init_args.eval_max_users=9",
        "--model.init_args.tokenizer_path",
        str(tiny_tokenizer),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
    )
    assert_same_metrics(two, one)
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["weights"] == "model" and json.loads((export / "index.json").read_text()) == json.loads(
        index.read_text()
    )
