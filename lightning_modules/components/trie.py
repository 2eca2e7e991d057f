"""A tensorised prefix trie over item codes and the logits processor that constrains beam search to it.

Every item is a fixed-length tuple of ``L`` code tokens (``<a_12><b_3><c_200><d_7>``), followed by EOS. The
trie is stored as tensors so that masking runs on the accelerator without any device->host sync:

* trie nodes below depth ``L`` ("states") get global ids, the root is ``0``;
* at depth ``d`` the tokens that occur there get *slots* ``0 .. S_d - 1`` (``level_tokens[d]`` lists them,
  ``token_slot[d, token]`` inverts it), so the table width is ``S = max_d S_d`` (256 for a 256-code
  codebook) instead of the vocabulary;
* ``next_state[state, slot]`` is the child's id (``-1``: not a valid continuation), ``allowed`` is
  ``next_state >= 0``; children at depth ``L`` are leaves, ``item_of_leaf[leaf - num_states]`` their item.

HF beam search reorders its beams between logits-processor calls without telling the processor, so a state
cached per row would belong to another beam one step later. :class:`TrieLogitsProcessor` therefore derives
each row's state from the row's own generated tokens: ``d`` vectorised gathers through ``next_state`` at
depth ``d <= L`` (at most 4 tiny ``[rows]`` gathers), then one gather of the allowed slots.

Per-prompt exclusions (the items a user already has, under ``mask_history``) are a ``[prompts, nodes]`` bool table
from :meth:`CodeTrie.blocked_nodes`: a node is blocked when *every* item below it is excluded, so a beam never
enters a prefix without an allowed item and all ``num_beams`` beams are spent on items that can be recommended.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import LogitsProcessor

from datamodules.errors import SemConvError


class CodeCollisionError(SemConvError):
    """Two items share a full code tuple, so generated codes could not be mapped back to one item."""


class CodeTrie(nn.Module):
    """Prefix trie over unique, equal-length item codes, precomputed as tensors.

    The tables are non-persistent buffers: as a submodule of a LightningModule they follow it to its device (and
    stay out of checkpoints, since they are rebuilt from the item index).

    Args:
        codes: one token-id tuple per item (``[N, L]`` tensor or nested sequence), all of length ``L``.
        eos_token_id: the token that must follow the ``L`` code tokens.
        items: the item id of each row of ``codes`` (default ``0 .. N-1``).

    Raises:
        CodeCollisionError: two items share a tuple (the message names them).
        ValueError: empty index or tuples of different lengths.
    """

    def __init__(
        self, codes: torch.Tensor | Sequence[Sequence[int]], eos_token_id: int, items: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        rows = [tuple(int(t) for t in row) for row in (codes.tolist() if isinstance(codes, torch.Tensor) else codes)]
        item_ids = list(range(len(rows))) if items is None else [int(item) for item in items]
        if not rows or len(item_ids) != len(rows):
            raise ValueError(
                f"need a non-empty index with one item id per code tuple (got {len(rows)} tuples, {len(item_ids)} ids)"
            )
        lengths = {len(row) for row in rows}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"code tuples must all have the same non-zero length, got lengths {sorted(lengths)}")
        owner: dict[tuple[int, ...], int] = {}
        collisions: list[str] = []
        for item, row in zip(item_ids, rows, strict=False):
            if row in owner:
                collisions.append(f"items {owner[row]} and {item} share {list(row)}")
            owner.setdefault(row, item)
        if collisions:
            raise CodeCollisionError(
                f"{len(collisions)} code collision(s): "
                f"{'; '.join(collisions[:5])}{' ...' if len(collisions) > 5 else ''}. "
                "Generated codes must identify one item: export a collision-free index, or deduplicate explicitly."
            )
        self.code_length = L = lengths.pop()
        self.eos_token_id = int(eos_token_id)
        self.num_items = len(rows)
        level_tokens = [sorted({row[d] for row in rows}) for d in range(L)]
        if any(self.eos_token_id in tokens for tokens in level_tokens):
            raise ValueError(f"eos_token_id {self.eos_token_id} is also a code token")
        slot_of = [{token: slot for slot, token in enumerate(tokens)} for tokens in level_tokens]
        width = max(len(tokens) for tokens in level_tokens)
        # Global node ids, breadth first: depth-d prefixes get consecutive ids so the root is 0.
        node_of: dict[tuple[int, ...], int] = {(): 0}
        for d in range(1, L + 1):
            for prefix in sorted({row[:d] for row in rows}):
                node_of[prefix] = len(node_of)
        self.num_states = sum(1 for prefix in node_of if len(prefix) < L)
        edges = [
            (node_of[prefix[:-1]], slot_of[len(prefix) - 1][prefix[-1]], node)
            for prefix, node in node_of.items()
            if prefix
        ]
        parent, slot, child = torch.tensor(edges, dtype=torch.long).T
        next_state = torch.full((self.num_states, width), -1, dtype=torch.int32)
        next_state[parent, slot] = child.to(torch.int32)
        leaf_rows = torch.tensor([node_of[row] for row in rows]) - self.num_states  # each item's leaf
        item_of_leaf = torch.empty(len(node_of) - self.num_states, dtype=torch.long)
        item_of_leaf[leaf_rows] = torch.tensor(item_ids)
        vocab_bound = max(max(tokens) for tokens in level_tokens) + 1
        token_slot = torch.full((L, vocab_bound), -1, dtype=torch.long)
        for d, tokens in enumerate(level_tokens):
            token_slot[d, torch.tensor(tokens)] = torch.arange(len(tokens))
        # For exclusions: each leaf's path (node ids at depths 1..L) and how many items lie below every node.
        path_of_leaf = torch.empty(len(rows), L, dtype=torch.long)
        path_of_leaf[leaf_rows] = torch.tensor([[node_of[row[:d]] for d in range(1, L + 1)] for row in rows])
        items_below = torch.zeros(len(node_of), dtype=torch.int32)
        items_below.index_add_(0, path_of_leaf.flatten(), torch.ones(path_of_leaf.numel(), dtype=torch.int32))
        items_below[0] = len(rows)
        leaf_of_item = torch.full((max(item_ids) + 1,), -1, dtype=torch.long)
        leaf_of_item[torch.tensor(item_ids)] = leaf_rows
        flat_tokens = torch.tensor([token for tokens in level_tokens for token in tokens], dtype=torch.long)
        tables = {
            "next_state": next_state,
            "allowed": next_state >= 0,
            "path_of_leaf": path_of_leaf,
            "items_below": items_below,
            "leaf_of_item": leaf_of_item,
            "token_slot": token_slot,
            "item_of_leaf": item_of_leaf,
            "level_token_table": flat_tokens,
        }
        for name, table in tables.items():
            self.register_buffer(name, table, persistent=False)
        self.level_sizes = [len(tokens) for tokens in level_tokens]

    @property
    def level_tokens(self) -> tuple[torch.Tensor, ...]:
        """The sorted token ids that occur at each depth (``level_tokens[d][slot]`` is the token of a slot)."""
        return self.level_token_table.split(self.level_sizes)

    def rekeyed(self, level_tokens: Sequence[torch.Tensor], token_slot: torch.Tensor, eos_token_id: int) -> CodeTrie:
        """The same trie (shared node tables) over other token ids, e.g. the positions of a vocabulary view."""
        other = copy.copy(self)
        other._buffers = dict(self._buffers)  # the copy's own buffer table: the original keeps its token ids
        other._buffers["level_token_table"] = torch.cat(list(level_tokens))
        other._buffers["token_slot"] = token_slot
        other.eos_token_id = int(eos_token_id)
        return other

    @classmethod
    def from_index(
        cls, index: Mapping[int | str, Sequence[str]], tokenizer, eos_token_id: int | None = None, dedupe: bool = False
    ) -> CodeTrie:
        """Build from an LC-Rec ``index.json`` mapping (``{"item": ["<a_1>", ...]}``) and a tokenizer with code tokens.

        Args:
            index: item id -> code-token strings.
            tokenizer: a tokenizer to which the code tokens were added (``convert_tokens_to_ids``).
            eos_token_id: defaults to ``tokenizer.eos_token_id``.
            dedupe: keep only the lowest item id of each colliding tuple instead of raising.
        """
        items = sorted(int(key) for key in index)
        strings = [index[str(item)] if str(item) in index else index[item] for item in items]
        unknown = getattr(tokenizer, "unk_token_id", None)
        codes = []
        for item, tokens in zip(items, strings, strict=False):
            ids = tokenizer.convert_tokens_to_ids(list(tokens))
            if unknown is not None and unknown in ids:
                raise ValueError(
                    f"item {item}: code tokens {tokens} are not all in the tokenizer; add them with add_tokens first"
                )
            codes.append(tuple(ids))
        if dedupe:
            first: dict[tuple[int, ...], int] = {}
            for item, row in zip(items, codes, strict=False):
                first.setdefault(row, item)
            items, codes = list(first.values()), list(first.keys())
        return cls(codes, tokenizer.eos_token_id if eos_token_id is None else eos_token_id, items)

    @property
    def device(self) -> torch.device:
        """Where the tables are."""
        return self.next_state.device

    def walk(self, generated: torch.Tensor) -> torch.Tensor:
        """Node id reached by each row of ``generated`` ``[N, t]`` (``t <= L``); ``-1`` for an invalid prefix."""
        state = torch.zeros(generated.shape[0], dtype=torch.long, device=generated.device)
        bound = self.token_slot.shape[1]
        for depth in range(generated.shape[1]):
            token = generated[:, depth]
            slot = torch.where(token < bound, self.token_slot[depth, token.clamp(0, bound - 1)], -1)
            alive = (state >= 0) & (slot >= 0)
            child = self.next_state[state.clamp(min=0), slot.clamp(min=0)].long()
            state = torch.where(alive, child, -1)
        return state

    @property
    def num_nodes(self) -> int:
        return self.items_below.numel()

    def blocked_nodes(self, rows: torch.Tensor, items: torch.Tensor, num_prompts: int) -> torch.Tensor:
        """``[num_prompts, num_nodes]`` bool: node ``n`` is blocked for prompt ``p`` when all items below are excluded.

        Args:
            rows: prompt index of each excluded ``(row, item)`` pair (repeats are fine).
            items: the excluded item ids; ids the trie does not hold are ignored.
            num_prompts: number of prompts ``B``.

        Built with scatters only (no device->host sync): once per ``generate`` call, not per step.
        """
        num_leaves = self.path_of_leaf.shape[0]
        bound = self.leaf_of_item.numel()
        leaf = self.leaf_of_item[items.long().clamp(0, bound - 1)]
        leaf = torch.where((items >= 0) & (items < bound) & (leaf >= 0), leaf, num_leaves)  # unknown: a spare column
        excluded = torch.zeros(num_prompts, num_leaves + 1, dtype=torch.int32, device=self.device)
        excluded[rows.long(), leaf] = 1  # assignment, so a repeated pair counts once
        excluded = excluded[:, :num_leaves]
        below = torch.zeros(num_prompts, self.num_nodes, dtype=torch.int32, device=self.device)
        for depth in range(self.code_length):
            below.index_add_(1, self.path_of_leaf[:, depth], excluded)
        below[:, 0] = excluded.sum(dim=1)
        return below >= self.items_below

    def items_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Item id of each row of ``codes`` ``[N, L]``; ``-1`` where the row is not a valid item code."""
        leaf = self.walk(codes[:, : self.code_length]) - self.num_states
        valid = leaf >= 0
        return torch.where(valid, self.item_of_leaf[leaf.clamp(min=0)], -1)


