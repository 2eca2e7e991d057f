"""Stage 3 (Alignment Tasks): item index checks, prompts and label masks, negatives, queries, the LLM module, CLI "
"runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from callbacks import load_exported_llm
from datamodules import PromptDataModule, TaskWeights, load_item_index, load_lcrec, write_lcrec
from datamodules.artifacts import ArtifactWriter
from datamodules.catalogue import DataFormatError
from datamodules.errors import ArtifactError
from datamodules.negatives import interaction_keys, sample_negatives
from datamodules.prompt_tasks import NEGATIVE_TASK, SEQUENTIAL_TASK, TASKS, TEXT_TASK, PromptTasks
from datamodules.prompt_templates import NEGATIVE, SEQUENTIAL
from lightning_modules import GenerativeRecommender
from lightning_modules.cli import build_cli, main
from tests.conftest import CONFIGS, REPO, shared_dataset, shared_tokenizer, tiny_run_args

LC_REC_EVAL = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nThe user has interacted with items {history} in chronological order. Can you predict the next "
    "possible item that the user may expect?\n\n### Response:"
)
TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}


def synthetic_codes(num_items: int = 120) -> np.ndarray:
    """A deterministic collision-free 3-level index (K = 8) for the tiny synthetic catalogue."""
    items = np.arange(num_items)
    return np.stack([items // 16, (items // 4) % 4, items % 4], axis=1)


def write_index(path: Path, codes: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    letters = "abcdefgh"
    path.write_text(
        json.dumps(
            {str(i): [f"<{letters[level]}_{c}>" for level, c in enumerate(row)] for i, row in enumerate(codes.tolist())}
        )
    )
    return path


def write_export(directory: Path, catalogue, codes: np.ndarray | None = None, **manifest) -> Path:
    """A stage-2-style code_index artifact (index.json, code_vectors.pt, manifest.json)."""
    codes = synthetic_codes(catalogue.num_items) if codes is None else codes
    with ArtifactWriter(directory, "code_index") as writer:
        write_index(writer.path("index.json"), codes)
        writer.save_torch("code_vectors.pt", torch.randn(3, 8, 16))
        writer.commit(
            {
                "dataset": catalogue.fingerprint(),
                "num_levels": 3,
                "codebook_size": 8,
                "tokens_per_item": 3,
                "final_collision_rate": 0.0,
                "code_vectors": "code_vectors.pt",
                **manifest,
            }
        )
    return directory


def load_tokenizer(path: Path, vocabulary: list[str] | None = None):
    """The tokenizer at ``path``; with ``vocabulary``, prepared as the model does (``<pad>``, then the code tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if vocabulary is not None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        tokenizer.add_tokens(vocabulary)
    return tokenizer


def full_model(tokenizer: Path, **model_args) -> GenerativeRecommender:
    """A full-fine-tuning tiny Llama module built from scratch with the tokenizer at ``tokenizer``."""
    return GenerativeRecommender(
        tokenizer_path=str(tokenizer), llama_config=TINY_LLAMA, lora=False, full_finetune=True, **model_args
    )


def llm_run_args(data_dir: Path, root: Path, tokenizer: Path, *extra: str) -> list[str]:
    """CLI arguments for a tiny run of configs/synthetic/llm.yaml with the tokenizer at ``tokenizer`` (the test, like
    validation, on the ``eval_max_users`` subset)."""
    return tiny_run_args(
        "synthetic/llm.yaml",
        data_dir,
        root,
        f"--model.init_args.tokenizer_path={tokenizer}",
        "--data.init_args.test_all_users=false",
        *extra,
    )


def _prompt_dm(synthetic_dir: Path, directory: Path, tokenizer: Path) -> PromptDataModule:
    """Tiny synthetic prompts (negative ratio 2) with the tokenizer at ``tokenizer`` prepared as the model does."""
    index = write_index(directory / "index.json", synthetic_codes())
    dm = PromptDataModule(
        data_dir=str(synthetic_dir), source="lcrec", dataset="Synthetic", index=str(index), negative_ratio=2, seed=7
    )
    dm.setup("fit")
    dm.set_tokenizer(load_tokenizer(tokenizer, dm.item_index.vocabulary()))
    return dm


@pytest.fixture(scope="module")
def prompt_dm(synthetic_dir, tiny_tokenizer, tmp_path_factory) -> PromptDataModule:
    """Prompts tokenized by the in-code tokenizer."""
    return _prompt_dm(synthetic_dir, tmp_path_factory.mktemp("index"), tiny_tokenizer)


@pytest.fixture(scope="module")
def llama2_prompt_dm(synthetic_dir, tmp_path_factory) -> PromptDataModule:
    """Prompts tokenized by the real Llama-2 tokenizer (SentencePiece), whose prefix-space rules the label masks
    must survive; skipped without ../shared."""
    return _prompt_dm(synthetic_dir, tmp_path_factory.mktemp("index"), shared_tokenizer())


# ------------------------------------------------------------------------------------------------ item index
def test_export_directory_is_checked_against_the_catalogue(synthetic_dir, tmp_path):
    catalogue = load_lcrec(synthetic_dir, "Synthetic")
    index = load_item_index(write_export(tmp_path / "ok", catalogue), catalogue)
    assert (index.num_levels, index.codebook_size, index.tokens_per_item) == (3, 8, 3) and index.code_vectors_path
    assert len(index.vocabulary()) == 24 and index.vocabulary()[:2] == ["<a_0>", "<a_1>"]
    cases = {
        "content_hash": {"dataset": {**catalogue.fingerprint(), "content_hash": "0" * 64}},
        "final_collision_rate": {"final_collision_rate": 0.02},
        "num_levels=4": {"num_levels": 4, "tokens_per_item": 4},  # L mismatch
        "codebook_size=4": {"codebook_size": 4},  # K mismatch: codes reach 7
    }
    for message, manifest in cases.items():
        with pytest.raises((DataFormatError, ArtifactError), match=message):
            load_item_index(write_export(tmp_path / message, catalogue, **manifest), catalogue)
    with pytest.raises(DataFormatError, match="codes for 119 items"):
        load_item_index(write_index(tmp_path / "short.json", synthetic_codes(119)), catalogue)


def test_colliding_index_is_an_error_unless_deduplicated(synthetic_dir, tmp_path):
    catalogue = load_lcrec(synthetic_dir, "Synthetic")
    codes = synthetic_codes()
    codes[[9, 77]] = codes[5]
    path = write_index(tmp_path / "index.json", codes)
    with pytest.raises(DataFormatError, match=r"3 items share a code tuple .*dedupe_collisions"):
        load_item_index(path, catalogue)
    index = load_item_index(path, catalogue, dedupe_collisions=True)
    assert (
        index.tokens_per_item == 4
        and index.deduplicated == 2
        and len({tuple(row) for row in index.codes.tolist()}) == 120
    )
    assert (
        index.codes[[5, 9, 77], 3].tolist() == [0, 1, 2] and (np.delete(index.codes, [9, 77], axis=0)[:, 3] == 0).all()
    )
    assert index.vocabulary()[-3:] == ["<d_0>", "<d_1>", "<d_2>"]


def test_shared_industrial_index_collides_and_dedupes():
    directory = shared_dataset("Industrial_and_Scientific")
    catalogue = load_lcrec(directory, "Industrial_and_Scientific")
    with pytest.raises(DataFormatError, match="share a code tuple"):
        load_item_index(None, catalogue)
    index = load_item_index(None, catalogue, dedupe_collisions=True)
    assert index.num_levels == 3 and 0 < index.deduplicated <= 14
    assert len({tuple(row) for row in index.codes.tolist()}) == catalogue.num_items


# ---------------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("dm", ["prompt_dm", "llama2_prompt_dm"])
def test_every_task_prompt_and_label_mask(dm, request):
    prompt_dm = request.getfixturevalue(dm)
    tasks, catalogue = prompt_dm.prompts, prompt_dm.catalogue
    tokenizer = tasks.tokenizer
    for task in range(len(TASKS)):
        rows = np.flatnonzero(tasks.task == task)[::97][:6]
        assert len(rows), TASKS[task]
        prompts, responses = tasks.render(rows)
        batch = tasks.train_batch(rows)
        for j, row in enumerate(rows):
            assert prompts[j].startswith("Below is an instruction") and prompts[j].endswith("\n\n### Response:")
            prompt_ids = tokenizer(prompts[j])["input_ids"]
            response_ids = (
                tasks.code_ids[responses[j]].tolist() if task != TEXT_TASK or isinstance(responses[j], int) else None
            )
            if response_ids is None:
                response_ids = tokenizer(responses[j], add_special_tokens=False)["input_ids"]
            expected, n = prompt_ids + response_ids + [tokenizer.eos_token_id], len(prompt_ids) + len(response_ids) + 1
            assert batch["input_ids"][j, :n].tolist() == expected
            assert (batch["input_ids"][j, n:] == tokenizer.pad_token_id).all() and int(
                batch["attention_mask"][j].sum()
            ) == n
            labels = batch["labels"][j]
            assert (labels[: len(prompt_ids)] == -100).all() and (labels[n:] == -100).all()
            assert labels[len(prompt_ids) : n].tolist() == response_ids + [tokenizer.eos_token_id]
            source, item = tasks.source[row], tasks.item[row]
            if task in (SEQUENTIAL_TASK, NEGATIVE_TASK):
                history = tasks.split.histories(tasks.split.train, np.array([source]))[0]
                codes = ", ".join(tasks.code_text[i] for i in history[history != catalogue.pad_item])
                templates = SEQUENTIAL if task == SEQUENTIAL_TASK else NEGATIVE
                assert any(prompts[j].endswith(t.format(history=codes) + "\n\n### Response:") for t in templates)
                if task == SEQUENTIAL_TASK:
                    assert item == catalogue.items[tasks.split.train.target_pos[source]]
                else:
                    assert item not in catalogue.sequence(tasks.split.train.user[source])
            elif task == TEXT_TASK:
                assert (
                    isinstance(responses[j], str)
                    or tasks.texts["title"][item] in prompts[j]
                    or tasks.texts["description"][item] in prompts[j]
                )
            else:
                assert tasks.query_text[source] in prompts[j] and responses[j] == item


@pytest.mark.parametrize("dm", ["prompt_dm", "llama2_prompt_dm"])
def test_eval_batches_are_lc_rec_prompts(dm, request):
    prompt_dm = request.getfixturevalue(dm)
    catalogue, tokenizer = prompt_dm.catalogue, prompt_dm.prompts.tokenizer
    code_text = prompt_dm.prompts.code_text
    for loader, offset in ((prompt_dm.val_dataloader(), 2), (prompt_dm.test_dataloader(), 1)):
        users = []
        for batch in loader:
            assert batch["attention_mask"][:, -1].all()  # left-padded
            for j, user in enumerate(batch["user"].tolist()):
                sequence = catalogue.sequence(user)
                text = LC_REC_EVAL.format(history=", ".join(code_text[i] for i in sequence[:-offset][-20:]))
                ids = tokenizer(text)["input_ids"]
                mask = batch["attention_mask"][j].bool()
                assert (
                    batch["input_ids"][j][mask].tolist() == ids
                    and mask[-len(ids) :].all()
                    and not mask[: -len(ids)].any()
                )
                assert int(batch["target_item"][j]) == sequence[-offset]
                users.append(user)
        assert users == list(range(catalogue.num_users))
    assert (catalogue.lengths > 21).any()  # the 20-item cap was exercised


def test_eval_user_subset_and_test_all_users(prompt_dm):
    """``eval_max_users`` fixes one seeded subset for val and test; ``test_all_users`` tests everyone."""
    num_users = prompt_dm.catalogue.num_users
    try:
        prompt_dm.eval_max_users = 5
        subset = prompt_dm.eval_rows("valid")
        assert (
            len(subset) == 5
            and np.array_equal(subset, np.unique(subset))
            and np.array_equal(prompt_dm.eval_rows("test"), subset)
        )
        prompt_dm.test_all_users = True
        assert np.array_equal(prompt_dm.eval_rows("valid"), subset)
        assert np.array_equal(prompt_dm.eval_rows("test"), np.arange(num_users))
        assert sum(len(b["user"]) for b in prompt_dm.test_dataloader()) == num_users
        assert sorted(u for b in prompt_dm.val_dataloader() for u in b["user"].tolist()) == subset.tolist()
    finally:
        prompt_dm.eval_max_users, prompt_dm.test_all_users = None, False


def test_negatives_are_never_interacted_and_redrawn_each_epoch(prompt_dm):
    catalogue, tasks = prompt_dm.catalogue, prompt_dm.prompts
    seen = np.zeros((catalogue.num_users, catalogue.num_items), dtype=bool)  # training interactions only
    train_users, train_items = tasks.split.train_interactions()
    seen[train_users, train_items] = True
    users = np.repeat(np.arange(catalogue.num_users), 1000)
    keys = interaction_keys(train_users, train_items, catalogue.num_items)
    negatives = sample_negatives(keys, users, catalogue.num_items, np.random.default_rng(0))
    assert not seen[users, negatives].any() and len(np.unique(negatives)) == catalogue.num_items
    plans = []
    for epoch in (0, 1, 0):
        prompt_dm.set_epoch(epoch)
        negative = tasks.task == NEGATIVE_TASK
        assert not seen[tasks.split.train.user[tasks.source[negative]], tasks.item[negative]].any()
        plans.append(tasks.item[negative].copy())
    assert tasks.counts["negative"] == 2 * tasks.counts["sequential"]
    assert not np.array_equal(plans[0], plans[1]) and np.array_equal(plans[0], plans[2])
    # a user who saw all but one item always gets that item; one who saw everything has none
    keys = np.array([0 * 5 + i for i in (0, 1, 2, 4)] + [1 * 5 + i for i in range(5)])
    assert (sample_negatives(keys, np.zeros(50, dtype=int), 5, np.random.default_rng(1)) == 3).all()
    with pytest.raises(RuntimeError, match="every item"):
        sample_negatives(keys, np.ones(2, dtype=int), 5, np.random.default_rng(1), max_rounds=20)


def test_query_task_uses_only_training_reviews(tmp_path, caplog):
    sequences = {0: [0, 1, 2, 3, 4], 1: [5, 6, 7, 5], 2: [8, 9, 10]}
    reviews = {0: {0: "r00", 3: "r03", 4: "r04"}, 1: {5: "r15", 6: "r16", 7: "r17"}, 2: {8: "r28", 9: "r29", 10: "r2a"}}
    write_lcrec(tmp_path / "data", "Tiny", sequences, reviews=reviews)
    write_index(tmp_path / "data" / "Tiny.index.json", synthetic_codes(11))
    dm = PromptDataModule(data_dir=str(tmp_path / "data"), source="lcrec", negative_ratio=1)
    dm.setup("fit")
    # item 5 of user 1 is a training item but also the test target: its review may describe that interaction
    assert sorted(dm.prompts.query_text) == ["r00", "r16", "r28"] and dm.prompts.counts["query"] == 3
    (tmp_path / "data" / "Tiny.review.json").unlink()
    with caplog.at_level(logging.INFO, logger="datamodules.prompt_tasks"):
        dm = PromptDataModule(data_dir=str(tmp_path / "data"), source="lcrec")
        dm.setup("fit")
    assert dm.prompts.counts["query"] == 0 and "no reviews: the query-alignment task is skipped" in caplog.text


def test_long_samples_are_dropped_and_counted(prompt_dm):
    base = prompt_dm.prompts
    tasks = PromptTasks(base.catalogue, base.split, base.item_index, TaskWeights(), 1, 90, seed=0)
    tasks.set_tokenizer(base.tokenizer)
    prompts, responses = tasks.render(np.arange(len(tasks)))
    text = [i for i, response in enumerate(responses) if isinstance(response, str)]
    response_lengths = np.array([tasks.item_index.tokens_per_item if isinstance(r, int) else 0 for r in responses])
    response_lengths[text] = [
        len(ids) for ids in base.tokenizer([responses[i] for i in text], add_special_tokens=False)["input_ids"]
    ]
    lengths = np.array([len(ids) for ids in base.tokenizer(prompts)["input_ids"]]) + response_lengths + 1
    assert 0 < (lengths > 90).sum() < len(tasks)
    dropped, kept = np.zeros(len(TASKS), dtype=int), 0
    for start in range(0, len(tasks), 256):
        batch = tasks.train_batch(np.arange(start, min(start + 256, len(tasks))))
        assert batch["input_ids"].shape[1] <= 90
        dropped += batch["dropped"].numpy()
        kept += len(batch["input_ids"])
    assert dropped.sum() == (lengths > 90).sum() and kept + dropped.sum() == len(tasks)
    assert dropped.tolist() == np.bincount(tasks.task[lengths > 90], minlength=len(TASKS)).tolist()


def test_length_grouped_batches_cover_the_plan_once(prompt_dm):
    from datamodules.prompts import LengthGroupedPlan

    tasks = prompt_dm.prompts
    lengths = tasks.approx_lengths()
    rows = np.flatnonzero(tasks.task == SEQUENTIAL_TASK)[:20]
    exact = np.array([len(tasks.tokenizer(p)["input_ids"]) for p in tasks.render(rows)[0]])
    assert np.corrcoef(lengths[rows], exact)[0, 1] > 0.9  # the proxy orders samples like their real lengths
    sampler = LengthGroupedPlan(tasks, batch_size=16, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(len(tasks))) and first != second

    def padding(order):  # total padding when cutting the order into batches of 16
        batches = [lengths[order[i : i + 16]] for i in range(0, len(order), 16)]
        return sum(int(b.max() * len(b) - b.sum()) for b in batches)

    assert padding(np.array(first)) < 0.5 * padding(np.random.default_rng(0).permutation(len(tasks)))


def test_task_weights_and_presets(prompt_dm):
    base = prompt_dm.prompts
    natural = {name: count for name, count in base.counts.items()}

    def counts(weights: TaskWeights, ratio: int) -> dict[str, int]:
        return PromptTasks(base.catalogue, base.split, base.item_index, weights, ratio, 2048, seed=0).counts

    assert counts(TaskWeights(sequential=2.0, text=0.5, query=0.0), 0) == {
        "sequential": 2 * natural["sequential"],
        "negative": 0,
        "text": round(natural["text"] / 2),
        "query": 0,
    }
    assert counts(TaskWeights(negative=0.5), 3)["negative"] == round(1.5 * natural["sequential"])
    behaviour = PromptDataModule(preset="behaviour_only").task_weights
    assert behaviour.text == behaviour.query == 0 and behaviour.sequential == behaviour.negative == 1
    with pytest.raises(ValueError, match="replaces `tasks`"):
        PromptDataModule(preset="behaviour_only", tasks=TaskWeights(text=2.0))


# ------------------------------------------------------------------------------------------------------ model
def test_tokenizer_without_pad_token_gets_one(tiny_tokenizer, tmp_path, caplog):
    vocab_size = len(load_tokenizer(tiny_tokenizer))
    module = full_model(tiny_tokenizer)
    with caplog.at_level(logging.INFO, logger="lightning_modules.llm"):
        tokenizer = module._load_tokenizer()
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == vocab_size and module.pad_token_added
    assert "no pad token: added <pad>" in caplog.text
    tokenizer.save_pretrained(tmp_path / "with_pad")
    module = GenerativeRecommender(
        tokenizer_path=str(tmp_path / "with_pad"), llama_config=TINY_LLAMA, lora=False, full_finetune=True
    )
    assert module._load_tokenizer().pad_token_id == vocab_size and not module.pad_token_added
    with pytest.raises(ValueError, match="choose one training mode"):
        GenerativeRecommender(
            tokenizer_path=str(tiny_tokenizer), llama_config=TINY_LLAMA, lora=True, full_finetune=True
        )


def test_mlp_code_embedding_init(synthetic_dir, tiny_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    catalogue = load_lcrec(synthetic_dir, "Synthetic")
    index = load_item_index(write_export(tmp_path / "export", catalogue), catalogue)
    tokenizer = load_tokenizer(tiny_tokenizer)
    base_size = len(tokenizer)
    tokenizer.add_tokens(index.vocabulary())
    table = torch.from_numpy(index.level_token_ids(tokenizer.get_vocab()))
    rows = []
    for variant in ("mlp2", "mlp3"):
        module = full_model(tiny_tokenizer, code_embedding_init=variant)
        module.code_token_ids = table.flatten().tolist()
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **TINY_LLAMA))
        before = model.get_input_embeddings().weight.detach().clone()
        module._init_code_embeddings(model, index, table)
        after = model.get_input_embeddings().weight.detach()
        old, new = slice(None, base_size), slice(base_size, None)
        assert torch.equal(after[old], before[old]) and not torch.allclose(after[new], before[new])
        assert after[base_size:].std() == pytest.approx(before[:base_size].std().item(), rel=0.1)
        rows.append(after[base_size:].clone())
    assert not torch.allclose(rows[0], rows[1])
    bare = load_item_index(tmp_path / "export" / "index.json", catalogue)
    with pytest.raises(ArtifactError, match="bare index without code vectors"):
        module._init_code_embeddings(model, bare, table)


