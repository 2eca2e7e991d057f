"""Encoder-decoder generative recommenders (T5): TIGER and P5 on one base.

:class:`Seq2SeqRecommender` owns what every encoder-decoder baseline shares: a ``T5ForConditionalGeneration``
built from a ``T5Config`` in code (or loaded from a local ``model_path``), teacher-forced cross-entropy on the next
item's code tokens plus EOS, and evaluation by the project's trie-constrained beam search over the decoder
(:mod:`lightning_modules.components.seq2seq_decoding`: the same trie processor, generation config and distinct-item
ranking as stage 3). Validation logs ``val/hr@10`` etc. from the module; ``test_step`` returns a ranked
:class:`BeamBatchResult` for :class:`callbacks.BeamSearchEvaluator`, so its rows compare with stage 3's.

The datamodule supplies the token layout: ``vocabulary`` (``size``, ``pad_token_id``, ``eos_token_id``) and
``item_token_ids()`` (``[num_items, T]`` decoder tokens of every item), as
:class:`datamodules.semantic_ids.SemanticIdDataModule` (TIGER) and :class:`datamodules.p5_prompts.P5DataModule` (P5)
do.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from datamodules.errors import ConfigError, require
from lightning_modules.base import BeamRanker, check_dataset_fingerprint
from lightning_modules.components.decoding import BeamBatchResult, DecodingConfig
from lightning_modules.components.seq2seq_decoding import encoder_decoder_eval_batch
from lightning_modules.components.trie import CodeTrie
from lightning_modules.metrics import TopKMetrics
from lightning_modules.optimizers import adamw
from lightning_modules.schedules import warmup_cosine

log = logging.getLogger(__name__)

#: TIGER's architecture (Rajput et al., 2023, section 4.1): 4 encoder and 4 decoder layers, 6 heads of 64, MLP 1024,
#: model width 128, dropout 0.1.
TIGER_T5 = {
    "d_model": 128,
    "d_kv": 64,
    "d_ff": 1024,
    "num_layers": 4,
    "num_decoder_layers": 4,
    "num_heads": 6,
    "dropout_rate": 0.1,
    "feed_forward_proj": "relu",
}

#: t5-small, P5-small's backbone (Geng et al., 2022, implementation details; Raffel et al., 2020): 6 encoder and 6
#: decoder layers, 8 heads of 64, model width 512, MLP 2048, ReLU, dropout 0.1.
T5_SMALL = {
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_decoder_layers": 6,
    "num_heads": 8,
    "dropout_rate": 0.1,
    "feed_forward_proj": "relu",
}


class Seq2SeqRecommender(BeamRanker, L.LightningModule):
    """A T5 encoder-decoder that names the next item by its code tokens (see the module docstring).

    Args:
        model_path: local Hugging Face T5 directory whose vocabulary covers the datamodule's; exclusive with
            ``t5_config``.
        t5_config: ``transformers.T5Config`` fields over the class defaults (vocabulary and special tokens are
            set from the datamodule).
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay (matrices only).
        warmup_steps: linear warm-up steps, then cosine decay to 0 at the end of the run.
        num_beams: beam width of constrained decoding.
        eval_top_k: items returned per user (at least 10 for HR@10, at most ``num_beams``).
        mask_history: never recommend items the user already interacted with (excluded inside the search).
    """

    #: T5Config fields of a model built from scratch, under ``t5_config``.
    default_t5: dict[str, Any] = TIGER_T5
    configs_with_evaluator = "configs/*/tiger.yaml"
    #: give a loaded ``model_path`` T5 embedding rows for tokens beyond its vocabulary (added to its tokenizer)
    grow_embeddings = False

    def __init__(
        self,
        model_path: str | None = None,
        t5_config: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        num_beams: int = 20,
        eval_top_k: int = 20,
        mask_history: bool = False,
    ) -> None:
        super().__init__()
        field = "model.init_args."
        require(model_path is None or t5_config is None, field + "t5_config", "null when model_path is set", t5_config)
        require(lr > 0, field + "lr", "> 0", lr)
        require(weight_decay >= 0, field + "weight_decay", ">= 0", weight_decay)
        require(warmup_steps >= 0, field + "warmup_steps", ">= 0", warmup_steps)
        min_k = TopKMetrics().max_k
        require(num_beams >= min_k, field + "num_beams", f">= {min_k} (HR@{min_k} needs {min_k} items)", num_beams)
        require(
            min_k <= eval_top_k <= num_beams, field + "eval_top_k", f"in [{min_k}, num_beams={num_beams}]", eval_top_k
        )
        self.save_hyperparameters()
        self.decoding = DecodingConfig(num_beams, eval_top_k, mask_history=mask_history)
        self.model: nn.Module | None = None
        self.code_trie: CodeTrie | None = None
        self.pad_token_id = self.eos_token_id = 0
        self.dataset_fingerprint: dict[str, Any] | None = None
        self.val_metrics = TopKMetrics()

    # -------------------------------------------------------------------------------------------- building
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if getattr(datamodule, "vocabulary", None) is None or not hasattr(datamodule, "item_token_ids"):
            raise ConfigError(
                f"{type(self).__name__} needs a datamodule with a token vocabulary and item token ids: set "
                "`data.class_path: datamodules.SemanticIdDataModule`"
            )
        index = datamodule.item_index
        self.dataset_fingerprint = {
            **datamodule.catalogue.fingerprint(),
            "index_hash": index.trained_index_hash,
            "tokens_per_item": index.tokens_per_item,
            "vocabulary_size": datamodule.vocabulary.size,
        }

    def build_model(self, vocabulary: Any) -> nn.Module:
        """The T5: loaded from ``model_path``, or built from ``default_t5`` updated with ``t5_config``."""
        from transformers import T5Config, T5ForConditionalGeneration

        hp = self.hparams
        special = {
            "pad_token_id": vocabulary.pad_token_id,
            "eos_token_id": vocabulary.eos_token_id,
            "decoder_start_token_id": vocabulary.pad_token_id,  # T5's convention
        }
        if hp.model_path is not None:
            model = T5ForConditionalGeneration.from_pretrained(hp.model_path)
            if model.config.vocab_size < vocabulary.size and self.grow_embeddings:
                model.resize_token_embeddings(vocabulary.size)  # rows for the tokens the tokenizer added
            if model.config.vocab_size < vocabulary.size:
                raise ConfigError(
                    f"model.init_args.model_path {hp.model_path} has {model.config.vocab_size} token rows but the "
                    f"datamodule's vocabulary has {vocabulary.size}: load a T5 saved with this index's vocabulary, or "
                    "build one from `t5_config`."
                )
            for name, value in special.items():
                setattr(model.config, name, value)
            return model.train()  # from_pretrained returns eval mode, which would silence T5's dropout in training
        config = T5Config(**{**self.default_t5, **(hp.t5_config or {}), "vocab_size": vocabulary.size, **special})
        return T5ForConditionalGeneration(config)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.dataset_fingerprint is None:
            raise RuntimeError("configure_model() before setup(): the vocabulary is unknown.")
        datamodule = self.trainer.datamodule
        vocabulary = datamodule.vocabulary
        self.pad_token_id, self.eos_token_id = vocabulary.pad_token_id, vocabulary.eos_token_id
        model = self.build_model(vocabulary)
        log.info(
            "%s: T5 with %d parameters over %d tokens",
            type(self).__name__,
            sum(p.numel() for p in model.parameters()),
            vocabulary.size,
        )
        self.model = model
        self.code_trie = CodeTrie(torch.from_numpy(datamodule.item_token_ids()), eos_token_id=self.eos_token_id)
        # identical on every rank: keep DDP from re-broadcasting the trie's tables at every forward
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, [f"code_trie.{name}" for name, _ in self.code_trie.named_buffers()]
        )

    # ---------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return out.loss

    # -------------------------------------------------------------------------------------- evaluation
    def rank_items(self, batch: dict[str, torch.Tensor]) -> BeamBatchResult:
        """The top-K items of each row of ``batch`` by constrained beam search (the one evaluation path)."""
        return encoder_decoder_eval_batch(
            self.model, self.code_trie, batch, self.decoding, self.pad_token_id, self.pad_token_id
        )

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dataset_fingerprint"] = self.dataset_fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_dataset_fingerprint(
            checkpoint.get("dataset_fingerprint"), self.dataset_fingerprint, "seq2seq checkpoint (data + item index)"
        )

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [param for param in self.parameters() if param.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = adamw(self._trainer, [group for group in groups if group["params"]], lr=hp.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.trainer, hp.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TIGER(Seq2SeqRecommender):
    """TIGER (Rajput et al., 2023): a T5 trained from scratch on semantic-ID sequences.

    Encoder input: a hashed user token, then the code tokens of the last ``max_history`` items; decoder target: the
    next item's code tokens and EOS (:class:`datamodules.semantic_ids.SemanticIdDataModule`). Any index the project
    makes works (``data.init_args.index``: an RQ-VAE export as in the paper, ours, a peer's ``index.json``).
    Recipe deviations, for one framework across baselines: AdamW with linear warm-up and cosine decay (the paper:
    inverse square-root decay from 0.01), and this project's trie-constrained beam search at evaluation, so every
    returned item is valid (the paper drops invalid generations).

    Args:
        model_path: local Hugging Face T5 directory saved with this index's vocabulary; exclusive with ``t5_config``.
        t5_config: ``transformers.T5Config`` fields over TIGER's (4+4 layers, 6 heads of 64, d_model 128, d_ff 1024,
            dropout 0.1).
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay (matrices only).
        warmup_steps: linear warm-up steps, then cosine decay to 0 at the end of the run.
        num_beams: beam width of constrained decoding.
        eval_top_k: items returned per user (at least 10 for HR@10, at most ``num_beams``).
        mask_history: never recommend items the user already interacted with (excluded inside the search).
    """

    default_t5 = TIGER_T5

    def __init__(
        self,
        model_path: str | None = None,
        t5_config: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        num_beams: int = 20,
        eval_top_k: int = 20,
        mask_history: bool = False,
    ) -> None:
        super().__init__(model_path, t5_config, lr, weight_decay, warmup_steps, num_beams, eval_top_k, mask_history)


class P5(Seq2SeqRecommender):
    """P5 (Geng et al., 2022) for sequential recommendation, with P5-ID's item indexing (Hua et al., 2023).

    A T5 reads P5's sequential prompt (a template filled with the user and the history's item ids) and generates
    the next item's id tokens, then EOS (:class:`datamodules.p5_prompts.P5DataModule`: ``cid`` collaborative
    indexing by default, ``sequential`` and ``random`` as options). Built from ``t5_config`` over t5-small's sizes
    on CPU, or loaded from a local t5-small directory (``model_path``) on GPU, as P5 fine-tunes t5-small; its
    token embeddings grow to the tokenizer's added id tokens, as P5-ID resizes them. Evaluation is this project's
    trie-constrained beam search over the valid item ids, so every returned item is valid (P5 drops invalid
    generations). Recipe deviations: sequential prompts only (P5 trains five task families jointly), no whole-word
    embedding (P5's ``--whole_word_embed``), and AdamW with linear warm-up and cosine decay (P5: linear decay).

    Args:
        model_path: local Hugging Face T5 directory (e.g. t5-small); exclusive with ``t5_config``.
        t5_config: ``transformers.T5Config`` fields over t5-small's (6+6 layers, 8 heads of 64, d_model 512,
            d_ff 2048, dropout 0.1).
        lr: AdamW peak learning rate (P5: 1e-3).
        weight_decay: AdamW weight decay (matrices only).
        warmup_steps: linear warm-up steps, then cosine decay to 0 at the end of the run.
        num_beams: beam width of constrained decoding.
        eval_top_k: items returned per user (at least 10 for HR@10, at most ``num_beams``).
        mask_history: never recommend items the user already interacted with (excluded inside the search).
    """

    default_t5 = T5_SMALL
    configs_with_evaluator = "configs/*/p5.yaml"
    grow_embeddings = True  # the id tokens P5DataModule adds to a pretrained T5's tokenizer (as P5-ID does)

    def __init__(
        self,
        model_path: str | None = None,
        t5_config: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        num_beams: int = 20,
        eval_top_k: int = 20,
        mask_history: bool = False,
    ) -> None:
        super().__init__(model_path, t5_config, lr, weight_decay, warmup_steps, num_beams, eval_top_k, mask_history)

    def setup(self, stage: str) -> None:
        if not hasattr(self.trainer.datamodule, "prompts"):
            raise ConfigError("P5 reads text prompts: set `data.class_path: datamodules.P5DataModule`")
        super().setup(stage)
