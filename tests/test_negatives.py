"""The one negative sampler (DCCF's BPR negatives, the LLM's negative-behaviour task): exclusion, uniformity,
determinism, and both users of it exclude the training interactions only."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from datamodules.negatives import contains, interaction_keys, sample_negatives

# hand-made: 3 users, 6 items; user 0 trained on {0, 2}, user 1 on {1, 2, 3, 4}, user 2 on nothing
TRAIN_USERS = np.array([0, 0, 1, 1, 1, 1, 0])
TRAIN_ITEMS = np.array([0, 2, 1, 2, 3, 4, 2])  # a repeated purchase (0, 2) is one key
ALLOWED = {0: [1, 3, 4, 5], 1: [0, 5], 2: [0, 1, 2, 3, 4, 5]}


def test_interaction_keys_and_contains_by_hand():
    keys = interaction_keys(TRAIN_USERS, TRAIN_ITEMS, 6)
    assert keys.tolist() == [0, 2, 7, 8, 9, 10]
    assert contains(keys, np.array([0, 1, 10, 11, -3])).tolist() == [True, False, True, False, False]
    assert not contains(np.array([], dtype=np.int64), np.array([1, 2])).any()


def test_never_returns_an_excluded_item_and_is_uniform_over_the_rest():
    keys = interaction_keys(TRAIN_USERS, TRAIN_ITEMS, 6)
    draws = 12_000
    for user, allowed in ALLOWED.items():
        items = sample_negatives(keys, np.full(draws, user), 6, np.random.default_rng(user))
        assert set(np.unique(items).tolist()) == set(allowed)  # every allowed item, nothing else
        counts = np.bincount(items, minlength=6)[allowed]
        # uniform over the allowed items: expected draws / len(allowed) each; chi-square at the 0.1% level
        assert chisquare(counts).pvalue > 1e-3, counts


def test_deterministic_given_the_generator_and_shaped_like_users():
    keys = interaction_keys(TRAIN_USERS, TRAIN_ITEMS, 6)
    users = np.array([[0, 1], [2, 1]]).ravel()
    first = sample_negatives(keys, users, 6, np.random.default_rng(7))
    assert first.shape == (4,) and first.dtype == np.int64
    assert np.array_equal(first, sample_negatives(keys, users, 6, np.random.default_rng(7)))
    many = [sample_negatives(keys, np.zeros(50, dtype=int), 6, np.random.default_rng(seed)) for seed in (1, 2)]
    assert not np.array_equal(*many)


def test_a_user_with_every_item_in_training_is_an_error():
    keys = interaction_keys(np.zeros(6, dtype=int), np.arange(6), 6)
    with pytest.raises(RuntimeError, match="every item in training"):
        sample_negatives(keys, np.zeros(3, dtype=int), 6, np.random.default_rng(0), max_rounds=30)


def test_dccf_and_llm_negatives_exclude_training_interactions_only(synthetic_dir, tmp_path):
    """Both users of the sampler: never a training interaction, but held-out (validation/test) targets are drawn
    like any other unobserved item (excluding them would build training data from the held-out targets)."""
    from datamodules import GraphDataModule, PromptDataModule
    from datamodules.prompt_tasks import NEGATIVE_TASK
    from tests.test_prompts_llm import synthetic_codes, write_index

    graph = GraphDataModule(data_dir=str(synthetic_dir), source="lcrec", dataset="Synthetic", num_negatives=8)
    graph.setup("fit")
    index = write_index(tmp_path / "index.json", synthetic_codes())
    prompts = PromptDataModule(
        data_dir=str(synthetic_dir), source="lcrec", dataset="Synthetic", index=str(index), negative_ratio=8
    )
    prompts.setup("fit")
    catalogue = graph.catalogue
    train_keys = interaction_keys(*graph.split.train_interactions(), catalogue.num_items)
    ends = catalogue.offsets[1:]
    held_out = np.concatenate(
        [np.arange(catalogue.num_users) * catalogue.num_items + catalogue.items[ends - offset] for offset in (1, 2)]
    )  # test and validation targets
    held_out = held_out[~contains(train_keys, held_out)]
    dataset = graph.datasets["train"]
    dccf = np.repeat(dataset.users, 8).astype(np.int64) * catalogue.num_items + dataset.negatives(0).ravel()
    tasks = prompts.prompts
    tasks.set_epoch(0)
    negative = tasks.task == NEGATIVE_TASK
    llm = tasks.split.train.user[tasks.source[negative]].astype(np.int64) * catalogue.num_items + tasks.item[negative]
    for drawn in (dccf, llm):
        assert not contains(train_keys, drawn).any()
        assert np.isin(drawn, held_out).any()  # ~1/110 of the draws; thousands of draws
