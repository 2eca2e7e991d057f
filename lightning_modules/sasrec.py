"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over the item history.

Trained with cross-entropy over the whole catalogue at the last position of every leave-last-out prefix
(the sampled-BCE loss of the original paper underperforms full softmax, see Klenitskiy & Vasilev 2023),
evaluated by full ranking with the user's history masked out (configurable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.errors import require
from lightning_modules.base import IDRecommender
from lightning_modules.components.transformer import TransformerBlock, padding_aware_mask


def check_sequence_model(
    hidden_size: int,
    num_layers: int,
    dropout: float,
    max_history: int,
    label_smoothing: float,
    num_heads: int | None = None,
) -> None:
    """Refuse the sequence models' (SASRec, BERT4Rec, FMLP-Rec) out-of-range settings, naming the field.

    Args:
        hidden_size: model width (> 0; a multiple of ``num_heads``).
        num_layers: blocks (>= 1).
        dropout: dropout probability (in [0, 1)).
        max_history: history length (>= 1).
        label_smoothing: cross-entropy label smoothing (in [0, 1)).
        num_heads: attention heads (>= 1), None for models without attention.
    """
    field = "model.init_args."
    require(hidden_size > 0, field + "hidden_size", "> 0", hidden_size)
    require(num_layers >= 1, field + "num_layers", ">= 1", num_layers)
    require(0 <= dropout < 1, field + "dropout", "in [0, 1)", dropout)
    require(max_history >= 1, field + "max_history", ">= 1", max_history)
    require(0 <= label_smoothing < 1, field + "label_smoothing", "in [0, 1)", label_smoothing)
    if num_heads is not None:
        require(num_heads >= 1, field + "num_heads", ">= 1", num_heads)
        multiple = f"a multiple of num_heads={num_heads}"
        require(hidden_size % num_heads == 0, field + "hidden_size", multiple, hidden_size)


class SASRec(IDRecommender):
    """Self-attentive sequential recommender.

    Args:
        hidden_size: item embedding and model width.
        num_layers: Transformer blocks.
        num_heads: attention heads.
        dropout: embedding, attention and residual dropout.
        max_history: longest history the position embeddings cover (the DataModule's cap).
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
        num_heads: int = 2,
        dropout: float = 0.3,
        max_history: int = 20,
        label_smoothing: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        mask_history: bool = True,
        top_k: int = 20,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, mask_history=mask_history, top_k=top_k)
        check_sequence_model(hidden_size, num_layers, dropout, max_history, label_smoothing, num_heads)
        self.save_hyperparameters()

    def build(self, num_items: int) -> None:
        hp = self.hparams
        self.item_embedding = nn.Embedding(num_items + 1, hp.hidden_size, padding_idx=num_items)
        self.position_embedding = nn.Embedding(hp.max_history, hp.hidden_size)
        self.embedding_dropout = nn.Dropout(hp.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(hp.hidden_size, hp.num_heads, hp.dropout) for _ in range(hp.num_layers)
        )
        self.final_norm = nn.LayerNorm(hp.hidden_size)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[num_items].zero_()

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """User representation ``[B, H]`` from the left-padded history ``[B, T]`` (output at the last position)."""
        return self.encode_all(history)[:, -1]

    def encode_all(self, history: torch.Tensor) -> torch.Tensor:
        """Causal representations ``[B, T, H]``: position t summarises the history up to and including t."""
        is_item = history != self.num_items
        length = history.shape[1]
        if length > self.hparams.max_history:
            raise ValueError(f"history length {length} exceeds SASRec max_history {self.hparams.max_history}")
        positions = torch.arange(self.hparams.max_history - length, self.hparams.max_history, device=history.device)
        x = self.item_embedding(history) * self.hparams.hidden_size**0.5 + self.position_embedding(positions)[None]
        x = self.embedding_dropout(x) * is_item[..., None]
        mask = padding_aware_mask(is_item, causal=True)
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x)

    def score_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encode(batch["history"]) @ self.item_embedding.weight[: self.num_items].T

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        target = batch["target"]
        if target.dim() == 1:  # one prefix per row
            return F.cross_entropy(self.score_items(batch), target, label_smoothing=self.hparams.label_smoothing)
        # causal windows: every supervised position at once (only those rows reach the catalogue-wide softmax)
        supervised = target != -100
        states = self.encode_all(batch["history"])[supervised]
        logits = states @ self.item_embedding.weight[: self.num_items].T
        return F.cross_entropy(logits, target[supervised], label_smoothing=self.hparams.label_smoothing)

    def item_embeddings(self) -> torch.Tensor:
        return self.item_embedding.weight[: self.num_items].detach()
