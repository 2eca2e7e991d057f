"""Trie-constrained beam search: trie tables, masks vs the dict-trie reference, brute force, config isolation,
the evaluation callback (hand-made metrics) and a 2-process DDP run over an odd number of users."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PrefixConstrainedLogitsProcessor

from callbacks.beam_eval import BeamSearchEvaluator
from datamodules.base import RecDataModule
from experiments.bench_decoding import dict_trie_prefix_fn, unshared_prompts
from lightning_modules.components.decoding import (
    BeamBatchResult,
    DecodingConfig,
    beam_eval_batch,
    beam_generation_config,
    cache_keyword,
    generate_topk,
)
from lightning_modules.components.trie import CodeCollisionError, CodeTrie, TrieLogitsProcessor
from lightning_modules.metrics import rank_in_list
from tests.conftest import shared_tokenizer

V, EOS, PAD, BOS = 40, 2, 0, 1
TOKENIZER = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
LEVELS = (range(10, 14), range(20, 24), range(30, 34))  # 3 code levels of 4 tokens each


def make_codes(count: int, seed: int = 1) -> list[tuple[int, ...]]:
    every = list(itertools.product(*LEVELS))
    return [
        every[i] for i in torch.randperm(len(every), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    ]


def tiny_model(vocab: int = V, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # peaky distributions: well-separated item scores
    return model


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, 10, (length,), generator=g)
        mask[row, width - length :] = 1
    return ids, mask


def test_trie_tables_and_item_lookup():
    codes = make_codes(12)
    trie = CodeTrie(codes, EOS, items=range(100, 112))
    assert trie.code_length == 3 and trie.num_items == 12
    assert trie.allowed[0].sum() == len({code[0] for code in codes})  # root: the distinct first tokens
    assert trie.items_of(torch.tensor(codes)).tolist() == list(range(100, 112))
    missing = next(code for code in itertools.product(*LEVELS) if code not in codes)
    assert trie.items_of(torch.tensor([missing, (10, 10, 10), (EOS, 20, 30)])).tolist() == [-1, -1, -1]


def test_colliding_index_names_the_items():
    with pytest.raises(CodeCollisionError, match="items 5 and 7 share"):
        CodeTrie([(10, 20), (11, 20), (10, 20)], EOS, items=[5, 6, 7])
    index = {"0": ["<a_1>", "<b_1>"], "1": ["<a_1>", "<b_1>"], "2": ["<a_2>", "<b_1>"]}
    tokenizer = SimpleNamespace(
        eos_token_id=EOS,
        unk_token_id=PAD,
        convert_tokens_to_ids=lambda ts: [10 + int(t[3:-1]) + 10 * (t[1] == "b") for t in ts],
    )
    with pytest.raises(CodeCollisionError, match="items 0 and 1"):
        CodeTrie.from_index(index, tokenizer)
    assert sorted(CodeTrie.from_index(index, tokenizer, dedupe=True).item_of_leaf.tolist()) == [0, 2]


def test_masks_equal_dict_trie_step_by_step():
    codes, prompt_len, rows = make_codes(20), 5, 24
    trie = CodeTrie(codes, EOS)
    ours = TrieLogitsProcessor(trie, prompt_len=prompt_len)
    reference = PrefixConstrainedLogitsProcessor(dict_trie_prefix_fn(codes, prompt_len, EOS), num_beams=4)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, V, (rows, prompt_len), generator=g)
    for depth in range(trie.code_length + 2):
        scores = torch.log_softmax(torch.randn(rows, V, generator=g), dim=-1)
        if depth == 2:
            input_ids[0, -1] = 5  # a row that left the trie: only EOS, in both
        expected = reference(input_ids, scores.clone())
        got = ours(input_ids, scores.clone())
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), f"depth {depth}"
        assert torch.equal(got[~torch.isinf(got)], scores[~torch.isinf(got)])  # kept scores untouched
        if depth >= trie.code_length:
            assert torch.isinf(got[:, :EOS]).all() and torch.isinf(got[:, EOS + 1 :]).all()
        # Continue with a random allowed token per row, then shuffle the rows as beam search reorders beams.
        choice = (got + torch.rand(rows, V, generator=g)).argmax(dim=1)
        input_ids = torch.cat([input_ids, choice[:, None]], dim=1)[torch.randperm(rows, generator=g)]


def brute_force(model, prompt: torch.Tensor, codes) -> tuple[list[int], torch.Tensor]:
    """Summed log-prob of every item's codes + EOS after ``prompt``, best first."""
    sequences = torch.tensor([prompt.tolist() + list(code) + [EOS] for code in codes])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(sequences).logits.float(), dim=-1)
    targets = sequences[:, len(prompt) :]
    total = log_probs[:, len(prompt) - 1 : -1].gather(2, targets[..., None]).squeeze(-1).sum(dim=1)
    order = total.argsort(descending=True)
    return order.tolist(), total[order]


