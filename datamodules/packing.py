"""Shared-prefix packing of training samples: the same loss with far fewer tokens.

A sequential sample and its ``negative_ratio`` negatives share the user's history, and LC-Rec trains on every
prefix of a user's sequence, so LC-Rec's layout (one sequence per sample) runs nearly the same ~80-token prompt
many times. A *pack* lays several samples out as a token tree in one row (those of up to ``pack_prompts``
consecutive training prefixes of one user): each prompt prefix they share once, then per sample only what
differs. A 4-D attention mask lets every token attend to exactly its ancestors in the tree, and position ids
restart each branch at its depth, so every sample's hidden states (and loss) equal those of its own unpacked
sequence (``tests/test_packing.py`` checks loss and gradients): a layout, not an approximation.

Each sample's *last* prompt token is never shared: its hidden state predicts the first response token, which
differs between samples, and a column can hold one label. So a sample contributes its unshared prompt tokens,
a copy of its last prompt token, its response and EOS. Ancestors always precede their descendants in a row,
and the row-wise shift of the labels (column ``t`` predicts the label of ``t + 1``) stays valid: a branch is
contiguous, and the column after a branch's EOS is never supervised.

Hand-written because no library packs a prefix *tree*: transformers' packed-sequence support (``position_ids``
restarts / flash-attention varlen) concatenates independent sequences and would not share a prefix.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE = -100


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    width = min(len(a), len(b))
    differs = np.flatnonzero(a[:width] != b[:width])
    return int(differs[0]) if len(differs) else width


def pack_tree(
    prompts: list[list[int]], responses: list[list[int]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lay out samples (``prompt + response``; put EOS in the response) as one prefix tree.

    Args:
        prompts: token ids of each sample's prompt (at least one token each).
        responses: token ids of each sample's response, supervised.

    Returns:
        ``input_ids [T]``, ``position_ids [T]``, ``labels [T]`` (``-100`` off the responses) and the boolean
        attention mask ``[T, T]`` (``mask[q, k]``: query column ``q`` sees key column ``k``).
    """
    ids, positions, labels = [], [], []
    paths: dict[int, np.ndarray] = {}  # each sample's columns, root to EOS
    blocks: list[tuple[np.ndarray, int, int]] = []  # (columns of the shared ancestors, first own column, end)
    if any(not prompt for prompt in prompts):
        raise ValueError("every packed sample needs a prompt of at least one token")
    # In lexicographic order of the shareable tokens (each prompt minus its last token), the sample sharing the
    # longest prefix with a sample among those before it is its predecessor: one comparison per sample.
    order = sorted(range(len(prompts)), key=lambda i: prompts[i][:-1])
    previous_share, previous = None, None
    width = 0
    for i in order:
        prompt, response = prompts[i], responses[i]
        share = np.asarray(prompt[:-1], dtype=np.int64)
        depth = _common_prefix(share, previous_share) if previous is not None else 0
        tokens = np.concatenate([share[depth:], [prompt[-1]], np.asarray(response, dtype=np.int64)])
        ancestors = paths[previous][:depth] if depth else np.zeros(0, dtype=np.int64)
        columns = np.arange(width, width + len(tokens))
        blocks.append((ancestors, width, width + len(tokens)))
        width += len(tokens)
        ids.append(tokens)
        positions.append(np.arange(depth, depth + len(tokens)))
        label = np.full(len(tokens), IGNORE, dtype=np.int64)
        label[len(tokens) - len(response) :] = response
        labels.append(label)
        paths[i] = np.concatenate([ancestors, columns])
        previous_share, previous = share, i
    # a sample's own columns are contiguous: they see all of its shared ancestors and themselves causally
    mask = np.zeros((width, width), dtype=bool)
    causal = np.tril(np.ones((width, width), dtype=bool))
    for ancestors, start, end in blocks:
        mask[start:end, ancestors] = True
        mask[start:end, start:end] = causal[: end - start, : end - start]
    return np.concatenate(ids), np.concatenate(positions), np.concatenate(labels), mask


def collate_packs(
    packs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad packed rows into ``input_ids``/``position_ids``/``labels [B, T]`` and a mask ``[B, 1, T, T]``.

    Padding columns attend to themselves only: a query row with no visible key would make SDPA return NaN,
    which would reach the gradients through the masked softmax.
    """
    width = max((len(ids) for ids, *_ in packs), default=0)
    input_ids = torch.full((len(packs), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(packs), width), dtype=torch.long)
    labels = torch.full((len(packs), width), IGNORE, dtype=torch.long)
    mask = torch.eye(width, dtype=torch.bool).expand(len(packs), 1, width, width).clone()
    for row, (ids, positions, label, allowed) in enumerate(packs):
        length = len(ids)
        input_ids[row, :length] = torch.from_numpy(ids)
        position_ids[row, :length] = torch.from_numpy(positions)
        labels[row, :length] = torch.from_numpy(label)
        mask[row, 0, :length, :length] = torch.from_numpy(allowed)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask, "labels": labels}
