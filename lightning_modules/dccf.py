"""DCCF (Ren et al., SIGIR 2023): disentangled contrastive collaborative filtering on the user-item graph.

The paper's item embeddings come from this model, trained on behaviour only (the training interactions of the
leave-last-out split). Loss, as published: BPR with sampled negatives + ``ssl_weight`` x InfoNCE between the GNN
view and each other view (intent, both adaptive views) of the batch's users and items, per layer, + L2 on the
batch's initial embeddings (``emb_reg``, a sum over the batch as in the official code) + L2 on the intent
prototypes (``intent_reg``). Evaluation ranks the full catalogue with the final propagated embeddings, which are
computed once per evaluation epoch.

History fold-in (``history_weight > 0``, off by default = the published model): the graph holds only
``items[:-2]``, so at test time the user's vector knows nothing of the validation item, and at both stages it is
an order-free bag. Scoring adds the recency-weighted final embeddings of the last ``history_items`` items of the
evaluation history (weights ``history_decay ** age``, the most recent item 1) to the user's vector, the same
input a sequential model reads. No graph edge or parameter changes, so the embeddings exported to the tokenizer
are unaffected; tune the three values on validation (configs/games/dccf.yaml lists the grid).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from datamodules.graph import GraphDataModule
from lightning_modules.base import IDRecommender
from lightning_modules.components.dccf import AugmentNorm, DCCFEncoder

VIEWS = ("intent", "gnn_aug", "intent_aug")  # contrasted with the GNN view


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean InfoNCE of row-aligned views; the other rows of ``positive`` are the negatives."""
    # scaling the [n, dim] anchor instead of the [n, n] logits: same result, n / dim times fewer divisions
    logits = (F.normalize(anchor, dim=1) / temperature) @ F.normalize(positive, dim=1).T
    return F.cross_entropy(logits, torch.arange(len(anchor), device=anchor.device))


