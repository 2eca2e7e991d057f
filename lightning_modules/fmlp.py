"""FMLP-Rec (Zhou et al., WWW 2022): "Filter-enhanced MLP is all you need for sequential recommendation".

Self-attention is replaced by a learnable filter in the frequency domain: the sequence is taken to the
frequency domain with an FFT over positions, multiplied element-wise by a learnable complex weight, and
brought back; a point-wise feed-forward follows. Both sub-layers are post-norm residuals, as in the paper.

Leakage: the filter is a circular convolution over *all* positions, so the state at position t depends on
the items after t. The official code nevertheless supervises every position of a window with the shifted
next items, i.e. the input at position t + 1 is the very target of position t. Here the model is trained on
one (history, next item) prefix per row (``SequenceDataModule(causal_windows=False)``) and supervised at the
last position only, whose input holds the history alone: the training task is the evaluation task and no
target is ever an input. Causal-window batches are refused rather than silently reduced to their last target.
Loss: cross-entropy over the whole catalogue with the item embedding tied as the output layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.base import IDRecommender
from lightning_modules.sasrec import check_sequence_model


class FrequencyFilter(nn.Module):
    """Learnable global filter: ``irfft(rfft(x) * W)`` over the sequence dimension, then residual + LayerNorm.

    Args:
        hidden: model width.
        max_length: sequence length the filter is defined for (``max_length // 2 + 1`` frequencies).
        dropout: dropout on the filtered signal.
    """

    def __init__(self, hidden: int, max_length: int, dropout: float) -> None:
        super().__init__()
        self.max_length = max_length
        # small init (as the official code): each block starts close to the identity through its residual
        self.complex_weight = nn.Parameter(torch.randn(max_length // 2 + 1, hidden, 2) * 0.02)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, max_length, H]``."""
        if x.shape[1] != self.max_length:
            raise ValueError(f"FMLP filter is defined for length {self.max_length}, got {x.shape[1]}")
        spectrum = torch.fft.rfft(x.float(), dim=1, norm="ortho") * torch.view_as_complex(self.complex_weight)
        filtered = torch.fft.irfft(spectrum, n=self.max_length, dim=1, norm="ortho").to(x.dtype)
        return self.norm(x + self.dropout(filtered))


class FilterBlock(nn.Module):
    """A filter layer followed by a point-wise feed-forward layer (residual + LayerNorm).

    Args:
        hidden: model width.
        max_length: sequence length.
        dropout: dropout on both sub-layers.
        ffn_mult: feed-forward width as a multiple of ``hidden``.
    """

    def __init__(self, hidden: int, max_length: int, dropout: float, ffn_mult: int = 4) -> None:
        super().__init__()
        self.filter = FrequencyFilter(hidden, max_length, dropout)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, ffn_mult * hidden), nn.GELU(), nn.Linear(ffn_mult * hidden, hidden), nn.Dropout(dropout)
        )
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """``x``: ``[B, T, H]`` -> ``[B, T, H]``, or ``[B, 1, H]`` (the last position) when ``last_only``."""
        x = self.filter(x)
        if last_only:  # the feed-forward is point-wise: skip the positions nobody reads (half of its cost)
            x = x[:, -1:]
        return self.norm(x + self.ffn(x))


class FMLPRec(IDRecommender):
    """Filter-enhanced MLP sequential recommender.

    Args:
        hidden_size: item embedding and model width.
        num_layers: filter blocks.
        dropout: embedding, filter and feed-forward dropout.
        max_history: history length (the DataModule's cap); histories are left-padded to it.
        label_smoothing: cross-entropy label smoothing.
        lr: Adam learning rate.
        weight_decay: AdamW weight decay.
        mask_history: exclude already-seen items at evaluation.
        top_k: length of predicted lists.
    """

    def __init__(
        self,
        hidden_size: int = 64,
        num_layers: int = 2,
        dropout: float = 0.3,
        max_history: int = 20,
        label_smoothing: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        mask_history: bool = True,
        top_k: int = 20,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, mask_history=mask_history, top_k=top_k)
        check_sequence_model(hidden_size, num_layers, dropout, max_history, label_smoothing)
        self.save_hyperparameters()

    def build(self, num_items: int) -> None:
        hp = self.hparams
        self.item_embedding = nn.Embedding(num_items + 1, hp.hidden_size, padding_idx=num_items)
        self.position_embedding = nn.Embedding(hp.max_history, hp.hidden_size)
        self.embedding_norm = nn.LayerNorm(hp.hidden_size)
        self.embedding_dropout = nn.Dropout(hp.dropout)
        self.blocks = nn.ModuleList(
            FilterBlock(hp.hidden_size, hp.max_history, hp.dropout) for _ in range(hp.num_layers)
        )
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[num_items].zero_()

    def encode_all(self, history: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """States ``[B, max_history, H]`` of a left-padded history (every position sees the whole sequence),
        or ``[B, 1, H]`` of the last position when ``last_only``."""
        if history.shape[1] != self.hparams.max_history:
            raise ValueError(
                f"FMLP-Rec expects histories of length max_history={self.hparams.max_history}, got {history.shape[1]}"
            )
        is_item = (history != self.num_items)[..., None]
        x = self.item_embedding(history) + self.position_embedding.weight[None]
        # padding is zeroed before every filter so the global filter only mixes real items
        x = self.embedding_dropout(self.embedding_norm(x)) * is_item
        for depth, block in enumerate(self.blocks, start=1):
            last_only_here = last_only and depth == len(self.blocks)
            x = block(x, last_only_here) * (is_item[:, -1:] if last_only_here else is_item)
        return x

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """User representation ``[B, H]``: the state at the last position (the most recent item)."""
        return self.encode_all(history, last_only=True)[:, -1]

    def score_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encode(batch["history"]) @ self.item_embedding.weight[: self.num_items].T

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        target = batch["target"]
        if target.dim() != 1:
            raise ValueError(
                "FMLP-Rec's filter is not causal: supervising every position of a causal window would feed each "
                "position its own target. Use one prefix per row (data.init_args.causal_windows: false)."
            )
        return F.cross_entropy(self.score_items(batch), target, label_smoothing=self.hparams.label_smoothing)

    def item_embeddings(self) -> torch.Tensor:
        return self.item_embedding.weight[: self.num_items].detach()
