"""The leave-last-out split, exactly as LC-Rec: train prefixes of items[:-2], valid items[-2], test items[-1]."""

from __future__ import annotations

import numpy as np

from datamodules import LeaveLastOutSplit, SequenceDataModule, write_lcrec
from datamodules.catalogue import load_lcrec
from tests.conftest import shared_dataset

PAD = 30


def _split(tmp_path, sequences, max_history=20):
    write_lcrec(tmp_path, "Toy", sequences, item_text={i: {"title": str(i)} for i in range(PAD)})
    return LeaveLastOutSplit(load_lcrec(tmp_path, "Toy"), max_history=max_history)


def _rows(split, stage):
    index = split.samples(stage)
    histories = split.histories(index)
    targets = split.catalogue.items[index.target_pos]
    return [
        (int(u), [int(i) for i in h if i != PAD], int(t))
        for u, h, t in zip(index.user, histories, targets, strict=False)
    ]


def test_exact_samples_of_a_short_user(tmp_path):
    split = _split(tmp_path, {0: [5, 6, 7, 8, 9]})
    assert _rows(split, "train") == [(0, [5], 6), (0, [5, 6], 7)]
    assert _rows(split, "valid") == [(0, [5, 6, 7], 8)]
    assert _rows(split, "test") == [(0, [5, 6, 7, 8], 9)]


def test_three_item_user_has_no_train_sample(tmp_path):
    split = _split(tmp_path, {0: [1, 2, 3], 1: [4, 5, 6, 7]})
    assert _rows(split, "train") == [(1, [4], 5)]
    assert _rows(split, "valid") == [(0, [1], 2), (1, [4, 5], 6)]
    assert _rows(split, "test") == [(0, [1, 2], 3), (1, [4, 5, 6], 7)]


def test_history_is_capped_and_left_padded(tmp_path):
    sequence = list(range(28))
    split = _split(tmp_path, {0: sequence}, max_history=20)
    train = _rows(split, "train")
    assert len(train) == 25  # targets sequence[1:-2]
    assert [t for _, _, t in train] == sequence[1:-2]
    assert all(history == sequence[max(0, t - 20) : t] for _, history, t in train)
    assert _rows(split, "valid") == [(0, sequence[:-2][-20:], 26)]
    assert _rows(split, "test") == [(0, sequence[:-1][-20:], 27)]
    first = split.histories(split.train)[0]
    assert first.tolist() == [PAD] * 19 + [0]


def test_seen_items_are_full_uncapped_history(tmp_path):
    split = _split(tmp_path, {0: list(range(25)), 1: [3, 4, 5]})
    rows, items = split.seen_items(split.test, np.array([1, 0]))
    assert items[rows == 0].tolist() == [3, 4]
    assert items[rows == 1].tolist() == list(range(24))


def test_train_interactions_exclude_valid_and_test(tmp_path):
    split = _split(tmp_path, {0: [1, 2, 3, 4, 5], 1: [6, 7, 8]})
    users, items = split.train_interactions()
    assert list(zip(users.tolist(), items.tolist(), strict=False)) == [(0, 1), (0, 2), (0, 3), (1, 6)]


def test_no_heldout_target_in_training_on_games():
    catalogue = load_lcrec(shared_dataset("Games"), "Games")
    split = LeaveLastOutSplit(catalogue)
    lengths = catalogue.lengths
    assert len(split.train) == int((lengths - 3).sum())
    # every train target and history position lies strictly before the user's validation position
    valid_pos = catalogue.offsets[1:] - 2
    assert (split.train.target_pos < valid_pos[split.train.user]).all()
    users, _ = split.train_interactions()
    assert len(users) == int((lengths - 2).sum())


def test_datamodule_batches(synthetic_dir):
    datamodule = SequenceDataModule(data_dir=str(synthetic_dir), batch_size=8, eval_batch_size=16)
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["history"].shape == (16, 20)
    assert batch["target"].shape == (16,)
    catalogue = datamodule.catalogue
    for row in range(16):
        user = int(batch["user"][row])
        sequence = catalogue.sequence(user).tolist()
        assert int(batch["target"][row]) == sequence[-2]
        assert batch["seen_items"][batch["seen_rows"] == row].tolist() == sequence[:-2]
    train_batch = next(iter(datamodule.train_dataloader()))
    assert set(train_batch) == {"user", "history", "target"}