def test_trie_code_softmax_loss_by_hand(synthetic_dir, tiny_tokenizer, tmp_path):
    """``code_softmax: trie``: a code target among its prefix's continuations, code-closing EOS skipped, text over the
    vocabulary."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    codes = synthetic_codes()
    index = write_index(tmp_path / "index.json", codes)
    dm = PromptDataModule(
        data_dir=str(synthetic_dir), source="lcrec", dataset="Synthetic", index=str(index), negative_ratio=1, seed=3
    )
    dm.setup("fit")
    torch.manual_seed(0)
    module = full_model(tiny_tokenizer, code_softmax="trie")
    module._trainer = SimpleNamespace(datamodule=dm)
    module.setup("fit")
    module.configure_model()
    tasks = dm.prompts
    rows = np.concatenate(
        [np.flatnonzero(tasks.task == task)[:3] for task in (SEQUENTIAL_TASK, NEGATIVE_TASK, TEXT_TASK)]
    )
    batch = tasks.train_batch(rows)
    assert any(isinstance(r, str) for r in tasks.render(rows)[1])  # a text response is in the batch
    loss = module.response_loss(batch)

    model, tokenizer = module.model, module.tokenizer
    code_ids = tasks.code_ids.tolist()  # [items, 3] token ids
    children: dict[tuple[int, ...], list[int]] = {}
    for row in code_ids:
        for depth in range(3):
            siblings = children.setdefault(tuple(row[:depth]), [])
            if row[depth] not in siblings:
                siblings.append(row[depth])
    code_tokens = {token for row in code_ids for token in row}
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    weight, labels = model.lm_head.weight, batch["labels"]
    terms, code_terms = [], 0
    for b in range(len(labels)):
        response = [(t, int(labels[b, t + 1])) for t in range(labels.shape[1] - 1) if labels[b, t + 1] != -100]
        previous: list[int] = []
        for t, target in response:
            h = hidden[b, t]
            if target in code_tokens:
                allowed = children[tuple(previous)]
                terms.append(F.cross_entropy((weight[allowed] @ h)[None], torch.tensor([allowed.index(target)])))
                previous.append(target)
                code_terms += 1
            elif target == tokenizer.eos_token_id and previous:
                continue  # the EOS after a code: forced by the trie, not trained
            else:
                terms.append(F.cross_entropy((weight @ h)[None], torch.tensor([target])))
    assert code_terms == 3 * 6 + 3 * sum(isinstance(r, int) for r in tasks.render(rows[6:])[1])
    torch.testing.assert_close(loss.detach(), torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)
    behaviour_only = module.response_loss(tasks.train_batch(rows[:6]))  # no text position: that term is an empty sum
    torch.testing.assert_close(behaviour_only.detach(), torch.stack(terms[: 3 * 6]).mean(), atol=1e-5, rtol=1e-5)
    assert module.renormalize_codes
    with pytest.raises(ValueError, match="adam_betas"):
        full_model(tiny_tokenizer, adam_betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="full_finetune"):
        GenerativeRecommender(tokenizer_path=str(tiny_tokenizer), llama_config=TINY_LLAMA, code_softmax="trie")
    # ZeRO-3 shards the LM head outside module calls, where the trie loss reads its rows: refused up front
    zero3 = full_model(tiny_tokenizer, code_softmax="trie")
    zero3._trainer = SimpleNamespace(datamodule=dm, strategy=SimpleNamespace(zero_stage_3=True))
    zero3.setup("fit")
    with pytest.raises(ValueError, match="ZeRO-3"):
        zero3.configure_model()


# -------------------------------------------------------------------------------------------------- CLI runs
def _callbacks(tmp_path: Path, export: Path, *extra: str) -> Path:
    override = tmp_path / "callbacks.yaml"
    override.write_text(
        "trainer:\n  enable_progress_bar: false\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {monitor: val/ndcg@10, mode: max}\n"
        "    - class_path: callbacks.BeamSearchEvaluator\n"
        "    - class_path: callbacks.MetricsWriter\n"
        f"    - {{class_path: callbacks.LLMExporter, init_args: {{output_dir: '{export}'}}}}\n" + "".join(extra)
    )
    return override


def test_fit_and_test_on_a_stage2_export(synthetic_dir, tiny_tokenizer, tmp_path):
    """Stage 2 (tiny codebook) -> stage 3 (tiny Llama from scratch, MLP init) through the CLI, then the export."""
    torch.save(torch.randn(120, 16, generator=torch.Generator().manual_seed(0)), tmp_path / "item_embeddings.pt")
    codebook = tmp_path / "codebook"
    override = tmp_path / "codebook.yaml"
    override.write_text(
        "trainer:\n  enable_progress_bar: false\n  callbacks:\n    - "
        f"{{class_path: callbacks.CodeIndexExporter, init_args: {{output_dir: '{codebook}'}}}}\n"
    )
    main(
        [
            "fit",
            *tiny_run_args(
                "synthetic/codebook.yaml",
                synthetic_dir,
                tmp_path / "stage2",
                "--config",
                str(override),
                "--data.init_args.embeddings",
                str(tmp_path / "item_embeddings.pt"),
                "--model.init_args.num_levels=3",
                "--model.init_args.codebook_size=8",
                "--trainer.max_epochs=1",
            ),
        ]
    )
    root, export = tmp_path / "run", tmp_path / "llm"
    main(
        [
            "fit",
            *llm_run_args(
                synthetic_dir,
                root,
                tiny_tokenizer,
                "--config",
                str(_callbacks(tmp_path, export)),
                "--data.init_args.index",
                str(codebook),
                "--data.init_args.eval_max_users=8",
                "--model.init_args.code_embedding_init=mlp2",
                "--trainer.max_epochs=2",
                "--trainer.limit_train_batches=3",
            ),
        ]
    )
    record = json.loads((root / "csv" / "version_0" / "test_metrics.json").read_text())
    assert set(record["metrics"]) == {"hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10"} and record[
        "best_checkpoint"
    ].endswith(".ckpt")
    assert 0 <= record["metrics"]["hr@1"] <= record["metrics"]["hr@10"] <= 1
    beam = json.loads((root / "csv" / "version_0" / "beam_test_metrics.json").read_text())
    assert beam["users"] == beam["dataset_size"] == 8 and set(beam["metrics"]) == set(record["metrics"])
    manifest = json.loads((export / "manifest.json").read_text())
    stage2 = json.loads((codebook / "manifest.json").read_text())
    assert manifest["dataset"] == stage2["dataset"] and manifest["num_levels"] == 3 and manifest["codebook_size"] == 8
    assert (
        manifest["weights"] == "model" and manifest["pad_token_added"] and manifest["llama_config"]["hidden_size"] == 64
    )
    assert json.loads((export / "index.json").read_text()) == json.loads((codebook / "index.json").read_text())
    model, tokenizer, _ = load_exported_llm(export)
    assert (
        tokenizer.pad_token == "<pad>"
        and tokenizer.convert_tokens_to_ids("<c_7>") < model.get_input_embeddings().weight.shape[0]
    )


def test_ema_weight_averaging_builds_the_model_before_setup(synthetic_dir, tiny_tokenizer, tmp_path):
    """Lightning's EMAWeightAveraging calls configure_model() in its setup(), before the module's: it must work, and
    the checkpoint keeps the averaged weights (what validation and test see) next to the live ones."""
    index = write_index(tmp_path / "index.json", synthetic_codes())
    root, export = tmp_path / "run", tmp_path / "llm"
    ema = (
        "    - class_path: lightning.pytorch.callbacks.EMAWeightAveraging\n"
        "      init_args: {decay: 0.5, use_buffers: false}\n"
    )
    main(
        [
            "fit",
            *llm_run_args(
                synthetic_dir,
                root,
                tiny_tokenizer,
                "--config",
                str(_callbacks(tmp_path, export, ema)),
                "--data.init_args.index",
                str(index),
                "--data.init_args.eval_max_users=4",
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=4",
            ),
        ]
    )
    checkpoint = torch.load(
        next((root / "csv" / "version_0" / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=False
    )
    averaged, live = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert averaged.keys() == live.keys() and checkpoint["dataset_fingerprint"]["num_items"] == 120
    assert not torch.equal(
        averaged["model.model.layers.0.mlp.up_proj.weight"], live["model.model.layers.0.mlp.up_proj.weight"]
    )
    assert (root / "csv" / "version_0" / "test_metrics.json").is_file()


def test_lora_trains_only_adapters_and_code_rows(synthetic_dir, tiny_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(tiny_tokenizer)
    base_size = len(tokenizer)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **TINY_LLAMA))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    index = write_index(tmp_path / "index.json", synthetic_codes())
    root, export = tmp_path / "run", tmp_path / "llm"
    main(
        [
            "fit",
            *llm_run_args(
                synthetic_dir,
                root,
                tiny_tokenizer,
                "--config",
                str(_callbacks(tmp_path, export)),
                "--data.init_args.index",
                str(index),
                "--data.init_args.eval_max_users=4",
                "--model.init_args.model_path",
                str(tmp_path / "base"),
                "--model.init_args.llama_config=null",
                "--model.init_args.tokenizer_path=null",
                "--model.init_args.lora=true",
                "--model.init_args.full_finetune=false",
                "--model.init_args.code_softmax=vocabulary",  # the trie softmax reads the LM head's rows directly
                "--model.init_args.lr=0.05",
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=3",
            ),
        ]
    )
    checkpoint = torch.load(
        next((root / "csv" / "version_0" / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=False
    )
    keys = checkpoint["state_dict"].keys()
    assert any("lora_A" in key for key in keys) and any("trainable_tokens_delta" in key for key in keys)
    assert not any(
        key.endswith("base_layer.weight") or key.endswith("embed_tokens.weight") for key in keys
    )  # frozen: from model_path
    assert all(group["fused"] for group in checkpoint["optimizer_states"][0]["param_groups"])  # one-kernel AdamW on CPU
    assert (root / "csv" / "version_0" / "test_metrics.json").is_file()  # the stripped checkpoint was tested
    model, tokenizer, manifest = load_exported_llm(export)
    assert manifest["weights"] == "adapter" and manifest["mode"] == "lora"
    assert manifest["vocab_size"] == len(tokenizer) == base_size + 25  # <pad> and 24 codes
    adapter = model.base_model.model.model.embed_tokens.token_adapter
    assert not torch.allclose(adapter.trainable_tokens_delta["default"], adapter.trainable_tokens_original["default"])
    merged = model.merge_and_unload()
    assert torch.equal(merged.model.embed_tokens.weight[:base_size], base.model.embed_tokens.weight)  # never trained
    assert torch.equal(merged.lm_head.weight[:base_size], base.lm_head.weight)


def test_negative_ratio_sweep_parses():
    sweep = yaml.safe_load((CONFIGS / "sweeps" / "negative_ratio.yaml").read_text())
    assert sweep["parameters"]["data.init_args.negative_ratio"]["values"] == [0, 1, 2, 3, 4, 5]
    configs = [
        arg for previous, arg in zip(sweep["command"], sweep["command"][1:], strict=False) if previous == "--config"
    ]
    args = [arg for config in configs for arg in ("--config", str(REPO / config))]
    cli = build_cli([*args, "--data.init_args.negative_ratio=0"], run=False)
    assert cli.datamodule.negative_ratio == 0 and isinstance(cli.model, GenerativeRecommender)


def test_a_dataloader_worker_yields_the_in_process_batches_every_epoch(synthetic_dir, tiny_tokenizer, tmp_path):
    """Tokenization may run in a worker (configs/industrial/llm.yaml): the worker must see each epoch's re-drawn
    negatives, templates and subsets (workers do not persist; on_train_epoch_start re-draws before the fork)."""
    import lightning as L

    class Recorder(L.Callback):
        def __init__(self) -> None:
            self.batches: list[tuple[int, torch.Tensor]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.batches.append((trainer.current_epoch, batch["input_ids"].clone()))

    index = write_index(tmp_path / "index.json", synthetic_codes())
    runs = {}
    for workers in (0, 1):
        cli = build_cli(
            [
                *llm_run_args(
                    synthetic_dir,
                    tmp_path / f"w{workers}",
                    tiny_tokenizer,
                    "--data.init_args.index",
                    str(index),
                    f"--data.init_args.num_workers={workers}",
                    "--trainer.max_epochs=3",
                    "--trainer.limit_train_batches=3",
                    "--trainer.limit_val_batches=0",
                    "--trainer.callbacks=[]",
                    "--trainer.logger=false",
                    "--trainer.enable_checkpointing=false",
                    "--test_after_fit=false",
                )
            ],
            run=False,
        )
        recorder = Recorder()
        cli.trainer.callbacks.append(recorder)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        runs[workers] = recorder.batches
    assert [epoch for epoch, _ in runs[1]] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(runs[0], runs[1], strict=True))
    assert not torch.equal(runs[1][0][1], runs[1][3][1])  # and the epochs differ
