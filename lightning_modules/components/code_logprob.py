"""Log-probabilities of item codes under the constrained decoder's softmax (stage 3's trie loss, stage 4's GRPO).

Two scorings, matching the two ways :func:`lightning_modules.components.decoding.generate_topk` ranks items:

* ``renormalize`` (``code_softmax: trie``): code ``d`` is scored by a softmax over the trie's continuations of its
  prefix only, with the LM head's code rows of level ``d``; the closing EOS is forced by the trie (log-prob 0);
* otherwise: every code token and the closing EOS by the model's softmax over the whole vocabulary.

The sum over an item's tokens is the beam-search score of that item (HF's ``sequences_scores`` with
``length_penalty=0``). :func:`trie_code_rows` and :func:`trie_level_logits` are the pieces stage 3's loss
(:func:`lightning_modules.components.sft_loss.trie_loss`) uses too, so training, RL and decoding score codes one way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.components.trie import CodeTrie


def trie_code_rows(head: nn.Module, trie: CodeTrie) -> tuple[torch.Tensor, ...]:
    """The LM head's rows of each level's code tokens (``[S_d, hidden]`` per level), in the trie's slot order.

    One gather of every level: its backward scatters into a ``[vocab, hidden]`` gradient once, where one gather per
    level would zero-fill and add a vocabulary-sized buffer ``L`` times per step.
    """
    return head.weight.index_select(0, torch.cat(trie.level_tokens)).split(trie.level_sizes)


def trie_level_logits(hidden: torch.Tensor, rows: torch.Tensor, trie: CodeTrie, state: torch.Tensor) -> torch.Tensor:
    """Float logits ``[N, S_d]`` of one level's codes, ``-inf`` where the trie does not continue ``state`` ``[N]``.

    Args:
        hidden: ``[N, hidden]`` states at the positions that predict a level-``d`` code.
        rows: that level's LM-head rows (:func:`trie_code_rows`).
        trie: the item trie.
        state: each row's trie node (:meth:`CodeTrie.walk` of its code prefix), all valid.
    """
    logits = (hidden @ rows.T).float()
    return logits.masked_fill(~trie.allowed[state, : rows.shape[0]], -float("inf"))


def item_token_logprobs(
    lm: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    codes: torch.Tensor,
    trie: CodeTrie,
    renormalize: bool,
) -> torch.Tensor:
    """Per-token log-probabilities of item codes after their prompts, by one teacher-forced pass.

    Args:
        lm: a HF ``*ForCausalLM`` (under peft, its base model: the LoRA layers are injected into it).
        input_ids: ``[N, P]`` left-padded prompts (the evaluation layout).
        attention_mask: ``[N, P]`` 1 on real tokens.
        codes: ``[N, L]`` the items' code-token ids (valid items of ``trie``).
        trie: the item trie, on the prompts' device.
        renormalize: score codes over the trie's continuations (``code_softmax: trie``); otherwise over the
            vocabulary, EOS included.

    Returns:
        ``[N, L]`` (``renormalize``) or ``[N, L + 1]`` float log-probs; a row's sum is its item's decoder score.
    """
    rows, prompt_len = input_ids.shape
    length = trie.code_length
    sequence = torch.cat([input_ids, codes], dim=1)  # the EOS input is never needed: nothing is predicted after it
    mask = torch.cat([attention_mask, attention_mask.new_ones(rows, length)], dim=1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate derives them from left padding
    hidden = lm.get_decoder()(
        input_ids=sequence, attention_mask=mask, position_ids=positions, use_cache=False
    ).last_hidden_state[:, prompt_len - 1 :]  # [N, L + 1]: the states that predict codes 0..L-1, then EOS
    head = lm.get_output_embeddings()
    if not renormalize:
        eos = torch.full((rows, 1), trie.eos_token_id, dtype=codes.dtype, device=codes.device)
        targets = torch.cat([codes, eos], dim=1)
        return F.log_softmax(head(hidden).float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    code_rows = trie_code_rows(head, trie)
    levels = []
    for depth in range(length):
        state = trie.walk(codes[:, :depth])
        logits = trie_level_logits(hidden[:, depth], code_rows[depth], trie, state)
        slot = trie.token_slot[depth, codes[:, depth]]
        levels.append(F.log_softmax(logits, dim=-1).gather(1, slot[:, None]).squeeze(1))
    return torch.stack(levels, dim=1)
