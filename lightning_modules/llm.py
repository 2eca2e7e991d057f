"""Stage 3 (Alignment Tasks): supervised fine-tuning of a causal LLM on item-code prompts, beam-search evaluation.

``configure_model`` (never ``__init__``, so DeepSpeed/FSDP can wrap the loading) builds everything:

1. the tokenizer (``tokenizer_path`` or ``model_path``); one without a pad token gets ``<pad>``;
2. the index's code tokens (``L x K``, plus an extra disambiguation level if any) are added, the embeddings
   resized (HF mean-resizing for pretrained models); optionally the new input rows are initialised from the
   stage-2 code vectors through a random 2-/3-layer MLP (the paper's Table 7 ablation, reported worse;
   :mod:`lightning_modules.components.code_embeddings`);
3. LoRA (peft) on ``lora_target_modules`` with ``trainable_token_indices`` on the input embedding and LM head:
   only the rows of the new code tokens are trainable in the embedding and the LM head (peft keeps them as
   separate parameters and swaps them in; tied embeddings are handled by peft), so the 32k original rows
   stay frozen without a gradient-mask hook (:mod:`lightning_modules.components.lora`); or full fine-tuning as in
   LC-Rec (``full_finetune``);
4. the datamodule gets the tokenizer (``set_tokenizer``) and the code trie is built for constrained decoding (a
   submodule whose tables are buffers, so Lightning moves them with the model).

Training (:mod:`lightning_modules.components.sft_loss`) computes logits only at supervised positions
(labels != -100): the LM head over the whole prompt would cost ``T x vocab`` per sample for nothing. With
``code_softmax: trie`` a position whose target is an item code scores only the codes that continue its prefix in the
item trie (what the constrained decoder can pick there), the EOS that closes a code is not trained (the trie forces
it), and decoding renormalises over the allowed tokens: training maximises exactly the item likelihood the decoder
ranks by. Text positions keep the full vocabulary. On a small model the ``N x vocab`` LM head dominates a step, so
this is also a faster step (docs/notes.md); with a pretrained LLM keep the default ``vocabulary`` (LC-Rec's plain LM
loss).

Every evaluation decodes the top-K items by trie-constrained beam search through one method, :meth:`rank_items`
(:func:`lightning_modules.components.decoding.beam_eval_batch`, over a code-vocabulary view of the model):
validation logs ``val/hr@10`` etc. from the module, the final test is run by :class:`callbacks.BeamSearchEvaluator`
(``test/hr@10`` etc. and the top-K lists), and ``predict_step`` serves the same lists.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning as L
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_modules.base import BeamRanker, CheckpointMismatchError, check_dataset_fingerprint
from lightning_modules.components import sft_loss
from lightning_modules.components.code_embeddings import init_code_rows
from lightning_modules.components.code_view import causal_lm_of
from lightning_modules.components.cold_ranking import ColdPrefixTable
from lightning_modules.components.decoding import BeamBatchResult, DecodingConfig, beam_eval_batch
from lightning_modules.components.lora import DEFAULT_LORA_TARGETS, add_lora
from lightning_modules.components.trie import CodeTrie
from lightning_modules.metrics import TopKMetrics
from lightning_modules.optimizers import adamw
from lightning_modules.schedules import warmup_cosine

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"


class GenerativeRecommender(BeamRanker, L.LightningModule):
    """A causal LLM that names the next item by its code tokens.

    Args:
        model_path: local Hugging Face model directory (loaded in ``configure_model``); None builds
            ``llama_config`` from scratch.
        tokenizer_path: tokenizer directory (default: ``model_path``), e.g. ``../shared/tokenizers/llama2``.
        llama_config: ``transformers.LlamaConfig`` fields of a model built from scratch (CPU runs); the
            vocabulary size is set from the tokenizer.
        lora: train LoRA adapters plus the new token rows (the paper); exclusive with ``full_finetune``.
        lora_rank: LoRA rank ``r``: the adapters' capacity (the paper: 8).
        lora_alpha: LoRA scaling ``alpha``: the adapters' update size relative to ``r``.
        lora_dropout: dropout on the LoRA path, against overfitting the adapters.
        lora_target_modules: module names to adapt (default: every Llama attention and MLP projection).
        full_finetune: train every weight (LC-Rec); exclusive with ``lora``.
        code_embedding_init: ``random`` (HF resizing, the paper's choice), or ``mlp2``/``mlp3``: new input rows from
            the stage-2 code vectors (``code_vectors.pt`` of the index artifact) through a 2-/3-layer MLP, the
            paper's Table 7 ablation.
        gradient_checkpointing: recompute activations in the backward pass (long prompts, 7B models).
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (GPUs; packed batches need sdpa or eager).
        load_dtype: dtype of pretrained weights (``auto`` keeps the checkpoint's; bf16 halves a 7B model's memory).
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay (matrices only, as in the HF Trainer).
        adam_betas: AdamW's ``(beta1, beta2)``, e.g. LLM fine-tuning's ``(0.9, 0.95)``; default torch's and the HF
            Trainer's ``(0.9, 0.999)`` (LC-Rec).
        warmup_steps: linear warm-up steps, then cosine decay to 0 at the end of the run: the last step of
            ``max_epochs``/``max_steps``, or ``trainer.max_time`` if that comes first.
        num_beams: beam width of constrained decoding.
        eval_top_k: items returned per user (at least 10 for HR@10).
        code_softmax: ``vocabulary`` (plain LM loss, beam scores = log-probs over the vocabulary; pretrained LLMs)
            or ``trie`` (code targets scored against the trie's continuations of their prefix, beam scores
            renormalised over the allowed tokens: the exact item likelihood the decoder ranks by, and a cheaper step
            for small models trained from scratch; needs ``full_finetune``, since LoRA keeps the new LM-head rows
            inside peft's wrapper).
        mask_history: never recommend items the user already interacted with, the policy of this repository's ID
            baselines (their ``mask_history``); the default ranks them, as LC-Rec does. They are excluded inside
            the constrained beam search, so all ``eval_top_k`` slots hold unseen items.
        cold_start_prefix: put items coded by cold start (the index's ``cold_start`` records: added after training,
            or held out by the cold-start protocol) into each list after the best returned item sharing their first
            ``cold_start_prefix`` codes (TIGER's cold-start retrieval, :mod:`.components.cold_ranking`); 0: off.
        cold_start_slots: at most this many cold-start items per list.
    """

    def __init__(
        self,
        model_path: str | None = None,
        tokenizer_path: str | None = None,
        llama_config: dict[str, Any] | None = None,
        lora: bool = True,
        lora_rank: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        full_finetune: bool = False,
        code_embedding_init: Literal["random", "mlp2", "mlp3"] = "random",
        gradient_checkpointing: bool = False,
        attn_implementation: str = "sdpa",
        load_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        lr: float = 3e-4,
        weight_decay: float = 0.01,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        num_beams: int = 20,
        eval_top_k: int = 20,
        code_softmax: Literal["vocabulary", "trie"] = "vocabulary",
        mask_history: bool = False,
        cold_start_prefix: int = 0,
        cold_start_slots: int = 1,
    ) -> None:
        super().__init__()
        if (model_path is None) == (llama_config is None):
            raise ValueError(
                "set exactly one of `model_path` (pretrained LLM) and `llama_config` (a Llama built from scratch)"
            )
        if model_path is None and tokenizer_path is None:
            raise ValueError("a model built from `llama_config` needs `tokenizer_path`")
        if lora == full_finetune:
            raise ValueError(
                "choose one training mode: `lora: true` (adapters + new token rows) or `full_finetune: true`"
            )
        if eval_top_k > num_beams or eval_top_k < TopKMetrics().max_k:
            raise ValueError(f"eval_top_k must be in [{TopKMetrics().max_k}, num_beams={num_beams}], got {eval_top_k}")
        if cold_start_prefix < 0 or cold_start_slots < 1:
            raise ValueError(
                f"cold_start_prefix must be >= 0 (0: off) and cold_start_slots >= 1, got {cold_start_prefix} and "
                f"{cold_start_slots}"
            )
        if not all(0.0 <= beta < 1.0 for beta in adam_betas):
            raise ValueError(f"adam_betas must both be in [0, 1), got {adam_betas}")
        if code_softmax == "trie" and not full_finetune:
            raise ValueError(
                "code_softmax: trie reads the LM head's code rows directly; with LoRA they live in peft's "
                "trainable-token wrapper. Use full_finetune: true, or code_softmax: vocabulary."
            )
        self.save_hyperparameters()
        self.lora_target_modules = lora_target_modules or list(DEFAULT_LORA_TARGETS)
        # beam scores renormalised over the allowed codes when training scored codes that way
        self.decoding = DecodingConfig(
            num_beams, eval_top_k, renormalize=code_softmax == "trie", mask_history=mask_history
        )
        self.model: nn.Module | None = None
        self.tokenizer = None
        self.code_trie: CodeTrie | None = None
        self.cold_table: ColdPrefixTable | None = None
        self.cold_start_prefix, self.cold_start_slots = cold_start_prefix, cold_start_slots
        self.code_token_ids: list[int] = []
        self.pad_token_added = False
        self.dataset_fingerprint: dict[str, Any] | None = None
        # Frozen base weights are reloaded from model_path, so LoRA checkpoints keep only the trainable tensors.
        self.strict_loading = not (lora and model_path is not None)
        self.val_metrics = TopKMetrics()

    # -------------------------------------------------------------------------------------------- building
    def setup(self, stage: str) -> None:
        self._read_dataset_fingerprint()

    def _read_dataset_fingerprint(self) -> None:
        datamodule = self.trainer.datamodule
        if getattr(datamodule, "item_index", None) is None or not hasattr(datamodule, "set_tokenizer"):
            raise RuntimeError(
                f"{type(self).__name__} needs a datamodule with an item index and set_tokenizer() "
                "(datamodules.PromptDataModule)"
            )
        catalogue, index = datamodule.catalogue, datamodule.item_index
        # an index extended with cold-start items carries the hash of its catalogue part: the one trained on
        self.dataset_fingerprint = {
            **catalogue.fingerprint(),
            "index_hash": index.trained_index_hash,
            "tokens_per_item": index.tokens_per_item,
        }

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.hparams.tokenizer_path or self.hparams.model_path)
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
            self.pad_token_added = True
            log.info("the tokenizer has no pad token: added %s (id %d)", PAD_TOKEN, tokenizer.pad_token_id)
        return tokenizer

    def _load_model(self, tokenizer) -> nn.Module:
        from transformers import AutoModelForCausalLM, LlamaConfig

        hp = self.hparams
        if self._zero_stage_3():
            from transformers.integrations import HfDeepSpeedConfig

            # Lightning's configure_model runs inside deepspeed.zero.Init, so every weight is created as an empty
            # 1/world-size shard. transformers must know: from_pretrained then loads each tensor into its shard,
            # and weight init / resize_token_embeddings gather the shards instead of indexing empty placeholders.
            # It keeps only a weak reference to this object: hold it for the run.
            self._hf_deepspeed_config = HfDeepSpeedConfig(self.trainer.strategy.config)
        if hp.model_path is not None:
            dtype = hp.load_dtype if hp.load_dtype == "auto" else getattr(torch, hp.load_dtype)
            model = AutoModelForCausalLM.from_pretrained(
                hp.model_path, dtype=dtype, attn_implementation=hp.attn_implementation
            )
        else:
            config = LlamaConfig(
                **{
                    **hp.llama_config,
                    "vocab_size": len(tokenizer),
                    "pad_token_id": tokenizer.pad_token_id,
                    "bos_token_id": tokenizer.bos_token_id,
                    "eos_token_id": tokenizer.eos_token_id,
                }
            )
            model = AutoModelForCausalLM.from_config(config, attn_implementation=hp.attn_implementation)
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def _zero_stage_3(self) -> bool:
        return bool(getattr(getattr(self._trainer, "strategy", None), "zero_stage_3", False))

    def _init_code_embeddings(self, model: nn.Module, index, token_ids: torch.Tensor) -> None:
        """Table 7: new input rows = MLP(code vector) (or an orthogonal map of it), at the original rows' scale."""
        books = index.code_vectors()  # [L, K, dim]; a bare index.json has none and says so
        method, first_code_token = self.hparams.code_embedding_init, min(self.code_token_ids)
        how = init_code_rows(model, books, token_ids, method, first_code_token, self._zero_stage_3())
        levels, size, _ = books.shape
        log.info(
            "initialised %d code-token input rows from %dx%d code vectors via %s", levels * size, levels, size, how
        )

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.dataset_fingerprint is None:
            # Lightning's WeightAveraging/EMAWeightAveraging callbacks call configure_model() from their own
            # setup(), which runs before the module's: read the datamodule's index here.
            self._read_dataset_fingerprint()
        hp = self.hparams
        if hp.code_softmax == "trie" and self._zero_stage_3():
            raise ValueError(
                "code_softmax: trie reads the code-token rows of the LM head directly, which DeepSpeed ZeRO-3 keeps "
                "sharded outside module calls; use code_softmax: vocabulary with ZeRO-3, or ZeRO-2 / DDP with trie"
            )
        datamodule = self.trainer.datamodule
        index = datamodule.item_index
        tokenizer = self._load_tokenizer()
        vocabulary = index.vocabulary()
        tokenizer.add_tokens(vocabulary)
        token_table = index.level_token_ids(tokenizer.get_vocab())  # the one source of the code-token ids
        self.code_token_ids = [
            int(token) for level, size in enumerate(index.level_sizes()) for token in token_table[level, :size]
        ]
        model = self._load_model(tokenizer)
        if hp.code_embedding_init != "random":
            self._init_code_embeddings(model, index, torch.from_numpy(token_table))
        if hp.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hp.lora:
            model = add_lora(
                model, self.code_token_ids, hp.lora_rank, hp.lora_alpha, hp.lora_dropout, self.lora_target_modules
            )
        numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 - a ZeRO-3 shard's numel() is 0
        trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
        log.info(
            "%s: %d trainable of %d parameters; %d code tokens added",
            "LoRA" if hp.lora else "full fine-tuning",
            trainable,
            sum(numel(p) for p in model.parameters()),
            len(vocabulary),
        )
        model.train()  # from_pretrained returns eval mode, which would silence dropout (LoRA's included) in training
        self.model, self.tokenizer = model, tokenizer
        datamodule.set_tokenizer(tokenizer)
        # the items' code-token ids, which the datamodule derived from the same ItemIndex.level_token_ids table
        self.code_trie = CodeTrie(torch.from_numpy(datamodule.prompts.code_ids), eos_token_id=tokenizer.eos_token_id)
        # The tables are identical on every rank: DDP would otherwise re-broadcast them (35 MB for Games) at every
        # training forward. DDP reads this list of names when it wraps the module, after configure_model.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, [f"code_trie.{name}" for name, _ in self.code_trie.named_buffers()]
        )
        cold = datamodule.item_index.cold_start_items()
        if self.cold_start_prefix > 0 and len(cold):
            codes = torch.from_numpy(datamodule.item_index.codes)
            self.cold_table = ColdPrefixTable(codes, torch.from_numpy(cold), self.cold_start_prefix)

    def causal_lm(self) -> nn.Module:
        """The HF ``*ForCausalLM`` (under the peft wrapper when LoRA is on)."""
        return causal_lm_of(self.model)

    # ---------------------------------------------------------------------------------------- training
    def response_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over supervised tokens, with the LM head applied to those positions only."""
        trie = self.code_trie if self.hparams.code_softmax == "trie" else None
        return sft_loss.response_loss(self.causal_lm(), batch, trie)

    def on_train_epoch_start(self) -> None:
        set_epoch = getattr(self.trainer.datamodule, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.current_epoch)  # fresh negatives / subsets / templates every epoch

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        self.log(
            "train/dropped_long",
            batch["dropped"].sum().float(),
            reduce_fx="sum",
            on_step=False,
            on_epoch=True,
            batch_size=1,
        )
        if batch["input_ids"].shape[0] == 0:
            return None  # every sample was longer than max_length: skip the step
        loss = self.response_loss(batch)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        # Length-grouped batches repeat every 50 batches (the longest, text-heavy batch first), so a step logged every
        # `log_every_n_steps` can fall on that batch for a whole epoch, far above the epoch mean: the epoch mean is
        # the number to compare across epochs.
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, batch_size=size)
        return loss

    # -------------------------------------------------------------------------------------- evaluation
    def rank_items(self, batch: dict[str, torch.Tensor]) -> BeamBatchResult:
        """The top-K items of each prompt of ``batch`` by constrained beam search (the one evaluation path)."""
        cold = None if self.cold_table is None else self.cold_table.to(batch["input_ids"].device)
        slots = self.cold_start_slots
        return beam_eval_batch(self.model, self.tokenizer, self.code_trie, batch, self.decoding, cold, slots)

    @property
    def renormalize_codes(self) -> bool:
        """Beam search renormalises over the allowed codes when training did (``code_softmax: trie``)."""
        return self.decoding.renormalize

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dataset_fingerprint"] = self.dataset_fingerprint
        if not self.strict_loading:
            frozen = {f"model.{name}" for name, param in self.model.named_parameters() if not param.requires_grad}
            checkpoint["state_dict"] = {
                key: value for key, value in checkpoint["state_dict"].items() if key not in frozen
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        index = self.trainer.datamodule.item_index if self._trainer is not None else None
        saved = checkpoint.get("dataset_fingerprint") or {}
        if index is not None and index.new_items and saved.get("index_hash") != index.trained_index_hash:
            raise CheckpointMismatchError(
                f"data.init_args.index {index.source} adds {index.new_items} cold-start items after the catalogue's "
                f"{index.catalogue_items}, but those first {index.catalogue_items} items' codes are not the ones the "
                "checkpoint was trained on: extend the training index itself (callbacks.index_export.assign_codes "
                "never changes existing codes), or serve with the index the checkpoint was trained on."
            )
        check_dataset_fingerprint(
            checkpoint.get("dataset_fingerprint"), self.dataset_fingerprint, "LLM checkpoint (data + item index)"
        )
        if not self.strict_loading and self.model is not None:
            missing = [
                name
                for name, param in self.model.named_parameters()
                if param.requires_grad and f"model.{name}" not in checkpoint["state_dict"]
            ]
            if missing:
                raise CheckpointMismatchError(
                    f"checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[:3]}); it is not from this "
                    "LoRA setup"
                )

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [param for param in self.parameters() if param.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = adamw(self._trainer, [group for group in groups if group["params"]], lr=hp.lr, betas=hp.adam_betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.trainer, hp.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
