"""Initial code-token rows from stage-2 code vectors (the paper's Table 7 ``mlp2``/``mlp3`` variants).

The vectors pass through a seeded random GELU MLP (the paper's ablation) and come out at the scale of the
vocabulary they join.
"""

from __future__ import annotations

import contextlib
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


def init_code_rows(
    model: nn.Module,
    vectors: torch.Tensor,
    token_ids: torch.Tensor,
    method: str,
    first_code_token: int,
    zero_stage_3: bool = False,
) -> str:
    """Overwrite the code tokens' input-embedding rows of ``model`` with :func:`code_rows` of their code vectors.

    Args:
        model: the HF causal LM, its vocabulary already holding the code tokens.
        vectors: ``[L, K, dim]`` stage-2 code vectors of each level's codes.
        token_ids: ``[L, >= K]`` token id of each level's codes (``ItemIndex.level_token_ids``).
        method: ``mlp2`` or ``mlp3``.
        first_code_token: the lowest code-token id; the rows before it are the original vocabulary, whose
            statistics the new rows take.
        zero_stage_3: the weight is a DeepSpeed ZeRO-3 shard: gather the full matrix, write the rows, re-shard it
            (rank 0's values win).

    Returns:
        A description of the map for the log.
    """
    levels, size, dim = vectors.shape
    weight = model.get_input_embeddings().weight
    width = model.get_input_embeddings().embedding_dim  # weight.shape is (0,) under ZeRO-3 sharding
    gathered = contextlib.nullcontext()
    if zero_stage_3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([weight], modifier_rank=0)
    with gathered, torch.no_grad():
        old = weight[:first_code_token].float()  # the original vocabulary
        rows, how = code_rows(vectors.reshape(-1, dim), method, width, old)
        weight[token_ids[:levels, :size].reshape(-1)] = rows.to(weight.dtype)
    return how
