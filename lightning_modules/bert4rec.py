"""BERT4Rec (Sun et al., CIKM 2019): a bidirectional Transformer trained with the cloze objective.

Input length: the model has ``max_history + 1`` positions. Training sequences are a causal window's
``history`` with its last next-item target appended (up to ``max_history + 1`` training items); at prediction
the full ``max_history`` history is kept and a ``[MASK]`` token is appended in the extra slot, so the model
sees exactly the history SASRec sees and scores the catalogue at the ``[MASK]``.

Which items a training window may mask: a user's first causal window holds the user's whole (capped) training
sequence, so every item in it is maskable; each later window exists to supervise one more item (its last),
so only that item is maskable there. Every training interaction is thus a cloze target in exactly one window
per epoch, heavy users are not over-weighted, and nothing beyond ``items[:-2]`` is ever seen (the windows hold
training items only). With one prefix per row (``causal_windows: false``) every item of ``history + target``
is maskable instead.

Masks: each maskable item is replaced by ``[MASK]`` with probability ``mask_prob``; with probability
``last_mask_prob`` a row instead masks only its last item (the prediction-time pattern, as in the
original code's "mask last" instances); a row left with nothing masked masks its last item. The loss is
cross-entropy over the whole catalogue at the masked positions only (tied output embedding + bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.errors import require
from lightning_modules.base import IDRecommender
from lightning_modules.components.transformer import TransformerBlock, padding_aware_mask
from lightning_modules.sasrec import check_sequence_model


class BERT4Rec(IDRecommender):
    """Bidirectional self-attentive sequential recommender with a cloze objective.

    Args:
        hidden_size: item embedding and model width.
        num_layers: Transformer blocks.
        num_heads: attention heads.
        dropout: embedding, attention and residual dropout.
        max_history: history length at prediction (the DataModule's cap); the model has one more position.
        mask_prob: probability that a maskable training item is replaced by ``[MASK]``.
        last_mask_prob: probability that a training row masks only its last item (next-item pattern).
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
        dropout: float = 0.2,
        max_history: int = 20,
        mask_prob: float = 0.2,
        last_mask_prob: float = 0.2,
        label_smoothing: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        mask_history: bool = True,
        top_k: int = 20,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, mask_history=mask_history, top_k=top_k)
        check_sequence_model(hidden_size, num_layers, dropout, max_history, label_smoothing, num_heads)
        require(0.0 <= mask_prob <= 1.0, "model.init_args.mask_prob", "in [0, 1]", mask_prob)
        require(0.0 <= last_mask_prob <= 1.0, "model.init_args.last_mask_prob", "in [0, 1]", last_mask_prob)
        self.save_hyperparameters()

    @property
    def pad_token(self) -> int:
        return self.num_items

    @property
    def mask_token(self) -> int:
        return self.num_items + 1

    def build(self, num_items: int) -> None:
        hp = self.hparams
        self.item_embedding = nn.Embedding(num_items + 2, hp.hidden_size, padding_idx=num_items)
        self.position_embedding = nn.Embedding(hp.max_history + 1, hp.hidden_size)
        self.embedding_norm = nn.LayerNorm(hp.hidden_size)
        self.embedding_dropout = nn.Dropout(hp.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(hp.hidden_size, hp.num_heads, hp.dropout) for _ in range(hp.num_layers)
        )
        self.final_norm = nn.LayerNorm(hp.hidden_size)
        # BERT's prediction head: a transform before the tied output embedding
        self.head = nn.Sequential(nn.Linear(hp.hidden_size, hp.hidden_size), nn.GELU(), nn.LayerNorm(hp.hidden_size))
        self.output_bias = nn.Parameter(torch.zeros(num_items))
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[num_items].zero_()

    def encode_all(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bidirectional states ``[B, T, H]`` of left-padded tokens (items, pad, ``[MASK]``), ``T <= max_history + "
        "1``."""
        length = tokens.shape[1]
        positions_total = self.hparams.max_history + 1
        if length > positions_total:
            raise ValueError(
                f"sequence length {length} exceeds BERT4Rec's {positions_total} positions (max_history + 1)"
            )
        is_token = tokens != self.pad_token
        # right-aligned positions: the last slot (the [MASK] at prediction) always has the same position
        positions = torch.arange(positions_total - length, positions_total, device=tokens.device)
        x = self.embedding_norm(self.item_embedding(tokens) + self.position_embedding(positions)[None])
        x = self.embedding_dropout(x) * is_token[..., None]
        mask = padding_aware_mask(is_token, causal=False)
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Catalogue scores ``[N, num_items]`` of states ``[N, H]``."""
        return self.head(states) @ self.item_embedding.weight[: self.num_items].T + self.output_bias

    def prediction_input(self, history: torch.Tensor) -> torch.Tensor:
        """``history`` ``[B, T]`` with ``[MASK]`` appended: ``[B, T + 1]``."""
        return torch.cat([history, history.new_full((len(history), 1), self.mask_token)], dim=1)

    def score_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.logits(self.encode_all(self.prediction_input(batch["history"]))[:, -1])

    def training_sequence(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The training items ``[B, T + 1]`` of each row and which of them may be masked."""
        history, target = batch["history"], batch["target"]
        is_item = history != self.pad_token
        if target.dim() == 1:  # one prefix per row: history + target
            sequence = torch.cat([history, target[:, None]], dim=1)
            return sequence, sequence != self.pad_token
        # causal windows: the last position of a window is always supervised, so target[:, -1] is its last item
        sequence = torch.cat([history, target[:, -1:]], dim=1)
        supervised = target != -100
        # a user's first window supervises one target per history item; a later window, a full history and one target
        first_window = is_item.sum(1) == supervised.sum(1)
        maskable = torch.cat([is_item & first_window[:, None], torch.ones_like(first_window[:, None])], dim=1)
        return sequence, maskable

    def cloze_mask(self, maskable: torch.Tensor) -> torch.Tensor:
        """Boolean ``[B, T]``: the positions replaced by ``[MASK]`` (and supervised)."""
        hp = self.hparams
        masked = maskable & (torch.rand(maskable.shape, device=maskable.device) < hp.mask_prob)
        last_only = torch.rand(len(maskable), device=maskable.device) < hp.last_mask_prob
        masked = masked & ~last_only[:, None]
        # rows with nothing masked (short sequences, last-only rows) predict their last item
        masked[:, -1] |= ~masked.any(dim=1)
        return masked

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        sequence, maskable = self.training_sequence(batch)
        masked = self.cloze_mask(maskable)
        tokens = sequence.masked_fill(masked, self.mask_token)
        states = self.encode_all(tokens)[masked]
        return F.cross_entropy(self.logits(states), sequence[masked], label_smoothing=self.hparams.label_smoothing)

    def item_embeddings(self) -> torch.Tensor:
        return self.item_embedding.weight[: self.num_items].detach()
