"""The graph view: the user-item bipartite graph of the training interactions, for graph CF models (DCCF).

Nodes are laid out users first (rows ``0 .. U-1``), then items (``U .. U+I-1``). The graph holds only
:meth:`LeaveLastOutSplit.train_interactions` (``items[:-2]`` of every user), so no validation or test target
is ever propagated over. Training samples are (user, positive item, negative items) triples: every distinct
training interaction once per epoch, with negatives drawn uniformly from the items the user has not interacted
with in training, re-drawn each epoch from ``seed + epoch``. Validation and test batches are the sequence
view's (one per user, full ranking), so metrics are comparable with the sequential baselines.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.base import Source, _identity_collate
from datamodules.cold_items import allowed_items
from datamodules.errors import require
from datamodules.negatives import interaction_keys, sample_negatives
from datamodules.sequence import SequenceDataModule
from datamodules.synthetic import SyntheticSpec

log = logging.getLogger(__name__)


def normalized_adjacency(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> torch.Tensor:
    """LightGCN's ``D^-1/2 A D^-1/2`` of the bipartite graph, as a coalesced sparse COO ``[U+I, U+I]`` tensor.

    ``(users[k], items[k])`` must be distinct pairs. Coalescing sorts the edges row-major, i.e. in CSR order.
    Isolated nodes (degree 0) simply have no entries.
    """
    num_nodes = num_users + num_items
    rows = np.concatenate([users, items + num_users]).astype(np.int64)
    cols = np.concatenate([items + num_users, users]).astype(np.int64)
    degree = np.bincount(rows, minlength=num_nodes).astype(np.float64)
    inv_sqrt = np.zeros_like(degree)
    np.power(degree, -0.5, out=inv_sqrt, where=degree > 0)
    values = (inv_sqrt[rows] * inv_sqrt[cols]).astype(np.float32)
    indices = torch.from_numpy(np.stack([rows, cols]))
    return torch.sparse_coo_tensor(
        indices, torch.from_numpy(values), (num_nodes, num_nodes), check_invariants=True
    ).coalesce()


class TrainTriples(Dataset):
    """Every distinct training interaction with freshly drawn negatives; batches built in ``__getitems__``.

    Indices are ``epoch * len(self) + row`` (see :class:`EpochShuffle`): the epoch travels with the index, so a
    copy of the dataset in a DataLoader worker draws the same negatives as the main process would.
    Batches: ``user`` ``[B]``, ``target`` ``[B]`` (the positive item), ``negative`` ``[B, num_negatives]``.
    """

    def __init__(
        self,
        users: np.ndarray,
        items: np.ndarray,
        num_items: int,
        num_negatives: int,
        seed: int,
        allowed: np.ndarray | None = None,
    ) -> None:
        self.users, self.items, self.allowed = users, items, allowed
        self.keys = interaction_keys(users, items, num_items)  # excluded from the negatives
        self.num_items, self.num_negatives, self.seed = num_items, num_negatives, seed
        self._epoch, self._negatives = -1, None

    def __len__(self) -> int:
        return len(self.users)

    def negatives(self, epoch: int) -> np.ndarray:
        """The ``[N, num_negatives]`` negatives of one epoch (drawn for the whole epoch at once, then cached)."""
        if epoch != self._epoch:
            rng = np.random.default_rng(self.seed + epoch)
            owners = np.repeat(self.users, self.num_negatives)
            negatives = sample_negatives(self.keys, owners, self.num_items, rng, allowed=self.allowed)
            self._negatives = negatives.reshape(len(self.users), self.num_negatives)
            self._epoch = epoch
        return self._negatives

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        epoch, rows = np.divmod(np.asarray(indices, dtype=np.int64), len(self))
        return {
            "user": torch.from_numpy(self.users[rows]),
            "target": torch.from_numpy(self.items[rows]),
            "negative": torch.from_numpy(self.negatives(int(epoch[0]))[rows]),
        }


class EpochShuffle(Sampler[int]):
    """Shuffles ``size`` rows with ``seed + epoch`` and tags each index with the epoch (``epoch * size + row``).

    Lightning calls :meth:`set_epoch` before every epoch; when a wrapper hides this sampler from it (DDP's
    ``DistributedSamplerWrapper``), each iteration advances the epoch by itself.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        order = np.random.default_rng(self.seed + epoch).permutation(self.size)
        yield from (order + epoch * self.size).tolist()


