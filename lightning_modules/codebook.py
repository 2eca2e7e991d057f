"""Alignment Tokenization (stage 2): cascaded codebooks over behaviour embeddings, aligned with the LLM.

Loss (the paper's eqs. 1-4; the equations were lost from the text, so the exact forms are ours)::

    L = behaviour_weight * sum_l D(sg(r_l), c_l)  +  llm_alignment_weight * L_llm  (+ reconstruction, RQ-VAE only)

* **Behaviour alignment**: ``r_1`` is the item's behaviour (DCCF) embedding, ``r_{l+1} = r_l - c_l``, ``c_l`` the
  code of level ``l`` nearest to ``r_l`` under ``D`` (cosine or squared l2). Only the codes receive
  gradients: the inputs are fixed embeddings, so RQ-VAE's commitment term has nothing to train.
* **LLM alignment**: for items with text, the prefix sums ``s_l = c_1 + ... + c_l`` (the item as seen after
  ``l`` levels) are mapped into the LLM input space by a learned linear map ``W`` (no bias) and pulled
  towards the item's LLM embedding ``e`` (mean LLM input embedding over its title + description tokens,
  centred by the catalogue mean)::

      L_llm = mean_items (1 / L) * sum_l (1 - cos(W s_l, e - mean(e)))

  Every level is thereby tied to the LLM semantic space ("each code layer is synchronised"), the coarse
  levels most strongly (they appear in every prefix). Centring removes the direction all mean-pooled
  embeddings share; otherwise ``W`` could match it with any input and the codes would learn nothing. Items
  without text are masked out. ``llm_alignment_weight: 0`` is the paper's "w/o LA" ablation and
  ``variant: rqvae`` its "ED" ablation (encoder/decoder + reconstruction, LC-Rec style).

Code assignment is always the nearest code (the LLM term moves codes, it never picks them), so inference for
new items needs only the codebook. K-means initialisation, collision logging and the index export are
callbacks (``callbacks.KMeansInit``, ``callbacks.CollisionLogger``, ``callbacks.CodeIndexExporter``).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.errors import require
from lightning_modules.base import check_dataset_fingerprint
from lightning_modules.components.code_assignment import last_level_costs
from lightning_modules.components.quantizer import RQVAE, Distance, Quantized, ResidualCodebook, paired_distance
from lightning_modules.optimizers import adamw

log = logging.getLogger(__name__)


class AlignmentTokenizer(L.LightningModule):
    """Cascaded codebooks trained with behaviour + LLM alignment losses.

    Args:
        num_levels: code levels ``L`` (4 in the paper).
        codebook_size: codes per level ``K`` (256 in the paper); at most the number of items.
        distance: ``l2`` (squared Euclidean) or ``cosine``, for choosing codes and for the behaviour loss.
        variant: ``residual`` (the paper: codes in the embedding space) or ``rqvae`` (the "ED" ablation).
        behaviour_weight: weight of the behaviour alignment loss.
        llm_alignment_weight: weight of the LLM alignment loss (0: "w/o LA"; > 0 needs item text and
            ``data.init_args.llm_path``).
        lr: Adam learning rate.
        weight_decay: AdamW weight decay (on the projection only; decaying codes would shrink them).
        rqvae_hidden_dims: RQ-VAE encoder widths.
        rqvae_latent_dim: RQ-VAE latent dimension.
        rqvae_beta: RQ-VAE commitment weight.
        reconstruction_weight: RQ-VAE reconstruction loss weight.
        collision_mapping: at the index export, ``sinkhorn`` first re-chooses the last code of items that share a
            tuple by LC-Rec's uniform semantic mapping (:mod:`.components.sinkhorn`), then ``make_unique`` resolves
            the rest; ``none`` leaves it all to ``make_unique``.
        sinkhorn_epsilon: Sinkhorn temperature on the centred last-level distances (LC-Rec: 0.003).
        sinkhorn_iterations: Sinkhorn-Knopp rounds (LC-Rec: 50).
    """

    def __init__(
        self,
        num_levels: int = 4,
        codebook_size: int = 256,
        distance: Distance = "l2",
        variant: Literal["residual", "rqvae"] = "residual",
        behaviour_weight: float = 1.0,
        llm_alignment_weight: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        rqvae_hidden_dims: list[int] | None = None,
        rqvae_latent_dim: int = 32,
        rqvae_beta: float = 0.25,
        reconstruction_weight: float = 1.0,
        collision_mapping: Literal["none", "sinkhorn"] = "none",
        sinkhorn_epsilon: float = 0.003,
        sinkhorn_iterations: int = 50,
    ) -> None:
        super().__init__()
        field = "model.init_args."
        require(num_levels >= 1, field + "num_levels", ">= 1 (the paper uses 4)", num_levels)
        require(codebook_size >= 2, field + "codebook_size", ">= 2 (one code cannot tell items apart)", codebook_size)
        require(behaviour_weight >= 0, field + "behaviour_weight", ">= 0", behaviour_weight)
        require(llm_alignment_weight >= 0, field + "llm_alignment_weight", ">= 0", llm_alignment_weight)
        require(lr > 0, field + "lr", "> 0", lr)
        require(
            collision_mapping in ("none", "sinkhorn"),
            field + "collision_mapping",
            "none or sinkhorn",
            collision_mapping,
        )
        require(sinkhorn_epsilon > 0, field + "sinkhorn_epsilon", "> 0 (LC-Rec: 0.003)", sinkhorn_epsilon)
        require(sinkhorn_iterations >= 1, field + "sinkhorn_iterations", ">= 1 (LC-Rec: 50)", sinkhorn_iterations)
        self.save_hyperparameters()
        self.quantizer: ResidualCodebook | None = None
        self.llm_projection: nn.Linear | None = None
        self.dims: dict[str, int] | None = None
        self.dataset_fingerprint: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------ building
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if getattr(datamodule, "item_embeddings", None) is None:
            raise RuntimeError("AlignmentTokenizer needs datamodules.ItemDataModule (item behaviour embeddings).")
        catalogue, hp = datamodule.catalogue, self.hparams
        if hp.codebook_size > catalogue.num_items:
            raise ValueError(
                f"codebook_size {hp.codebook_size} is larger than the number of items ({catalogue.num_items} in "
                f"{catalogue.name}): most codes could never be used. Set `model.init_args.codebook_size` <= "
                f"{catalogue.num_items}."
            )
        if hp.llm_alignment_weight > 0:  # also at predict: the checkpoint holds the LLM projection
            if datamodule.llm_dim == 0 or not bool(datamodule.has_text.any()):
                raise ValueError(
                    f"llm_alignment_weight={hp.llm_alignment_weight} needs LLM embeddings, but {catalogue.name} has "
                    "no item "
                    "text or `data.init_args.llm_path` is not set. Set llm_path to a local HF model directory, or set "
                    "`model.init_args.llm_alignment_weight: 0` (the paper's w/o LA)."
                )
        self.dims = {
            "embedding": int(datamodule.item_embeddings.shape[1]),
            "llm": datamodule.llm_dim if hp.llm_alignment_weight > 0 else 0,
        }
        self.dataset_fingerprint = catalogue.fingerprint()
        self._llm_mean = datamodule.llm_embeddings[datamodule.has_text].mean(0) if self.dims["llm"] else None
        self._input_scale = datamodule.item_embeddings.pow(2).sum(1).mean().rsqrt().clamp(max=1e8)

    def configure_model(self) -> None:
        if self.quantizer is not None:
            return
        if self.dims is None:
            raise RuntimeError("configure_model() before setup(): the embedding size is unknown.")
        hp, dim = self.hparams, self.dims["embedding"]
        if hp.variant == "rqvae":
            self.quantizer = RQVAE(
                dim,
                hp.num_levels,
                hp.codebook_size,
                hp.distance,
                tuple(hp.rqvae_hidden_dims or (128, 64)),
                hp.rqvae_latent_dim,
                hp.rqvae_beta,
                hp.reconstruction_weight,
            )
        elif hp.variant == "residual":
            self.quantizer = ResidualCodebook(dim, hp.num_levels, hp.codebook_size, hp.distance)
        else:
            raise ValueError(f"variant must be 'residual' or 'rqvae', got {hp.variant!r}")
        self.quantizer.input_scale.fill_(float(self._input_scale))  # a resumed checkpoint restores the same value
        if self.dims["llm"]:
            self.llm_projection = nn.Linear(self.quantizer.latent_dim, self.dims["llm"], bias=False)
            self.register_buffer("llm_mean", self._llm_mean.clone())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dataset_fingerprint"] = self.dataset_fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_dataset_fingerprint(
            checkpoint.get("dataset_fingerprint"), self.dataset_fingerprint, "codebook checkpoint"
        )

    # ---------------------------------------------------------------------------------------------- losses
    def llm_cost(self, prefix_sums: torch.Tensor, llm: torch.Tensor) -> torch.Tensor:
        """``1 - cos(W s, e - mean)`` for prefix sums ``[..., d]`` against LLM embeddings broadcastable to ``[..., "
        "D]``."""
        return 1 - F.cosine_similarity(self.llm_projection(prefix_sums), llm - self.llm_mean, dim=-1, eps=1e-8)

    def llm_loss(self, out: Quantized, llm: torch.Tensor, has_text: torch.Tensor) -> torch.Tensor:
        if not bool(has_text.any()):
            return out.chosen.sum() * 0.0  # keeps the graph (and DDP) happy on a batch without text
        prefix_sums = out.chosen[has_text].cumsum(1)  # [b, L, d]
        return self.llm_cost(prefix_sums, llm[has_text][:, None]).mean()

    def losses(self, batch: dict[str, torch.Tensor]) -> tuple[Quantized, dict[str, torch.Tensor]]:
        x = batch["embedding"]
        out = self.quantizer(x)
        losses = self.quantizer.loss(out, x)
        if self.llm_projection is not None:
            losses["llm_loss"] = self.llm_loss(out, batch["llm_embedding"], batch["has_text"])
        return out, losses

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        hp = self.hparams
        total = hp.behaviour_weight * losses["behaviour_loss"] + losses.get("reconstruction_loss", 0.0)
        return total + hp.llm_alignment_weight * losses["llm_loss"] if "llm_loss" in losses else total

    # ------------------------------------------------------------------------------------------ loop hooks
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # runs after the callbacks' hook of the same name, i.e. after KMeansInit had its chance
        if self.global_step == 0 and batch_idx == 0 and not bool(self.quantizer.initialised):
            log.warning(
                "codebooks are not initialised from data (add callbacks.KMeansInit); training starts from random codes"
            )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        _, losses = self.losses(batch)
        size = len(batch["item"])
        self.log_dict(
            {f"train/{name}": value.detach() for name, value in losses.items()}, batch_size=size, prog_bar=True
        )
        return self.total(losses)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        out, losses = self.losses(batch)
        size = len(batch["item"])
        self.log_dict({f"val/{name}": value for name, value in losses.items()}, batch_size=size)
        error = paired_distance(out.latent, out.quantized, self.hparams.distance).mean()
        self.log("val/quantization_error", error, batch_size=size)
        return {"item": batch["item"], "codes": out.codes}

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Raw (nearest-code) codes of the batch's items; ``CodeIndexExporter`` makes new items unique."""
        return {"item": batch["item"], "codes": self.quantizer(batch["embedding"]).codes}

    @torch.no_grad()
    def encode_items(self, embeddings: torch.Tensor, batch_size: int = 8192) -> Quantized:
        """Codes (and level inputs) of many items, in batches, without gradients."""
        outs = [
            self.quantizer(embeddings[i : i + batch_size].to(self.device))
            for i in range(0, len(embeddings), batch_size)
        ]

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(out, name).cpu() for out in outs])

        return Quantized(cat("codes"), cat("inputs"), cat("chosen"), cat("quantized"), cat("latent"))

    def last_level_cost(self, out: Quantized, llm: torch.Tensor | None = None, has_text: torch.Tensor | None = None):
        """``item indices -> [m, K]`` cost of each last-level code (see :func:`code_assignment.last_level_costs`)."""
        use_llm = self.llm_projection is not None and llm is not None and llm.shape[1] > 0
        return last_level_costs(
            out,
            self.quantizer.codebooks[-1].detach().cpu(),
            self.hparams.distance,
            self.hparams.behaviour_weight,
            projection=self.llm_projection.weight.detach().cpu() if use_llm else None,
            llm_target=(llm - self.llm_mean.cpu()) if use_llm else None,
            has_text=has_text,
            llm_weight=self.hparams.llm_alignment_weight,
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        decay = [] if self.llm_projection is None else list(self.llm_projection.parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in decay)]
        groups = [{"params": rest, "weight_decay": 0.0}] + (
            [{"params": decay, "weight_decay": self.hparams.weight_decay}] if decay else []
        )
        return adamw(self._trainer, groups, lr=self.hparams.lr)
