"""Initial code-token rows from stage-2 code vectors (the paper's Table 7 ``mlp2``/``mlp3`` variants).

The vectors pass through a seeded random GELU MLP (the paper's ablation) and come out at the scale of the
vocabulary they join.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_modules.components.quantizer import mlp


def mlp_projection(dims: list[int], seed: int = 0) -> nn.Sequential:
    """A GELU MLP with the given layer widths, initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return mlp(dims, nn.GELU)


def code_rows(vectors: torch.Tensor, method: str, width: int, vocabulary: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Rows of width ``width`` for the code vectors ``[N, dim]``, matched to the ``vocabulary`` rows' statistics.

    Args:
        vectors: the stage-2 code vectors, one per code token.
        method: ``mlp2`` or ``mlp3`` (a 2- or 3-layer MLP).
        width: the LLM's embedding width.
        vocabulary: the original embedding rows, whose mean and spread the new rows take.

    Returns:
        The rows and a description of the map for the log.
    """
    if method not in ("mlp2", "mlp3"):
        raise ValueError(f"unknown code-row initialisation {method!r}: use mlp2 or mlp3")
    dim = vectors.shape[1]
    hidden = int(math.sqrt(dim * width))
    dims = [dim, hidden, width] if method == "mlp2" else [dim, hidden, hidden, width]
    rows = mlp_projection(dims)(vectors)
    rows = (rows - rows.mean()) / rows.std().clamp_min(1e-8) * vocabulary.std() + vocabulary.mean(0)
    return rows, f"an MLP {dims}"
