"""Trie-constrained beam search for encoder-decoder models (T5): top-K item ids per encoder input.

The decoder side of an encoder-decoder is the decoder-only case with a one-token prompt: ``generate`` starts
every beam from ``decoder_start_token_id`` and hands the logits processor the decoder's tokens, so
:class:`~lightning_modules.components.trie.TrieLogitsProcessor` applies unchanged with ``prompt_len = 1``, and
the generation config (:func:`~lightning_modules.components.decoding.beam_generation_config`: ``do_sample=False``,
``length_penalty=0``, summed log-probabilities), the checkpoint-config isolation, the history exclusion
(:meth:`CodeTrie.blocked_nodes`) and the final ranking of distinct valid items
(:func:`~lightning_modules.components.decoding.rank_distinct`) are the decoder-only search's own. What the
decoder-only path adds (left-padded prompt checks, the shared prompt KV cache, the code-vocabulary view) does not
apply: the encoder runs once per input, and a semantic-ID vocabulary is the codes already.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList

from lightning_modules.components.decoding import (
    BeamBatchResult,
    DecodingConfig,
    beam_generation_config,
    isolated_generation_config,
    rank_distinct,
)
from lightning_modules.components.trie import CodeTrie, TrieLogitsProcessor
from lightning_modules.metrics import rank_in_list


def encoder_decoder_topk(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: CodeTrie,
    num_beams: int,
    num_return_sequences: int,
    pad_token_id: int,
    decoder_start_token_id: int,
    renormalize: bool = False,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K items per encoder input by trie-constrained beam search over the decoder.

    Args:
        model: a HF encoder-decoder (``T5ForConditionalGeneration``).
        input_ids: ``[B, S]`` encoder inputs (any padding side).
        attention_mask: ``[B, S]`` 1 on real tokens.
        trie: the valid item codes (decoder token ids), its EOS the model's; on the inputs' device.
        num_beams: beam width.
        num_return_sequences: K, at most ``num_beams``.
        pad_token_id: the decoder's pad token.
        decoder_start_token_id: the token every decoder sequence starts from (T5: the pad token).
        renormalize: score each step over the trie's allowed tokens only.
        exclude: ``(rows, items)`` pairs never to return (excluded inside the search).

    Returns:
        ``items`` ``[B, K]`` distinct valid item ids, best first, and their summed log-prob ``scores``; rows are
        padded with ``-1`` / ``-inf`` when fewer than K valid items were found.
    """
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) cannot exceed num_beams ({num_beams})")
    if trie.device != input_ids.device:
        raise ValueError(
            f"the code trie is on {trie.device} but the inputs are on {input_ids.device}: register the trie as a "
            "submodule of the LightningModule (Lightning moves it) or call trie.to(device)"
        )
    batch, length = input_ids.shape[0], trie.code_length
    config = beam_generation_config(num_beams, num_return_sequences, length + 1, pad_token_id, trie.eos_token_id, None)
    config.decoder_start_token_id = decoder_start_token_id
    blocked = None if exclude is None else trie.blocked_nodes(exclude[0], exclude[1], batch)
    processor = TrieLogitsProcessor(trie, prompt_len=1, renormalize=renormalize, blocked=blocked)
    with isolated_generation_config(model), torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([processor]),
        )
    generated = out.sequences[:, 1:]  # after the decoder start token
    if generated.shape[1] < length + 1:  # every hypothesis ended early: nothing valid
        generated = torch.nn.functional.pad(generated, (0, length + 1 - generated.shape[1]), value=pad_token_id)
    items = trie.items_of(generated[:, :length])
    items = torch.where(generated[:, length] == trie.eos_token_id, items, -1).view(batch, num_return_sequences)
    scores = out.sequences_scores.view(batch, num_return_sequences).float()
    return rank_distinct(items, scores)


def encoder_decoder_eval_batch(
    model,
    trie: CodeTrie,
    batch: dict[str, torch.Tensor],
    config: DecodingConfig,
    pad_token_id: int,
    decoder_start_token_id: int,
) -> BeamBatchResult:
    """Beam-search one batch of encoder inputs and rank each row's ``target_item`` among the results.

    The encoder-decoder counterpart of :func:`~lightning_modules.components.decoding.beam_eval_batch` (same
    batch keys: ``input_ids``, ``attention_mask``, optional ``target_item`` and, under ``config.mask_history``,
    ``seen_rows``/``seen_items``), so :class:`callbacks.BeamSearchEvaluator` reads either.
    """
    exclude = (batch["seen_rows"], batch["seen_items"]) if config.mask_history else None
    items, scores = encoder_decoder_topk(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        trie,
        config.num_beams,
        config.top_k,
        pad_token_id,
        decoder_start_token_id,
        renormalize=config.renormalize,
        exclude=exclude,
    )
    target = batch.get("target_item")
    return BeamBatchResult(items, scores, None if target is None else rank_in_list(items, target))
