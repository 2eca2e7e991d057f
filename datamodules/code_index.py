"""The code-index format: LC-Rec code-token strings, tuple <-> token conversion, collision masks and rates.

An item's index is its tuple of codes, written as LC-Rec tokens ``["<a_12>", "<b_3>", "<c_200>", "<d_7>"]``
(one letter per level). An index file is a JSON object ``{"<item_idx>": [tokens]}``. How colliding tuples are
resolved is the tokenizer model's business (:mod:`lightning_modules.components.code_assignment`).
"""

from __future__ import annotations

import re

import torch

TOKEN = re.compile(r"^<([a-z])_(\d+)>$")

#: The stage-2 artifact (:class:`datamodules.artifacts.ArtifactWriter` kind) and its files.
KIND = "code_index"
INDEX_FILE = "index.json"  # the LC-Rec index of every item, collision-free
CODE_VECTORS_FILE = "code_vectors.pt"  # [L, K, dim] float32: code k of level l (stage 3's code-row initialisation)
CODEBOOK_FILE = "codebook.pt"  # quantiser config + state and LLM projection: enough to code new items (cold start)


def level_letter(level: int) -> str:
    """The token letter of a code level (``0 -> "a"``)."""
    if not 0 <= level < 26:
        raise ValueError(f"level {level} has no token letter (at most 26 levels)")
    return chr(ord("a") + level)


def codes_to_tokens(codes: torch.Tensor) -> list[list[str]]:
    """``[N, T]`` codes -> LC-Rec token lists (``<a_i>``, ``<b_j>``, ...)."""
    letters = [level_letter(level) for level in range(codes.shape[1])]
    return [[f"<{letters[level]}_{code}>" for level, code in enumerate(row)] for row in codes.tolist()]


def index_json(codes: torch.Tensor) -> dict[str, list[str]]:
    """``[N, T]`` codes of items ``0..N-1`` -> the LC-Rec index object ``{"<item_idx>": [tokens]}``."""
    return {str(item): tokens for item, tokens in enumerate(codes_to_tokens(codes))}


def tokens_to_codes(index: dict[str, list[str]] | dict[int, list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse an LC-Rec index (``{"item": ["<a_1>", ...]}``) into sorted item ids ``[N]`` and codes ``[N, T]``."""
    items = sorted(int(key) for key in index)
    rows = []
    for item in items:
        tokens = index[str(item)] if str(item) in index else index[item]
        row = []
        for level, token in enumerate(tokens):
            match = TOKEN.match(token) if isinstance(token, str) else None
            if match is None or match.group(1) != level_letter(level):
                raise ValueError(f"item {item}: token {token!r} at level {level} is not <{level_letter(level)}_N>")
            row.append(int(match.group(2)))
        rows.append(row)
    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        raise ValueError(f"index tuples have different lengths {sorted(lengths)}; expected one length")
    return torch.tensor(items, dtype=torch.long), torch.tensor(rows, dtype=torch.long).reshape(len(items), -1)


def shared_mask(codes: torch.Tensor) -> torch.Tensor:
    """``[N]`` True for items whose full tuple is shared with another item."""
    if codes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool)
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    return counts[inverse] > 1


def collision_rate(codes: torch.Tensor) -> float:
    """Share of items whose full code tuple is shared with at least one other item."""
    return float(shared_mask(codes).float().mean()) if codes.shape[0] else 0.0


def level_statistics(codes: torch.Tensor, codebook_size: int) -> list[dict[str, float]]:
    """Per level: share of codes used, perplexity ``exp(entropy)`` of the code distribution, dead codes."""
    stats = []
    for level in range(codes.shape[1]):
        counts = torch.bincount(codes[:, level], minlength=codebook_size).double()
        p = counts / counts.sum().clamp_min(1)
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        used = int((counts > 0).sum())
        stats.append(
            {"usage": used / codebook_size, "perplexity": float(entropy.exp()), "dead_codes": codebook_size - used}
        )
    return stats
