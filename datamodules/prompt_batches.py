"""Tokenisation and collation of rendered prompt samples: strings and token lists to a causal LM's batch tensors.

Plain functions of a tokenizer and token lists, used by :class:`datamodules.prompt_tasks.PromptTasks` (and the
serving prompts): a training sequence is ``prompt ids + response ids + [EOS]``, its labels ``-100`` on the prompt
and on padding; training rows are right-padded (or packed as prefix trees, :mod:`datamodules.packing`), generation
prompts left-padded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from datamodules.packing import collate_packs, pack_tree


def left_padded(prompt_ids: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, T]`` of prompts left-padded to the longest (generation layout)."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for out, ids in enumerate(prompt_ids):
        input_ids[out, width - len(ids) :] = torch.tensor(ids)
        attention[out, width - len(ids) :] = 1
    return input_ids, attention


def tokenize_samples(
    tokenizer, prompts: list[str], responses: Sequence[int | str], code_ids: np.ndarray, max_length: int
) -> tuple[list[list[int]], list[list[int]], np.ndarray]:
    """Token ids of rendered samples and which of them fit ``max_length``.

    Args:
        tokenizer: the model's fast tokenizer (code tokens added, an EOS token).
        prompts: the samples' prompt strings (tokenized with special tokens).
        responses: per sample, an item id (its code tokens' ids, taken from ``code_ids``) or a text (tokenized
            without special tokens).
        code_ids: ``[num_items, tokens_per_item]`` code-token ids of every item.
        max_length: the longest ``prompt + response + EOS`` kept.

    Returns:
        Prompt ids, response ids with EOS appended, and a boolean ``[N]`` of the samples that fit ``max_length``.
    """
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    text_rows = [i for i, response in enumerate(responses) if isinstance(response, str)]
    text_ids = tokenizer([responses[i] for i in text_rows], add_special_tokens=False)["input_ids"] if text_rows else []
    response_ids = [None if isinstance(r, str) else code_ids[r].tolist() for r in responses]
    for i, ids in zip(text_rows, text_ids, strict=False):
        response_ids[i] = ids
    response_ids = [ids + [tokenizer.eos_token_id] for ids in response_ids]
    fits = np.array([len(p) + len(r) <= max_length for p, r in zip(prompt_ids, response_ids, strict=False)], dtype=bool)
    return prompt_ids, response_ids, fits


def right_padded(
    prompt_ids: list[list[int]], response_ids: list[list[int]], keep: np.ndarray, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels [B, T]`` of the samples ``keep`` (training layout).

    Args:
        prompt_ids: every sample's prompt ids.
        response_ids: every sample's response ids (EOS included), the supervised part.
        keep: indices of the samples that become the batch's rows, in order.
        pad_token_id: the id of the padding columns.

    Returns:
        The batch tensors; ``labels`` is ``-100`` off the responses.
    """
    lengths = np.array([len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=False)], dtype=np.int64)
    width = int(lengths[keep].max()) if len(keep) else 0
    input_ids = torch.full((len(keep), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(keep), width), -100, dtype=torch.long)
    attention = torch.zeros((len(keep), width), dtype=torch.long)
    for out, i in enumerate(keep):
        prompt, response = prompt_ids[i], response_ids[i]
        input_ids[out, : lengths[i]] = torch.tensor(prompt + response)
        labels[out, len(prompt) : lengths[i]] = torch.tensor(response)
        attention[out, : lengths[i]] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def packed(
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    fits: np.ndarray,
    pack_sizes: Sequence[int],
    pad_token_id: int,
) -> dict[str, torch.Tensor]:
    """Consecutive samples grouped into packs, each pack's fitting samples laid out as one prefix-tree row.

    Args:
        prompt_ids: every sample's prompt ids, pack after pack.
        response_ids: every sample's response ids (EOS included).
        fits: which samples are kept; a pack none of whose samples fits yields no row.
        pack_sizes: the number of consecutive samples of each pack.
        pad_token_id: the id of the padding columns.

    Returns:
        ``input_ids``/``position_ids``/``labels [B, T]`` and a boolean ``attention_mask [B, 1, T, T]``
        (:func:`datamodules.packing.collate_packs`).
    """
    bounds = np.cumsum([0, *pack_sizes])
    trees = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=False):
        kept = [i for i in range(start, stop) if fits[i]]
        if kept:
            trees.append(pack_tree([prompt_ids[i] for i in kept], [response_ids[i] for i in kept]))
    return collate_packs(trees, pad_token_id)
