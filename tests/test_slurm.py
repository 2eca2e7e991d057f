"""The sbatch templates of experiments/slurm: they render, are valid bash, launch the intended `lightning fit` under
srun (SLURM's environment set by hand, srun replaced by a recorder), Lightning derives the ranks from that
environment, and a restarted job resumes from the newest checkpoint.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from lightning.pytorch.utilities.rank_zero import rank_zero_only as pytorch_rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

from experiments.slurm.render import defaults, render
from experiments.slurm.resume import resume_checkpoint
from lightning_modules.cli import build_cli
from tests.conftest import CONFIGS, REPO

SLURM_DIR = REPO / "experiments" / "slurm"
TEMPLATES = sorted(SLURM_DIR.glob("*.sbatch"))
MULTI, ONE = SLURM_DIR / "stage3_multi_node.sbatch", SLURM_DIR / "stage3_one_node.sbatch"
NODES, GPUS = 2, 4


def slurm_env(proc_id: int, nodes: int = NODES, gpus: int = GPUS) -> dict[str, str]:
    """What SLURM sets for task ``proc_id`` of a ``nodes`` x ``gpus`` job (one task per GPU, block distribution)."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "semconv-stage3",
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": f"gpu[003-{3 + nodes - 1:03d}]",
        "SLURM_NODELIST": f"gpu[003-{3 + nodes - 1:03d}]",
        "SLURM_NTASKS": str(nodes * gpus),
        "SLURM_NTASKS_PER_NODE": str(gpus),
        "SLURM_GPUS_ON_NODE": str(gpus),
        "SLURM_PROCID": str(proc_id),
        "SLURM_LOCALID": str(proc_id % gpus),
        "SLURM_NODEID": str(proc_id // gpus),
    }


