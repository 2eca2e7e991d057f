"""The `lightning`/`semconv` command: every shipped config parses; tiny fit+test runs through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lightning_modules.cli import build_cli, main
from tests.conftest import CONFIGS, REPO, tiny_run_args

# Pieces that only make sense stacked on a model config: parsed together with the quickstart config.
PIECES = sorted(
    str(path.relative_to(CONFIGS))
    for sub in ("trainer", "logger", "strategy")
    for path in (CONFIGS / sub).glob("*.yaml")
)
RUN_CONFIGS = sorted(
    str(path.relative_to(CONFIGS))
    for path in CONFIGS.rglob("*.yaml")
    # configs/tables holds override pieces of experiments/reproduce.py, parsed stacked in test_reproduce_tables.py;
    # pipeline.yaml files are parsed in test_pipeline.py
    if path.parent.name not in ("trainer", "logger", "strategy", "sweeps", "serving", "tables")
    and path.name != "pipeline.yaml"
)


@pytest.mark.parametrize("config", RUN_CONFIGS)
def test_every_run_config_parses(config):
    cli = build_cli(["--config", str(CONFIGS / config)], run=False)
    assert cli.model is not None and cli.datamodule is not None


@pytest.mark.parametrize("piece", PIECES)
def test_every_config_piece_stacks(piece, capsys):
    # parse and print only: strategies such as DeepSpeed cannot be instantiated on a CPU-only machine
    with pytest.raises(SystemExit) as exit_info:
        build_cli(
            ["--config", str(CONFIGS / "synthetic/sasrec.yaml"), "--config", str(CONFIGS / piece), "--print_config"],
            run=False,
        )
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "trainer:" in printed and "lightning_modules.SASRec" in printed
    assert "${" not in printed  # interpolation across stacked files is resolved
    if piece.startswith("logger/"):
        assert "save_dir: runs/synthetic/sasrec" in printed


def test_unknown_config_key_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "synthetic/sasrec.yaml"), "--model.init_args.hiden_size=3"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "hiden_size" in err


def test_unknown_key_in_a_config_file_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  init_args:\n    batch_sise: 3\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "synthetic/sasrec.yaml"), "--config", str(bad)])
    assert "batch_sise" in capsys.readouterr().err


def test_fit_then_test_writes_metrics_json(synthetic_dir, tmp_path):
    root = tmp_path / "run"
    main(["fit", *tiny_run_args("synthetic/sasrec.yaml", synthetic_dir, root, "--trainer.max_epochs=2")])
    version_dir = root / "csv" / "version_0"
    test_record = json.loads((version_dir / "test_metrics.json").read_text())
    val_record = json.loads((version_dir / "val_metrics.json").read_text())
    assert set(test_record["metrics"]) == {"hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10"}
    assert test_record["best_checkpoint"].endswith(".ckpt") and val_record["epoch"] == 1
    assert test_record["dataset"]["users"] == 300
    metrics = test_record["metrics"]
    assert 0 <= metrics["hr@1"] <= metrics["hr@5"] <= metrics["hr@10"] <= 1
    assert metrics["ndcg@5"] <= metrics["ndcg@10"] <= metrics["hr@10"]
    assert (version_dir / "config.yaml").is_file()

    # `lightning test --ckpt_path` on the best checkpoint reproduces the numbers
    retest_root = tmp_path / "retest"
    main(
        [
            "test",
            *tiny_run_args("synthetic/sasrec.yaml", synthetic_dir, retest_root),
            "--ckpt_path",
            test_record["best_checkpoint"],
        ]
    )
    retested = json.loads((retest_root / "csv" / "version_0" / "test_metrics.json").read_text())["metrics"]
    assert retested == pytest.approx(metrics, abs=1e-6)

    # rerunning into the same directory does not abort on the existing config.yaml
    main(["fit", *tiny_run_args("synthetic/sasrec.yaml", synthetic_dir, root, "--trainer.fast_dev_run=1")])


def _checkpoint_callbacks(config: str) -> list[dict]:
    import yaml

    callbacks = yaml.safe_load((CONFIGS / config).read_text()).get("trainer", {}).get("callbacks") or []
    return [cb.get("init_args") or {} for cb in callbacks if cb["class_path"].endswith("ModelCheckpoint")]


@pytest.mark.parametrize("config", [c for c in RUN_CONFIGS if _checkpoint_callbacks(c)])
def test_every_config_keeps_a_current_last_checkpoint(config):
    """A monitored callback's ``save_last`` only follows improvements (Lightning >= 2.6): resuming from it would
    silently drop every epoch after the best one. Some callback without a monitor must write each epoch."""
    callbacks = _checkpoint_callbacks(config)
    assert any(args.get("monitor") is None and args.get("save_top_k", 1) != 0 for args in callbacks), callbacks
    assert not any(args.get("monitor") and args.get("save_last") for args in callbacks), callbacks


def test_last_checkpoint_holds_the_final_epoch_and_resumes(synthetic_dir, tmp_path):
    import torch

    root = tmp_path / "run"
    # lr 1e-30 (0 is refused): float32 weights never change, the monitored metric never improves after epoch 0,
    # so only the first epoch is "best"
    main(
        [
            "fit",
            *tiny_run_args(
                "synthetic/sasrec.yaml",
                synthetic_dir,
                root,
                "--trainer.max_epochs=3",
                "--model.init_args.lr=1e-30",
                "--test_after_fit=false",
                "--trainer.limit_train_batches=2",
            ),
        ]
    )
    checkpoints = root / "csv" / "version_0" / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2 and last["global_step"] == 6
    assert [path.name for path in checkpoints.glob("epoch=*.ckpt")] == ["epoch=0-step=2.ckpt"]
    resumed = build_cli(
        [
            "fit",
            *tiny_run_args(
                "synthetic/sasrec.yaml",
                synthetic_dir,
                tmp_path / "resumed",
                "--trainer.max_epochs=4",
                "--test_after_fit=false",
                "--trainer.limit_train_batches=2",
            ),
            "--ckpt_path",
            str(checkpoints / "last.ckpt"),
        ]
    )
    assert resumed.trainer.current_epoch == 4 and resumed.trainer.global_step == 8  # one more epoch, not three


def test_final_weights_checkpoint_survives_a_stop_mid_epoch(synthetic_dir, tmp_path):
    """configs/industrial/llm.yaml tests last.ckpt: written at every train-epoch end, including the epoch that
    max_time (here: a callback doing what Lightning's Timer does) cuts short before its validation."""
    import lightning as L
    import torch

    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            trainer.should_stop = trainer.should_stop or trainer.global_step >= 5

    override = tmp_path / "callbacks.yaml"
    override.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {filename: last, save_on_train_epoch_end: true}\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {monitor: val/ndcg@10, mode: max}\n"
    )
    cli = build_cli(
        [
            *tiny_run_args(
                "synthetic/sasrec.yaml",
                synthetic_dir,
                tmp_path / "run",
                "--config",
                str(override),
                "--trainer.max_epochs=5",
                "--trainer.limit_train_batches=3",
            )
        ],
        run=False,
    )
    cli.trainer.callbacks.append(StopAt())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 5  # stopped inside the second epoch (3 batches each)
    final = cli.trainer.checkpoint_callback
    assert final.best_model_path.endswith("last.ckpt")
    assert torch.load(final.best_model_path, map_location="cpu", weights_only=False)["global_step"] == 5