class GraphDataModule(SequenceDataModule):
    """User-item graph of the training interactions plus (user, positive, negatives) training triples.

    After :meth:`setup`: ``adjacency`` (``D^-1/2 A D^-1/2``, sparse COO ``[U+I, U+I]``, users first),
    ``num_users``, ``train_users``/``train_items`` (the distinct training interactions) and ``isolated_items``
    (items without a training interaction: they only occur as validation/test targets and receive no messages
    in a graph model, but still get embeddings). Validation/test loaders are the sequence view's.

    Args:
        data_dir: see :class:`datamodules.base.RecDataModule`.
        dataset: dataset name (inferred when the directory holds exactly one).
        source: ``auto``, ``lcrec``, ``amazon_raw`` or ``synthetic``.
        processed_dir: where raw Amazon files are converted to LC-Rec format.
        synthetic: shape of the synthetic dataset (``source: synthetic`` only).
        max_history: history cap of evaluation samples (only used to build them; the graph is uncapped).
        batch_size: training triples per batch (graph CF models propagate the whole graph every step, so
            large batches are the norm; 2048 is the fastest per epoch on CPU, see configs/games/dccf.yaml).
        eval_batch_size: validation/test users per batch.
        num_workers: DataLoader workers.
        seed: seed of the negatives and of the shuffling (epoch ``e`` uses ``seed + e``).
        cold_items: items held out of every fit (see :class:`datamodules.base.RecDataModule`).
        num_negatives: negatives per positive.
    """

    def __init__(
        self,
        data_dir: str = "data/synthetic",
        dataset: str | None = None,
        source: Source = "auto",
        processed_dir: str | None = None,
        synthetic: SyntheticSpec | None = None,
        max_history: int = 20,
        batch_size: int = 2048,
        eval_batch_size: int = 1024,
        num_workers: int = 0,
        seed: int = 42,
        cold_items: str | None = None,
        num_negatives: int = 1,
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
        require(num_negatives >= 1, "data.init_args.num_negatives", ">= 1", num_negatives)
        self.num_negatives = num_negatives
        self.adjacency: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)  # catalogue, split and the sequence view's val/test datasets
        if self.adjacency is None:
            self._build_graph()
        self.datasets["train"] = TrainTriples(
            self.train_users,
            self.train_items,
            self.catalogue.num_items,
            self.num_negatives,
            self.seed,
            allowed_items(self.catalogue),
        )

    def _build_graph(self) -> None:
        catalogue = self.catalogue
        num_users, num_items = catalogue.num_users, catalogue.num_items
        users, items = self.split.train_interactions()
        # a binary graph: repeated purchases of an item are one edge
        keys = interaction_keys(users, items, num_items)
        self.train_users, self.train_items = np.divmod(keys, num_items)
        self.num_users = num_users
        degree = np.bincount(self.train_users, minlength=num_users)
        if (degree >= num_items).any():
            raise ValueError(
                f"{catalogue.name}: {int((degree >= num_items).sum())} users interacted with every item in training, "
                "so no "
                "negative item can be sampled for them. Remove them from the dataset."
            )
        self.adjacency = normalized_adjacency(self.train_users, self.train_items, num_users, num_items)
        self.isolated_items = np.flatnonzero(np.bincount(self.train_items, minlength=num_items) == 0)
        log.info(
            "%s graph: %d users, %d items, %d training edges; %d isolated items (no training interaction: only "
            "validation/test targets; they receive no graph messages)",
            catalogue.name,
            num_users,
            num_items,
            keys.size,
            self.isolated_items.size,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffle(len(dataset), self.seed),
            num_workers=self.num_workers,
            collate_fn=_identity_collate,
            persistent_workers=self.num_workers > 0,
        )
