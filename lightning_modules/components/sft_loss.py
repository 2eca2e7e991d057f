"""Stage 3's supervised fine-tuning loss of a causal LM on item-code prompts (plain functions of the LM).

:func:`response_loss` applies the LM head at the supervised positions only (labels != -100): over the whole prompt
it would cost ``T x vocab`` per sample for nothing. With a code trie (``code_softmax: trie``), :func:`trie_loss`
scores each code target among the trie's continuations of its prefix only, exactly the item likelihood the
renormalised constrained decoder ranks by; text targets keep the whole vocabulary. Packed batches
(:mod:`datamodules.packing`) carry a boolean prefix-tree mask, which :func:`tree_mask` hands to the attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.components.code_logprob import trie_code_rows, trie_level_logits
from lightning_modules.components.trie import CodeTrie


def response_loss(lm: nn.Module, batch: dict[str, torch.Tensor], trie: CodeTrie | None = None) -> torch.Tensor:
    """Mean cross-entropy over supervised tokens, with the LM head applied to those positions only.

    Args:
        lm: the HF ``*ForCausalLM`` (its decoder and LM head are called separately).
        batch: ``input_ids``/``labels [B, T]`` (``-100`` off the responses), ``attention_mask`` (``[B, T]``, or a
            packed batch's boolean ``[B, 1, T, T]``) and optionally ``position_ids``.
        trie: the item trie to score code targets against (:func:`trie_loss`); None: the whole vocabulary.

    Returns:
        The scalar loss.
    """
    mask = batch["attention_mask"]
    if mask.ndim == 4:  # packed prefix trees (datamodules.packing): a boolean ancestor mask
        mask = tree_mask(lm, mask)
    hidden = lm.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch.get("position_ids"), use_cache=False
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    supervised = targets != -100
    if trie is not None:
        return trie_loss(lm, trie, hidden[:, :-1], targets, supervised)
    logits = lm.get_output_embeddings()(hidden[:, :-1][supervised])
    return F.cross_entropy(logits.float(), targets[supervised])


def tree_mask(lm: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """A packed batch's boolean ``[B, 1, T, T]`` mask in the form the attention implementation takes as-is.

    Args:
        lm: the HF causal LM (its ``config._attn_implementation`` decides the form).
        mask: ``mask[b, 0, q, k]``: query column ``q`` sees key column ``k``.

    Returns:
        The boolean mask (SDPA), or an additive float mask in the embeddings' dtype (eager).

    Raises:
        ValueError: the attention implementation takes no 4-D mask (e.g. flash attention).
    """
    implementation = getattr(lm.config, "_attn_implementation", "sdpa")
    if implementation == "sdpa":
        return mask  # SDPA reads True as "attend"
    if implementation == "eager":
        dtype = lm.get_input_embeddings().weight.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(
        f"pack_prompts needs an attention implementation that takes a 4-D mask (sdpa or eager); the model "
        f"uses {implementation!r}: set pack_prompts: 0 or attn_implementation: sdpa"
    )


def trie_loss(
    lm: nn.Module, trie: CodeTrie, hidden: torch.Tensor, targets: torch.Tensor, supervised: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy with each code target scored among the trie's continuations of its prefix.

    That is the exact log-likelihood of the item under the renormalised constrained decoder: a product over
    code positions of softmaxes over the valid next codes. Text targets keep the whole vocabulary; the EOS
    that closes a code is not trained (the trie forces it). One pass per code depth (L of them).

    Args:
        lm: the HF causal LM (its LM head scores the targets).
        trie: the item trie.
        hidden: ``[B, T, hidden]`` decoder states, position ``t`` predicting ``targets[:, t]``.
        targets: ``[B, T]`` target token ids.
        supervised: ``[B, T]`` whether a target is trained (labels != -100).

    Returns:
        The mean over the trained targets (code and text), a float32 scalar.
    """
    head = lm.get_output_embeddings()
    bound = trie.token_slot.shape[1]
    in_range = supervised & (targets < bound)
    slots = torch.where(in_range[None], trie.token_slot[:, targets.clamp(0, bound - 1)], -1)  # [L, B, T]
    depth = torch.where((slots >= 0).any(0), (slots >= 0).long().argmax(0), -1)  # code level of each target
    previous_is_code = F.pad(depth[:, :-1] >= 0, (1, 0), value=False)
    closes_code = (targets == trie.eos_token_id) & previous_is_code
    total = hidden.new_zeros((), dtype=torch.float32)
    coded = torch.zeros_like(supervised)
    code_rows = trie_code_rows(head, trie)  # one gather of every level's LM-head rows
    for d in range(trie.code_length):  # an empty depth contributes a zero sum
        rows, cols = torch.nonzero(depth == d, as_tuple=True)
        prefix = targets[rows[:, None], (cols[:, None] - d + torch.arange(d, device=targets.device)).clamp(min=0)]
        state = trie.walk(prefix)
        valid = (state >= 0) & (cols >= d)  # a code token outside any item's code (e.g. in a text) is scored as text
        rows, cols, state = rows[valid], cols[valid], state[valid]
        logits = trie_level_logits(hidden[rows, cols], code_rows[d], trie, state)
        total = total + F.cross_entropy(logits, slots[d, rows, cols], reduction="sum")
        coded[rows, cols] = True
    is_text = supervised & ~coded & ~closes_code
    total = total + F.cross_entropy(head(hidden[is_text]).float(), targets[is_text], reduction="sum")
    return total / (coded | is_text).sum().clamp(min=1)
