"""The cache writer in `lightning predict`: a fake model with fixed predictions, one process and DDP on 2 CPUs."""

from __future__ import annotations

import os
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.cache_writer import RecommendationCacheWriter, original_ids, training_popularity
from datamodules.catalogue import load_lcrec
from datamodules.recommendation_store import open_store
from datamodules.split import LeaveLastOutSplit
from tests import serving_fixtures
from tests.conftest import REPO

redis_url, store_url = serving_fixtures.redis_url, serving_fixtures.store_url  # fixtures
K = 4


class FixedRanker(L.LightningModule):
    """predict_step: user u gets items (u + j) % num_items, j = 0..K-1, with scores K - j."""

    def __init__(self, num_items: int) -> None:
        super().__init__()
        self.num_items, self.eval_top_k, self.mask_history = num_items, K, False
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def predict_step(self, batch, batch_idx):
        users = batch["user"]
        items = (users[:, None] + torch.arange(K)[None, :]) % self.num_items
        return {
            "user": users,
            "items": items,
            "scores": (K - torch.arange(K, dtype=torch.float32)).expand(len(users), K),
        }


class CatalogueData(L.LightningDataModule):
    def __init__(self, data_dir: str) -> None:
        super().__init__()
        self.catalogue = load_lcrec(data_dir, "Synthetic")
        self.split = LeaveLastOutSplit(self.catalogue)

    def predict_dataloader(self):
        users = torch.arange(self.catalogue.num_users)
        return DataLoader(
            [{"user": int(u)} for u in users],
            batch_size=32,
            collate_fn=lambda rows: {"user": torch.tensor([r["user"] for r in rows])},
        )


def expected_list(catalogue, row: int, exclude_seen: bool) -> list[str]:
    items = [(row + j) % catalogue.num_items for j in range(K)]
    seen = set(catalogue.sequence(row).tolist()) if exclude_seen else set()
    return [str(item) for item in items if item not in seen]


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_predict_fills_and_publishes_a_version(store_url, synthetic_dir, exclude_seen):
    data = CatalogueData(str(synthetic_dir))
    model = FixedRanker(data.catalogue.num_items)
    writer = RecommendationCacheWriter(store_url, exclude_seen=exclude_seen)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[writer], enable_progress_bar=False)
    trainer.predict(model, datamodule=data, return_predictions=False)
    assert model.mask_history is exclude_seen  # the beam search is told to skip seen items too
    store = open_store(store_url)
    record = store.current_version()
    catalogue = data.catalogue
    assert (record.k, record.meta.num_items, record.meta.dataset_hash) == (
        K,
        catalogue.num_items,
        catalogue.content_hash,
    )
    users, _ = original_ids(catalogue)
    for row in (0, 5, catalogue.num_users - 1):
        expected = expected_list(catalogue, row, exclude_seen)
        found = store.lookup(users[row], K)
        if expected:
            assert (found.items, found.fallback) == (expected, False)
            assert found.scores == [float(K - j) for j in range(K) if str((row + j) % catalogue.num_items) in expected]
    # the fallback: training popularity, brute force
    counts = np.zeros(catalogue.num_items, dtype=int)
    for row in range(catalogue.num_users):
        for item in catalogue.sequence(row)[:-2]:
            counts[item] += 1
    best = sorted(range(catalogue.num_items), key=lambda item: (-counts[item], item))[:K]
    fallback = store.lookup("no-such-user", K)
    assert (
        fallback.fallback
        and fallback.items == [str(i) for i in best]
        and fallback.scores == [float(counts[i]) for i in best]
    )
    assert training_popularity(data, K)[0].tolist() == best
    # titles travel with the version
    title = catalogue.item_text[int(best[0])]["title"] if catalogue.item_text else None
    assert store.titles(record.version, [str(best[0])]) == [title]


