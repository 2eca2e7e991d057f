"""DCCF's encoder (Ren et al., SIGIR 2023, "Disentangled Contrastive Collaborative Filtering").

Per layer, from the previous layer's embeddings ``E``:

* GNN view: ``G E`` with the normalised adjacency ``G = D^-1/2 A D^-1/2``;
* intent view: ``softmax(E_u P_u) P_u^T`` (users) and ``softmax(E_i P_i) P_i^T`` (items) with learnable intent
  prototypes ``P`` ``[dim, num_intents]``;
* two adaptive augmentation views ``G' E`` whose edge weights are ``(cos(h, t) + 1) / 2`` of each edge's endpoints
  in the GNN view resp. the intent view, re-normalised over the graph;
* the layer output is the sum of the four views plus the previous layer (residual).

The final embedding sums all layers including layer 0, as in the official implementation (HKUDS/DCCF).
Nodes are laid out users first, then items.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

AugmentNorm = Literal["row", "symmetric"]

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    size = crow.numel() - 1
    # the pattern was validated once when the graph was built; re-checking it on every product would cost O(E)
    return torch.sparse_csr_tensor(crow, col, values, (size, size), check_invariants=False)


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    """Sparse kernels run in fp32: autocast would cast them to bf16, which CPU CSR kernels do not implement."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _edge_dot(crow: torch.Tensor, col: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a[h], b[t]>`` for every edge ``(h, t)`` in CSR order, as one SDDMM (no ``[E, dim]`` gathers)."""
    pattern = _csr(crow, col, a.new_zeros(col.numel()))
    return torch.sparse.sampled_addmm(pattern, a, b.T, beta=0.0).values()


class _EdgeWeightedSpMM(torch.autograd.Function):
    """``A(values) @ x`` for a fixed symmetric CSR pattern, differentiable in both the edge weights and ``x``.

    torch's own autograd through a sparse tensor's values is very slow for COO on CPU and can densify the
    gradient (``num_nodes^2`` memory) for CSR. Here the gradient of an edge weight is the dot product of its
    endpoints' rows (an SDDMM), and ``A^T`` reuses the symmetric pattern with the values permuted by ``reverse``.
    """

    @staticmethod
    def forward(ctx, values, x, crow, col, reverse):
        # fp32 (at least) inside: under bf16 autocast x and the gradients arrive in bf16, and the sparse kernels
        # neither mix dtypes nor all support bf16; autograd casts the returned gradients back to the inputs' dtypes
        dtype = torch.promote_types(torch.promote_types(values.dtype, x.dtype), torch.float32)
        values, x = values.to(dtype), x.to(dtype)
        ctx.save_for_backward(values, x, crow, col, reverse)
        with _no_autocast(x):
            return torch.sparse.mm(_csr(crow, col, values), x)

    @staticmethod
    def backward(ctx, grad_out):
        values, x, crow, col, reverse = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype)
        with _no_autocast(x):
            grad_values = _edge_dot(crow, col, grad_out, x) if ctx.needs_input_grad[0] else None
            grad_x = torch.sparse.mm(_csr(crow, col, values[reverse]), grad_out) if ctx.needs_input_grad[1] else None
        return grad_values, grad_x, None, None, None


class _EdgeSelfDot(torch.autograd.Function):
    """``<x[h], x[t]>`` for every edge; its gradient ``(A(g) + A(g)^T) x`` is one sparse product."""

    @staticmethod
    def forward(ctx, x, crow, col, reverse):
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 (or fp64) inside, as in _EdgeWeightedSpMM
        ctx.save_for_backward(x, crow, col, reverse)
        with _no_autocast(x):
            return _edge_dot(crow, col, x, x)

    @staticmethod
    def backward(ctx, grad_out):
        x, crow, col, reverse = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype)
        with _no_autocast(x):
            return torch.sparse.mm(_csr(crow, col, grad_out + grad_out[reverse]), x), None, None, None