class TrieLogitsProcessor(LogitsProcessor):
    """Restricts beam search to the code tuples of a :class:`CodeTrie`, then EOS.

    Works on any ``[batch * beams, vocab]`` scores; all rows have the same number of generated tokens (the
    prompts are left-padded to one length), so the depth is a Python int taken from the input shape. After ``L``
    code tokens, and for any row whose tokens left the trie, only EOS is allowed.

    The mask is written into ``scores``: HF beam search passes a fresh ``log_softmax`` output that nothing else
    holds, and a new ``[rows, vocab]`` buffer per step would cost more than the masking itself on CPU.

    Args:
        trie: the code trie, on the scores' device.
        prompt_len: length of the (padded) prompt; generated tokens start there.
        renormalize: subtract each row's log-sum-exp over its allowed tokens, so a step's scores are
            log-probabilities *given* the trie (for models trained with the trie-restricted code softmax, whose
            vocabulary-wide mass outside the codes is untrained). Off: scores stay the model's own log-probs.
        blocked: ``[prompts, nodes]`` from :meth:`CodeTrie.blocked_nodes`; rows are ``prompt * beams + beam``
            (HF's layout). Applied *after* renormalising, so every item keeps its score given the whole trie and
            the ranking equals the unrestricted ranking with the excluded items removed, without spending beams
            on them.
    """

    def __init__(
        self, trie: CodeTrie, prompt_len: int, renormalize: bool = False, blocked: torch.Tensor | None = None
    ) -> None:
        self.trie = trie
        self.prompt_len = prompt_len
        self.renormalize = renormalize
        self.blocked = blocked
        self._prompt_of_row: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        trie = self.trie
        depth = input_ids.shape[1] - self.prompt_len
        if depth < 0:
            raise ValueError(f"input has {input_ids.shape[1]} tokens, fewer than the prompt length {self.prompt_len}")
        eos = trie.eos_token_id
        if depth >= trie.code_length:
            kept = torch.zeros_like(scores[:, eos]) if self.renormalize else scores[:, eos].clone()
            scores.fill_(-float("inf"))
            scores[:, eos] = kept
            return scores
        state = trie.walk(input_ids[:, self.prompt_len :])
        tokens = trie.level_tokens[depth]
        child = trie.next_state[state.clamp(min=0), : tokens.numel()]
        allowed = (child >= 0) & (state >= 0)[:, None]
        kept = torch.where(allowed, scores.index_select(1, tokens), -float("inf"))
        if self.renormalize:  # rows without an allowed token (dead beams) stay -inf instead of NaN
            kept = kept - torch.logsumexp(kept, dim=1, keepdim=True).nan_to_num(nan=0.0, neginf=0.0)
        if self.blocked is not None:
            kept = kept.masked_fill(self._blocked_children(child), -float("inf"))
        # A row whose prefix left the trie may only end (keeps such dead beams from spelling codes).
        dead_eos = torch.where(state >= 0, -float("inf"), scores[:, eos])
        scores.fill_(-float("inf"))
        scores.index_copy_(1, tokens, kept)
        scores[:, eos] = dead_eos
        return scores

    def _blocked_children(self, child: torch.Tensor) -> torch.Tensor:
        rows, prompts = child.shape[0], self.blocked.shape[0]
        if rows % prompts:
            raise ValueError(
                f"{rows} score rows are not a whole number of beams for the {prompts} prompts of `blocked`"
            )
        if (
            self._prompt_of_row is None
            or self._prompt_of_row.shape[0] != rows
            or self._prompt_of_row.device != child.device
        ):
            self._prompt_of_row = torch.arange(rows, device=child.device) // (rows // prompts)
        return self.blocked[self._prompt_of_row[:, None], child.long().clamp(min=0)]
