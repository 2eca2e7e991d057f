"""experiments/rl_rewards.py: the generated pipeline files parse and the table reads finished runs."""

from __future__ import annotations

import argparse
import json

import pytest

from experiments import rl_rewards
from lightning_modules.cli import main as cli_main
from lightning_modules.pipeline_spec import load_pipeline


def _finished(directory, ndcg: float, hr: float) -> None:
    out = directory / "csv" / "version_0"
    out.mkdir(parents=True)
    metrics = {"hr@1": 0.03, "hr@5": 0.06, "hr@10": hr, "ndcg@5": 0.05, "ndcg@10": ndcg}
    (out / "test_metrics.json").write_text(json.dumps({"metrics": metrics}))


def test_pipelines_parse_and_every_rl_stage_starts_from_its_seeds_sft(tmp_path, monkeypatch):
    monkeypatch.chdir(rl_rewards.ROOT)
    run_dir = tmp_path / "rl"
    for sft in (None, str(tmp_path / "sft{seed}")):
        options = argparse.Namespace(
            dataset="industrial", run_dir=str(run_dir), rows=list(rl_rewards.ROWS), steps=100, sft_run=sft,
            extra_args=[],
        )  # fmt: skip
        pipeline = load_pipeline(rl_rewards.pipeline_file(options, 43))
        names = [stage.name for stage in pipeline.stages]
        expected = [f"rl_{row}" for row in rl_rewards.ROWS]
        assert names == (expected if sft else ["llm", *expected])
        for stage in pipeline.stages[-len(expected) :]:
            args = list(stage.args)
            init = args[args.index("--model.init_args.init_from") + 1]
            assert init == (str(tmp_path / "sft43" / "export") if sft else str(run_dir / "seed43/artifacts/llm"))
            assert args[args.index("--seed_everything") + 1] == "43"
        combined = list(pipeline.stages[-1].args)
        assert combined[combined.index("--model.init_args.rewards.distance") + 1] == "0.1"
        assert combined[combined.index("--model.init_args.scale_advantages") + 1] == "false"


def test_every_row_parses_with_the_shipped_rl_config(monkeypatch):
    monkeypatch.chdir(rl_rewards.ROOT)
    for row in rl_rewards.ROWS:
        args = rl_rewards.rl_args(42, row, "artifacts/industrial/llm", "artifacts/industrial/rl")
        with pytest.raises(SystemExit) as done:  # --print_config parses every argument, then exits
            cli_main(["fit", "--config", "configs/industrial/rl.yaml", *args, "--print_config"])
        assert done.value.code in (0, None)


def test_report_reads_finished_runs(tmp_path, capsys):
    run_dir = tmp_path / "rl"
    for seed, base in ((42, 0.050), (43, 0.052)):
        _finished(tmp_path / f"sft{seed}", base, 0.08)
        _finished(run_dir / f"seed{seed}" / "rl_hit", base + 0.004, 0.081)
        _finished(run_dir / f"seed{seed}" / "rl_rank", base + 0.006, 0.070)  # best NDCG@10, but HR@10 falls
    argv = ["--seeds", "42", "43", "--rows", "hit", "rank", "--run_dir", str(run_dir)]
    argv += ["--sft_run", str(tmp_path / "sft{seed}"), "--report_only"]
    assert rl_rewards.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    last = out[-1]
    assert out[-3] == "Rows whose mean HR@10 stays at or above SFT's lowest seed (0.0800): RL: hit."

    assert last == (
        "NDCG@10: SFT 0.0510 (spread 0.0500-0.0520), RL: hit 0.0550 (spread 0.0540-0.0560); "
        "HR@10: SFT 0.0800 (spread 0.0800-0.0800), RL: hit 0.0810 (spread 0.0810-0.0810)"
    )
    table = (run_dir / "results.md").read_text()
    assert "| **RL: rank** | mean | 0.0300 | 0.0600 | 0.0700 | 0.0500 | 0.0570 |" in table
    with pytest.raises(FileNotFoundError, match="rl_combined"):
        rl_rewards.main([*argv[:-1], "--rows", "combined", "--report_only"])
