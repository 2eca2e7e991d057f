"""Negative items for training: uniform over the items a user has no *training* interaction with.

One sampler serves every negative in the project: DCCF's BPR negatives (:mod:`datamodules.graph`) and the LLM's
negative-behaviour task (:mod:`datamodules.prompt_tasks`). Both exclude the user's training interactions
(``items[:-2]`` of the leave-last-out split) and nothing else. The validation and test targets are held out: a
sampler that excluded them would build the training data from them (a held-out item could never be shown to its
user as a negative, which is information about the held-out item the model could learn), so the exclusion set
is the data the model may see. A held-out item is then drawn as a negative with probability at most
``2 / (num_items - train_length)`` per draw, the same false-negative rate as any other unobserved positive.
"""

from __future__ import annotations

import numpy as np


def interaction_keys(users: np.ndarray, items: np.ndarray, num_items: int) -> np.ndarray:
    """Sorted unique ``user * num_items + item`` keys of the (user, item) pairs to exclude.

    Args:
        users: ``[N]`` user rows.
        items: ``[N]`` item ids (``0..num_items-1``), e.g. ``LeaveLastOutSplit.train_interactions()``.
        num_items: catalogue size.
    """
    return np.unique(users.astype(np.int64) * num_items + items.astype(np.int64))


def contains(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Membership of ``queries`` in the sorted array ``sorted_keys`` (vectorised binary search)."""
    if sorted_keys.size == 0:
        return np.zeros(np.shape(queries), dtype=bool)
    position = np.searchsorted(sorted_keys, queries)
    return sorted_keys[np.minimum(position, sorted_keys.size - 1)] == queries


def sample_negatives(
    keys: np.ndarray,
    users: np.ndarray,
    num_items: int,
    rng: np.random.Generator,
    max_rounds: int = 1000,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """One item per entry of ``users``, uniform over the items whose ``(user, item)`` key is not in ``keys``.

    Rejection sampling, vectorised: every negative is drawn at once, then only the rejected ones are redrawn, so
    the loop runs about ``log(N) / log(1 / density)`` times. Each accepted draw is uniform over the allowed items
    (a uniform draw conditioned on landing outside the excluded set). Deterministic given ``rng``'s state.

    Args:
        keys: :func:`interaction_keys` of the excluded pairs (the training interactions).
        users: ``[M]`` user rows; repeat a row to draw several negatives for it.
        num_items: catalogue size.
        rng: the generator (e.g. the epoch's).
        max_rounds: bound on the redraw rounds (only reached when a user interacted with (almost) every item).
        allowed: sorted item ids that may be drawn (default every item); the cold-start protocol's held-out items
            are left out (:func:`datamodules.cold_items.allowed_items`).

    Returns:
        ``[M]`` int64 item ids.

    Raises:
        RuntimeError: a user has no allowed item (or almost none) after ``max_rounds`` rounds.
    """
    users = np.asarray(users, dtype=np.int64)

    def draw(size: int) -> np.ndarray:
        return rng.integers(0, num_items, size) if allowed is None else allowed[rng.integers(0, len(allowed), size)]

    items = draw(users.size)
    pending = np.flatnonzero(contains(keys, users * num_items + items))
    for _ in range(max_rounds):
        if pending.size == 0:
            return items
        items[pending] = draw(pending.size)
        pending = pending[contains(keys, users[pending] * num_items + items[pending])]
    raise RuntimeError(
        f"{pending.size} negatives still rejected after {max_rounds} rounds: some users interacted with (almost) every "
        "item in training, so no negative item exists for them"
    )
