"""Most-popular ranking counts training interactions only and evaluates through the shared metric path."""

from __future__ import annotations

import math

import pytest

from datamodules import write_lcrec
from lightning_modules.cli import main


def test_most_popular_hand_computed(tmp_path):
    # training parts (items[:-2]): user0 [0,1,2], user1 [1,2], user2 [2] -> counts item2=3, item1=2, item0=1
    sequences = {0: [0, 1, 2, 3, 4], 1: [1, 2, 0, 3], 2: [2, 4, 3]}
    write_lcrec(tmp_path / "data", "Toy", sequences, item_text={i: {"title": str(i)} for i in range(6)})
    root = tmp_path / "run"
    main(
        [
            "test",
            "--model",
            "lightning_modules.MostPopular",
            "--model.init_args.mask_history",
            "false",
            "--data",
            "datamodules.SequenceDataModule",
            "--data.init_args.data_dir",
            str(tmp_path / "data"),
            "--trainer.default_root_dir",
            str(root),
            "--trainer.callbacks+=callbacks.MetricsWriter",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    import json

    metrics = json.loads((root / "test_metrics.json").read_text())["metrics"]
    # ranking 2,1,0,3,4,5 (ties by index); test targets 4, 3, 3 -> ranks 4, 3, 3
    assert metrics["hr@1"] == 0.0
    assert metrics["hr@5"] == pytest.approx(1.0)
    assert metrics["ndcg@5"] == pytest.approx((1 / math.log2(6) + 2 / math.log2(5)) / 3)
