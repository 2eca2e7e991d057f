"""A pre-norm Transformer encoder block with explicit attention masks (used by SASRec and BERT4Rec)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TransformerBlock(nn.Module):
    """Multi-head self-attention + position-wise feed-forward, each with a residual and pre-LayerNorm.

    Args:
        hidden: model width.
        heads: attention heads.
        dropout: dropout on attention weights, residual branches and the feed-forward layer.
        ffn_mult: feed-forward width as a multiple of ``hidden``.
    """

    def __init__(self, hidden: int, heads: int, dropout: float, ffn_mult: int = 4) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ffn_norm = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, ffn_mult * hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_mult * hidden, hidden)
        )
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, T, H]``; ``attn_mask``: boolean ``[B, 1, T, T]``, True where attention is allowed."""
        batch, length, hidden = x.shape
        q, k, v = (
            self.qkv(self.attn_norm(x)).view(batch, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        )
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.residual_dropout(self.proj(attended.transpose(1, 2).reshape(batch, length, hidden)))
        return x + self.residual_dropout(self.ffn(self.ffn_norm(x)))


def padding_aware_mask(is_item: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean ``[B, 1, T, T]`` mask: attend to real items (and causally, to earlier ones only).

    Every query may also attend to itself so that rows of pure padding never hit an all-masked softmax
    (which would produce NaNs that leak through 0 * NaN in the value product).
    """
    length = is_item.shape[1]
    allowed = is_item[:, None, None, :].expand(-1, 1, length, -1)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=is_item.device).tril()
    return allowed | torch.eye(length, dtype=torch.bool, device=is_item.device)
