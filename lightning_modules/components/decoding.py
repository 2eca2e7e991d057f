"""Constrained beam search: top-K item ids per prompt from a causal LM and a :class:`CodeTrie`.

Scores are HF's ``sequences_scores`` with ``length_penalty=0``: the summed log-probability of the ``L`` code
tokens plus EOS under the model (the trie only removes candidates; with ``renormalize`` each step is
renormalised over the allowed tokens instead, for models trained with the trie-restricted code softmax).
Every item has the same length, so a length penalty could not change the order anyway; 0 keeps the score a
plain log-probability. ``generate`` runs on a code-vocabulary view of the model by default
(:mod:`lightning_modules.components.code_view`): the same scores, without the per-step vocabulary-wide passes.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList

from lightning_modules.components.code_view import build_view, causal_lm_of, vocabulary_view
from lightning_modules.components.cold_ranking import ColdPrefixTable
from lightning_modules.components.trie import CodeTrie, TrieLogitsProcessor
from lightning_modules.metrics import rank_in_list

#: HF beam search seeds all but the first beam with this score; a result at or below it is no real hypothesis.
_HF_DEAD_BEAM_SCORE = -1.0e8


def beam_generation_config(
    num_beams: int,
    num_return_sequences: int,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int,
    bos_token_id: int | None,
) -> GenerationConfig:
    """An explicit, deterministic beam-search config.

    ``early_stopping="never"`` with ``length_penalty=0`` is HF's canonical beam search: it stops only at
    ``max_new_tokens`` (``L + 1``: every valid hypothesis has ended) or when no running beam can beat the finished
    ones. ``early_stopping=True`` would stop once ``num_beams`` hypotheses ended, and with a small trie, filler
    hypotheses (score ``-inf``) that end early could do that before the real items finish. Sampling flags keep
    their neutral values so no "only used in sample-based generation" warning fires. ``output_scores`` is what
    makes HF return ``sequences_scores``; it also keeps ``L + 1`` copies of the ``[rows, vocab]`` log-probs.
    """
    return GenerationConfig(
        do_sample=False,
        num_beams=num_beams,
        num_return_sequences=num_return_sequences,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        length_penalty=0.0,
        early_stopping="never",
        temperature=1.0,
        top_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        output_scores=True,
        return_dict_in_generate=True,
        use_cache=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
    )


def sampling_generation_config(
    num_return_sequences: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    pad_token_id: int,
    eos_token_id: int,
    bos_token_id: int | None,
) -> GenerationConfig:
    """An explicit ancestral-sampling config (stage 4's ``rollout: sample``): ``do_sample=True``, one beam.

    ``top_k=0`` and ``top_p=1.0`` switch those filters off; HF applies temperature, top-k and top-p after the
    logits processors, i.e. to the trie-constrained distribution. Beam-only flags keep their neutral values so no
    "only used in beam-based generation" warning fires.
    """
    return GenerationConfig(
        do_sample=True,
        num_beams=1,
        num_return_sequences=num_return_sequences,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        return_dict_in_generate=True,
        use_cache=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
    )


@contextlib.contextmanager
def isolated_generation_config(model) -> Iterator[None]:
    """Hide the checkpoint's ``generation_config`` during ``generate``.

    ``generate`` fills every field our config leaves ``None`` (``bad_words_ids``, ``suppress_tokens``,
    ``sequence_bias``, ``forced_eos_token_id``, ...) from ``model.generation_config``; a blank config in its
    place means only our explicit values and the library's neutral global defaults apply.
    """
    targets = list({id(target): target for target in (model, causal_lm_of(model))}.values())
    saved = [(target, target.generation_config) for target in targets]
    try:
        for target, _ in saved:
            target.generation_config = GenerationConfig()
        yield
    finally:
        for target, config in saved:
            target.generation_config = config


def cache_keyword(module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (before): the name the model's forward takes.

    An unknown keyword is not an error everywhere: the decoder swallows it in ``**kwargs`` and silently runs
    without the cache, while ``generate`` rejects it.
    """
    return "cache" if "cache" in inspect.signature(type(module).forward).parameters else "past_key_values"


def prompt_cache_kwargs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int) -> dict:
    """``generate`` keyword arguments carrying the KV cache of every prompt but its last token, shared by the beams.

    ``generate`` repeats each prompt ``num_beams`` times *before* its prefill, so the prompt would be encoded
    ``num_beams`` times; with this cache it only runs the last prompt token per beam (same scores up to float
    rounding). Positions follow the left padding exactly as ``generate`` derives them (``cumsum(attention_mask) - 1``).
    Empty when there is nothing to share (a one-token prompt or one beam).
    """
    if input_ids.shape[1] < 2 or num_beams < 2:
        return {}
    cache = DynamicCache(config=model.config)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    decoder = model.get_decoder()  # skips the LM head: no [B, P, vocab] logits
    decoder(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=positions[:, :-1],
        use_cache=True,
        **{cache_keyword(decoder): cache},
    )
    cache.batch_repeat_interleave(num_beams)
    return {cache_keyword(decoder): cache}