def test_beam_search_equals_brute_force():
    model, codes = tiny_model(), make_codes(12)
    trie = CodeTrie(codes, EOS)
    ids, mask = left_padded([7, 7, 7])
    items, scores = generate_topk(model, TOKENIZER, ids, mask, trie, num_beams=16, num_return_sequences=16)
    for row in range(ids.shape[0]):
        order, total = brute_force(model, ids[row], codes)
        assert items[row, :12].tolist() == order  # num_beams >= items: exact, in log-prob order
        torch.testing.assert_close(scores[row, :12], total, atol=1e-4, rtol=1e-4)
        assert items[row, 12:].tolist() == [-1] * 4 and torch.isinf(scores[row, 12:]).all()


def test_renormalised_beam_search_equals_brute_force_over_the_trie():
    """With ``renormalize`` every step is a log-prob given the trie: brute force sums log-softmax over trie children."""
    model, codes = tiny_model(seed=5), make_codes(12, seed=4)
    trie = CodeTrie(codes, EOS)
    ids, mask = left_padded([6, 6])
    items, scores = generate_topk(
        model, TOKENIZER, ids, mask, trie, num_beams=16, num_return_sequences=16, renormalize=True
    )
    children: dict[tuple[int, ...], list[int]] = {}
    for code in codes:
        for depth in range(len(code)):
            siblings = children.setdefault(code[:depth], [])
            if code[depth] not in siblings:
                siblings.append(code[depth])
    for row in range(ids.shape[0]):
        sequences = torch.tensor([ids[row].tolist() + list(code) for code in codes])
        with torch.no_grad():
            logits = model(sequences).logits.float()[:, ids.shape[1] - 1 : -1]
        totals = []
        for n, code in enumerate(codes):
            steps = [
                torch.log_softmax(logits[n, d, children[code[:d]]], dim=0)[children[code[:d]].index(code[d])]
                for d in range(len(code))
            ]
            totals.append(sum(steps))  # the forced EOS contributes log 1 = 0
        totals = torch.stack(totals)
        order = totals.argsort(descending=True)
        assert items[row, :12].tolist() == order.tolist()
        torch.testing.assert_close(scores[row, :12], totals[order], atol=1e-4, rtol=1e-4)
        assert torch.exp(totals).sum() == pytest.approx(1.0, abs=1e-4)  # a distribution over the items


def test_only_valid_distinct_items_and_same_as_dict_trie():
    model, codes = tiny_model(seed=3), make_codes(40, seed=2)
    trie = CodeTrie(codes, EOS, items=range(500, 540))
    ids, mask = left_padded([4, 9, 6, 9, 2], seed=1)
    items, scores = generate_topk(model, TOKENIZER, ids, mask, trie, num_beams=8, num_return_sequences=8)
    assert ((items >= 500) & (items < 540)).all()
    assert all(len(set(row)) == len(row) for row in items.tolist())
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    reference = PrefixConstrainedLogitsProcessor(dict_trie_prefix_fn(codes, ids.shape[1], EOS), num_beams=8)
    ref_items, ref_scores = generate_topk(model, TOKENIZER, ids, mask, trie, 8, 8, processor=reference)
    full_items, full_scores = generate_topk(model, TOKENIZER, ids, mask, trie, 8, 8, code_view=False)
    assert torch.equal(full_items, ref_items) and torch.equal(full_scores, ref_scores)  # same full-vocabulary scores
    assert torch.equal(items, ref_items)  # the code view (default) sums the same log-probs in another order
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
    with unshared_prompts():
        plain_items, plain_scores = generate_topk(model, TOKENIZER, ids, mask, trie, 8, 8)
    assert torch.equal(plain_items, items)  # the shared prompt cache changes rounding only
    torch.testing.assert_close(plain_scores, scores, atol=1e-4, rtol=1e-5)