def test_checkpoint_for_another_dataset_is_refused(synthetic_dir, tmp_path):
    from datamodules import SyntheticSpec, write_synthetic

    root = tmp_path / "run"
    main(
        [
            "fit",
            *tiny_run_args(
                "synthetic/sasrec.yaml", synthetic_dir, root, "--trainer.max_epochs=1", "--test_after_fit=false"
            ),
        ]
    )
    checkpoint = next((root / "csv" / "version_0" / "checkpoints").glob("epoch=*.ckpt"))
    other = write_synthetic(tmp_path / "other", SyntheticSpec(num_users=300, num_items=120, num_categories=6, seed=99))
    args = [
        "test",
        *tiny_run_args("synthetic/sasrec.yaml", other, tmp_path / "other_run"),
        "--ckpt_path",
        str(checkpoint),
    ]
    with pytest.raises(
        ValueError, match="checkpoint was trained on dataset Synthetic .* Use the checkpoint of this dataset"
    ):
        build_cli(args)
    with pytest.raises(SystemExit) as exit_info:
        main(args)  # the command prints the message, not a traceback
    assert exit_info.value.code == 2


def test_command_line_model_flags_win_over_checkpoint_hparams(synthetic_dir, tmp_path, caplog):
    """Lightning loads --ckpt_path's hyperparameters over the config; an explicit flag must still apply."""
    root = tmp_path / "run"
    main(
        [
            "fit",
            *tiny_run_args(
                "synthetic/sasrec.yaml",
                synthetic_dir,
                root,
                "--trainer.max_epochs=1",
                "--test_after_fit=false",
                "--trainer.limit_train_batches=2",
            ),
        ]
    )
    checkpoint = str(next((root / "csv" / "version_0" / "checkpoints").glob("epoch=*.ckpt")))
    args = [
        *tiny_run_args("synthetic/sasrec.yaml", synthetic_dir, tmp_path / "test"),
        "--ckpt_path",
        checkpoint,
        "--trainer.limit_test_batches=1",
    ]
    assert build_cli(["test", *args]).model.mask_history  # the checkpoint's value (trained with the default)
    with caplog.at_level("WARNING", logger="lightning_modules.cli"):
        cli = build_cli(["test", *args, "--model.init_args.mask_history=false", "--model.init_args.top_k", "10"])
    assert cli.model.mask_history is False and cli.model.hparams.top_k == 10
    assert "mask_history=False from the command line replaces the checkpoint's True" in caplog.text