def generate_topk(
    model,
    tokenizer,
    prompts_input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: CodeTrie,
    num_beams: int = 20,
    num_return_sequences: int = 20,
    max_new_tokens: int | None = None,
    processor: LogitsProcessor | None = None,
    renormalize: bool = False,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    code_view: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K items per prompt by trie-constrained beam search.

    Args:
        model: a HF causal LM (or a PEFT wrapper of one).
        tokenizer: supplies ``eos_token_id``, ``pad_token_id`` (EOS when unset) and ``bos_token_id``.
        prompts_input_ids: ``[B, P]`` left-padded prompts.
        attention_mask: ``[B, P]`` 1 on real tokens.
        trie: the valid item codes, on the prompts' device (a submodule of the LightningModule moves with it).
        num_beams: beam width.
        num_return_sequences: K, at most ``num_beams``.
        max_new_tokens: defaults to ``L + 1`` (codes and EOS).
        processor: replaces the trie processor (benchmarks: a timed wrapper, or transformers' own).
        renormalize: score each step over the trie's allowed tokens only (see :class:`TrieLogitsProcessor`).
        exclude: ``(rows, items)`` pairs never to return (a user's history under ``mask_history``). Excluded inside
            the search (:meth:`CodeTrie.blocked_nodes`), so the K results are the best K *remaining* items rather
            than what is left of K after a filter; each keeps the score it has without the exclusion.
        code_view: search over a vocabulary of the trie's and the prompts' tokens only
            (:mod:`lightning_modules.components.code_view`; same scores, a fraction of the per-step work). Off with a
            custom ``processor``, which works in the model's own token ids.

    Returns:
        ``items`` ``[B, K]`` distinct item ids per row, best first, and their ``scores`` (summed log-probs);
        rows are padded with item ``-1`` / score ``-inf`` when fewer than K valid items were found.
    """
    if attention_mask.shape[1] and not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded (the last column of attention_mask has padding)")
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) cannot exceed num_beams ({num_beams})")
    batch, prompt_len = prompts_input_ids.shape
    code_length = trie.code_length
    eos = trie.eos_token_id
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else eos
    config = beam_generation_config(
        num_beams,
        num_return_sequences,
        max_new_tokens or code_length + 1,
        pad,
        eos,
        getattr(tokenizer, "bos_token_id", None),
    )
    if trie.device != prompts_input_ids.device:
        raise ValueError(
            f"the code trie is on {trie.device} but the prompts are on {prompts_input_ids.device}: register the trie "
            "as a submodule of the model's LightningModule (Lightning moves it) or call trie.to(device)"
        )
    if processor is not None and exclude is not None:
        raise ValueError("`exclude` needs the built-in trie processor; a custom `processor` cannot apply it")
    blocked = None if exclude is None else trie.blocked_nodes(exclude[0], exclude[1], batch)
    view = build_view(trie, prompts_input_ids, [pad]) if code_view and processor is None else None
    search_trie, search_ids = (
        (trie, prompts_input_ids) if view is None else (view.trie, view.to_view(prompts_input_ids))
    )
    if view is not None:
        config.pad_token_id, config.eos_token_id, config.bos_token_id = view.id_of(pad), search_trie.eos_token_id, None
    processors = LogitsProcessorList(
        [
            processor
            if processor is not None
            else TrieLogitsProcessor(search_trie, prompt_len, renormalize=renormalize, blocked=blocked)
        ]
    )
    with isolated_generation_config(model), torch.inference_mode():
        # before the view: the prompt in the model's own ids
        cache = prompt_cache_kwargs(model, prompts_input_ids, attention_mask, num_beams)
        with (
            contextlib.nullcontext() if view is None else vocabulary_view(model, view, exact_normaliser=not renormalize)
        ):
            out = model.generate(
                input_ids=search_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=processors,
                **cache,
            )
    sequences = out.sequences if view is None else view.to_original(out.sequences)
    generated = sequences[:, prompt_len:]
    if generated.shape[1] < code_length + 1:  # every hypothesis ended early: nothing valid
        generated = torch.nn.functional.pad(generated, (0, code_length + 1 - generated.shape[1]), value=pad)
    items = trie.items_of(generated[:, :code_length])
    items = torch.where(generated[:, code_length] == eos, items, -1).view(batch, num_return_sequences)
    scores = out.sequences_scores.view(batch, num_return_sequences).float()
    return rank_distinct(items, scores)


def rank_distinct(items: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort rows by score, drop invalid hypotheses and repeated items (keeping the best), pad with -1/-inf."""
    valid = (items >= 0) & torch.isfinite(scores) & (scores > _HF_DEAD_BEAM_SCORE)
    scores = torch.where(valid, scores, -float("inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    items, scores = items.gather(1, order), scores.gather(1, order)
    # HF seeds beams 1.. with copies of beam 0 (score -1e9); those duplicates are already invalid above, this
    # guard keeps the contract "distinct items per row" even if a model repeats a code tuple another way.
    same = (items[:, :, None] == items[:, None, :]) & torch.isfinite(scores)[:, None, :]
    repeated = torch.tril(same, diagonal=-1).any(dim=2)
    scores = torch.where(repeated, -float("inf"), scores)
    order = scores.argsort(dim=1, descending=True, stable=True)
    items, scores = items.gather(1, order), scores.gather(1, order)
    return torch.where(torch.isfinite(scores), items, -1), scores


@dataclass(frozen=True)
class DecodingConfig:
    """How constrained beam search ranks items; decoding is always deterministic (``do_sample=False``).

    Args:
        num_beams: beam width.
        top_k: items kept per prompt (``num_return_sequences``), at most ``num_beams``.
        renormalize: score each step over the trie's allowed tokens only (models trained with ``code_softmax: trie``).
        mask_history: never return the items in the batch's ``seen_rows``/``seen_items`` (excluded inside the
            search, so all ``top_k`` slots go to unseen items).
        do_sample: stated explicitly and must stay ``False``: rankings are the deterministic beam search's, never
            sampled, whatever the checkpoint's ``generation_config`` says.
    """

    num_beams: int = 20
    top_k: int = 20
    renormalize: bool = False
    mask_history: bool = False
    do_sample: bool = False

    def __post_init__(self) -> None:
        if self.do_sample:
            raise ValueError("constrained evaluation ranks items by deterministic beam search: do_sample must be False")
        if not 1 <= self.top_k <= self.num_beams:
            raise ValueError(f"top_k must be in [1, num_beams={self.num_beams}], got {self.top_k}")


@dataclass
class BeamBatchResult:
    """One evaluation batch: ``items``/``scores`` ``[B, K]`` and the target's 0-based ``ranks`` ``[B]`` (K = miss)."""

    items: torch.Tensor
    scores: torch.Tensor
    ranks: torch.Tensor | None


def beam_eval_batch(
    model,
    tokenizer,
    trie: CodeTrie,
    batch: dict[str, torch.Tensor],
    config: DecodingConfig,
    cold: ColdPrefixTable | None = None,
    cold_slots: int = 1,
) -> BeamBatchResult:
    """Beam-search one batch of left-padded prompts and rank each row's ``target_item`` among the results.

    Args:
        model: a HF causal LM (or a peft wrapper of one).
        tokenizer: supplies the pad/EOS/BOS ids.
        trie: the valid item codes, on the batch's device.
        batch: ``input_ids``/``attention_mask`` (left-padded prompts), optionally ``target_item`` ``[B]`` (no ranks
            without it, e.g. when serving) and, under ``config.mask_history``, ``seen_rows``/``seen_items``.
        config: beam width, K, renormalisation and history masking.
        cold: cold-start items retrieved by code prefix into the lists (:mod:`.cold_ranking`), ``cold_slots`` each.
    """
    exclude = (batch["seen_rows"], batch["seen_items"]) if config.mask_history else None
    items, scores = generate_topk(
        model,
        tokenizer,
        batch["input_ids"],
        batch["attention_mask"],
        trie,
        config.num_beams,
        config.top_k,
        renormalize=config.renormalize,
        exclude=exclude,
    )
    if cold is not None:
        items, scores = cold.insert(items, scores, cold_slots)
    target = batch.get("target_item")
    return BeamBatchResult(items, scores, None if target is None else rank_in_list(items, target))