def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    model, codes = tiny_model(), make_codes(20)
    trie = CodeTrie(codes, EOS)
    ids, mask = left_padded([5, 3])
    expected = generate_topk(model, TOKENIZER, ids, mask, trie, 6, 6)
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )  # LoRA B = 0: same outputs
    wrapped.eval()
    items, scores = generate_topk(wrapped, TOKENIZER, ids, mask, trie, 6, 6)
    assert torch.equal(items, expected[0])
    torch.testing.assert_close(scores, expected[1])


def test_generation_config_ignores_checkpoint_defaults():
    config = beam_generation_config(8, 8, 4, PAD, EOS, BOS)
    assert config.do_sample is False and config.length_penalty == 0.0 and config.num_return_sequences == 8
    model, codes = tiny_model(), make_codes(30)
    trie = CodeTrie(codes, EOS)
    ids, mask = left_padded([6, 3, 6])
    clean = generate_topk(model, TOKENIZER, ids, mask, trie, num_beams=8, num_return_sequences=8)
    defaults = model.generation_config
    defaults.do_sample, defaults.temperature, defaults.top_k = True, 0.1, 2
    defaults.bad_words_ids, defaults.repetition_penalty = [[codes[0][0]]], 5.0
    for _ in range(2):  # deterministic and unaffected
        again = generate_topk(model, TOKENIZER, ids, mask, trie, num_beams=8, num_return_sequences=8)
        assert torch.equal(again[0], clean[0]) and torch.equal(again[1], clean[1])
    assert model.generation_config is defaults and defaults.temperature == 0.1  # restored afterwards


