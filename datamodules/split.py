"""LC-Rec's leave-last-out split, built with vectorised numpy over the CSR catalogue.

For a user with items ``s`` (chronological):

* train: every prefix of ``s[:-2]`` predicts its next item (targets ``s[1:-2]``), history = last
  ``max_history`` items before the target;
* valid: ``s[:-2][-max_history:]`` predicts ``s[-2]``;
* test:  ``s[:-1][-max_history:]`` predicts ``s[-1]``.

Every sample is described by the flat position of its target in ``catalogue.items``; its history is the
``max_history`` positions before the target within the same user. Nothing here ever places a validation or
test target in a training sample or in the training interactions (:meth:`LeaveLastOutSplit.train_interactions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from datamodules.catalogue import Catalogue

Stage = Literal["train", "valid", "test"]


@dataclass(frozen=True)
class SampleIndex:
    """Samples of one split stage: the user row and the flat position of the target item."""

    user: np.ndarray  # [N] user rows
    target_pos: np.ndarray  # [N] positions into catalogue.items

    def __len__(self) -> int:
        return len(self.user)


class LeaveLastOutSplit:
    """The leave-last-out split of a catalogue.

    Args:
        catalogue: the dataset (every user has at least 3 interactions).
        max_history: history cap (20 in LC-Rec and the paper).
    """

    def __init__(self, catalogue: Catalogue, max_history: int = 20) -> None:
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        self.catalogue = catalogue
        self.max_history = max_history
        offsets = catalogue.offsets
        lengths = catalogue.lengths
        users = np.arange(catalogue.num_users)
        # train: targets at in-user positions 1 .. n-3
        counts = np.maximum(lengths - 3, 0)
        train_user = np.repeat(users, counts)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        in_user = np.arange(int(counts.sum())) - first + 1
        self.train = SampleIndex(train_user, offsets[train_user] + in_user)
        self.valid = SampleIndex(users, offsets[1:] - 2)
        self.test = SampleIndex(users, offsets[1:] - 1)

    def train_windows(self) -> tuple[SampleIndex, np.ndarray]:
        """The training samples grouped into causal windows (same (history, target) pairs, fewer forward passes).

        A window is identified by its last target; its input is the ``max_history`` items before that target
        and it supervises its last ``count`` positions. Each user's first window covers every target whose
        whole history fits in the cap; every later target gets a window of its own (``count = 1``), so the
        causal history of every supervised position is exactly the capped prefix of :attr:`train`.
        """
        train, cap = self.train, self.max_history
        in_user = train.target_pos - self.catalogue.offsets[train.user]  # 1-based position of the target
        targets_per_user = np.bincount(train.user, minlength=self.catalogue.num_users)
        has_train = np.flatnonzero(targets_per_user)
        first_count = np.minimum(targets_per_user[has_train], cap)
        first = SampleIndex(has_train, self.catalogue.offsets[has_train] + first_count)
        tail = in_user > cap
        user = np.concatenate([first.user, train.user[tail]])
        target_pos = np.concatenate([first.target_pos, train.target_pos[tail]])
        counts = np.concatenate([first_count, np.ones(int(tail.sum()), dtype=np.int64)])
        order = np.lexsort((target_pos, user))
        return SampleIndex(user[order], target_pos[order]), counts[order]

    def window_targets(self, index: SampleIndex, counts: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``[N, max_history]`` next-item targets aligned with :meth:`histories` of the windows; -100 = unsupervised."""
        cap = self.max_history
        next_positions = index.target_pos[rows][:, None] - cap + 1 + np.arange(cap)[None, :]
        supervised = np.arange(cap)[None, :] >= cap - counts[rows][:, None]
        return np.where(supervised, self.catalogue.items[np.maximum(next_positions, 0)], -100)

    def samples(self, stage: Stage) -> SampleIndex:
        return {"train": self.train, "valid": self.valid, "test": self.test}[stage]

    def histories(self, index: SampleIndex, rows: np.ndarray | None = None) -> np.ndarray:
        """Left-padded ``[N, max_history]`` item histories (pad = ``catalogue.pad_item``) of the given samples."""
        user = index.user if rows is None else index.user[rows]
        target_pos = index.target_pos if rows is None else index.target_pos[rows]
        positions = target_pos[:, None] - self.max_history + np.arange(self.max_history)[None, :]
        valid = positions >= self.catalogue.offsets[user][:, None]
        return np.where(valid, self.catalogue.items[np.maximum(positions, 0)], self.catalogue.pad_item)

    def seen_items(self, index: SampleIndex, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All items before each sample's target (uncapped), as (row-in-batch, item) pairs for masking."""
        starts = self.catalogue.offsets[index.user[rows]]
        ends = index.target_pos[rows]
        lengths = ends - starts
        batch_rows = np.repeat(np.arange(len(rows)), lengths)
        shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        return batch_rows, self.catalogue.items[np.arange(int(lengths.sum())) + shift]

    def train_interactions(self) -> tuple[np.ndarray, np.ndarray]:
        """(user row, item) pairs of ``items[:-2]`` of every user: the only interactions CF models may see."""
        lengths = self.catalogue.lengths - 2
        users = np.repeat(np.arange(self.catalogue.num_users), lengths)
        shift = np.repeat(self.catalogue.offsets[:-1] - (np.cumsum(lengths) - lengths), lengths)
        return users, self.catalogue.items[np.arange(int(lengths.sum())) + shift]
