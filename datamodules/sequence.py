"""The sequence view: (history, next item) samples for sequential recommenders such as SASRec."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.base import RecDataModule, Source
from datamodules.split import LeaveLastOutSplit, SampleIndex
from datamodules.synthetic import SyntheticSpec


class SequenceSamples(Dataset):
    """Samples of one split stage. Batches are built in one vectorised gather (``__getitems__``).

    Each batch is a dict of tensors:

    * ``user``: ``[B]`` user rows;
    * ``history``: ``[B, max_history]`` left-padded item ids (pad = number of items);
    * ``target``: ``[B]`` the item to predict;
    * ``seen_rows``/``seen_items``: the user's full (uncapped) history before the target, as pairs for
      masking at full ranking (evaluation stages only).
    """

    def __init__(self, split: LeaveLastOutSplit, index: SampleIndex, with_seen: bool) -> None:
        self.split = split
        self.index = index
        self.with_seen = with_seen

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64)
        batch = {
            "user": torch.from_numpy(self.index.user[rows]),
            "history": torch.from_numpy(self.split.histories(self.index, rows)),
            "target": torch.from_numpy(self.split.catalogue.items[self.index.target_pos[rows]]),
        }
        if self.with_seen:
            seen_rows, seen_items = self.split.seen_items(self.index, rows)
            batch["seen_rows"] = torch.from_numpy(seen_rows)
            batch["seen_items"] = torch.from_numpy(seen_items)
        return batch

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        return {
            key: value[0] if key not in ("seen_rows", "seen_items") else value
            for key, value in self.__getitems__([row]).items()
        }


class CausalWindows(Dataset):
    """Training samples grouped into causal windows (see :meth:`LeaveLastOutSplit.train_windows`).

    Batches hold ``history`` ``[B, T]`` and ``target`` ``[B, T]`` (the next item at every position, -100 where
    the position is not a training target), for models that supervise every causal position in one pass.
    """

    def __init__(self, split: LeaveLastOutSplit) -> None:
        self.split = split
        self.index, self.counts = split.train_windows()

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64)
        return {
            "user": torch.from_numpy(self.index.user[rows]),
            "history": torch.from_numpy(self.split.histories(self.index, rows)),
            "target": torch.from_numpy(self.split.window_targets(self.index, self.counts, rows)),
        }


class SequenceDataModule(RecDataModule):
    """Leave-last-out (history, next item) samples: every train prefix, one validation and one test sample per user.

    Args:
        causal_windows: serve training samples grouped into causal windows (``target`` is ``[B, T]``) for
            models that supervise every position in one forward pass (SASRec, FMLP-Rec); the (history, target)
            pairs are exactly the prefix samples. False serves one prefix per row (``target`` is ``[B]``).
        **see** :class:`datamodules.base.RecDataModule` for the other arguments.
    """

    def __init__(
        self,
        data_dir: str = "data/synthetic",
        dataset: str | None = None,
        source: Source = "auto",
        processed_dir: str | None = None,
        synthetic: SyntheticSpec | None = None,
        max_history: int = 20,
        batch_size: int = 256,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 42,
        cold_items: str | None = None,
        causal_windows: bool = False,
    ) -> None:
        super().__init__(
            data_dir,
            dataset,
            source,
            processed_dir,
            synthetic,
            max_history,
            batch_size,
            eval_batch_size,
            num_workers,
            seed,
            cold_items=cold_items,
        )
        self.causal_windows = causal_windows

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        train = (
            CausalWindows(self.split)
            if self.causal_windows
            else SequenceSamples(self.split, self.split.train, with_seen=False)
        )
        self.datasets = {
            "train": train,
            "valid": SequenceSamples(self.split, self.split.valid, with_seen=True),
            "test": SequenceSamples(self.split, self.split.test, with_seen=True),
        }

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["valid"], self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], self.eval_batch_size, shuffle=False)
