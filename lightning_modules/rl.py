"""Stage 4 (preference optimisation): GRPO on the stage-3 model with constrained beam rollouts, rewarded by behaviour.

:class:`PreferenceOptimizer` *is* a :class:`GenerativeRecommender` (one implementation of loading, the trie,
decoding, validation, test and predict); it only starts from a stage-3 model (``init_from``: its export directory or
a Lightning checkpoint, both checked against this run's dataset fingerprint and item index) and replaces the SFT
training step by a GRPO step over the training prefixes of :class:`datamodules.rollout_prompts
.RolloutPromptDataModule`:

1. **rollouts**: for each prompt a group of ``G = group_size`` items from the trie-constrained decoder
   (:mod:`lightning_modules.components.rollouts`): the top ``G`` distinct items of the beam search (``rollout:
   beam``, MiniOneRec 2025) or ``G`` samples (``rollout: sample``, explicit temperature / top-k / top-p);
2. **rewards** (:mod:`lightning_modules.components.rewards`, weights in ``rewards``): exact hit, MiniOneRec's
   ranking penalty (in a group that holds the target, each wrong rollout loses its NDCG discount's share), and the
   paper's negative behaviour as penalties (a rollout that is one of the user's sampled negatives; cosine distance to
   the history in the stage-1 DCCF space);
3. **objective** (:mod:`lightning_modules.components.grpo`, DeepSeekMath 2024): advantages ``A_i = (r_i - mean r) /
   (std r + eps)`` within each group (``scale_advantages: false``: ``r_i - mean r``, Dr. GRPO), then minimise

       -1/N sum_i 1/T sum_t [ min(rho_it A_i, clip(rho_it, 1 - clip_eps, 1 + clip_eps) A_i) - kl_coef KL_it ]
       rho_it = exp(logp_it - logp_old_it),   KL_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1   (k3)

   over the ``N`` valid rollouts of the batch, where ``logp_it`` is the log-prob of the item's ``t``-th token under
   the same softmax the decoder ranks by (:func:`lightning_modules.components.code_logprob.item_token_logprobs`:
   with ``code_softmax: trie`` each code among the trie's continuations of its prefix, EOS forced; otherwise the
   vocabulary softmax, EOS included), and ``ref`` the frozen stage-3 model's. One gradient step is taken per rollout
   batch (DeepSeekMath's ``mu = 1``, TRL's default ``num_iterations=1``): the policy that drew the rollouts is the
   current one, so ``logp_old`` is the current log-prob detached (``rho = 1`` in value, gradient ``A grad logp``) and
   the clip only binds with several updates per batch, which this module does not take.

The reference is a frozen copy of the stage-3 weights (full fine-tuning), or, with ``lora``, the adapter-free base
itself (peft's ``disable_adapter``: the stage-3 weights, merged, sit under a fresh RL adapter), so no second copy.
Rollouts run the policy in eval mode (no dropout), like evaluation. DeepSpeed ZeRO-3 is refused (rollout generation
would need the sharded weights gathered at every decoding step): use ZeRO-2 or DDP.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from datamodules.artifacts import read_artifact
from datamodules.errors import ConfigError, require
from datamodules.items import load_item_embeddings
from datamodules.negatives import sample_negatives
from lightning_modules.base import CheckpointMismatchError, check_dataset_fingerprint
from lightning_modules.components.code_logprob import item_token_logprobs
from lightning_modules.components.code_view import causal_lm_of
from lightning_modules.components.grpo import group_advantages, grpo_loss
from lightning_modules.components.lora import DEFAULT_LORA_TARGETS, add_lora
from lightning_modules.components.rewards import (
    RewardWeights,
    distance_reward,
    hit_reward,
    negative_reward,
    rank_reward,
    total_reward,
)
from lightning_modules.components.rollouts import beam_rollouts, sample_rollouts
from lightning_modules.llm import GenerativeRecommender

log = logging.getLogger(__name__)

#: The kind of stage 3's export (callbacks.llm_export.KIND; callbacks sit above this layer).
EXPORT_KIND = "llm_recommender"
FIELD = "model.init_args."


class PreferenceOptimizer(GenerativeRecommender):
    """GRPO fine-tuning of a stage-3 generative recommender (see the module docstring for the objective).

    Args:
        init_from: the stage-3 model: its export directory (``callbacks.LLMExporter``'s ``output_dir``, e.g.
            ``artifacts/industrial/llm``: weights and tokenizer come from it) or a stage-3 ``.ckpt`` (the model is
            built from the settings below, which must be stage 3's, then loaded).
        model_path: as in :class:`GenerativeRecommender` (stage 3's; with an export of full weights it is unused).
        tokenizer_path: as in :class:`GenerativeRecommender` (with an export, the export's tokenizer is used).
        llama_config: as in :class:`GenerativeRecommender` (stage 3's).
        lora: train a fresh LoRA adapter on the merged stage-3 weights (its adapter-free base is the reference).
        lora_rank: LoRA rank of the RL adapter.
        lora_alpha: LoRA scaling of the RL adapter.
        lora_dropout: dropout on the LoRA path.
        lora_target_modules: modules to adapt (default: every Llama projection).
        full_finetune: train every weight, with a frozen copy as the reference; exclusive with ``lora``.
        code_embedding_init: only ``random`` (the code rows come from stage 3; nothing is initialised again).
        gradient_checkpointing: recompute activations in the backward pass.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
        load_dtype: dtype of pretrained weights.
        lr: AdamW peak learning rate (RL steps are much smaller than SFT's).
        weight_decay: AdamW weight decay.
        adam_betas: AdamW's betas.
        warmup_steps: linear warm-up steps before the cosine decay.
        num_beams: beam width of evaluation (validation, test, predict), as in stage 3.
        eval_top_k: items ranked per user at evaluation.
        code_softmax: stage 3's (``trie`` or ``vocabulary``): the softmax rollouts are scored and ranked by.
        mask_history: exclude the user's seen items from rollouts and evaluation, as in stage 3.
        group_size: rollouts per prompt ``G`` (at least 2: advantages compare within a group).
        rollout: ``beam`` (top ``G`` distinct items of the constrained beam search) or ``sample``.
        temperature: sampling temperature (``rollout: sample``).
        sample_top_k: keep the ``k`` most likely allowed tokens per sampling step, 0 = all (``rollout: sample``).
        sample_top_p: nucleus mass of sampling, 1.0 = all (``rollout: sample``).
        clip_eps: PPO/GRPO ratio clipping range.
        scale_advantages: divide each group's centred rewards by their std (GRPO) or not (Dr. GRPO: the reward
            weights then set each reward's share of the gradient).
        kl_coef: weight ``beta`` of the k3 KL penalty to the reference (DeepSeekMath: 0.04).
        rewards: weight of each reward: ``hit``, ``rank``, ``negative``, ``distance`` (default: hit only).
        negatives_per_prompt: negatives sampled per prompt and step for the ``negative`` reward.
        behaviour_embeddings: the stage-1 DCCF embeddings artifact (``artifacts/<ds>/dccf_embeddings``), needed by
            the ``distance`` reward.
    """

    def __init__(
        self,
        init_from: str,
        model_path: str | None = None,
        tokenizer_path: str | None = None,
        llama_config: dict[str, Any] | None = None,
        lora: bool = False,
        lora_rank: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        full_finetune: bool = True,
        code_embedding_init: Literal["random"] = "random",
        gradient_checkpointing: bool = False,
        attn_implementation: str = "sdpa",
        load_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 10,
        num_beams: int = 20,
        eval_top_k: int = 20,
        code_softmax: Literal["vocabulary", "trie"] = "vocabulary",
        mask_history: bool = False,
        group_size: int = 8,
        rollout: Literal["beam", "sample"] = "beam",
        temperature: float = 1.0,
        sample_top_k: int = 0,
        sample_top_p: float = 1.0,
        clip_eps: float = 0.2,
        scale_advantages: bool = True,
        kl_coef: float = 0.04,
        rewards: RewardWeights | None = None,
        negatives_per_prompt: int = 20,
        behaviour_embeddings: str | None = None,
    ) -> None:
        super().__init__(
            model_path, tokenizer_path, llama_config, lora, lora_rank, lora_alpha, lora_dropout, lora_target_modules,
            full_finetune, code_embedding_init, gradient_checkpointing, attn_implementation, load_dtype, lr,
            weight_decay, adam_betas, warmup_steps, num_beams, eval_top_k, code_softmax, mask_history,
        )  # fmt: skip
        require(group_size >= 2, FIELD + "group_size", ">= 2 (advantages compare rollouts within a group)", group_size)
        require(temperature > 0, FIELD + "temperature", "> 0", temperature)
        require(sample_top_k >= 0, FIELD + "sample_top_k", ">= 0 (0 = off)", sample_top_k)
        require(0 < sample_top_p <= 1, FIELD + "sample_top_p", "in (0, 1]", sample_top_p)
        require(0 < clip_eps < 1, FIELD + "clip_eps", "in (0, 1)", clip_eps)
        require(kl_coef >= 0, FIELD + "kl_coef", ">= 0", kl_coef)
        require(negatives_per_prompt >= 1, FIELD + "negatives_per_prompt", ">= 1", negatives_per_prompt)
        self.rewards = rewards or RewardWeights()
        require(
            not self.rewards.distance or behaviour_embeddings is not None,
            FIELD + "behaviour_embeddings",
            "the stage-1 DCCF embeddings directory (e.g. artifacts/industrial/dccf_embeddings) when rewards.distance "
            "> 0 (or set rewards.distance: 0)",
            behaviour_embeddings,
        )
        self.reference: nn.Module | None = None
        self._source: dict[str, Any] | None = None

    # -------------------------------------------------------------------------------------------- building
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.lora and self.hparams.model_path is not None:
            exporters = [cb for cb in self.trainer.callbacks if type(cb).__name__ == "LLMExporter"]
            if exporters:
                raise ConfigError(
                    "trainer.callbacks: LLMExporter would save only the RL adapter, which belongs on the merged "
                    "stage-3 weights, not on model_path; remove LLMExporter (serve from the checkpoint) or use "
                    "full_finetune: true"
                )

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self._zero_stage_3():
            raise ConfigError(
                "trainer.strategy: DeepSpeed ZeRO-3 shards the weights that rollout generation needs whole at every "
                "decoding step; use configs/strategy/deepspeed_zero2.yaml or ddp.yaml (with lora: true a 7B policy "
                "and its reference share one copy of the weights)"
            )
        if self.dataset_fingerprint is None:
            self._read_dataset_fingerprint()
        self._source = self._read_source()
        try:
            super().configure_model()
        finally:
            self._source = None  # a checkpoint's tensors are not kept
        datamodule = self.trainer.datamodule
        self.register_buffer("item_codes", torch.from_numpy(datamodule.prompts.code_ids).long(), persistent=False)
        ignored = [f"code_trie.{name}" for name, _ in self.code_trie.named_buffers()] + ["item_codes"]
        if self.hparams.behaviour_embeddings is not None:
            matrix, _ = load_item_embeddings(self.hparams.behaviour_embeddings, datamodule.catalogue)
            self.register_buffer("behaviour_matrix", matrix.float(), persistent=False)
            ignored.append("behaviour_matrix")
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ignored)
        if not self.hparams.lora:
            self.reference = copy.deepcopy(self.model).requires_grad_(False).eval()

    def _read_source(self) -> dict[str, Any]:
        """The verified stage-3 model of ``init_from``: ``{"export", "manifest"}`` or ``{"checkpoint", "path"}``."""
        path = Path(self.hparams.init_from)
        index = self.trainer.datamodule.item_index
        fix = (
            f"point {FIELD}init_from at the stage-3 export or checkpoint trained on this dataset and index "
            "(configs/<dataset>/llm.yaml)"
        )
        if path.is_dir():
            expected = {
                "dataset": self.trainer.datamodule.catalogue.fingerprint(),
                "index_hash": index.trained_index_hash,
                "tokens_per_item": index.tokens_per_item,
            }
            manifest = read_artifact(path, EXPORT_KIND, expected, fix=fix).manifest
            self._check_softmax(manifest.get("decoding", {}).get("renormalize"), str(path))
            self.pad_token_added = bool(manifest.get("pad_token_added"))
            return {"export": path, "manifest": manifest}
        if not path.is_file():
            raise ConfigError(f"{FIELD}init_from: {path} is neither a stage-3 export directory nor a .ckpt; {fix}")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        saved = checkpoint.get("dataset_fingerprint")
        if "state_dict" not in checkpoint or saved is None:
            raise CheckpointMismatchError(f"{FIELD}init_from: {path} is not a stage-3 (LLM) checkpoint; {fix}")
        check_dataset_fingerprint(saved, self.dataset_fingerprint, f"{FIELD}init_from checkpoint {path}")
        hp = checkpoint.get("hyper_parameters", {})
        self._check_softmax(hp.get("code_softmax", "vocabulary") == "trie", str(path))
        return {"checkpoint": checkpoint, "path": path}

    def _check_softmax(self, renormalized: bool | None, where: str) -> None:
        if renormalized is not None and bool(renormalized) != self.decoding.renormalize:
            wanted = "trie" if renormalized else "vocabulary"
            raise ConfigError(
                f"{FIELD}code_softmax: {where} was trained and ranks with code_softmax: {wanted}; set {wanted} so "
                "rollouts are scored by the softmax the decoder ranks by"
            )

    def _load_tokenizer(self):
        source = self._source or {}
        if "export" not in source:
            return super()._load_tokenizer()
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source["export"] / "tokenizer")

    def _load_model(self, tokenizer) -> nn.Module:
        """The stage-3 weights as a plain HF model (a stage-3 adapter merged); the RL adapter goes on top of it."""
        source = self._source or {}
        if "export" in source:
            manifest, directory = source["manifest"], source["export"]
            if len(tokenizer) != manifest["vocab_size"]:
                raise CheckpointMismatchError(
                    f"{directory}: the export's vocabulary has {manifest['vocab_size']} tokens but {len(tokenizer)} "
                    "with this index's code tokens; use the index stage 3 was trained on (data.init_args.index)"
                )
            if manifest["weights"] == "model":
                from transformers import AutoModelForCausalLM

                hp = self.hparams
                dtype = hp.load_dtype if hp.load_dtype == "auto" else getattr(torch, hp.load_dtype)
                model = AutoModelForCausalLM.from_pretrained(
                    directory / "model", dtype=dtype, attn_implementation=hp.attn_implementation
                )
                model.config.pad_token_id = tokenizer.pad_token_id
                return model
            if manifest["base_model"] != self.hparams.model_path:
                raise ConfigError(
                    f"{FIELD}model_path: the adapter in {directory} belongs on {manifest['base_model']!r}, "
                    f"not {self.hparams.model_path!r}; set model_path to stage 3's base model"
                )
            from peft import PeftModel

            return PeftModel.from_pretrained(super()._load_model(tokenizer), directory / "adapter").merge_and_unload()
        model = super()._load_model(tokenizer)
        if "checkpoint" in source:
            model = self._load_checkpoint_weights(model, source["checkpoint"], source["path"])
        return model

    def _load_checkpoint_weights(self, model: nn.Module, checkpoint: dict[str, Any], path: Path) -> nn.Module:
        hp = checkpoint.get("hyper_parameters", {})
        state = {
            key[len("model.") :]: value for key, value in checkpoint["state_dict"].items() if key.startswith("model.")
        }
        if hp.get("lora"):  # stage 3's adapter, rebuilt with its settings, loaded, then merged into the base
            targets = hp.get("lora_target_modules") or list(DEFAULT_LORA_TARGETS)
            model = add_lora(model, self.code_token_ids, hp["lora_rank"], hp["lora_alpha"], 0.0, targets)
        own = model.state_dict()
        wrong = [key for key, value in state.items() if key not in own or own[key].shape != value.shape]
        missing = [key for key in own if key not in state]
        # a LoRA checkpoint of a pretrained model leaves out the frozen base weights, which model_path supplies
        frozen_ok = hp.get("lora") and hp.get("model_path") is not None
        if wrong or (missing and not frozen_ok):
            raise CheckpointMismatchError(
                f"{FIELD}init_from: {path} does not fit the model built from this config ({len(wrong)} unexpected or "
                f"differently shaped tensors, e.g. {wrong[:2]}; {len(missing)} missing, e.g. {missing[:2]}); set "
                "model_path / tokenizer_path / llama_config to stage 3's"
            )
        model.load_state_dict(state, strict=False)
        return model.merge_and_unload() if hp.get("lora") else model

    # ------------------------------------------------------------------------------------------- training
    @contextlib.contextmanager
    def reference_lm(self) -> Iterator[nn.Module]:
        """The frozen stage-3 model as a HF causal LM: the copy, or the policy with its RL adapter disabled."""
        if self.reference is not None:
            self.reference.eval()
            yield causal_lm_of(self.reference)
            return
        with self.model.disable_adapter():
            yield self.causal_lm()

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(training)

    def rollouts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, G]`` rollout items of the batch's prompts (``-1`` where the trie could not fill the group)."""
        hp = self.hparams
        exclude = (batch["seen_rows"], batch["seen_items"]) if self.decoding.mask_history else None
        args = (self.model, self.tokenizer, self.code_trie, batch["input_ids"], batch["attention_mask"], hp.group_size)
        with self._eval_mode():
            if hp.rollout == "beam":
                return beam_rollouts(*args, self.decoding.renormalize, exclude)
            return sample_rollouts(
                *args, self.decoding.renormalize, hp.temperature, hp.sample_top_k, hp.sample_top_p, exclude
            )

    def reward_terms(
        self, batch: dict[str, torch.Tensor], items: torch.Tensor, scores: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Each active reward ``[B, G]`` of the rollouts (``hit`` always, for logging)."""
        target = batch["target_item"]
        terms = {"hit": hit_reward(items, target)}
        active = self.rewards.active()
        if "rank" in active:
            terms["rank"] = rank_reward(items, target, scores)
        if "negative" in active:
            datamodule = self.trainer.datamodule
            rng = np.random.default_rng((datamodule.seed, self.global_step, self.global_rank))
            users = np.repeat(batch["user"].cpu().numpy(), self.hparams.negatives_per_prompt)
            num_items, pool = datamodule.catalogue.num_items, datamodule.negative_pool
            drawn = sample_negatives(datamodule.negative_keys, users, num_items, rng, allowed=pool)
            negatives = torch.from_numpy(drawn).to(items.device).view(len(target), -1)
            terms["negative"] = negative_reward(items, negatives)
        if "distance" in active:
            terms["distance"] = distance_reward(items, batch["seen_rows"], batch["seen_items"], self.behaviour_matrix)
        return terms

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        items = self.rollouts(batch)
        prompts, group = items.shape
        valid = items >= 0
        codes = self.item_codes[items.reshape(-1).clamp(min=0)]
        input_ids = batch["input_ids"].repeat_interleave(group, dim=0)
        attention = batch["attention_mask"].repeat_interleave(group, dim=0)
        renormalize = self.decoding.renormalize
        logp = item_token_logprobs(self.causal_lm(), input_ids, attention, codes, self.code_trie, renormalize)
        logp_old = logp.detach()  # one update per rollout batch: the policy that drew them is this one
        with torch.no_grad(), self.reference_lm() as reference:
            ref_logp = item_token_logprobs(reference, input_ids, attention, codes, self.code_trie, renormalize)
        terms = self.reward_terms(batch, items, logp_old.sum(dim=1).view(prompts, group))
        reward = total_reward(terms, self.rewards)
        advantages = group_advantages(reward, valid, scale=hp.scale_advantages)
        out = grpo_loss(logp, logp_old, ref_logp, advantages.reshape(-1), valid.reshape(-1), hp.clip_eps, hp.kl_coef)
        count = valid.sum().clamp(min=1)
        logged = {
            "train/loss": out.loss.detach(),
            "train/reward": (reward * valid).sum() / count,
            "train/kl": out.kl.detach(),
            "train/clip_fraction": out.clip_fraction,
            "train/valid_rollouts": valid.float().mean(),
            "train/target_in_group": (terms["hit"].sum(dim=1) > 0).float().mean(),
        }
        logged.update({f"train/reward_{name}": (value * valid).sum() / count for name, value in terms.items()})
        self.log_dict(logged, prog_bar=False, batch_size=prompts)
        self.log("train/reward_epoch", logged["train/reward"], on_step=False, on_epoch=True, batch_size=prompts)
        return out.loss
