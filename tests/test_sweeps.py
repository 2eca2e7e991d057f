"""W&B sweeps: every grid point of configs/sweeps/*.yaml becomes, as `wandb agent` writes it, a command line the
project's CLI parses; a run logged through configs/logger/wandb.yaml records the metrics the result tables read."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from lightning_modules.cli import build_cli, main
from tests.conftest import CONFIGS, REPO, tiny_run_args

SWEEPS = sorted(path.name for path in (CONFIGS / "sweeps").glob("*.yaml"))
CLI_ENTRY_POINT = "lightning_modules.cli:main"
TABLE_METRICS = [
    f"{stage}/{metric}" for stage in ("val", "test") for metric in ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10")
]


def load_sweep(name: str) -> dict:
    return yaml.safe_load((CONFIGS / "sweeps" / name).read_text())


def grid(parameters: dict) -> list[dict]:
    """The runs of ``method: grid``, as W&B's sweep controller makes them: every combination of the parameters'
    ``values`` (a ``value`` is a one-point axis). Grid search takes no distributions, so any other kind is refused.
    (W&B's own controller, the `sweeps` package behind ``wandb[sweeps]``, is not a dependency: it pins numpy < 2.)"""
    axes = []
    for name, spec in parameters.items():
        if "values" in spec:
            axes.append([(name, value) for value in spec["values"]])
        elif "value" in spec:
            axes.append([(name, spec["value"])])
        else:
            raise ValueError(f"grid search needs `values` or `value` for parameter {name!r}, got {sorted(spec)}")
    return [dict(point) for point in itertools.product(*axes)]


def agent_command(sweep: dict, point: dict, run_id: str, monkeypatch, tmp_path: Path) -> list[str]:
    """The command line ``wandb agent`` starts for one run of ``sweep``: wandb's own ``Agent._command_run`` (macro
    expansion of ``command``: ``${env}``, ``${interpreter}``, ``${program}``, ``${args}``, ``${args_no_hyphens}``,
    ``${envvar:NAME}``...) on the run command the sweep server sends, with the process start replaced by a recorder."""
    from wandb import wandb_agent

    started: list[list[str]] = []

    class Recorder:
        def __init__(self, command=None, **_):
            started.append(command)

    monkeypatch.setattr(wandb_agent, "AgentProcess", Recorder)
    # the agent writes the run's parameters under WANDB_DIR and exports the run's id and parameter file
    for name, value in (("WANDB_DIR", str(tmp_path)), ("WANDB_SWEEP_ID", "sweep0")):
        monkeypatch.setenv(name, value)
    for name in ("WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):
        monkeypatch.setenv(name, "")
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="sweep0")
    agent._sweep_command = list(sweep["command"])  # what Agent.run reads from the sweep's config
    run = {
        "type": "run",
        "run_id": run_id,
        "program": sweep["program"],
        "args": {k: {"value": v} for k, v in point.items()},
    }
    agent._command_run(run)
    assert len(started) == 1 and started[0], f"the agent started {started}"
    return started[0]


def cli_arguments(command: list[str]) -> list[str]:
    """The arguments the project's CLI receives from an agent's command: ``${env}`` (/usr/bin/env) dropped, and the
    program checked to be one of the project's console scripts for :func:`lightning_modules.cli.main`."""
    if command[0].endswith("/env"):
        command = command[1:]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get(command[0]) == CLI_ENTRY_POINT, (
        f"the sweep runs {command[0]!r}, not a console script of {CLI_ENTRY_POINT} ({scripts})"
    )
    return command[1:]


def dotted(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("sweep_name", SWEEPS)
def test_grid_points_expand_to_commands_the_cli_parses(sweep_name, tmp_path, monkeypatch, capsys):
    sweep = load_sweep(sweep_name)
    assert sweep["method"] == "grid"
    points = grid(sweep["parameters"])
    commands = [agent_command(sweep, point, f"run{i}", monkeypatch, tmp_path) for i, point in enumerate(points)]
    assert len(commands) == len({tuple(command) for command in commands}) == len(points)
    assert len(points) == math.prod(len(spec.get("values", [None])) for spec in sweep["parameters"].values())
    # the sweep's parameters file, written by the agent, is what the run's wandb.config starts from
    written = yaml.safe_load((tmp_path / "wandb" / "sweep-sweep0" / "config-run0.yaml").read_text())
    assert {key: value["value"] for key, value in written.items() if key != "wandb_version"} == points[0]

    monkeypatch.chdir(REPO)  # the sweep files name configs relative to the checkout, where `wandb agent` runs
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_SWEEP_ID", "WANDB_RUN_ID"):  # what the agent exported for the last run
        monkeypatch.delenv(name)
    for point, command in zip(points, commands, strict=True):
        args = cli_arguments(command)
        for name, value in point.items():
            assert f"--{name}={value}" in args, (args, point)
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--print_config"])
        output = capsys.readouterr()
        assert exit_info.value.code in (0, None), f"{' '.join(command)}\n{output.err[-3000:]}"
        printed = yaml.safe_load(output.out)
        for name, value in point.items():
            assert dotted(printed, name) == value, f"{name} in the resolved config of {' '.join(command)}"
        # and the value reaches the module that the run builds
        subcommand, *rest = args
        assert subcommand == "fit"
        cli = build_cli(rest, run=False)
        for name, value in point.items():
            owner, _, field = name.partition(".init_args.")
            assert (cli.model if owner == "model" else cli.datamodule).hparams[field] == value


def test_a_misspelt_sweep_parameter_fails_to_parse(tmp_path, monkeypatch, capsys):
    sweep = {**load_sweep("codebook_levels.yaml"), "parameters": {"model.init_args.num_level": {"values": [2]}}}
    (command,) = [agent_command(sweep, point, "run0", monkeypatch, tmp_path) for point in grid(sweep["parameters"])]
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(SystemExit) as exit_info:
        main([*cli_arguments(command), "--print_config"])
    assert exit_info.value.code not in (0, None)
    assert "num_level" in capsys.readouterr().err


def test_agent_macros_are_substituted_as_wandb_documents(tmp_path, monkeypatch):
    sweep = {
        "program": "lightning",
        "command": ["${env}", "${interpreter}", "${program}", "fit", "${args_no_hyphens}", "--seed=${envvar:SEED}"],
    }
    monkeypatch.setenv("SEED", "7")
    command = agent_command(sweep, {"a.b": 1, "c": "x"}, "run0", monkeypatch, tmp_path)
    assert command == ["/usr/bin/env", "python", "lightning", "fit", "a.b=1", "c=x", "--seed=7"]
    with pytest.raises(ValueError, match="values"):
        grid({"lr": {"distribution": "uniform", "min": 0, "max": 1}})
    assert grid({"a": {"values": [1, 2]}, "b": {"value": 3}, "c": {"values": ["x", "y"]}}) == [
        {"a": 1, "b": 3, "c": "x"},
        {"a": 1, "b": 3, "c": "y"},
        {"a": 2, "b": 3, "c": "x"},
        {"a": 2, "b": 3, "c": "y"},
    ]


def test_wandb_mode_defaults_offline_except_under_a_sweep_agent(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    args = ["--config", str(CONFIGS / "synthetic/sasrec.yaml"), "--config", str(CONFIGS / "logger/wandb.yaml")]
    for sweep_id, expected in (("", "offline"), ("sweep0", None)):
        monkeypatch.delenv("WANDB_MODE", raising=False)
        monkeypatch.setenv("WANDB_SWEEP_ID", sweep_id)
        with pytest.raises(SystemExit):
            build_cli([*args, "--print_config"], run=False)
        assert os.environ.get("WANDB_MODE") == expected
        printed = yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]["init_args"]
        # `offline: true` would make WandbLogger overwrite WANDB_MODE; `name: csv` (from the CSV logger of the run
        # config) would name every run "csv"
        assert printed["offline"] is False and printed["name"] is None


def read_offline_run(wandb_dir: Path) -> dict:
    """The one offline run under ``wandb_dir``, read from its transaction log by wandb's own reader
    (``wandb leet inspect --summary --json``; offline runs keep their history and summary only in that log)."""
    (log,) = wandb_dir.glob("offline-run-*/run-*.wandb")
    result = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(log)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_offline_wandb_run_records_the_table_metrics(synthetic_dir, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    root = tmp_path / "run"
    extra = ["--config", str(CONFIGS / "logger/wandb.yaml"), "--trainer.max_epochs=1"]
    try:
        main(["fit", *tiny_run_args("synthetic/sasrec.yaml", synthetic_dir, root, *extra)])
    finally:
        wandb.finish()  # what the exit of a `lightning fit` process does (WandbLogger leaves the run open)

    run = read_offline_run(root / "wandb")  # the logger's save_dir (${trainer.default_root_dir}) wins over WANDB_DIR
    assert run["state"] == "finished" and run["exit_code"] == 0
    assert run["project"] == "semantic-convergence" and run["name"] != "csv"
    summary = run["summary"]
    assert set(TABLE_METRICS) <= set(summary), sorted(summary)
    # the numbers W&B holds are the ones the run wrote for the tables
    for stage in ("val", "test"):
        written = json.loads((root / f"{stage}_metrics.json").read_text())["metrics"]
        assert {key: summary[f"{stage}/{key}"] for key in written} == pytest.approx(written, abs=1e-6)
    assert run["config"]["hidden_size"] == 64 and run["config"]["data_dir"] == str(synthetic_dir)  # hyperparameters
