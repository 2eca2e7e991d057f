"""Export the fine-tuned LLM recommender at the end of fit, and load such an export back.

The artifact directory::

    adapter/ or model/   peft adapter (LoRA on a pretrained ``model_path``: base weights stay where they are)
                         or full HF weights (full fine-tuning, or a model built from ``llama_config``, LoRA merged)
    tokenizer/           the tokenizer with the code tokens (and pad token) added
    index.json           the item -> code-token index the model was trained on (LC-Rec format)
    manifest.json        dataset name + hash, index source + hash, L, K, tokens per item, vocabulary size,
                         base model path / Llama config, training mode, LoRA settings, step, the decoding
                         settings (beams, K, renormalisation) and the prompt's history length

Written through :class:`datamodules.artifacts.ArtifactWriter` (staged beside ``output_dir``, renamed into place
whole, every file's hash in the manifest) and read back through :func:`datamodules.artifacts.read_artifact`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L

from datamodules.artifacts import ArtifactWriter, read_artifact

log = logging.getLogger(__name__)

KIND = "llm_recommender"


def export_llm(output_dir: str | Path, module: Any, datamodule: Any, global_step: int = 0) -> dict[str, Any]:
    """Write the export of a :class:`lightning_modules.GenerativeRecommender` (see the module docstring)."""
    hp, index, catalogue = module.hparams, datamodule.item_index, datamodule.catalogue
    with ArtifactWriter(output_dir, KIND) as writer:
        if hp.lora and hp.model_path is not None:
            weights = "adapter"
            module.model.save_pretrained(writer.path(weights))
        else:
            weights = "model"
            # merge on a copy: the live module keeps its LoRA layers for `test` after fit
            model = copy.deepcopy(module.model).merge_and_unload() if hp.lora else module.model
            model.save_pretrained(writer.path(weights))
        module.tokenizer.save_pretrained(writer.path("tokenizer"))
        writer.write_json("index.json", {str(item): tokens for item, tokens in enumerate(index.tokens())}, indent=None)
        lora = {
            "rank": hp.lora_rank,
            "alpha": hp.lora_alpha,
            "dropout": hp.lora_dropout,
            "target_modules": module.lora_target_modules,
        }
        manifest = writer.commit(
            {
                "dataset": catalogue.fingerprint(),
                "num_items": catalogue.num_items,
                "index_source": index.source,
                "index_hash": index.index_hash,
                "num_levels": index.num_levels,
                "codebook_size": index.codebook_size,
                "tokens_per_item": index.tokens_per_item,
                "code_tokens": len(module.code_token_ids),
                "vocab_size": len(module.tokenizer),
                "pad_token_added": module.pad_token_added,
                "base_model": hp.model_path,
                "llama_config": hp.llama_config,
                "mode": "lora" if hp.lora else "full_finetune",
                "lora": lora if hp.lora else None,
                "weights": weights,
                "global_step": int(global_step),
                # what the live path needs to rank exactly as the cache build does (lightning_modules.live)
                "decoding": {
                    "num_beams": module.decoding.num_beams,
                    "top_k": module.decoding.top_k,
                    "renormalize": module.decoding.renormalize,
                },
                "max_history": int(getattr(datamodule, "max_history", 20)),
            }
        )
    log.info("LLM recommender exported to %s (%s)", output_dir, weights)
    return manifest


def load_exported_llm(directory: str | Path, dtype: str = "auto") -> tuple[Any, Any, dict[str, Any]]:
    """Load ``(model, tokenizer, manifest)`` of a verified export; an adapter is applied to its resized base model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    manifest = read_artifact(directory, KIND, fix="export the LLM again (configs/*/llm.yaml with LLMExporter)").manifest
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
    if manifest["weights"] == "adapter":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(manifest["base_model"], dtype=dtype)
        base.resize_token_embeddings(manifest["vocab_size"])
        model = PeftModel.from_pretrained(base, directory / "adapter")
    else:
        model = AutoModelForCausalLM.from_pretrained(directory / "model", dtype=dtype)
    return model, tokenizer, manifest


@contextlib.contextmanager
def full_weights(trainer: L.Trainer, module: L.LightningModule) -> Iterator[None]:
    """Inside this context every parameter of ``module`` holds its full tensor on every rank.

    DeepSpeed ZeRO-3 keeps only a 1/world-size slice of each weight per rank (the rest are empty placeholders),
    so saving them as they are would write empty tensors. ``GatheredParameters`` all-gathers them for the
    duration of the block; every rank must enter it. Other strategies already hold full weights.
    """
    if not getattr(trainer.strategy, "zero_stage_3", False):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


class LLMExporter(L.Callback):
    """At the end of fit, export the adapter (or full weights), tokenizer, index and manifest atomically.

    Exports the weights training ended with, written by rank 0. Under DeepSpeed ZeRO-3 the weight shards are
    first gathered from all ranks (the whole model must then fit on one device for the export).

    Args:
        output_dir: the artifact directory (e.g. ``artifacts/industrial/llm``); replaced as a whole.
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.manifest: dict[str, Any] | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            log.warning("fit was interrupted; the LLM is not exported")
            return
        with full_weights(trainer, pl_module):
            if trainer.is_global_zero:
                self.manifest = export_llm(self.output_dir, pl_module, trainer.datamodule, trainer.global_step)
        trainer.strategy.barrier("llm_export")
