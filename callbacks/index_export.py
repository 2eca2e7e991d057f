"""Export the item index (LC-Rec ``index.json``) at the end of fit, and extend it with new items (cold start).

The artifact directory (kind ``code_index``, written whole by :class:`datamodules.artifacts.ArtifactWriter`)::

    index.json        {"<item_idx>": ["<a_12>", "<b_3>", "<c_200>", "<d_7>"]}   collision-free
    code_vectors.pt   [L, K, dim] float32 code vectors: what stage 3 initialises code-token rows from
    codebook.pt       quantiser config + state, LLM projection: enough to code new items
    manifest.json     dataset fingerprint, L, K, distance, raw/final collision rates, config, embeddings source,
                      and the SHA-256 of every file above
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch

from callbacks.cold_start import assign_codes, code_against
from callbacks.collisions import gather_codes
from datamodules.artifacts import ArtifactWriter, read_artifact
from datamodules.code_index import CODE_VECTORS_FILE, CODEBOOK_FILE, INDEX_FILE, KIND, collision_rate, index_json
from datamodules.llm_embeddings import model_fingerprint
from lightning_modules.components.code_assignment import make_unique
from lightning_modules.components.quantizer import Quantized
from lightning_modules.components.sinkhorn import spread_collisions

log = logging.getLogger(__name__)

RATES = ("raw_collision_rate", "final_collision_rate")


def _take(out: Quantized, rows: torch.Tensor) -> Quantized:
    return Quantized(*(getattr(out, name)[rows] for name in ("codes", "inputs", "chosen", "quantized", "latent")))


def codebook_state(pl_module: L.LightningModule, datamodule: Any) -> dict[str, Any]:
    """What ``codebook.pt`` holds: the quantiser, the LLM cost terms and the text grounding (cold start needs all)."""
    quantizer, grounding = pl_module.quantizer, getattr(datamodule, "grounding", None)
    return {
        "quantizer_config": quantizer.config(),
        "quantizer_state": {name: value.detach().cpu() for name, value in quantizer.state_dict().items()},
        "llm_projection": None if pl_module.llm_projection is None else pl_module.llm_projection.weight.detach().cpu(),
        "llm_mean": None if pl_module.llm_projection is None else pl_module.llm_mean.detach().cpu(),
        "behaviour_weight": float(pl_module.hparams.behaviour_weight),
        "llm_alignment_weight": float(pl_module.hparams.llm_alignment_weight),
        "text_grounding": None if grounding is None else grounding.state_dict(),
    }


def export_code_index(output_dir: str | Path, pl_module: L.LightningModule, datamodule: Any) -> dict[str, Any]:
    """Code every catalogue item, resolve collisions and write the index artifact. Returns the manifest.

    Held-out items (the cold-start protocol's ``cold_items``) are coded after the trained ones, by cold start:
    the trained items' tuples are resolved among themselves first and never move for them.
    """
    out = pl_module.encode_items(datamodule.item_embeddings)
    has_text, llm = datamodule.has_text, datamodule.llm_embeddings
    held_out = getattr(datamodule, "held_out", torch.zeros(len(out.codes), dtype=torch.bool))
    trained, cold = torch.nonzero(~held_out).flatten(), torch.nonzero(held_out).flatten()
    quantizer, catalogue = pl_module.quantizer, datamodule.catalogue
    cost = pl_module.last_level_cost(_take(out, trained), llm[trained], has_text[trained])
    hp, raw = pl_module.hparams, out.codes[trained]
    mapping = hp.get("collision_mapping", "none")  # checkpoints from before the option: none
    mapped, spread = raw, 0
    if mapping == "sinkhorn":  # LC-Rec's uniform semantic mapping first, make_unique for what still collides
        mapped, spread = spread_collisions(raw, cost, hp.sinkhorn_epsilon, hp.sinkhorn_iterations)
    resolution = make_unique(mapped, cost, quantizer.codebook_size)
    state = codebook_state(pl_module, datamodule)
    codes = torch.zeros(len(out.codes), resolution.codes.shape[1], dtype=torch.long)
    codes[trained] = resolution.codes
    cold_records = []
    if len(cold):
        text_llm = llm[cold] if llm.shape[1] else None
        cold_codes, cold_rate, moved = code_against(
            resolution.codes, _take(out, cold), out.codes[cold], quantizer.cpu(), state, text_llm
        )
        codes[cold] = cold_codes
        source = "text" if getattr(datamodule, "grounding", None) is not None else "behaviour"
        cold_records.append(
            {"items": cold.tolist(), "count": len(cold), "input": source, "source": "cold_items"}
            | {"raw_collision_rate": cold_rate, "reassigned_items": moved}
        )
    grounding = getattr(datamodule, "grounding", None)
    with ArtifactWriter(output_dir, KIND) as writer:
        writer.save_torch(CODEBOOK_FILE, state)
        writer.save_torch(CODE_VECTORS_FILE, quantizer.codebooks.detach().cpu().float().contiguous())
        writer.write_json(INDEX_FILE, index_json(codes), indent=None)
        manifest = writer.commit(
            {
                "dataset": catalogue.fingerprint(),
                "num_items": catalogue.num_items,
                "num_levels": quantizer.num_levels,
                "codebook_size": quantizer.codebook_size,
                "tokens_per_item": int(codes.shape[1]),
                "code_vectors": CODE_VECTORS_FILE,
                "distance": quantizer.distance,
                "variant": quantizer.config()["variant"],
                "raw_collision_rate": collision_rate(raw),
                "collision_mapping": mapping,
                "mapped_collision_rate": resolution.raw_collision_rate,
                "sinkhorn_moved_items": spread,
                "final_collision_rate": collision_rate(codes),
                "reassigned_items": resolution.reassigned,
                "extra_level_items": resolution.extra_level,
                "items_with_text": int(has_text.sum()),
                "text_grounding": None
                if grounding is None
                else {
                    **asdict(grounding.spec),
                    "text_dim": grounding.text_dim,
                    "fingerprint": grounding.fingerprint(),
                    "llm_fingerprint": grounding.llm_fingerprint,
                },
                "config": dict(pl_module.hparams),
                "embeddings": getattr(datamodule, "embedding_source", {}),
                "llm_path": getattr(datamodule, "llm_path", None),
                "cold_start": cold_records,
            }
        )
    log.info(
        "index of %d items written to %s: raw collision rate %.4f%% (%d trained items), %.4f%% after collision "
        "mapping %s, %d re-assigned, %d on an extra level, %d held-out items coded by cold start, final %.1f%%",
        catalogue.num_items,
        output_dir,
        100 * manifest["raw_collision_rate"],
        len(trained),
        100 * resolution.raw_collision_rate,
        mapping,
        resolution.reassigned,
        resolution.extra_level,
        len(cold),
        100 * manifest["final_collision_rate"],
    )
    return manifest


def load_code_index(codebook_dir: str | Path) -> dict[str, list[str]]:
    """``index.json`` of a verified ``code_index`` artifact (kind and file hashes checked)."""
    artifact = read_artifact(codebook_dir, KIND)
    return json.loads(artifact.file(INDEX_FILE).read_text(encoding="utf-8"))


class CodeIndexExporter(L.Callback):
    """At the end of fit, write the collision-free index of every catalogue item (see the module docstring).

    Collisions are resolved by :func:`lightning_modules.components.code_assignment.make_unique`; the manifest
    reports the raw and final collision rates. The index uses the weights at the end of fit.

    During ``lightning predict`` with ``data.init_args.cold_start_embeddings``, the predicted codes of the new
    items are made unique against the exported index and the extended index is written (:func:`assign_codes`).

    Args:
        output_dir: the artifact directory (e.g. ``artifacts/games/codebook``).
        predict_output_dir: where ``predict`` writes the extended index (default: ``output_dir``, in place).
    """

    def __init__(self, output_dir: str, predict_output_dir: str | None = None) -> None:
        self.output_dir = output_dir
        self.predict_output_dir = predict_output_dir
        self.manifest: dict[str, Any] | None = None
        self._predictions: list[dict[str, torch.Tensor]] = []

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            log.warning("fit was interrupted; the code index is not exported")
            return
        if trainer.is_global_zero:  # no collective inside: the other ranks wait at the barrier below
            self.manifest = export_code_index(self.output_dir, pl_module, trainer.datamodule)
            rates = {f"export/{key}": float(self.manifest[key]) for key in RATES}
            for logger in trainer.loggers:
                logger.log_metrics(rates, step=trainer.global_step)
        trainer.strategy.barrier("code_index_export")

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._predictions = []

    def on_predict_batch_end(
        self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._predictions.append({key: value.detach().cpu() for key, value in outputs.items()})

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if getattr(datamodule, "cold_start", None) is None or not self._predictions:
            log.info("predict coded catalogue items only; set data.init_args.cold_start_embeddings to extend the index")
            return
        items = torch.cat([batch["item"] for batch in self._predictions])
        codes = torch.cat([batch["codes"] for batch in self._predictions])
        items, codes = gather_codes(pl_module, items, codes)
        if trainer.global_rank == 0:
            new = datamodule.cold_start
            self.extended = assign_codes(
                self.output_dir,
                embeddings=new.embeddings,
                texts=new.texts if new.text_features is None else None,
                text_features=new.text_features,
                output_dir=self.predict_output_dir,
                # codes from text are recomputed from the export's stored grounding (the authority); behaviour-only
                # inputs must give the codes the checkpoint predicted
                raw_codes=codes[torch.argsort(items)] if new.texts is None else None,
                first_id=new.first_id,
                text_model=None if new.text_features is None else model_fingerprint(datamodule.llm_path),
            )
        trainer.strategy.barrier("cold_start_export")
