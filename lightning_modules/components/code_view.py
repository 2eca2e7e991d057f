"""A small-vocabulary view of a causal LM for trie-constrained beam search.

Constrained beam search only ever picks the trie's code tokens and EOS, yet ``generate`` runs its log-softmax, its
top-k over ``beams x vocab``, the logits processor and the ``output_scores`` copies over the whole vocabulary at
every step. For a small model those vocabulary-wide passes are most of the evaluation (docs/notes.md).

:func:`vocabulary_view` swaps, for the duration of ``generate`` only, the model's input embedding and LM head for
thin wrappers over a *view*: a sorted table of the token ids the search can meet (the trie's tokens, EOS, pad and
the batch's prompt tokens). Inside ``generate`` a token id is a position in that table; the embedding wrapper maps
it back before the model's own embedding, and the head scores the table's rows only. Scores stay exact:

* ``renormalize`` (models trained with the trie softmax): every step is renormalised over the allowed tokens, all
  of which are in the view, so the vocabulary's normaliser cancels and only the table's rows are computed;
* otherwise one extra column holds the log-sum-exp of every logit *outside* the table, so ``generate``'s
  log-softmax over the view equals the full-vocabulary log-probabilities of the table's tokens. The full LM-head
  matmul still runs; everything after it works on the table. The processor never allows that column.

transformers has no option to restrict ``generate`` to a sub-vocabulary (``PrefixConstrainedLogitsProcessor`` and
``bad_words_ids`` mask a full-width score matrix), hence these two wrappers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.components.trie import CodeTrie


@dataclass
class VocabularyView:
    """The view's ``table`` (sorted original ids; position = id inside the view) and the trie re-keyed to it."""

    table: torch.Tensor
    trie: CodeTrie

    def to_view(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Original ids (all in the table) -> view ids."""
        return torch.searchsorted(self.table, token_ids)

    def id_of(self, token_id: int) -> int:
        """The view id of one original id in the table."""
        return int(torch.searchsorted(self.table, torch.tensor([token_id], device=self.table.device)))

    def to_original(self, view_ids: torch.Tensor) -> torch.Tensor:
        """View ids -> original ids; the out-of-table column (never allowed) maps to the table's first token."""
        return self.table[torch.where(view_ids < self.table.numel(), view_ids, 0)]


def build_view(trie: CodeTrie, prompts: torch.Tensor, special_ids: Sequence[int]) -> VocabularyView:
    """The view for one ``generate`` call: the trie's tokens, ``special_ids`` and every token of ``prompts``.

    One ``unique`` per call (a device->host sync per batch, none per decoding step). ``trie`` must be on the prompts'
    device; the view's trie shares its node tables.
    """
    device = prompts.device
    specials = torch.tensor([trie.eos_token_id, *special_ids], dtype=torch.long, device=device)
    table = torch.unique(torch.cat([*trie.level_tokens, specials, prompts.flatten().long()]))
    level_tokens = [torch.searchsorted(table, tokens) for tokens in trie.level_tokens]
    token_slot = torch.full((trie.code_length, table.numel()), -1, dtype=torch.long, device=device)
    for depth, tokens in enumerate(level_tokens):
        token_slot[depth, tokens] = torch.arange(tokens.numel(), device=device)
    eos = int(torch.searchsorted(table, specials[:1]))
    return VocabularyView(table, trie.rekeyed(level_tokens, token_slot, eos))


class _ViewEmbedding(nn.Module):
    """View ids -> the wrapped embedding of their original ids."""

    def __init__(self, embedding: nn.Module, table: torch.Tensor) -> None:
        super().__init__()
        self.embedding, self.table = embedding, table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.table[input_ids])


class _ViewHead(nn.Module):
    """Logits of the table's tokens, plus the out-of-table log-sum-exp column when ``exact_normaliser``."""

    def __init__(self, head: nn.Module, table: torch.Tensor, exact_normaliser: bool) -> None:
        super().__init__()
        self.head, self.table, self.exact_normaliser = head, table, exact_normaliser
        weight = getattr(head, "weight", None)
        # A plain Linear with its weight in place: multiply by the table's rows only. A wrapper (peft) or a sharded
        # weight (ZeRO-3 keeps a 0-element placeholder outside the module call) goes through the module itself.
        self.rows_only = type(head) is nn.Linear and weight is not None and weight.numel() > 0 and not exact_normaliser
        if self.rows_only:  # gathered once per generate call, not per decoding step
            self.rows = weight[table]
            self.bias = None if head.bias is None else head.bias[table]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.rows_only:
            return F.linear(hidden, self.rows, self.bias)
        logits = self.head(hidden)
        viewed = logits.index_select(-1, self.table)
        if not self.exact_normaliser:
            return viewed
        outside = logits.float().index_fill(-1, self.table, -float("inf")).logsumexp(-1, keepdim=True)
        return torch.cat([viewed.float(), outside], dim=-1)


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The HF ``*ForCausalLM`` under a peft wrapper (or the model itself): the one place that unwraps peft."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def vocabulary_view(model: nn.Module, view: VocabularyView, exact_normaliser: bool) -> Iterator[None]:
    """Run ``model`` on view ids with logits over the view (see the module docstring); restored on exit."""
    lm = causal_lm_of(model)
    embedding, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    lm.set_input_embeddings(_ViewEmbedding(embedding, view.table))
    lm.set_output_embeddings(_ViewHead(head, view.table, exact_normaliser))
    try:
        yield
    finally:
        lm.set_input_embeddings(embedding)
        lm.set_output_embeddings(head)
