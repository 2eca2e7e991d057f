"""Export the item index (LC-Rec ``index.json``) at the end of fit, and extend it with new items (cold start).

The artifact directory (kind ``code_index``, written whole by :class:`datamodules.artifacts.ArtifactWriter`)::

    index.json        {"<item_idx>": ["<a_12>", "<b_3>", "<c_200>", "<d_7>"]}   collision-free
    code_vectors.pt   [L, K, dim] float32 code vectors: what stage 3 initialises code-token rows from
    codebook.pt       quantiser config + state, LLM projection: enough to code new items
    manifest.json     dataset fingerprint, L, K, distance, raw/final collision rates, config, embeddings source,
                      and the SHA-256 of every file above
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from callbacks.collisions import gather_codes
from datamodules.artifacts import ArtifactWriter, read_artifact
from datamodules.code_index import (
    CODE_VECTORS_FILE,
    CODEBOOK_FILE,
    INDEX_FILE,
    KIND,
    codes_to_tokens,
    collision_rate,
    index_json,
    shared_mask,
    tokens_to_codes,
)
from datamodules.items import check_embeddings, read_matrix
from lightning_modules.components.code_assignment import last_level_costs, make_unique, pair_costs
from lightning_modules.components.quantizer import build_quantizer

log = logging.getLogger(__name__)

RATES = ("raw_collision_rate", "final_collision_rate")


def export_code_index(output_dir: str | Path, pl_module: L.LightningModule, datamodule: Any) -> dict[str, Any]:
    """Code every catalogue item, resolve collisions and write the index artifact. Returns the manifest."""
    out = pl_module.encode_items(datamodule.item_embeddings)
    has_text = datamodule.has_text
    cost = pl_module.last_level_cost(out, datamodule.llm_embeddings, has_text)
    quantizer = pl_module.quantizer
    resolution = make_unique(out.codes, cost, quantizer.codebook_size)
    catalogue = datamodule.catalogue
    state = {
        "quantizer_config": quantizer.config(),
        "quantizer_state": {name: value.detach().cpu() for name, value in quantizer.state_dict().items()},
        "llm_projection": None if pl_module.llm_projection is None else pl_module.llm_projection.weight.detach().cpu(),
        "llm_mean": None if pl_module.llm_projection is None else pl_module.llm_mean.detach().cpu(),
        "behaviour_weight": float(pl_module.hparams.behaviour_weight),
        "llm_alignment_weight": float(pl_module.hparams.llm_alignment_weight),
    }
    with ArtifactWriter(output_dir, KIND) as writer:
        writer.save_torch(CODEBOOK_FILE, state)
        writer.save_torch(CODE_VECTORS_FILE, quantizer.codebooks.detach().cpu().float().contiguous())
        writer.write_json(INDEX_FILE, index_json(resolution.codes), indent=None)
        manifest = writer.commit(
            {
                "dataset": catalogue.fingerprint(),
                "num_items": catalogue.num_items,
                "num_levels": quantizer.num_levels,
                "codebook_size": quantizer.codebook_size,
                "tokens_per_item": int(resolution.codes.shape[1]),
                "code_vectors": CODE_VECTORS_FILE,
                "distance": quantizer.distance,
                "variant": quantizer.config()["variant"],
                "raw_collision_rate": resolution.raw_collision_rate,
                "final_collision_rate": resolution.final_collision_rate,
                "reassigned_items": resolution.reassigned,
                "extra_level_items": resolution.extra_level,
                "items_with_text": int(has_text.sum()),
                "config": dict(pl_module.hparams),
                "embeddings": getattr(datamodule, "embedding_source", {}),
                "llm_path": getattr(datamodule, "llm_path", None),
                "cold_start": [],
            }
        )
    log.info(
        "index of %d items written to %s: raw collision rate %.4f%%, %d re-assigned, %d on an extra level, final "
        "%.1f%%",
        catalogue.num_items,
        output_dir,
        100 * resolution.raw_collision_rate,
        resolution.reassigned,
        resolution.extra_level,
        100 * resolution.final_collision_rate,
    )
    return manifest


def load_code_index(codebook_dir: str | Path) -> dict[str, list[str]]:
    """``index.json`` of a verified ``code_index`` artifact (kind and file hashes checked)."""
    artifact = read_artifact(codebook_dir, KIND)
    return json.loads(artifact.file(INDEX_FILE).read_text(encoding="utf-8"))


def assign_codes(
    codebook_dir: str | Path,
    embeddings: torch.Tensor | np.ndarray | str | Path,
    llm_embeddings: torch.Tensor | np.ndarray | None = None,
    output_dir: str | Path | None = None,
    raw_codes: torch.Tensor | None = None,
) -> dict[str, list[str]]:
    """Give new items codes from their behaviour embeddings, unique against the existing index, no retraining.

    New items get ids ``N .. N + M - 1`` after the ``N`` indexed ones. Each takes its nearest codes; a new item
    whose tuple is taken (by an existing item or a closer new one) is moved to a free last-level code of its
    prefix, exactly as at export. Existing items never change. The extended ``index.json`` and an updated
    manifest (``num_items``, a ``cold_start`` record) are written as a new complete artifact to ``output_dir``
    (default: in place, replacing the old artifact whole once the new one is written).

    Args:
        codebook_dir: a ``CodeIndexExporter`` directory.
        embeddings: ``[M, dim]`` behaviour embeddings of the new items (tensor, array or .pt/.npy path).
        llm_embeddings: optional ``[M, D]`` LLM embeddings (zero rows: no text); when the codebook was trained
            with LLM alignment they join the cost of re-assigning colliding items, as in training.
        output_dir: where to write the extended export (default: ``codebook_dir``).
        raw_codes: the new items' nearest codes if already computed (``lightning predict``).

    Returns:
        The extended index ``{"<item_idx>": [tokens]}`` (existing and new items).
    """
    directory, out_dir = Path(codebook_dir), Path(output_dir or codebook_dir)
    artifact = read_artifact(directory, KIND)
    manifest = dict(artifact.manifest)
    index = json.loads(artifact.file(INDEX_FILE).read_text(encoding="utf-8"))
    state = torch.load(artifact.file(CODEBOOK_FILE), map_location="cpu", weights_only=True)
    quantizer = build_quantizer(**state["quantizer_config"])
    quantizer.load_state_dict(state["quantizer_state"])
    quantizer.eval()
    if isinstance(embeddings, (str, Path)):
        embeddings = read_matrix(Path(embeddings))
    embeddings = check_embeddings(torch.as_tensor(embeddings), None, "new item embeddings")
    expected_dim = state["quantizer_config"]["dim"]
    if embeddings.shape[1] != expected_dim:
        raise ValueError(
            f"new item embeddings have dim {embeddings.shape[1]}, the codebook was trained on dim {expected_dim}"
        )
    digest = hashlib.sha256(embeddings.numpy().tobytes()).hexdigest()
    for record in manifest.get("cold_start", []):
        if record["embeddings_sha256"] == digest:
            raise ValueError(
                f"these embeddings were already added as items {record['first_item']}..{record['last_item']} of "
                f"{directory}"
            )
    items, existing = tokens_to_codes(index)
    n, m, levels = len(items), embeddings.shape[0], quantizer.num_levels
    if not torch.equal(items, torch.arange(n)):
        raise ValueError(f"{directory / 'index.json'}: item ids must be 0..{n - 1}")
    with torch.no_grad():
        new = quantizer(embeddings)
    if raw_codes is not None and not torch.equal(raw_codes.cpu(), new.codes):
        raise ValueError(
            "predicted codes differ from the exported codebook's: predict with the checkpoint that was exported"
        )
    use_llm = llm_embeddings is not None and state["llm_projection"] is not None
    llm = torch.as_tensor(llm_embeddings).float() if use_llm else None
    new_cost = last_level_costs(
        new,
        quantizer.codebooks[-1].detach(),
        quantizer.distance,
        state["behaviour_weight"],
        projection=state["llm_projection"] if use_llm else None,
        llm_target=(llm - state["llm_mean"]) if use_llm else None,
        has_text=(llm.abs().sum(1) > 0) if use_llm else None,
        llm_weight=state["llm_alignment_weight"],
    )
    codes = torch.cat([existing[:, :levels], new.codes])
    fixed = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(m, dtype=torch.bool)])
    fixed_extra = (
        torch.cat([existing[:, levels], torch.zeros(m, dtype=torch.long)]) if existing.shape[1] > levels else None
    )
    raw_rate = float(shared_mask(codes)[n:].float().mean()) if m else 0.0
    pair_cost = pair_costs(new, quantizer.codebooks[-2:].detach(), quantizer.distance) if levels >= 2 else None
    resolution = make_unique(
        codes,
        lambda rows: new_cost(rows - n),
        quantizer.codebook_size,
        fixed,
        fixed_extra,
        pair_cost=(lambda rows: pair_cost(rows - n)) if pair_cost else None,
    )
    extended = dict(index)
    extended.update({str(n + row): tokens for row, tokens in enumerate(codes_to_tokens(resolution.codes[n:]))})
    manifest.pop("files")
    manifest["num_items"] = n + m
    manifest["final_collision_rate"] = collision_rate(resolution.codes)
    manifest["cold_start"] = [
        *manifest.get("cold_start", []),
        {
            "first_item": n,
            "last_item": n + m - 1,
            "count": m,
            "embeddings_sha256": digest,
            "raw_collision_rate": raw_rate,
            "reassigned_items": resolution.reassigned,
        },
    ]
    with ArtifactWriter(out_dir, KIND) as writer:  # a new complete artifact, swapped in whole (also in place)
        writer.copy(CODEBOOK_FILE, artifact.file(CODEBOOK_FILE))
        writer.copy(CODE_VECTORS_FILE, artifact.file(CODE_VECTORS_FILE))
        writer.write_json(INDEX_FILE, extended, indent=None)
        writer.commit(manifest)
    log.info(
        "cold start: %d new items coded into %s (%.2f%% collided raw, %d re-assigned)",
        m,
        out_dir,
        100 * raw_rate,
        resolution.reassigned,
    )
    return extended


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
            codes = codes[torch.argsort(items)]
            self.extended = assign_codes(
                self.output_dir, datamodule.cold_start, output_dir=self.predict_output_dir, raw_codes=codes
            )
        trainer.strategy.barrier("cold_start_export")
