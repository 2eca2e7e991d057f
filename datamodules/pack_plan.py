"""Packs of an epoch plan: which plan rows share one prefix-tree row, their aligned templates, their rough lengths.

With ``pack_prompts: n`` (:class:`datamodules.prompt_tasks.PromptTasks`) the training unit is a *pack*: up to ``n``
consecutive training prefixes of one user with their negatives, laid out as one prefix tree
(:mod:`datamodules.packing`); text and query samples are packed in random groups of the mean behaviour pack's size.
These plain functions of the plan's arrays group the rows and give the packs' lengths for length-grouped batching.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datamodules.prompt_templates import NEGATIVE, SEQUENTIAL, TEMPLATE_DRAW

#: rough tokens of a further prefix's own branch in a pack: the question's wording after the history
QUESTION_TOKENS = 30


@dataclass(frozen=True)
class PackPlan:
    """An epoch's packs and the templates of its behaviour rows.

    Attributes:
        rows: plan rows, pack after pack (behaviour packs first, then the other tasks' groups in task order).
        offsets: ``[packs + 1]`` bounds of each pack in ``rows``.
        prefixes: ``[packs]`` training prefixes each pack holds (0: a text or query pack).
        behaviour: the behaviour rows, in pack order.
        templates: the template draw of each of ``behaviour``'s rows (one draw per pack, negatives aligned).
    """

    rows: np.ndarray
    offsets: np.ndarray
    prefixes: np.ndarray
    behaviour: np.ndarray
    templates: np.ndarray


def plan_packs(
    behaviour: np.ndarray,
    is_negative: np.ndarray,
    others: list[np.ndarray],
    source: np.ndarray,
    prefix_user: np.ndarray,
    pack: int,
    rng: np.random.Generator,
) -> PackPlan:
    """Group an epoch plan's rows into packs of ``pack`` training prefixes of one user each, and align templates.

    Args:
        behaviour: plan rows of the behaviour samples (sequential and negative).
        is_negative: per plan row, whether it is a negative sample (sorted after its prefix's sequential sample).
        others: per further task (text, query), its plan rows, packed in random groups.
        source: per plan row, its source row (for behaviour rows: the training prefix).
        prefix_user: per training prefix, its user.
        pack: training prefixes per behaviour pack (``>= 1``).
        rng: the epoch's generator (draws the groups' order and the packs' templates).

    Returns:
        The packs, and the template draws of the behaviour rows.
    """
    source_of = source[behaviour]
    user = prefix_user[source_of]
    behaviour = behaviour[np.lexsort((is_negative[behaviour], source_of, user))]
    source_of, user = source[behaviour], prefix_user[source[behaviour]]
    new_user = np.r_[True, user[1:] != user[:-1]] if len(behaviour) else np.zeros(0, dtype=bool)
    new_source = np.r_[True, source_of[1:] != source_of[:-1]] if len(behaviour) else np.zeros(0, dtype=bool)
    # prefixes counted within each user; a pack starts at a user's first prefix and every `pack` prefixes
    prefix = np.cumsum(new_source) - 1
    prefix_in_user = prefix - np.maximum.accumulate(np.where(new_user, prefix, 0))
    starts = np.flatnonzero(new_user | (new_source & (prefix_in_user % pack == 0)))
    # Text and query samples are packed too, as many random ones of a task per pack as a behaviour pack holds
    # on average: batches count packs, so packs of one would hand these tasks (1 + ratio) x pack times their
    # share of the optimiser steps (at 1:3 and pack 1, text 0.1 would train like text 0.4). They share the frame.
    group = max(1, round(len(behaviour) / len(starts))) if len(starts) else 1
    other_rows, other_starts = [], []
    for task_rows in others:
        rows = rng.permutation(task_rows)
        other_starts.append(len(behaviour) + sum(map(len, other_rows)) + np.arange(0, len(rows), group))
        other_rows.append(rows)
    pack_rows = np.concatenate([behaviour, *other_rows])
    offsets = np.r_[starts, *other_starts, len(pack_rows)].astype(np.int64)
    prefixes = np.add.reduceat(new_source.astype(np.int64), starts) if len(starts) else starts
    prefixes = np.r_[prefixes, np.zeros(sum(map(len, other_starts)), dtype=np.int64)]  # 0: not behaviour
    # one draw per pack: the sequential template t % 4; negatives take NEGATIVE[t % 4], the same wording up
    # to the question, when it exists (t % 4 < 3) and else a uniform one, so P(NEGATIVE[k]) = 1/4 + 1/12 = 1/3
    pack_of_row = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(behaviour)]))
    draw, fallback = rng.integers(0, TEMPLATE_DRAW, len(starts)), rng.integers(0, len(NEGATIVE), len(starts))
    sequential_template = draw % len(SEQUENTIAL)
    negative_template = np.where(sequential_template < len(NEGATIVE), sequential_template, fallback)
    templates = np.where(is_negative[behaviour], negative_template[pack_of_row], draw[pack_of_row])
    return PackPlan(pack_rows, offsets, prefixes, behaviour, templates)


def pack_lengths(
    lengths: np.ndarray, rows: np.ndarray, offsets: np.ndarray, prefixes: np.ndarray, tokens_per_item: int
) -> np.ndarray:
    """Rough token counts of the packs, from the rough lengths of the plan's samples (no tokenizing).

    A behaviour pack counts as its longest sample, a response-sized branch (``tokens_per_item + 2``) per further
    sample and a question-sized branch (:data:`QUESTION_TOKENS`) per further prefix; a text or query pack shares
    only the frame, so its samples' lengths add up.

    Args:
        lengths: ``[plan rows]`` rough token count of each sample.
        rows: plan rows, pack after pack (:attr:`PackPlan.rows`).
        offsets: ``[packs + 1]`` bounds of each pack in ``rows``; at least one pack.
        prefixes: ``[packs]`` training prefixes of each pack (0: a text or query pack).
        tokens_per_item: code tokens of an item.

    Returns:
        ``[packs]`` rough token counts; only their order matters.
    """
    starts, sizes = offsets[:-1], np.diff(offsets)
    behaviour = (
        np.maximum.reduceat(lengths[rows], starts)
        + (sizes - 1) * (tokens_per_item + 2)
        + (prefixes - 1) * QUESTION_TOKENS
    )
    return np.where(prefixes > 0, behaviour, np.add.reduceat(lengths[rows], starts))