def test_llama2_tokenizer_code_tokens():
    tokenizer_dir = shared_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_tokens([f"<{level}_{code}>" for level in "abcd" for code in range(8)])
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.unk_token
    index = {str(i): [f"<a_{i % 8}>", f"<b_{i // 8}>", f"<c_{(3 * i) % 8}>", f"<d_{i % 3}>"] for i in range(24)}
    trie = CodeTrie.from_index(index, tokenizer)
    prompts = ["The user has interacted with items <a_1><b_0><c_3><d_1>, <a_2><b_0><c_6><d_2>", "Next item?"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    model = tiny_model(vocab=len(tokenizer))
    items, _ = generate_topk(model, tokenizer, batch["input_ids"], batch["attention_mask"], trie, 6, 5)
    assert ((items >= 0) & (items < 24)).all() and all(len(set(row)) == 5 for row in items.tolist())


# --------------------------------------------------------------------------------------- the callback
class PromptSamples(torch.utils.data.Dataset):
    """Eval batches like the LLM datamodule's: left-padded prompts, target item, user row."""

    def __init__(self, num_users: int, num_items: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.lengths = torch.randint(3, 8, (num_users,), generator=g)
        self.tokens = torch.randint(3, 10, (num_users, 8), generator=g)
        self.targets = torch.randint(0, num_items, (num_users,), generator=g)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitems__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        ids, mask = left_padded([int(self.lengths[row]) for row in rows])
        for i, row in enumerate(rows):
            ids[i, ids.shape[1] - int(self.lengths[row]) :] = self.tokens[row, : int(self.lengths[row])]
        return {"input_ids": ids, "attention_mask": mask, "target_item": self.targets[rows], "user": torch.tensor(rows)}


class PromptData(RecDataModule):
    """Uses RecDataModule's loaders, so evaluation gets the UnrepeatedDistributedSampler under DDP."""

    def __init__(self, num_users: int = 37, num_items: int = 30) -> None:
        super().__init__(eval_batch_size=5, batch_size=4)
        self.num_users, self.num_items = num_users, num_items

    def prepare_data(self) -> None:
        """In-memory samples: nothing to generate or convert."""

    def setup(self, stage: str | None = None) -> None:
        self.catalogue = SimpleNamespace(user_ids=np.arange(self.num_users) + 1000)
        self.sets = {
            stage: PromptSamples(self.num_users, self.num_items, seed) for seed, stage in enumerate(("valid", "test"))
        }

    def train_dataloader(self):
        return self._loader(self.sets["valid"], self.batch_size, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.sets["valid"], self.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return self._loader(self.sets["test"], self.eval_batch_size, shuffle=False)


class TinyRecommender(L.LightningModule):
    """Ranks test batches like GenerativeRecommender (its trie a submodule); ``ranking`` fakes the search."""

    def __init__(self, num_items: int = 30, ranking: dict[int, int] | None = None) -> None:
        super().__init__()
        self.model = tiny_model(seed=5)
        self.code_trie = CodeTrie(make_codes(num_items, seed=4), EOS)
        self.ranking = ranking

    def test_step(self, batch, batch_idx) -> BeamBatchResult:
        if self.ranking is None:
            return beam_eval_batch(self.model, TOKENIZER, self.code_trie, batch, DecodingConfig(num_beams=12, top_k=10))
        items = torch.arange(100, 120).repeat(len(batch["user"]), 1)  # user row -> rank of the target, else a miss
        for i, user in enumerate(batch["user"].tolist()):
            if user in self.ranking:
                items[i, self.ranking[user]] = batch["target_item"][i]
        scores = -torch.arange(20, dtype=torch.float).repeat(len(items), 1)
        return BeamBatchResult(items, scores, rank_in_list(items, batch["target_item"]))


def run_test(root: Path, module: L.LightningModule, data: RecDataModule, **trainer_args) -> L.Trainer:
    trainer = L.Trainer(
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        **trainer_args,
    )
    trainer.test(module, datamodule=data)
    return trainer


def test_callback_metrics_on_a_hand_made_case(tmp_path):
    evaluator = BeamSearchEvaluator(output_dir=str(tmp_path / "out"))
    trainer = run_test(
        tmp_path,
        TinyRecommender(ranking={0: 0, 1: 3, 2: 7}),
        PromptData(num_users=8),
        callbacks=[evaluator],
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
    )
    expected = {
        "hr@1": 1 / 8,
        "hr@5": 2 / 8,
        "hr@10": 3 / 8,
        "ndcg@5": (1 + 1 / math.log2(5)) / 8,
        "ndcg@10": (1 + 1 / math.log2(5) + 1 / math.log2(9)) / 8,
    }
    record = json.loads((tmp_path / "out" / "beam_test_metrics.json").read_text())
    assert record["metrics"] == pytest.approx(expected) and record["users"] == 8 == record["dataset_size"]
    lines = [json.loads(line) for line in (tmp_path / "out" / "topk_test.rank0.jsonl").read_text().splitlines()]
    assert [line["user"] for line in lines] == list(range(1000, 1008)) and len(lines[0]["items"]) == 20
    assert lines[3]["scores"] == [-float(n) for n in range(20)]
    assert trainer.callback_metrics["test/ndcg@5"].item() == pytest.approx(expected["ndcg@5"])
    logged = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "test/hr@10" in logged and "test/ndcg@5" in logged


def read_shards(directory: Path) -> dict[int, list[int]]:
    lines = [
        json.loads(line)
        for path in sorted(directory.glob("topk_test.rank*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    users = [line["user"] for line in lines]
    assert len(users) == len(set(users)), "a user was evaluated twice"
    return {line["user"]: line["items"] for line in lines}


def test_ddp_two_processes_match_single_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_test(
        tmp_path, TinyRecommender(), PromptData(), devices=1, logger=False, callbacks=[BeamSearchEvaluator(str(single))]
    )
    run_test(
        tmp_path,
        TinyRecommender(),
        PromptData(),
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        callbacks=[BeamSearchEvaluator(str(ddp))],
    )
    one = json.loads((single / "beam_test_metrics.json").read_text())
    two = json.loads((ddp / "beam_test_metrics.json").read_text())
    assert two["world_size"] == 2 and two["users"] == one["users"] == 37
    assert two["metrics"] == one["metrics"]  # integer count states: exactly equal, not just close
    assert len(list(ddp.glob("topk_test.rank*.jsonl"))) == 2
    assert read_shards(ddp) == read_shards(single)  # every user exactly once, same lists


def test_trie_tables_are_buffers_that_move_with_the_module():
    module = TinyRecommender()
    names = {name for name, _ in module.named_buffers()}
    assert {"code_trie.next_state", "code_trie.allowed", "code_trie.level_token_table"} <= names
    assert not any(key.startswith("code_trie.") for key in module.state_dict())  # rebuilt from the index, not saved
    module.to(torch.float64)
    assert module.code_trie.next_state.dtype == torch.int32 and module.code_trie.allowed.dtype == torch.bool
    assert module.code_trie.device == next(module.parameters()).device


def test_cache_keyword_follows_the_installed_transformers():
    """transformers renamed ``past_key_values`` to ``cache``; a wrong name is silently swallowed by the decoder."""

    class Renamed(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=None):
            return input_ids

    class Older(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
            return input_ids

    assert cache_keyword(Renamed()) == "cache"
    assert cache_keyword(Older()) == "past_key_values"


def test_blocked_nodes_are_the_prefixes_whose_items_are_all_excluded():
    codes = make_codes(30, seed=6)
    trie = CodeTrie(codes, EOS, items=range(200, 230))
    first = codes[0][:1]
    whole_branch = [200 + n for n, code in enumerate(codes) if code[:1] == first]
    exclusions = {0: whole_branch + whole_branch[:1], 1: [203, 999, -1], 2: []}  # a repeat, unknown ids, nobody
    rows = torch.tensor([row for row, items in exclusions.items() for _ in items])
    items = torch.tensor([item for items in exclusions.values() for item in items])
    blocked = trie.blocked_nodes(rows, items, num_prompts=3)
    for row, excluded in exclusions.items():
        for code in codes:
            for depth in range(1, trie.code_length + 1):
                node = trie.walk(torch.tensor([code[:depth]]))[0]
                below = [200 + m for m, other in enumerate(codes) if other[:depth] == code[:depth]]
                assert bool(blocked[row, node]) == (set(below) <= set(excluded)), (row, code[:depth])
    assert not blocked[:, 0].any()


@pytest.mark.parametrize("renormalize", [False, True])
def test_excluded_items_never_returned_and_the_rest_keep_their_exact_order(renormalize):
    """Exclusion inside the search = the unrestricted ranking minus the excluded items, with the same scores."""
    model, codes = tiny_model(seed=7), make_codes(14, seed=8)
    trie = CodeTrie(codes, EOS, items=range(300, 314))
    ids, mask = left_padded([6, 6, 6], seed=2)
    full_items, full_scores = generate_topk(model, TOKENIZER, ids, mask, trie, 16, 16, renormalize=renormalize)
    branch = [300 + n for n, code in enumerate(codes) if code[:1] == codes[0][:1]]
    excluded = {0: full_items[0, :3].tolist(), 1: branch, 2: list(range(300, 314))}  # the top 3, a whole prefix, all
    rows = torch.tensor([row for row, items in excluded.items() for _ in items])
    items, scores = generate_topk(
        model,
        TOKENIZER,
        ids,
        mask,
        trie,
        16,
        16,
        renormalize=renormalize,
        exclude=(rows, torch.tensor([item for items in excluded.values() for item in items])),
    )
    for row in range(3):
        keep = [n for n, item in enumerate(full_items[row].tolist()) if item >= 0 and item not in excluded[row]]
        assert items[row, : len(keep)].tolist() == full_items[row, keep].tolist()
        torch.testing.assert_close(scores[row, : len(keep)], full_scores[row, keep], atol=1e-5, rtol=1e-5)
        assert items[row, len(keep) :].eq(-1).all() and torch.isinf(scores[row, len(keep) :]).all()
    assert len([n for n in items[1].tolist() if n >= 0]) == 14 - len(branch)  # no beam lost in the excluded prefix


def test_mask_history_fills_every_slot_with_unseen_items():
    """With fewer beams than items, masking afterwards would leave holes; excluding in the search does not."""
    model, codes = tiny_model(seed=9), make_codes(40, seed=10)
    trie = CodeTrie(codes, EOS)
    ids, mask = left_padded([5, 7], seed=3)
    unmasked = beam_eval_batch(
        model,
        TOKENIZER,
        trie,
        {"input_ids": ids, "attention_mask": mask, "target_item": torch.tensor([0, 1])},
        DecodingConfig(num_beams=6, top_k=6),
    )
    seen_items = unmasked.items[:, :4].flatten()  # each user "has" their 4 best-scored items
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "seen_rows": torch.tensor([0] * 4 + [1] * 4),
        "seen_items": seen_items,
        "target_item": unmasked.items[:, 4],
    }
    masked = beam_eval_batch(model, TOKENIZER, trie, batch, DecodingConfig(num_beams=6, top_k=6, mask_history=True))
    assert (masked.items >= 0).all()  # 6 unseen items each, not 2
    for row in range(2):
        assert not set(masked.items[row].tolist()) & set(seen_items[4 * row : 4 * row + 4].tolist())
        assert set(unmasked.items[row, 4:].tolist()) <= set(masked.items[row].tolist())  # the unseen ones found before
        assert (masked.scores[row, :-1] >= masked.scores[row, 1:]).all()
    assert (masked.ranks < 6).all()


def test_decoding_config_refuses_sampling_and_more_items_than_beams():
    assert DecodingConfig().do_sample is False
    with pytest.raises(ValueError, match="do_sample"):
        DecodingConfig(do_sample=True)
    with pytest.raises(ValueError, match="top_k"):
        DecodingConfig(num_beams=4, top_k=5)