# srun records its argv; with SRUN_EXEC=1 it then runs the command (one task: srun's options are dropped)
FAKE_SRUN = """#!/bin/sh
printf "%s\\0" "$@" > "$SRUN_ARGV"
[ "${SRUN_EXEC:-0}" = 1 ] || exit 0
while [ "${1#-}" != "$1" ]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = '#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n'


def run_job(template: Path, tmp_path: Path, env: dict[str, str], **values: str) -> list[str]:
    """Render ``template``, run it with bash as sbatch would, and return the argv it gave srun."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(render(template.read_text(), values))
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    done = subprocess.run(
        ["bash", str(script)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            **env,
            "PATH": path,
            "SRUN_ARGV": str(tmp_path / "argv"),
            "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
            "PYTHONPATH": str(REPO),
        },
    )
    (tmp_path / "job.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return (tmp_path / "argv").read_text().split("\0")[:-1]


def fit_args(argv: list[str]) -> list[str]:
    """The `lightning fit` flags of a recorded srun argv (after srun's own options)."""
    start = argv.index("lightning")
    assert argv[start + 1] == "fit"
    return argv[start + 2 :]


# ------------------------------------------------------------------------------------------ templates
@pytest.mark.parametrize("template", TEMPLATES, ids=lambda path: path.name)
def test_template_renders_to_valid_bash_with_requeue(template: Path) -> None:
    text = render(template.read_text())
    assert "{{" not in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    directives = re.findall(r"^#SBATCH (\S+)", text, re.MULTILINE)
    assert "--requeue" in directives and "--signal=SIGUSR1@90" in directives
    # the signal SLURM sends is the one Lightning's SLURMEnvironment waits for by default
    assert SLURMEnvironment().requeue_signal == signal.SIGUSR1 and SLURMEnvironment().auto_requeue
    ntasks = next(d for d in directives if d.startswith("--ntasks-per-node="))
    assert ntasks.split("=")[1] == next(d for d in directives if d.startswith("--gpus-per-node=")).split("=")[1]


def test_render_fills_values_and_names_bad_ones() -> None:
    text = MULTI.read_text()
    assert defaults(text)["STRATEGY"] == "deepspeed_zero3_offload"
    assert defaults(ONE.read_text())["STRATEGY"] == "deepspeed_zero2"
    assert "#SBATCH --nodes=8\n" in render(text, {"NODES": "8"})
    with pytest.raises(ValueError, match=r"no placeholder \['NODE'\]"):
        render(text, {"NODE": "8"})
    with pytest.raises(ValueError, match="CONFIG='a b' must be one word"):
        render(text, {"CONFIG": "a b"})
    with pytest.raises(ValueError, match=r"no value for \['X'\]"):
        render("#SBATCH --x={{X}}\n")


# ------------------------------------------------------------------------------- the launched command
@pytest.mark.parametrize(
    ("template", "nodes", "stage", "offload"),
    [(MULTI, NODES, 3, True), (ONE, 1, 2, False)],
    ids=["multi_node", "one_node"],
)
def test_job_launches_lightning_fit_that_the_cli_parses(
    template: Path, nodes: int, stage: int, offload: bool, tmp_path: Path, capsys
) -> None:
    root = tmp_path / "run"
    argv = run_job(template, tmp_path, slurm_env(0, nodes), ROOT=str(root), EXTRA_ARGS="--trainer.max_epochs 2")
    assert argv[:2] == ["--kill-on-bad-exit=1", "lightning"]
    args = fit_args(argv)
    assert "--ckpt_path" not in args  # nothing to resume yet
    assert args[args.index("--trainer.num_nodes") + 1] == str(nodes)
    assert args[args.index("--trainer.devices") + 1] == str(GPUS)
    # the whole command parses with the project's CLI (printed, not run: DeepSpeed needs GPUs)
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert f"num_nodes: {nodes}\n" in printed and "max_epochs: 2\n" in printed
    assert f"devices: '{GPUS}'\n" in printed  # a string from the command line; Lightning reads "4" as 4 devices
    assert "DeepSpeedStrategy" in printed and f"stage: {stage}\n" in printed
    assert f"offload_optimizer: {str(offload).lower()}" in printed
    assert f"default_root_dir: {root}\n" in printed and "accelerator: gpu" in printed


@pytest.mark.parametrize(("proc_id", "node_rank", "local_rank"), [(0, 0, 0), (3, 0, 3), (4, 1, 0), (7, 1, 3)])
def test_lightning_derives_ranks_from_slurm(
    proc_id: int, node_rank: int, local_rank: int, tmp_path: Path, monkeypatch
) -> None:
    env = slurm_env(proc_id)
    args = fit_args(run_job(MULTI, tmp_path, env, ROOT=str(tmp_path / "run")))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # Lightning exports them; undone after the test
        monkeypatch.delenv(name, raising=False)
    for flag in {id(f): f for f in (fabric_rank_zero_only, pytorch_rank_zero_only, utils_rank_zero_only)}.values():
        monkeypatch.setattr(flag, "rank", flag.rank)  # the DDP strategy sets the process-wide rank; restore it
    # the same flags on CPU processes with DDP: DeepSpeed cannot be built without GPUs, the environment is the same
    strategy = args.index(f"{CONFIGS.relative_to(REPO)}/strategy/deepspeed_zero3_offload.yaml")
    args[strategy] = str(CONFIGS / "strategy" / "ddp.yaml")
    cli = build_cli([*args, "--trainer.accelerator", "cpu", "--trainer.precision", "32"], run=False)
    trainer = cli.trainer
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    assert (trainer.world_size, trainer.global_rank) == (NODES * GPUS, proc_id)
    assert (trainer.node_rank, trainer.local_rank, trainer.num_nodes) == (node_rank, local_rank, NODES)
    assert environment.main_address == "gpu003"  # the first host of gpu[003-004]
    assert environment.main_port == 15000 + 4242  # the job id's last 4 digits: the same on every rank
    assert pytorch_rank_zero_only.rank == proc_id  # logging and checkpoint writes happen on global rank 0 only


# ------------------------------------------------------------------------------------------- resuming
def touch(path: Path, mtime: int, directory: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if directory else path.write_bytes(b"")
    os.utime(path, (mtime, mtime))
    return path


def test_resume_picks_the_newest_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "run"
    assert resume_checkpoint(root) is None
    touch(root / "csv" / "version_0" / "checkpoints" / "epoch=0-step=10.ckpt", 500)
    touch(root / "csv" / "version_0" / "lastly.ckpt", 600)  # not in a checkpoints folder, not a last checkpoint
    assert resume_checkpoint(root) is None
    first = touch(root / "csv" / "version_0" / "checkpoints" / "last.ckpt", 100)
    assert resume_checkpoint(root) == first
    # a restarted job logs to version_1; its DeepSpeed last.ckpt is a folder
    second = touch(root / "csv" / "version_1" / "checkpoints" / "last.ckpt", 200, directory=True)
    assert resume_checkpoint(root) == second
    hpc = touch(root / "hpc_ckpt_1.ckpt", 300)  # saved when the requeue signal came, after the last epoch's
    assert resume_checkpoint(root) == hpc
    newer = touch(root / "csv" / "version_2" / "checkpoints" / "last-v1.ckpt", 400)
    assert resume_checkpoint(root) == newer


def test_requeued_job_resumes_from_last_ckpt(tmp_path: Path, capsys) -> None:
    root = tmp_path / "run"
    last = touch(root / "csv" / "version_0" / "checkpoints" / "last.ckpt", 100)
    args = fit_args(run_job(MULTI, tmp_path, {**slurm_env(0), "SLURM_RESTART_COUNT": "1"}, ROOT=str(root)))
    assert args[args.index("--ckpt_path") + 1] == str(last)
    with pytest.raises(SystemExit):
        build_cli(["fit", *args, "--print_config"])
    assert f"ckpt_path: {last}\n" in capsys.readouterr().out


class RequeueAtStep(L.Callback):
    """Test helper: at training step ``step``, SLURM's warning signal arrives (SIGUSR1), then the job dies the way
    SLURM ends it (no clean-up)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            signal.raise_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 60
            while not list(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")) and time.monotonic() < deadline:
                time.sleep(0.05)  # Lightning's handler saves the checkpoint and calls scontrol requeue
            os._exit(0)


def test_signal_saves_requeues_and_the_rerun_resumes(synthetic_dir: Path, tmp_path: Path) -> None:
    """The whole requeue path on CPU: a one-task job (DDP, gloo) gets SIGUSR1 at step 3 and dies; Lightning has
    saved hpc_ckpt_1.ckpt and asked scontrol to requeue; the rerun of the same script resumes from step 3."""
    root = tmp_path / "run"
    env = {**slurm_env(0, nodes=1, gpus=1), "SRUN_EXEC": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
    extra = (
        "--trainer.accelerator cpu --trainer.precision 32 --trainer.max_steps 6 --trainer.val_check_interval 3 "
        "--test_after_fit false "
        f"--data.init_args.data_dir {synthetic_dir} --data.init_args.source lcrec "
        "--data.init_args.dataset Synthetic --data.init_args.batch_size 16"
    )
    values = {"ROOT": str(root), "CONFIG": "configs/synthetic/sasrec.yaml", "STRATEGY": "ddp", "GPUS_PER_NODE": "1"}
    run_job(
        ONE,
        tmp_path,
        env,
        **values,
        EXTRA_ARGS=f"{extra} --trainer.callbacks+=tests.test_slurm.RequeueAtStep --trainer.callbacks.step 3",
    )
    hpc = root / "hpc_ckpt_1.ckpt"
    assert hpc.is_file() and (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert torch.load(hpc, map_location="cpu", weights_only=False)["global_step"] == 3

    args = fit_args(run_job(ONE, tmp_path, {**env, "SLURM_RESTART_COUNT": "1"}, **values, EXTRA_ARGS=extra))
    assert args[args.index("--ckpt_path") + 1] == str(hpc)
    log = (tmp_path / "job.log").read_text()
    assert "resuming from " + str(hpc) in log and f"Restored all states from the checkpoint at {hpc}" in log
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # no second signal, no second requeue
