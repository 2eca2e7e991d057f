"""Shared-prefix packing (``pack_prompts``): the tree layout by hand, the epoch plan, and exact loss equality."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules import PromptDataModule
from datamodules.packing import pack_tree
from datamodules.prompt_tasks import NEGATIVE_TASK, SEQUENTIAL_TASK, TEXT_TASK
from datamodules.prompt_templates import NEGATIVE, SEQUENTIAL
from datamodules.prompts import LengthGroupedPlan
from lightning_modules import GenerativeRecommender
from lightning_modules.cli import main
from lightning_modules.components.sft_loss import tree_mask
from tests.test_prompts_llm import _callbacks, full_model, llm_run_args, load_tokenizer, synthetic_codes, write_index


def test_pack_tree_by_hand():
    """Three samples: two share 3 prompt tokens, all share 2; last prompt tokens are never shared.

    Samples are laid out in lexicographic order of their shareable tokens ([1, 5] < [1, 5, 6] = [1, 5, 6]),
    so each one's tree parent is the sample before it.
    """
    ids, positions, labels, mask = pack_tree([[1, 5, 6, 7], [1, 5, 6, 8], [1, 5, 9]], [[20, 2], [21, 2], [22, 2]])
    assert ids.tolist() == [1, 5, 9, 22, 2, 6, 7, 20, 2, 8, 21, 2]
    assert positions.tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 3, 4, 5]
    assert labels.tolist() == [-100, -100, -100, 22, 2] + [-100, -100, 20, 2] + [-100, 21, 2]
    visible = {q: np.flatnonzero(mask[q]).tolist() for q in range(len(ids))}
    assert visible[4] == [0, 1, 2, 3, 4]
    assert visible[5] == [0, 1, 5] and visible[8] == [0, 1, 5, 6, 7, 8]  # sample 0 never sees sample 2's branch
    assert visible[9] == [0, 1, 5, 9] and visible[11] == [0, 1, 5, 9, 10, 11]
    # column c predicts labels[c + 1]: each branch's last prompt token predicts its own first response token
    assert [labels[c + 1] for c in (2, 6, 9)] == [22, 20, 21] and labels[5] == labels[9] == -100
    # the same prompt twice: only the last prompt token and the responses are repeated
    ids, positions, _, _ = pack_tree([[1, 5, 6], [1, 5, 6]], [[20, 2], [21, 2]])
    assert ids.tolist() == [1, 5, 6, 20, 2, 6, 21, 2] and positions.tolist() == [0, 1, 2, 3, 4, 2, 3, 4]
    with pytest.raises(ValueError, match="at least one token"):
        pack_tree([[]], [[2]])


@pytest.fixture(scope="module", params=[1, 3], ids=["prefix-packs", "user-packs"])
def packed_dm(request, synthetic_dir, tmp_path_factory) -> PromptDataModule:
    """Packs of one training prefix (and its negatives), or of up to 3 consecutive prefixes of a user."""
    index = write_index(tmp_path_factory.mktemp("index") / "index.json", synthetic_codes())
    dm = PromptDataModule(
        data_dir=str(synthetic_dir),
        source="lcrec",
        dataset="Synthetic",
        index=str(index),
        negative_ratio=3,
        seed=5,
        pack_prompts=request.param,
    )
    dm.setup("fit")
    return dm


def test_packs_cover_the_plan_with_aligned_templates(packed_dm):
    tasks, train = packed_dm.prompts, packed_dm.split.train
    for epoch in (0, 1):
        tasks.set_epoch(epoch)
        assert sorted(tasks.pack_rows.tolist()) == list(range(len(tasks.task)))  # every sample in exactly one pack
        assert len(tasks) == len(tasks.pack_offsets) - 1 and len(tasks.approx_lengths()) == len(tasks)
        prefixes_per_user: dict[int, list[int]] = {}
        units = tasks.unit_rows(np.arange(len(tasks)))
        behaviour_sizes = [len(rows) for rows in units if tasks.task[rows[0]] <= NEGATIVE_TASK]
        group = round(np.mean(behaviour_sizes))
        for rows in units:
            task = tasks.task[rows]
            if task[0] > NEGATIVE_TASK:  # text / query samples: packs of one task, the mean behaviour pack's size
                assert (task == task[0]).all() and 1 <= len(rows) <= group
                continue
            sources = list(dict.fromkeys(tasks.source[rows].tolist()))
            assert (task <= NEGATIVE_TASK).all() and 1 <= len(sources) <= tasks.pack
            assert len(set(train.user[sources])) == 1 and sources == sorted(sources)  # one user's consecutive prefixes
            for source in sources:  # weights 1: each prefix's positive, then its 3 negatives
                assert task[tasks.source[rows] == source].tolist() == [SEQUENTIAL_TASK] + [NEGATIVE_TASK] * 3
            prefixes_per_user.setdefault(int(train.user[sources[0]]), []).append(len(sources))
            sequential = set(tasks.template[rows[task == SEQUENTIAL_TASK]] % len(SEQUENTIAL))
            negative = set(tasks.template[rows[task == NEGATIVE_TASK]] % len(NEGATIVE))
            assert len(sequential) == len(negative) == 1  # one template draw per pack
            assert min(sequential) >= len(NEGATIVE) or negative == sequential
        # each task keeps (about) its share of the samples as its share of the packs, i.e. of the optimiser steps
        text_packs = sum(tasks.task[rows[0]] == TEXT_TASK for rows in units)
        text_samples = int((tasks.task == TEXT_TASK).sum())
        assert text_samples > 0 and text_packs / len(units) == pytest.approx(text_samples / len(tasks.task), rel=0.35)
        for user, sizes in prefixes_per_user.items():  # full packs first; a user's prefixes are never split further
            total = int((train.user == user).sum())
            assert sum(sizes) == total and len(sizes) == -(-total // tasks.pack)
    negative_rows = tasks.pack_rows[tasks.task[tasks.pack_rows] == NEGATIVE_TASK]
    share = np.bincount(tasks.template[negative_rows] % len(NEGATIVE), minlength=3) / len(negative_rows)
    assert np.allclose(share, 1 / 3, atol=0.06)  # each negative wording stays uniform
    sampler = LengthGroupedPlan(tasks, batch_size=8, seed=1)
    assert sorted(sampler) == list(range(len(tasks)))


def _module(dm, tokenizer, code_softmax: str, attn_implementation: str = "sdpa") -> GenerativeRecommender:
    torch.manual_seed(0)
    module = full_model(tokenizer, code_softmax=code_softmax, attn_implementation=attn_implementation)
    module._trainer = SimpleNamespace(datamodule=dm)
    module.setup("fit")
    module.configure_model()
    return module


@pytest.mark.parametrize(
    "code_softmax,attn_implementation", [("trie", "sdpa"), ("vocabulary", "sdpa"), ("trie", "eager")]
)
def test_packed_loss_and_gradients_equal_unpacked(packed_dm, tiny_tokenizer, code_softmax, attn_implementation):
    """The same samples, packed as trees or one per row: the same loss and the same gradients."""
    module = _module(packed_dm, tiny_tokenizer, code_softmax, attn_implementation)
    tasks = packed_dm.prompts
    first_task = tasks.task[tasks.pack_rows[tasks.pack_offsets[:-1]]]
    units = np.concatenate(
        [np.flatnonzero(first_task == SEQUENTIAL_TASK)[:5], np.flatnonzero(first_task == TEXT_TASK)[:3]]
    )
    rows = np.concatenate(tasks.unit_rows(units))
    packed, unpacked = tasks.train_batch(units), tasks.sample_batch(rows)
    assert len(packed["input_ids"]) == len(units) and len(unpacked["input_ids"]) == len(rows) == len(packed["task"])
    assert packed["attention_mask"].shape == (len(units), 1, packed["input_ids"].shape[1], packed["input_ids"].shape[1])
    tokens = (packed["input_ids"] != module.tokenizer.pad_token_id).sum()  # shared prefixes are fed once
    assert tokens < 0.6 * unpacked["attention_mask"].sum()
    assert (packed["labels"] != -100).sum() == (unpacked["labels"] != -100).sum()
    losses, grads = [], []
    for batch in (packed, unpacked):
        module.zero_grad()
        loss = module.response_loss(batch)
        loss.backward()
        assert torch.isfinite(loss)
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_packed_samples_over_max_length_are_dropped_and_counted(packed_dm, tiny_tokenizer):
    """Samples longer than ``max_length`` leave their pack (and a pack left empty leaves the batch), counted by task."""
    tasks = packed_dm.prompts
    tasks.set_tokenizer(load_tokenizer(tiny_tokenizer, packed_dm.item_index.vocabulary()))
    behaviour = np.flatnonzero(tasks.task[tasks.pack_rows[tasks.pack_offsets[:-1]]] == SEQUENTIAL_TASK)[:40]
    units = behaviour[np.argsort(tasks.approx_lengths()[behaviour])[[0, -1]]]  # the shortest and the longest pack
    rows = np.concatenate(tasks.unit_rows(units))
    prompt_ids, response_ids, task, _ = tasks._tokenized(rows)
    lengths = np.array([len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=False)])
    limit = int(np.median(lengths))
    saved, tasks.max_length = tasks.max_length, limit
    try:
        batch = tasks.train_batch(units)
    finally:
        tasks.max_length = saved
    too_long = lengths > limit
    assert batch["dropped"].tolist() == np.bincount(task[too_long], minlength=4).tolist() and too_long.any()
    assert len(batch["task"]) == int((~too_long).sum()) and (batch["labels"] != -100).sum() == sum(
        len(r) for r, long in zip(response_ids, too_long, strict=False) if not long
    )


def test_flash_attention_cannot_take_a_tree_mask(packed_dm):
    lm = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="pack_prompts"):
        PromptDataModule(pack_prompts=-1)
    with pytest.raises(ValueError, match="pack_prompts"):
        tree_mask(lm, torch.ones(1, 1, 2, 2, dtype=torch.bool))


def test_fit_with_packed_prompts_through_the_cli(synthetic_dir, tiny_tokenizer, tmp_path):
    """A tiny fit + test through ``lightning`` with packed prompts and history-masked evaluation."""
    index = write_index(tmp_path / "index.json", synthetic_codes())
    root = tmp_path / "run"
    callbacks = _callbacks(tmp_path, tmp_path / "llm")
    main(
        [
            "fit",
            *llm_run_args(
                synthetic_dir,
                root,
                tiny_tokenizer,
                "--config",
                str(callbacks),
                "--data.init_args.index",
                str(index),
                "--data.init_args.pack_prompts=2",
                "--data.init_args.batch_size=4",
                "--data.init_args.eval_max_users=8",
                "--model.init_args.code_softmax=trie",
                "--model.init_args.mask_history=true",
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=3",
                "--trainer.log_every_n_steps=1",
            ),
        ]
    )
    rows = list(csv.DictReader((root / "csv" / "version_0" / "metrics.csv").open()))
    steps = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    epoch_means = [float(row["train/loss_epoch"]) for row in rows if row.get("train/loss_epoch")]
    assert len(steps) == 3 and len(epoch_means) == 1  # one mean per epoch, next to every step's loss
    assert min(steps) <= epoch_means[0] <= max(steps)
    assert any(row.get("test/hr@10") for row in rows)


def test_eval_batches_carry_the_whole_history_for_masking(packed_dm, tiny_tokenizer):
    """Evaluation prompts cap the history at 20 items; the (row, item) pairs for ``mask_history`` hold all of it."""
    tasks, split = packed_dm.prompts, packed_dm.split
    tasks.set_tokenizer(load_tokenizer(tiny_tokenizer, packed_dm.item_index.vocabulary()))
    rows = np.arange(6)
    batch = tasks.eval_batch(split.test, rows)
    for row in rows:
        user = split.test.user[row]
        history = packed_dm.catalogue.sequence(user)[:-1]
        assert sorted(batch["seen_items"][batch["seen_rows"] == row].tolist()) == sorted(history.tolist())