class BipartiteGraph(nn.Module):
    """A symmetric sparse graph with its normalised weights and edge list, for propagation with edge weights.

    Args:
        adjacency: ``[N, N]`` sparse COO or CSR matrix with a symmetric pattern (its values are the weights
            of the plain GNN view, e.g. ``D^-1/2 A D^-1/2``).
    """

    def __init__(self, adjacency: torch.Tensor) -> None:
        super().__init__()
        if adjacency.layout == torch.sparse_coo:
            adjacency = adjacency.coalesce().to_sparse_csr()
        elif adjacency.layout != torch.sparse_csr:
            raise TypeError(f"adjacency must be a sparse COO or CSR tensor, got layout {adjacency.layout}")
        num_nodes = adjacency.shape[0]
        crow, col = adjacency.crow_indices().long(), adjacency.col_indices().long()
        # explicit device: Lightning's configure_model runs under a CUDA default device, the graph comes from the CPU
        head = torch.repeat_interleave(torch.arange(num_nodes, device=crow.device), crow.diff())
        # reverse[e] = index of the edge (t, h) of edge e = (h, t): the transpose's values in CSR order
        keys = head * num_nodes + col
        order = keys.argsort()
        reverse_keys = col * num_nodes + head
        pos = torch.searchsorted(keys[order], reverse_keys).clamp_max(max(len(keys) - 1, 0))
        if len(keys) and not torch.equal(keys[order][pos], reverse_keys):
            raise ValueError("adjacency must have a symmetric sparsity pattern (an undirected user-item graph)")
        self.num_nodes = num_nodes
        for name, tensor in (
            ("crow", crow),
            ("col", col),
            ("head", head),
            ("reverse", order[pos] if len(keys) else pos),
        ):
            self.register_buffer(name, tensor, persistent=False)
        # the graph comes from the datamodule at every setup: keep it out of checkpoints
        self.register_buffer("norm_values", adjacency.values().float(), persistent=False)

    @property
    def num_edges(self) -> int:
        return self.col.numel()

    def propagate(self, x: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """``A x`` with the normalised weights, or with ``values`` (one weight per edge, CSR order)."""
        values = self.norm_values if values is None else values
        return _EdgeWeightedSpMM.apply(values, x, self.crow, self.col, self.reverse)

    def similarity_weights(self, x: torch.Tensor, norm: AugmentNorm = "row") -> torch.Tensor:
        """Edge weights ``(cos(x_h, x_t) + 1) / 2``, re-normalised by the weighted degree.

        ``row`` divides by the head's weighted degree (``D^-1 A``, the official code); ``symmetric`` uses
        ``D^-1/2 A D^-1/2`` like the plain adjacency.
        """
        alpha = (_EdgeSelfDot.apply(F.normalize(x, dim=1), self.crow, self.col, self.reverse) + 1) / 2
        degree = torch.zeros(self.num_nodes, dtype=alpha.dtype, device=alpha.device).index_add_(0, self.head, alpha)
        # alpha == 0 on every edge of a node only when all its neighbours are exactly opposite; avoid 1/0
        degree = degree.clamp_min(torch.finfo(alpha.dtype).tiny)
        if norm == "row":
            return alpha / degree[self.head]
        if norm == "symmetric":
            inv_sqrt = degree.rsqrt()
            return alpha * inv_sqrt[self.head] * inv_sqrt[self.col]
        raise ValueError(f"augment_norm must be 'row' or 'symmetric', got {norm!r}")


class IntentAggregation(nn.Module):
    """``softmax(E P) P^T``: each node as a mixture of ``num_intents`` learnable intent prototypes.

    Args:
        dim: embedding size.
        num_intents: number of prototypes.
    """

    def __init__(self, dim: int, num_intents: int) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(nn.init.xavier_normal_(torch.empty(dim, num_intents)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x @ self.prototypes, dim=1) @ self.prototypes.T


class DCCFEncoder(nn.Module):
    """Initial embeddings, intent prototypes and the disentangled, adaptively augmented propagation.

    Args:
        adjacency: ``[U+I, U+I]`` normalised adjacency (users first), e.g. ``GraphDataModule.adjacency``.
        num_users: number of users ``U``.
        num_items: number of items ``I``.
        dim: embedding size (32 in the paper).
        num_layers: propagation layers (2).
        num_intents: intent prototypes per side (128).
        augment_norm: normalisation of the adaptive views' edge weights (``row`` as in the official code).
    """

    def __init__(
        self,
        adjacency: torch.Tensor,
        num_users: int,
        num_items: int,
        dim: int = 32,
        num_layers: int = 2,
        num_intents: int = 128,
        augment_norm: AugmentNorm = "row",
    ) -> None:
        super().__init__()
        self.graph = BipartiteGraph(adjacency)
        if self.graph.num_nodes != num_users + num_items:
            raise ValueError(
                f"adjacency has {self.graph.num_nodes} nodes, expected {num_users} users + {num_items} items"
            )
        self.num_users, self.num_items, self.num_layers, self.augment_norm = (
            num_users,
            num_items,
            num_layers,
            augment_norm,
        )
        self.user_embedding = nn.Embedding(num_users, dim)
        self.item_embedding = nn.Embedding(num_items, dim)
        nn.init.xavier_normal_(self.user_embedding.weight)
        nn.init.xavier_normal_(self.item_embedding.weight)
        self.user_intent = IntentAggregation(dim, num_intents)
        self.item_intent = IntentAggregation(dim, num_intents)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(users, items) rows of a node tensor."""
        return x[: self.num_users], x[self.num_users :]

    def intent(self, x: torch.Tensor) -> torch.Tensor:
        users, items = self.split(x)
        return torch.cat([self.user_intent(users), self.item_intent(items)])

    def forward(self) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Final node embeddings ``[U+I, dim]`` and, per layer, the four views (``gnn``, ``intent``, ``gnn_aug``, "
        "``intent_aug``)."""
        layers = [torch.cat([self.user_embedding.weight, self.item_embedding.weight])]
        views = []
        for _ in range(self.num_layers):
            previous = layers[-1]
            gnn = self.graph.propagate(previous)
            intent = self.intent(previous)
            gnn_aug = self.graph.propagate(previous, self.graph.similarity_weights(gnn, self.augment_norm))
            intent_aug = self.graph.propagate(previous, self.graph.similarity_weights(intent, self.augment_norm))
            views.append({"gnn": gnn, "intent": intent, "gnn_aug": gnn_aug, "intent_aug": intent_aug})
            layers.append(gnn + intent + gnn_aug + intent_aug + previous)
        return torch.stack(layers).sum(0), views