def test_console_scripts_are_installed():
    from importlib.metadata import entry_points

    scripts = {
        entry.name: entry.value
        for entry in entry_points(group="console_scripts")
        if entry.name in ("lightning", "semconv")
    }
    assert scripts == {"lightning": "lightning_modules.cli:main", "semconv": "lightning_modules.cli:main"}
    result = subprocess.run(["lightning", "--help"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-1000:]
    assert all(subcommand in result.stdout for subcommand in ("fit", "validate", "test", "predict"))


def test_predict_writes_top_k_per_user(synthetic_dir, tmp_path):
    root = tmp_path / "run"
    main(
        [
            "fit",
            *tiny_run_args(
                "synthetic/sasrec.yaml", synthetic_dir, root, "--trainer.max_epochs=1", "--test_after_fit=false"
            ),
        ]
    )
    checkpoint = next((root / "csv" / "version_0" / "checkpoints").glob("epoch=*.ckpt"))
    main(
        [
            "predict",
            *tiny_run_args("synthetic/sasrec.yaml", synthetic_dir, tmp_path / "predict"),
            "--ckpt_path",
            str(checkpoint),
        ]
    )
    lines = (tmp_path / "predict" / "csv" / "version_0" / "top_k.rank0.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [record["user"] for record in records] == list(range(300))
    from datamodules import load_lcrec

    catalogue = load_lcrec(synthetic_dir, "Synthetic")
    for record in records[::37]:
        assert len(record["items"]) == 20 == len(set(record["items"]))
        # history masking: nothing the user already saw (before the test target) is recommended
        assert not set(record["items"]) & set(catalogue.sequence(record["user"])[:-1].tolist())


# ------------------------------------------------------------------------------------------ readable errors
def run_command(*args: str, debug_env: bool = False) -> subprocess.CompletedProcess:
    """``python -m lightning_modules.cli`` as a user runs it (a new process: stderr as the user sees it)."""
    environment = {key: value for key, value in os.environ.items() if key != "SEMCONV_DEBUG"}
    environment.update({"PYTHONPATH": str(REPO), **({"SEMCONV_DEBUG": "1"} if debug_env else {})})
    return subprocess.run(
        [sys.executable, "-m", "lightning_modules.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
        cwd=REPO,
    )


def assert_readable(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Namespace(" not in result.stderr, result.stderr[-3000:]
    message = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(message) == 1 and all(fragment in message[0] for fragment in fragments), result.stderr[-3000:]


def test_bad_data_dir_prints_one_message_naming_the_field(tmp_path):
    args = [
        "fit",
        "--config",
        str(CONFIGS / "synthetic/sasrec.yaml"),
        "--data.init_args.source=lcrec",
        "--data.init_args.data_dir",
        str(tmp_path / "missing"),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    ]
    assert_readable(run_command(*args), str(tmp_path / "missing"), "data.init_args.data_dir")
    for debug in (run_command(*args, "--debug"), run_command(*args, debug_env=True)):
        assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataFormatError" in debug.stderr


@pytest.mark.parametrize(
    ("config", "flag", "fragment"),
    [
        ("synthetic/sasrec.yaml", "--data.init_args.batch_size=0", "data.init_args.batch_size must be >= 1, got 0"),
        ("synthetic/sasrec.yaml", "--model.init_args.dropout=1.0", "model.init_args.dropout must be in [0, 1)"),
        ("synthetic/codebook.yaml", "--model.init_args.codebook_size=1", "model.init_args.codebook_size must be >= 2"),
        ("synthetic/dccf.yaml", "--data.init_args.num_negatives=0", "data.init_args.num_negatives must be >= 1"),
    ],
)
def test_wrong_config_value_is_refused_at_construction(config, flag, fragment, tmp_path):
    """jsonargparse wraps a constructor's error in its own (with a Namespace dump): the command unwraps it."""
    result = run_command("fit", "--config", str(CONFIGS / config), flag, "--trainer.default_root_dir", str(tmp_path))
    assert_readable(result, fragment)
    assert not (tmp_path / "csv").exists()  # refused before anything ran