def test_a_second_build_replaces_the_first_and_prunes(tmp_path, synthetic_dir):
    url = f"sqlite:///{tmp_path / 'cache.sqlite'}"
    data = CatalogueData(str(synthetic_dir))
    for _ in range(3):
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            callbacks=[RecommendationCacheWriter(url, keep_versions=2)],
            enable_progress_bar=False,
        )
        trainer.predict(FixedRanker(data.catalogue.num_items), datamodule=data, return_predictions=False)
    assert [record.version for record in open_store(url).versions()] == [2, 3]


_DDP_SCRIPT = """
import sys
import lightning as L
from callbacks.cache_writer import RecommendationCacheWriter
from tests.test_cache_writer import CatalogueData, FixedRanker
data = CatalogueData(sys.argv[2])
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                    callbacks=[RecommendationCacheWriter(sys.argv[1], exclude_seen=False)])
trainer.predict(FixedRanker(data.catalogue.num_items), datamodule=data, return_predictions=False)
"""


def test_ddp_two_ranks_write_one_version_published_once(tmp_path, synthetic_dir):
    url = f"sqlite:///{tmp_path / 'ddp.sqlite'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = tmp_path / "ddp_predict.py"  # DDP relaunches the script for rank 1: it must be a file
    script.write_text(_DDP_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), url, str(synthetic_dir)],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    store = open_store(url)
    data = CatalogueData(str(synthetic_dir))
    records = store.versions()
    assert len(records) == 1 and records[0].published and records[0].num_users == data.catalogue.num_users
    users, _ = original_ids(data.catalogue)
    assert all(
        store.lookup(users[row], K).items == expected_list(data.catalogue, row, False) for row in range(0, 300, 7)
    )


def test_cache_piece_stacks_on_a_stage3_config(capsys):
    from lightning_modules.cli import build_cli
    from tests.conftest import CONFIGS

    with pytest.raises(SystemExit) as exit_info:
        build_cli(
            [
                "--config",
                str(CONFIGS / "synthetic/llm.yaml"),
                "--config",
                str(CONFIGS / "serving/cache.yaml"),
                "--print_config",
            ],
            run=False,
        )
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert (
        "callbacks.cache_writer.RecommendationCacheWriter" in printed
        and "lightning_modules.GenerativeRecommender" in printed
    )
    assert "store: sqlite:///runs/synthetic/llm/recommendations.sqlite" in printed and "${" not in printed


def test_predict_prompts_hold_the_whole_sequence(synthetic_dir, tiny_tokenizer, tmp_path):
    """Serving histories end with the test target; evaluation ones stop before it; a user list selects rows."""
    from datamodules.prompts import PromptDataModule
    from tests.test_prompts_llm import load_tokenizer, synthetic_codes, write_index

    index = write_index(tmp_path / "index.json", synthetic_codes())
    users = tmp_path / "users.txt"
    data = PromptDataModule(
        data_dir=str(synthetic_dir), source="lcrec", dataset="Synthetic", index=str(index), eval_batch_size=4
    )
    data.setup("predict")
    catalogue = data.catalogue
    users.write_text(f"{catalogue.user_ids[7]}\n\n{catalogue.user_ids[2]}\n")
    tokenizer = load_tokenizer(tiny_tokenizer, data.item_index.vocabulary())
    data.set_tokenizer(tokenizer)
    batch = next(iter(data.predict_dataloader()))
    test_batch = next(iter(data.test_dataloader()))
    assert batch["user"].tolist() == [0, 1, 2, 3] and batch["target_item"].tolist() == [-1] * 4
    prompt = tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])

    def codes(item: int) -> str:
        return "".join(data.item_index.tokens()[item])

    sequence = catalogue.sequence(0)
    assert codes(int(sequence[-1])) in prompt  # the test target is history now
    assert codes(int(sequence[-1])) not in tokenizer.decode(
        test_batch["input_ids"][0][test_batch["attention_mask"][0].bool()]
    )
    assert sorted(batch["seen_items"][batch["seen_rows"] == 0].tolist()) == sorted(sequence.tolist())
    data.predict_users = str(users)
    assert next(iter(data.predict_dataloader()))["user"].tolist() == [2, 7]
    users.write_text("no-such-user\n")
    with pytest.raises(ValueError, match="not in the dataset"):
        data.predict_dataloader()
