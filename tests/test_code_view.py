"""The code-vocabulary view of constrained beam search: same items and scores as the full vocabulary, model restored."""

from __future__ import annotations

import contextlib

import pytest
import torch

from experiments.bench_decoding import unshared_prompts
from lightning_modules.components.code_view import build_view, vocabulary_view
from lightning_modules.components.decoding import generate_topk
from lightning_modules.components.trie import CodeTrie
from tests.test_decoding import EOS, PAD, TOKENIZER, V, left_padded, make_codes, tiny_model


def test_view_table_holds_the_trie_specials_and_prompt_tokens_and_rekeys_the_trie():
    codes = make_codes(10, seed=3)
    trie = CodeTrie(codes, EOS)
    ids, _ = left_padded([4, 6], seed=5)  # tokens 3..9 and the pad
    view = build_view(trie, ids, [PAD])
    expected = sorted({token for code in codes for token in code} | {EOS, PAD} | set(ids.flatten().tolist()))
    assert view.table.tolist() == expected
    assert torch.equal(view.to_original(view.to_view(ids)), ids)
    assert view.table[view.trie.eos_token_id] == EOS and view.id_of(PAD) == expected.index(PAD)
    original = torch.tensor(codes)
    assert torch.equal(view.trie.items_of(view.to_view(original)), trie.items_of(original))  # same nodes, view ids
    assert trie.items_of(original).tolist() == list(range(10)) and trie.eos_token_id == EOS  # the original untouched
    assert view.trie.next_state is trie.next_state
    assert view.to_original(torch.tensor([len(expected)])).item() == expected[0]  # the out-of-table column maps inside


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("share_prompt", [True, False])
def test_view_search_equals_the_full_vocabulary_search(renormalize, share_prompt):
    model, codes = tiny_model(seed=11), make_codes(40, seed=12)
    trie = CodeTrie(codes, EOS, items=range(700, 740))
    ids, mask = left_padded([5, 9, 3, 9], seed=4)
    exclude = (torch.tensor([0, 0, 2]), torch.tensor([705, 731, 700]))
    kwargs = {"renormalize": renormalize, "exclude": exclude}
    with contextlib.nullcontext() if share_prompt else unshared_prompts():
        full_items, full_scores = generate_topk(model, TOKENIZER, ids, mask, trie, 10, 10, code_view=False, **kwargs)
        items, scores = generate_topk(model, TOKENIZER, ids, mask, trie, 10, 10, code_view=True, **kwargs)
    assert torch.equal(items, full_items)
    torch.testing.assert_close(scores, full_scores, atol=1e-5, rtol=1e-5)
    assert (items >= 700).all() and not {705, 731} & set(items[0].tolist())


def test_view_restores_the_model_also_after_an_error():
    model, codes = tiny_model(), make_codes(8)
    trie = CodeTrie(codes, EOS)
    ids, mask = left_padded([4, 4])
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    view = build_view(trie, ids, [PAD])
    with pytest.raises(RuntimeError, match="inside"), vocabulary_view(model, view, exact_normaliser=True):
        logits = model(view.to_view(ids)).logits
        assert logits.shape[-1] == view.table.numel() + 1  # the table plus the out-of-table column
        full = model.lm_head.head(model.model(view.to_view(ids)).last_hidden_state).float().log_softmax(-1)
        torch.testing.assert_close(logits.float().log_softmax(-1)[..., :-1], full[..., view.table])  # exact log-probs
        raise RuntimeError("inside")
    assert model.get_input_embeddings() is embedding and model.get_output_embeddings() is head
    assert model(ids).logits.shape[-1] == V


def test_view_rows_only_head_scores_just_the_table():
    model = tiny_model(seed=2)
    trie = CodeTrie(make_codes(6), EOS)
    ids, _ = left_padded([3])
    view = build_view(trie, ids, [PAD])
    with torch.no_grad():
        full = model(ids).logits
        with vocabulary_view(model, view, exact_normaliser=False):
            assert model.lm_head.rows_only
            viewed = model(view.to_view(ids)).logits
    torch.testing.assert_close(viewed, full[..., view.table])
