"""Rollout groups for stage 4 (GRPO): ``G`` valid items per prompt from the trie-constrained decoder.

* ``beam`` (the default): the top ``G`` distinct items of the constrained beam search with ``G`` beams, the very
  function evaluation ranks with (:func:`lightning_modules.components.decoding.generate_topk`). MiniOneRec (2025)
  found beam rollouts better than sampling for item spaces this small: ``G`` samples from a peaked distribution
  repeat the same few items, and a group of equal rewards has no advantage.
* ``sample``: ``G`` ancestral samples from the constrained distribution (temperature, top-k, top-p set explicitly by
  :func:`lightning_modules.components.decoding.sampling_generation_config`); items may repeat, as in DeepSeekMath's
  GRPO.

Both exclude the prompt's ``exclude`` items inside the search (``mask_history``), as evaluation does.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList

from lightning_modules.components.decoding import (
    generate_topk,
    isolated_generation_config,
    prompt_cache_kwargs,
    sampling_generation_config,
)
from lightning_modules.components.trie import CodeTrie, TrieLogitsProcessor


def beam_rollouts(
    model,
    tokenizer,
    trie: CodeTrie,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    group_size: int,
    renormalize: bool,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[B, G]`` distinct valid items per left-padded prompt, best first (``-1`` pads a group the trie cannot fill)."""
    items, _ = generate_topk(
        model,
        tokenizer,
        input_ids,
        attention_mask,
        trie,
        group_size,
        group_size,
        renormalize=renormalize,
        exclude=exclude,
    )
    return items.clone()


def sample_rollouts(
    model,
    tokenizer,
    trie: CodeTrie,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    group_size: int,
    renormalize: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[B, G]`` items sampled from the trie-constrained distribution (repeats possible; ``-1``: no valid item).

    Args:
        model: a HF causal LM (or a peft wrapper of one).
        tokenizer: supplies the pad/EOS/BOS ids.
        trie: the valid item codes, on the prompts' device.
        input_ids: ``[B, P]`` left-padded prompts.
        attention_mask: ``[B, P]``.
        group_size: samples per prompt ``G``.
        renormalize: sample each code from the softmax over the trie's continuations (``code_softmax: trie``).
        temperature: softmax temperature of sampling.
        top_k: keep the ``top_k`` most likely allowed tokens per step (0 = all).
        top_p: nucleus mass (1.0 = all).
        exclude: ``(rows, items)`` never to sample (the user's history under ``mask_history``).
    """
    batch, prompt_len = input_ids.shape
    eos = trie.eos_token_id
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else eos
    config = sampling_generation_config(
        group_size, trie.code_length + 1, temperature, top_k, top_p, pad, eos, getattr(tokenizer, "bos_token_id", None)
    )
    blocked = None if exclude is None else trie.blocked_nodes(exclude[0], exclude[1], batch)
    processors = LogitsProcessorList([TrieLogitsProcessor(trie, prompt_len, renormalize=renormalize, blocked=blocked)])
    with isolated_generation_config(model), torch.inference_mode():
        # generate repeats each prompt G times (repeat_interleave), the layout of the beam cache: share the prompt
        cache = prompt_cache_kwargs(model, input_ids, attention_mask, group_size)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=processors,
            **cache,
        )
    generated = out.sequences[:, prompt_len:].clone()
    if generated.shape[1] < trie.code_length + 1:
        generated = torch.nn.functional.pad(generated, (0, trie.code_length + 1 - generated.shape[1]), value=pad)
    items = trie.items_of(generated[:, : trie.code_length])
    return torch.where(generated[:, trie.code_length] == eos, items, -1).view(batch, group_size)