class DCCF(IDRecommender):
    """Disentangled Contrastive Collaborative Filtering. Needs :class:`datamodules.GraphDataModule`.

    Args:
        embedding_dim: embedding size (32 in the paper; the tokenizer consumes these vectors).
        num_layers: propagation layers.
        num_intents: intent prototypes per side (users, items).
        temperature: InfoNCE temperature.
        ssl_weight: weight of the contrastive loss.
        emb_reg: weight of the squared L2 norm of the batch's initial embeddings (summed over the batch).
        intent_reg: weight of the squared L2 norm of the intent prototypes.
        augment_norm: normalisation of the adaptive views' edge weights: ``row`` (``D^-1``, the official code)
            or ``symmetric`` (``D^-1/2 . D^-1/2``, like the plain adjacency).
        lr: Adam learning rate.
        weight_decay: AdamW weight decay (0: plain Adam as published; regularisation is ``emb_reg``).
        mask_history: exclude already-seen items at evaluation.
        top_k: length of predicted lists.
        history_weight: weight of the folded-in evaluation history at scoring (0: plain DCCF).
        history_items: how many of the most recent history items are folded in.
        history_decay: weight ratio between an item and the next more recent one.
    """

    def __init__(
        self,
        embedding_dim: int = 32,
        num_layers: int = 2,
        num_intents: int = 128,
        temperature: float = 1.0,
        ssl_weight: float = 0.1,
        emb_reg: float = 2.5e-5,
        intent_reg: float = 5e-3,
        augment_norm: AugmentNorm = "row",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        mask_history: bool = True,
        top_k: int = 20,
        history_weight: float = 0.0,
        history_items: int = 3,
        history_decay: float = 0.5,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, mask_history=mask_history, top_k=top_k)
        if history_weight < 0 or history_items < 1 or not 0 < history_decay <= 1:
            raise ValueError(
                f"history fold-in needs history_weight >= 0, history_items >= 1 and 0 < history_decay <= 1; got "
                f"{history_weight}, {history_items}, {history_decay}"
            )
        self.save_hyperparameters()
        self.adjacency: torch.Tensor | None = None
        self.num_users: int | None = None
        self._eval_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def attach_data(self, datamodule: Any) -> None:
        if not isinstance(datamodule, GraphDataModule):
            raise TypeError(
                f"DCCF trains on the user-item graph, but the datamodule is {type(datamodule).__name__}. "
                "Set `data.class_path: datamodules.GraphDataModule` (see configs/games/dccf.yaml)."
            )
        self.adjacency = datamodule.adjacency
        self.num_users = datamodule.catalogue.num_users

    def build(self, num_items: int) -> None:
        if self.adjacency is None:
            raise RuntimeError("DCCF.build() before attach_data(): the training graph is unknown.")
        hp = self.hparams
        self.encoder = DCCFEncoder(
            self.adjacency, self.num_users, num_items, hp.embedding_dim, hp.num_layers, hp.num_intents, hp.augment_norm
        )

    # ---------------------------------------------------------------------------------------- training
    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hp, encoder = self.hparams, self.encoder
        users, positives, negatives = batch["user"], batch["target"], batch["negative"]
        final, views = encoder()
        final_users, final_items = encoder.split(final)

        user_vectors = final_users[users]
        pos_scores = (user_vectors * final_items[positives]).sum(-1)
        neg_scores = (user_vectors[:, None] * final_items[negatives]).sum(-1)  # [B, num_negatives]
        bpr = F.softplus(neg_scores - pos_scores[:, None]).mean()

        emb_l2 = (
            encoder.user_embedding(users).square().sum()
            + encoder.item_embedding(positives).square().sum()
            + encoder.item_embedding(negatives).square().sum()
        )
        intent_l2 = encoder.user_intent.prototypes.square().sum() + encoder.item_intent.prototypes.square().sum()
        ssl = self.contrastive_loss(views, users.unique(), positives.unique())

        loss = bpr + hp.emb_reg * emb_l2 + hp.intent_reg * intent_l2 + hp.ssl_weight * ssl
        parts = {"train/bpr": bpr, "train/ssl": ssl, "train/emb_l2": emb_l2, "train/intent_l2": intent_l2}
        self.log_dict(parts, batch_size=len(users))
        return loss

    def contrastive_loss(
        self, views: list[dict[str, torch.Tensor]], users: torch.Tensor, items: torch.Tensor
    ) -> torch.Tensor:
        """Sum over layers and over (intent, both adaptive views) of InfoNCE against the GNN view, users and items."""
        # one gather per view and layer: each gather's backward allocates a [U+I, dim] zero gradient
        nodes = torch.cat([users, items + self.num_users])
        sides = (slice(0, len(users)), slice(len(users), None))
        loss = torch.zeros((), device=users.device)
        for layer in views:
            anchor = layer["gnn"][nodes]
            for view in VIEWS:
                other = layer[view][nodes]
                loss = loss + sum(info_nce(anchor[side], other[side], self.hparams.temperature) for side in sides)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._eval_cache = None  # weights are about to change

    # -------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (users ``[U, dim]``, items ``[I, dim]``) embeddings, propagated over the training graph."""
        final, _ = self.encoder()
        return self.encoder.split(final)

    def _refresh_cache(self) -> None:
        self._eval_cache = self.propagate()

    # propagate once per evaluation epoch, not per batch
    on_validation_epoch_start = on_test_epoch_start = on_predict_epoch_start = _refresh_cache

    def score_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._eval_cache is None:
            self._refresh_cache()
        users, items = self._eval_cache
        user_vectors = users[batch["user"]]
        if self.hparams.history_weight > 0:
            user_vectors = user_vectors + self.hparams.history_weight * self.fold_in(batch["history"], items)
        return user_vectors @ items.T

    def fold_in(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Recency-weighted sum ``[B, dim]`` of the last ``history_items`` items of left-padded ``history``."""
        hp = self.hparams
        recent = history[:, -hp.history_items :]
        ages = torch.arange(recent.shape[1] - 1, -1, -1, device=recent.device)
        weights = (hp.history_decay**ages).to(items.dtype) * (recent != self.num_items)  # padding = num_items
        return torch.einsum("bm,bmd->bd", weights, items[recent.clamp(max=self.num_items - 1)])

    def item_embeddings(self) -> torch.Tensor:
        return self.propagate()[1].detach()
