"""P5's item indexing (Hua et al., 2023, "How to Index Item IDs for Recommendation Foundation Models"): every item
as a short sequence of tokens.

Three methods, each computed from the leave-last-out TRAINING interactions only
(:meth:`datamodules.split.LeaveLastOutSplit.train_interactions`: each user's items without the last two), and
deterministic given the seed:

* ``sequential`` (P5-ID's sequential indexing, ``data/sequential_generation.py`` + ``data.py``'s ``item + 1000``):
  items numbered consecutively in the order of their first appearance over the users' training sequences (users in
  catalogue order), from 1001; items with no training interaction follow, in the order of their first appearance
  in the whole sequences, then any item in no sequence, by id.
* ``random`` (P5-ID's ``random_number``): a seeded random permutation of the same numbers 1001 .. 1000 + #items.
* ``cid``, collaborative indexing (P5-ID's ``CID_generation.py``): spectral clustering
  (scikit-learn ``SpectralClustering``, precomputed affinity, ``assign_labels="cluster_qr"`` as P5-ID) of the item
  co-occurrence graph ``A = X^T X`` (``X``: the user x item counts of the training interactions, diagonal dropped),
  applied recursively: a cluster of more than ``max_cluster_size`` items is split into ``num_clusters``
  sub-clusters. An item's id is one token per cluster on its path, named by the path as P5-ID's ``compute_index``
  names them (``<c3>``, ``<c3-7>``), then its rank within its final cluster (``<i5>``, items by id). The
  eigenvectors come from LOBPCG rather than scikit-learn's default ARPACK (P5-ID's): on Games' 16.8k-item graph
  (6.1M edges) ARPACK's shift-invert took 425 s and LOBPCG 2.3 s on one core, for top-level clusters whose sizes
  agree within 5 items.

A number is written as ``item_`` followed by one token per decimal digit (``1024`` -> ``1 0 2 4``): the offline
stand-in for the T5 SentencePiece pieces P5 tokenises numbers into, with a fixed, per-digit split so numbers that
share leading digits share their first tokens, as pieces do. Tuples shorter than the longest are padded at the end
with :data:`END_TOKEN`, so every item is a fixed-length tuple (what :class:`~lightning_modules.components.trie.CodeTrie`
needs) and uniqueness is that of the unpadded ids.

Items with no edge in the training co-occurrence graph (no training interaction, or only in one-item training
sequences) carry no collaborative signal: they are left out of the spectral clustering (so a held-out item changes
no other item's id) and share one extra top-level cluster ``<c{num_clusters}>``, numbered within it by item id (and
split into chunks of at most ``max_cluster_size`` items when larger, like any cluster without edges).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp

from datamodules.split import LeaveLastOutSplit

log = logging.getLogger(__name__)

Indexing = Literal["cid", "sequential", "random"]

#: First number of sequential and random indexing (P5-ID's ``data.py`` adds 1000 to ids counted from 1).
FIRST_NUMBER = 1001
#: Fills the positions after an id shorter than the longest, so every item has the same number of tokens.
END_TOKEN = "<end>"
#: Written before every item id in a prompt (P5-ID's ``"item_" + id``).
ITEM_PREFIX = "item_"
DIGITS = tuple(str(digit) for digit in range(10))


@dataclass(frozen=True)
class ItemIds:
    """Every catalogue item's id tokens (row ``i`` = item ``i``).

    Attributes:
        tokens: per item, its id tokens without padding (what a prompt shows after ``item_``).
        method: the indexing that made them.
        numbers: the item numbers of ``sequential``/``random`` indexing, else None.
        paths: the cluster labels on each item's path of ``cid`` indexing (its id minus the last token), else None.
    """

    tokens: tuple[tuple[str, ...], ...]
    method: str
    numbers: np.ndarray | None = None
    paths: tuple[tuple[int, ...], ...] | None = None

    @property
    def length(self) -> int:
        """Tokens per item once padded (the longest id)."""
        return max(len(row) for row in self.tokens)

    def padded(self) -> list[list[str]]:
        """Every id padded to :attr:`length` with :data:`END_TOKEN` (the decoder's targets)."""
        width = self.length
        return [[*row, *[END_TOKEN] * (width - len(row))] for row in self.tokens]

    def vocabulary(self) -> list[str]:
        """Every token an id uses (digits in order; cluster and rank tokens sorted), then :data:`END_TOKEN`."""
        used = {token for row in self.tokens for token in row}
        digits = [digit for digit in DIGITS if digit in used]
        return [*digits, *sorted(used - set(digits), key=_token_order), END_TOKEN]


def _token_order(token: str) -> tuple:
    """Natural order of ``<c3-12>`` / ``<i7>`` tokens: kind, then the numbers (so ``<i2>`` < ``<i10>``)."""
    body = token.strip("<>")
    return (body[:1], tuple(int(part) for part in body[1:].split("-") if part.isdigit()))


def number_tokens(numbers: np.ndarray) -> tuple[tuple[str, ...], ...]:
    """One token per decimal digit of each number (``1024`` -> ``("1", "0", "2", "4")``)."""
    return tuple(tuple(str(int(number))) for number in numbers)


def sequential_numbers(split: LeaveLastOutSplit) -> np.ndarray:
    """``[num_items]`` P5-ID's sequential numbers: first appearance over the training sequences, from 1001."""
    catalogue = split.catalogue
    _, train_items = split.train_interactions()  # users in row order, each user's items in time order
    order = [_first_appearances(train_items), _first_appearances(catalogue.items), np.arange(catalogue.num_items)]
    ranked = _first_appearances(np.concatenate(order))  # training first, then the held-out items, then the rest
    numbers = np.empty(catalogue.num_items, dtype=np.int64)
    numbers[ranked] = FIRST_NUMBER + np.arange(catalogue.num_items)
    return numbers


def random_numbers(num_items: int, seed: int) -> np.ndarray:
    """``[num_items]`` P5-ID's random numbers: a seeded permutation of the sequential range."""
    return FIRST_NUMBER + np.random.default_rng(seed).permutation(num_items)


def _first_appearances(items: np.ndarray) -> np.ndarray:
    """The distinct values of ``items`` in the order they first occur."""
    values, first = np.unique(items, return_index=True)
    return values[np.argsort(first, kind="stable")]


def cooccurrence_graph(split: LeaveLastOutSplit) -> sp.csr_matrix:
    """``[num_items, num_items]`` co-occurrence counts over the training interactions (``X^T X``, no diagonal)."""
    users, items = split.train_interactions()
    shape = (split.catalogue.num_users, split.catalogue.num_items)
    counts = sp.csr_matrix((np.ones(len(items)), (users, items)), shape=shape)
    graph = (counts.T @ counts).tocsr()
    graph.setdiag(0)
    graph.eliminate_zeros()
    return graph


def _chunks(size: int, parts: int) -> np.ndarray:
    """Labels splitting ``size`` nodes, in order, into ``parts`` near-equal runs (clusters without edges)."""
    return np.arange(size) * parts // size


def _split(graph: sp.csr_matrix, num_clusters: int, seed: int) -> np.ndarray:
    """Spectral-cluster labels of the nodes of ``graph``; node-order chunks when it has no edges or does not split."""
    size = graph.shape[0]
    if graph.nnz == 0:
        return _chunks(size, num_clusters)
    from sklearn.cluster import SpectralClustering

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Graph is not fully connected": expected inside a cluster
        labels = SpectralClustering(
            n_clusters=num_clusters,
            affinity="precomputed",
            assign_labels="cluster_qr",
            eigen_solver="lobpcg",  # see the module docstring: arpack's shift-invert is ~180x slower on Games
            random_state=seed,
        ).fit_predict(graph)
    if np.unique(labels).size < 2:  # nothing separated: split in node order so the recursion ends
        return _chunks(size, num_clusters)
    return labels


def collaborative_paths(
    split: LeaveLastOutSplit, num_clusters: int = 20, max_cluster_size: int = 500, seed: int = 42
) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """Cluster paths and within-cluster ranks of P5-ID's collaborative indexing (see the module docstring).

    Args:
        split: the leave-last-out split; only its training interactions are read.
        num_clusters: sub-clusters per split (P5-ID: 20).
        max_cluster_size: a cluster with more items is split again (P5-ID: 500).
        seed: ``random_state`` of every spectral clustering.

    Returns:
        Per item, its cluster labels from the top (one per level) and its rank within its final cluster.
    """
    graph = cooccurrence_graph(split)
    num_items = graph.shape[0]
    paths: list[tuple[int, ...]] = [()] * num_items
    ranks = np.zeros(num_items, dtype=np.int64)
    connected = np.diff(graph.indptr) > 0

    def descend(nodes: np.ndarray, prefix: tuple[int, ...], labels: np.ndarray | None) -> None:
        if labels is None and len(nodes) <= max_cluster_size:
            ranks[nodes] = np.arange(len(nodes))
            for node in nodes:  # only the path tuples are per item (the ranks above are one assignment)
                paths[node] = prefix
            return
        if labels is None:
            labels = _split(graph[nodes][:, nodes], num_clusters, seed)
        for label in np.unique(labels):
            descend(nodes[labels == label], (*prefix, int(label)), None)

    nodes = np.flatnonzero(connected)
    top = _split(graph[nodes][:, nodes], num_clusters, seed) if len(nodes) > max_cluster_size else None
    if top is None:  # the whole graph is one cluster: a top level with a single label
        top = np.zeros(len(nodes), dtype=np.int64)
    isolated = np.flatnonzero(~connected)
    descend(np.concatenate([nodes, isolated]), (), np.concatenate([top, np.full(len(isolated), num_clusters)]))
    return paths, ranks


def cid_tokens(paths: list[tuple[int, ...]], ranks: np.ndarray) -> tuple[tuple[str, ...], ...]:
    """P5-ID's token names: a token per cluster, named by its path (``<c3>``, ``<c3-7>``), then ``<i{rank}>``."""
    return tuple(
        (*(f"<c{'-'.join(str(label) for label in path[: depth + 1])}>" for depth in range(len(path))), f"<i{rank}>")
        for path, rank in zip(paths, ranks.tolist(), strict=True)
    )


def index_items(
    split: LeaveLastOutSplit, method: Indexing, seed: int, num_clusters: int = 20, max_cluster_size: int = 500
) -> ItemIds:
    """The item ids of ``method`` for every catalogue item (see the module docstring)."""
    if method == "cid":
        paths, ranks = collaborative_paths(split, num_clusters, max_cluster_size, seed)
        ids = ItemIds(cid_tokens(paths, ranks), method, paths=tuple(paths))
    elif method in ("sequential", "random"):
        numbers = (
            sequential_numbers(split) if method == "sequential" else random_numbers(split.catalogue.num_items, seed)
        )
        ids = ItemIds(number_tokens(numbers), method, numbers=numbers)
    else:
        raise ValueError(f"unknown indexing {method!r}: cid, sequential or random")
    if len(set(ids.tokens)) != len(ids.tokens):  # a construction invariant: generated ids must name one item
        raise AssertionError(f"{method} indexing gave two items the same id")
    log.info(
        "%s indexing: %d items, ids of %d..%d tokens",
        method,
        len(ids.tokens),
        min(map(len, ids.tokens)),
        ids.length,
    )
    return ids
