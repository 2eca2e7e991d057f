"""Initial code-token rows from stage-2 code vectors (the paper's Table 7 variants), as plain tensor maps.

``mlp2``/``mlp3`` pass the vectors through a seeded random GELU MLP (the paper's ablation); ``linear`` through a
fixed orthogonal map, which keeps their inner products: an item's code rows then sum to its behaviour
embedding up to one scale, so co-interacted items start close. Either way the rows come out at the scale of
the vocabulary they join.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp_projection(dims: list[int], seed: int = 0) -> nn.Sequential:
    """A GELU MLP with the given layer widths, initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers += [nn.Linear(width_in, width_out)] + ([nn.GELU()] if i < len(dims) - 2 else [])
        return nn.Sequential(*layers)


def orthogonal_map(dim_in: int, dim_out: int, seed: int = 0) -> torch.Tensor:
    """A seeded ``[dim_in, dim_out]`` matrix with orthonormal rows (columns if ``dim_in > dim_out``): for
    ``dim_in <= dim_out``, ``x @ Q`` keeps every inner product of the ``x``; the global RNG is untouched."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(max(dim_in, dim_out), min(dim_in, dim_out), generator=generator)
    q, _ = torch.linalg.qr(gaussian)  # orthonormal columns
    return q.T if dim_in <= dim_out else q


def code_rows(vectors: torch.Tensor, method: str, width: int, vocabulary: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Rows of width ``width`` for the code vectors ``[N, dim]``, matched to the ``vocabulary`` rows' statistics.

    Returns the rows and a description of the map for the log.
    """
    dim = vectors.shape[1]
    if method == "linear":
        rows = vectors @ orthogonal_map(dim, width)
        # one scale for every level keeps the vectors' geometry (the residual levels stay smaller)
        rows = rows / rows.pow(2).mean().sqrt().clamp_min(1e-8) * vocabulary.std() + vocabulary.mean(0)
        return rows, f"an orthogonal {dim}x{width} map"
    if method not in ("mlp2", "mlp3"):
        raise ValueError(f"unknown code-row initialisation {method!r}: use linear, mlp2 or mlp3")
    hidden = int(math.sqrt(dim * width))
    dims = [dim, hidden, width] if method == "mlp2" else [dim, hidden, hidden, width]
    rows = mlp_projection(dims)(vectors)
    rows = (rows - rows.mean()) / rows.std().clamp_min(1e-8) * vocabulary.std() + vocabulary.mean(0)
    return rows, f"an MLP {dims}"
