"""The live path of ``semconv serve --model``: the cache build's constrained beam search for one posted history.

:func:`load_live_recommender` loads an exported stage-3 artifact (:func:`callbacks.load_exported_llm`: weights,
tokenizer, the item index it was trained on, manifest) and returns a :class:`LiveRecommender`. A call builds the
prompt with the cache build's own code (:func:`datamodules.predict_prompts.serving_batch`: the last
``max_history`` items in LC-Rec's evaluation prompt, every posted item masked) and ranks with its own search
(:func:`lightning_modules.components.decoding.beam_eval_batch`, ``do_sample=False``), so a known user's history
gets that user's cached list.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.artifacts import read_artifact
from datamodules.code_index import INDEX_FILE, tokens_to_codes
from datamodules.code_index import KIND as INDEX_KIND
from datamodules.errors import ArtifactError, SemConvError
from datamodules.item_index import ItemIndex
from datamodules.predict_prompts import serving_batch
from lightning_modules.components.decoding import DecodingConfig, beam_eval_batch
from lightning_modules.components.trie import CodeTrie


class UnknownItems(SemConvError):
    """A posted history names items the model's index does not have (the service answers 422)."""


def _index(tokens: dict[str, list[str]], manifest: dict[str, Any], source: str) -> ItemIndex:
    items, codes = tokens_to_codes(tokens)
    if not torch.equal(items, torch.arange(len(items))):
        raise ArtifactError(f"{source}: item ids must be 0..{len(items) - 1}; export the LLM again")
    return ItemIndex(codes.numpy(), manifest["num_levels"], manifest["codebook_size"], source, manifest["index_hash"])


class LiveRecommender:
    """``(history: original item ids, k) -> (item ids, beam scores)``, best first; thread-safe (one search at a time).

    Args:
        model: the exported causal LM (eval mode).
        tokenizer: its tokenizer, with the code tokens.
        index: the items' codes (the export's, or a cold-start extension of it).
        decoding: beams, K, renormalisation and history masking of the cache build.
        max_history: history items in the prompt.
        item_names: original item ids by item row (default: the row numbers, as the index keys).
    """

    def __init__(
        self,
        model,
        tokenizer,
        index: ItemIndex,
        decoding: DecodingConfig,
        max_history: int,
        item_names: Sequence[str] | None = None,
    ) -> None:
        num_items = len(index.codes)
        self.names = np.asarray([str(row) for row in range(num_items)] if item_names is None else item_names)
        if len(self.names) != num_items:
            raise SemConvError(f"item_names has {len(self.names)} ids, the index {num_items} items; one per item row")
        self.model, self.tokenizer, self.decoding, self.max_history = model, tokenizer, decoding, max_history
        self.code_text = ["".join(tokens) for tokens in index.tokens()]
        token_ids = torch.from_numpy(index.token_ids(tokenizer.get_vocab()))
        self.trie = CodeTrie(token_ids, eos_token_id=tokenizer.eos_token_id)
        self.row_of = {name: row for row, name in enumerate(self.names.tolist())}
        self._lock = threading.Lock()

    @property
    def k(self) -> int:
        """Most items one call returns (the decoding's K)."""
        return self.decoding.top_k

    def __call__(self, history: Sequence[str], k: int) -> tuple[list[str], list[float]]:
        """The top ``k`` items for ``history`` (oldest first); items in it are excluded under ``mask_history``.

        Raises:
            UnknownItems: an id the index does not have (the message names it).
            ValueError: ``k`` outside ``1..K``.
        """
        unknown = [str(item) for item in history if str(item) not in self.row_of]
        if unknown or not history:
            raise UnknownItems(
                f"unknown item id {unknown[0]!r} in history ({len(unknown)} unknown); items are the ids the model's "
                f"index knows (e.g. {self.names[0]!r})"
                if unknown
                else "history must name at least one item"
            )
        if not 1 <= k <= self.k:
            raise ValueError(f"k must be between 1 and {self.k} (the live path's K); got k={k}")
        rows = np.asarray([self.row_of[str(item)] for item in history], dtype=np.int64)
        batch = serving_batch(self.tokenizer, self.code_text, [rows], self.max_history)
        with self._lock:
            result = beam_eval_batch(self.model, self.tokenizer, self.trie, batch, self.decoding)
        items, scores = result.items[0], result.scores[0]
        keep = items >= 0
        return self.names[items[keep][:k].numpy()].tolist(), scores[keep][:k].tolist()


def load_live_recommender(
    model_dir: str | Path,
    index_dir: str | Path | None = None,
    num_beams: int | None = None,
    renormalize: bool | None = None,
    max_history: int | None = None,
    exclude_seen: bool = True,
    item_names: Sequence[str] | None = None,
) -> LiveRecommender:
    """The live path over an exported stage-3 artifact.

    Args:
        model_dir: the ``callbacks.LLMExporter`` directory.
        index_dir: a cold-start extension of the export's index (a ``code_index`` artifact from
            ``callbacks.index_export.assign_codes``): its first items' codes must equal the export's.
        num_beams: beam width; None reads the manifest's ``decoding`` record.
        renormalize: ``True`` for a model trained with ``code_softmax: trie``; None reads the manifest.
        max_history: history items in the prompt; None reads the manifest (20 when absent, the project default).
        exclude_seen: never return the posted items (as the cache build's default).
        item_names: original item ids by item row (default: the row numbers).

    Raises:
        SemConvError: an export without a ``decoding`` record and no ``num_beams``/``renormalize`` given, or an
            index that does not extend the export's.
    """
    from callbacks.llm_export import load_exported_llm

    model, tokenizer, manifest = load_exported_llm(model_dir)
    model.eval()
    recorded = manifest.get("decoding") or {}
    beams = num_beams if num_beams is not None else recorded.get("num_beams")
    renorm = renormalize if renormalize is not None else recorded.get("renormalize")
    if beams is None or renorm is None:
        raise SemConvError(
            f"{model_dir}/manifest.json has no decoding record (an export from before it was recorded): give the "
            "model's settings, `semconv serve --num-beams <model.num_beams> --code-softmax <model.code_softmax>`"
        )
    decoding = DecodingConfig(
        beams,
        min(recorded.get("top_k", beams), beams),
        renormalize=bool(renorm),
        mask_history=exclude_seen,
        do_sample=False,
    )
    tokens = json.loads((Path(model_dir) / INDEX_FILE).read_text(encoding="utf-8"))  # hash checked by the loader
    index = _index(tokens, manifest, str(model_dir))
    if index_dir is not None:
        artifact = read_artifact(index_dir, INDEX_KIND, fix="pass the directory assign_codes wrote")
        extended = json.loads(artifact.file(INDEX_FILE).read_text(encoding="utf-8"))
        if any(extended.get(key) != value for key, value in tokens.items()):
            raise SemConvError(
                f"{index_dir}: its items 0..{len(tokens) - 1} do not have the codes the model in {model_dir} was "
                "trained on; a cold-start index must extend the training index (assign_codes never changes them)"
            )
        index = _index(extended, manifest, str(index_dir))
        if index.vocabulary() != _index(tokens, manifest, str(model_dir)).vocabulary():
            raise SemConvError(f"{index_dir}: the new items use code tokens the model in {model_dir} does not have")
    history = max_history if max_history is not None else int(manifest.get("max_history", 20))
    return LiveRecommender(model, tokenizer, index, decoding, history, item_names)
