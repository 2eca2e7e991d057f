"""P5: the three item indexings, the prompts and labels, constrained decoding, a tiny fit + test via the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules import P5DataModule
from datamodules.catalogue import load_lcrec
from datamodules.errors import ConfigError
from datamodules.p5_indexing import END_TOKEN, collaborative_paths, index_items, sequential_numbers
from datamodules.p5_prompts import SEPARATORS, TEMPLATES
from datamodules.split import LeaveLastOutSplit
from lightning_modules import P5
from lightning_modules.cli import main
from tests.conftest import tiny_run_args, write_inter

TINY_T5 = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2}
# three users over five items (TIGER's hand-made data): training sequences 10: [0, 1, 2], 11: [4], 12: [1, 0]
SEQUENCES = {"10": [0, 1, 2, 3, 4], "11": [4, 3, 2], "12": [1, 0, 3, 2]}


def _split(tmp_path, sequences: dict, name: str = "Tiny", max_history: int = 20) -> LeaveLastOutSplit:
    write_inter(tmp_path / name, name, sequences)
    return LeaveLastOutSplit(load_lcrec(tmp_path / name, name), max_history)


def _hand_made(tmp_path, **data_args) -> P5DataModule:
    write_inter(tmp_path / "data", "Tiny", SEQUENCES)
    dm = P5DataModule(data_dir=str(tmp_path / "data"), source="lcrec", dataset="Tiny", **data_args)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------------- indexing
def test_sequential_numbers_follow_first_appearance_in_the_training_sequences(tmp_path):
    split = _split(tmp_path, SEQUENCES)
    # training sequences in user order: 0 1 2 | 4 | 1 0 -> 0, 1, 2, 4 get 1001..1004; item 3 (held out only) 1005
    assert sequential_numbers(split).tolist() == [1001, 1002, 1003, 1005, 1004]
    ids = index_items(split, "sequential", seed=0)
    assert ids.tokens[3] == ("1", "0", "0", "5") and ids.length == 4
    assert ids.vocabulary() == ["0", "1", "2", "3", "4", "5", END_TOKEN]


def test_random_numbers_are_seeded_unique_and_in_the_sequential_range(tmp_path):
    split = _split(tmp_path, {str(user): [user, user + 1, user + 2] for user in range(40)})  # 42 items
    first, again, other = (index_items(split, "random", seed) for seed in (3, 3, 4))
    assert first.numbers.tolist() == again.numbers.tolist() and first.tokens == again.tokens
    assert first.numbers.tolist() != other.numbers.tolist()
    assert sorted(first.numbers.tolist()) == list(range(1001, 1043))  # a permutation: unique ids
    assert len(set(first.tokens)) == 42


def _communities(last_two: str) -> dict:
    """Users buying inside community A (items 0-5) or B (items 6-11); the last two items vary (never trained on)."""
    sequences = {}
    for user in range(12):
        base = 0 if user % 2 == 0 else 6
        items = [base + (user // 2 + step) % 6 for step in range(4)]  # four training items of one community
        other = 6 - base  # the other community
        tail = [other + user % 6, other + (user + 1) % 6] if last_two == "across" else [base + 5, base + 4]
        sequences[str(user)] = items + tail
    sequences["12"] = [0, 1, 2, 3, 12]  # item 12 occurs only as a test target
    return sequences


def test_cid_clusters_co_occurring_items_together_from_training_interactions_only(tmp_path):
    across = _split(tmp_path, _communities("across"), "Across")
    within = _split(tmp_path, _communities("within"), "Within")
    paths, ranks = collaborative_paths(across, num_clusters=2, max_cluster_size=6, seed=0)
    assert len({paths[item] for item in range(6)}) == 1 and len({paths[item] for item in range(6, 12)}) == 1
    assert paths[0] != paths[6] and {paths[0], paths[6]} == {(0,), (1,)}
    assert paths[12] == (2,) and ranks[12] == 0  # no training interaction: the extra top-level cluster
    assert sorted(ranks[:6].tolist()) == list(range(6))
    # the held-out positions (cross-community in one dataset, within in the other) change nothing
    assert (paths, ranks.tolist()) == (lambda p, r: (p, r.tolist()))(
        *collaborative_paths(within, num_clusters=2, max_cluster_size=6, seed=0)
    )
    ids = index_items(across, "cid", seed=0, num_clusters=2, max_cluster_size=6)
    assert len(set(ids.tokens)) == 13 and ids.tokens[12] == ("<c2>", "<i0>")
    assert ids.tokens[0][0] == f"<c{paths[0][0]}>" and ids.tokens[0][1].startswith("<i")


def test_cid_recurses_into_large_clusters_and_pads_ids_to_one_length(tmp_path):
    split = _split(tmp_path, _communities("within"), "Within")
    ids = index_items(split, "cid", seed=0, num_clusters=2, max_cluster_size=3)  # 6-item communities split again
    deep = [row for row in ids.tokens if len(row) == 3]
    assert deep and all(row[1].startswith(row[0][:-1] + "-") for row in deep)  # <c0> then <c0-1>: path-named
    assert len(set(ids.tokens)) == 13
    padded = ids.padded()
    assert {len(row) for row in padded} == {ids.length} and padded[12][-1] == END_TOKEN


# -------------------------------------------------------------------------------------------------- prompts
def _tokens(dm: P5DataModule, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return dm.tokenizer.convert_ids_to_tokens(ids[mask.bool()].tolist())


def test_prompts_and_labels_are_p5s_templates_over_the_leave_last_out_samples(tmp_path):
    dm = _hand_made(tmp_path, indexing="sequential", max_history=3)
    number = {0: "1 0 0 1", 1: "1 0 0 2", 2: "1 0 0 3", 3: "1 0 0 5", 4: "1 0 0 4"}

    def text(template: str, user: str, history: list[int], separator: str = " , ") -> str:
        items = separator.join(f"item_ {number[item]}" for item in history)
        return TEMPLATES[template].format(user="user_ " + " ".join(user), history=items)

    cases = {
        "valid": [("10", [0, 1, 2], 3), ("11", [4], 3), ("12", [1, 0], 3)],  # s[:-2][-3:] -> s[-2]
        "test": [("10", [1, 2, 3], 4), ("11", [4, 3], 2), ("12", [1, 0, 3], 2)],  # s[:-1][-3:] -> s[-1]
    }
    for stage, samples in cases.items():
        dataset = dm.datasets[stage]
        batch = dataset.__getitems__(list(range(len(dataset))))
        users = [str(dm.catalogue.user_ids[user]) for user in batch["user"].tolist()]
        got = sorted(zip(users, dataset.texts(np.arange(len(dataset))), batch["target_item"].tolist(), strict=True))
        assert got == sorted((user, text("2-13", user, history), t) for user, history, t in samples), stage
        texts = dataset.texts(np.arange(3))
        for row, (prompt, target) in enumerate(zip(texts, batch["target_item"].tolist(), strict=True)):
            assert _tokens(dm, batch["input_ids"][row], batch["attention_mask"][row]) == [*prompt.split(), "</s>"]
            labels = dm.tokenizer.convert_ids_to_tokens(batch["labels"][row].tolist())
            assert labels == [*number[target].split(), "</s>"]
    expected = text("2-13", "10", [1, 2, 3])
    assert expected == (
        "According to the purchase history of user_ 1 0 : \n item_ 1 0 0 2 , item_ 1 0 0 3 , item_ 1 0 0 5 \n "
        "Can you recommend the next possible item to the user ?"
    )
    test = dm.datasets["test"].__getitems__([0, 1, 2])
    row = [str(dm.catalogue.user_ids[user]) for user in test["user"].tolist()].index("10")
    assert sorted(test["seen_items"][test["seen_rows"] == row].tolist()) == [0, 1, 2, 3]  # uncapped history
    # training: every prefix of s[:-2]; one of templates 2-1..2-6 and either separator, drawn per sample
    train = dm.datasets["train"]
    assert len(train) == 3
    options = {
        (user, t): {text(template, user, history, sep) for template in dm.train_templates for sep in SEPARATORS}
        for user, history, t in [("10", [0], 1), ("10", [0, 1], 2), ("12", [1], 0)]
    }
    drawn = set()
    # draws are seeded by the batch's rows: the same rows draw the same prompts (any worker, after a resume) ...
    assert train.texts(np.arange(3)) == train.texts(np.arange(3))
    for i in range(30):  # ... and other batches (a longer batch here) draw afresh
        rows = [0, 1, 2] + [i % 3] * i
        batch = train.__getitems__(rows)
        texts = train.texts(np.asarray(rows))
        for prompt, user, target in zip(texts, batch["user"].tolist(), batch["target_item"], strict=True):
            assert prompt in options[(str(dm.catalogue.user_ids[user]), int(target))]
            drawn.add(prompt)
    assert len(drawn) > 6 and "2-13" not in dm.train_templates


def test_cid_prompts_name_items_by_their_cluster_tokens(tmp_path):
    dm = _hand_made(tmp_path, indexing="cid", cid_clusters=2, cid_max_cluster_size=2)
    ids = dm.item_ids
    assert len(set(ids.tokens)) == 5 and dm.item_index.tokens_per_item == ids.length
    test = dm.datasets["test"]
    batch = test.__getitems__([0])
    user = str(dm.catalogue.user_ids[int(batch["user"][0])])
    history = {"10": [0, 1, 2, 3], "11": [4, 3], "12": [1, 0, 3]}[user]
    items = " , ".join("item_ " + " ".join(ids.tokens[item]) for item in history)
    assert test.texts(np.array([0]))[0] == TEMPLATES["2-13"].format(user="user_ " + " ".join(user), history=items)
    target = int(batch["target_item"][0])
    labels = dm.tokenizer.convert_ids_to_tokens(batch["labels"][0].tolist())
    assert labels == [*ids.padded()[target], "</s>"] and dm.item_token_ids().shape == (5, ids.length)


def test_the_exported_tokenizer_reloads_with_the_same_token_ids(tmp_path):
    dm = _hand_made(tmp_path, indexing="cid", cid_clusters=2, cid_max_cluster_size=2, export_dir=str(tmp_path / "ex"))
    manifest = json.loads((tmp_path / "ex" / "manifest.json").read_text())
    assert manifest["kind"] == "p5_item_ids" and manifest["indexing"] == "cid"
    assert json.loads((tmp_path / "ex" / "item_ids.json").read_text())["0"] == list(dm.item_ids.tokens[0])
    reloaded = _hand_made(
        tmp_path / "b",
        indexing="cid",
        cid_clusters=2,
        cid_max_cluster_size=2,
        tokenizer_path=str(tmp_path / "ex/tokenizer"),
    )
    assert np.array_equal(reloaded.item_token_ids(), dm.item_token_ids())
    first, second = (module.datasets["test"].__getitems__([0, 1, 2]) for module in (dm, reloaded))
    assert torch.equal(first["input_ids"], second["input_ids"]) and torch.equal(first["labels"], second["labels"])


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="indexing"):
        P5DataModule(indexing="title")
    with pytest.raises(ConfigError, match="eval_template"):
        P5DataModule(eval_template="2-7")
    with pytest.raises(ConfigError, match="cid_max_cluster_size"):
        P5DataModule(cid_clusters=20, cid_max_cluster_size=5)
    with pytest.raises(ConfigError, match="t5_config"):
        P5(model_path="somewhere", t5_config=TINY_T5)


# ------------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("indexing", ["cid", "sequential"])
def test_constrained_decoding_returns_valid_distinct_items_scored_by_their_likelihood(synthetic_dir, indexing):
    dm = P5DataModule(
        data_dir=str(synthetic_dir),
        source="lcrec",
        dataset="Synthetic",
        indexing=indexing,
        cid_clusters=4,
        cid_max_cluster_size=10,
        eval_batch_size=5,
    )
    dm.setup("test")
    torch.manual_seed(0)
    module = P5(t5_config=TINY_T5, num_beams=12, eval_top_k=10, mask_history=True)
    module._trainer = SimpleNamespace(datamodule=dm)
    module.setup("test")
    module.configure_model()
    module.eval()
    batch = next(iter(dm.test_dataloader()))
    result = module.test_step(batch, 0)
    assert result.items.shape == (5, 10) and ((result.items >= 0) & (result.items < 120)).all()
    assert all(len(set(row)) == 10 for row in result.items.tolist())
    for row in range(5):
        seen = set(batch["seen_items"][batch["seen_rows"] == row].tolist())
        assert seen and not seen & set(result.items[row].tolist())
    tokens = torch.from_numpy(dm.item_token_ids())
    labels = torch.cat([tokens[result.items[:, 0]], torch.ones(5, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = module.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        ).logits
    likelihood = logits.log_softmax(-1).gather(2, labels[:, :, None]).sum((1, 2))
    assert torch.allclose(likelihood, result.scores[:, 0], atol=1e-4)


# ---------------------------------------------------------------------------------------------------- CLI
def test_tiny_fit_and_test_through_the_cli(synthetic_dir, tmp_path):
    root = tmp_path / "run"
    args = tiny_run_args(
        "synthetic/p5.yaml",
        synthetic_dir,
        root,
        "--data.init_args.eval_batch_size=8",
        f"--data.init_args.export_dir={tmp_path / 'index'}",
        f"--model.init_args.t5_config={json.dumps(TINY_T5)}",
        "--trainer.fast_dev_run=1",
        "--trainer.enable_progress_bar=false",
    )
    main(["fit", *args])
    written = json.loads(next(root.rglob("beam_test_metrics.json")).read_text())
    assert set(written["metrics"]) == {"hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10"} and written["users"] == 8
    lists = [json.loads(line) for line in next(root.rglob("topk_test.rank0.jsonl")).read_text().splitlines()]
    assert len(lists) == 8 and all(len(set(entry["items"])) == 20 for entry in lists)
    assert (tmp_path / "index" / "tokenizer" / "tokenizer.json").is_file()


def test_test_from_a_checkpoint_recomputes_the_same_ids_and_reproduces_the_final_evaluation(synthetic_dir, tmp_path):
    common = (
        "--data.init_args.eval_batch_size=8",
        "--data.init_args.eval_max_users=8",
        "--data.init_args.test_all_users=false",
        "--data.init_args.cid_max_cluster_size=20",
        f"--data.init_args.export_dir={tmp_path / 'index'}",
        f"--model.init_args.t5_config={json.dumps(TINY_T5)}",
        "--trainer.enable_progress_bar=false",
    )
    fit_root, test_root = tmp_path / "fit", tmp_path / "test"
    fit = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1")
    main(["fit", *tiny_run_args("synthetic/p5.yaml", synthetic_dir, fit_root, *common, *fit)])
    checkpoint = next(fit_root.rglob("last.ckpt"))
    main(["test", *tiny_run_args("synthetic/p5.yaml", synthetic_dir, test_root, *common), f"--ckpt_path={checkpoint}"])

    def lists(root):
        return next(root.rglob("topk_test.rank0.jsonl")).read_text(), next(root.rglob("beam_test_metrics.json"))

    (fit_lists, fit_metrics), (test_lists, test_metrics) = lists(fit_root), lists(test_root)
    assert fit_lists == test_lists and len(fit_lists.splitlines()) == 8
    assert json.loads(fit_metrics.read_text())["metrics"] == json.loads(test_metrics.read_text())["metrics"]


def test_a_loaded_t5_grows_embedding_rows_for_the_added_id_tokens(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    dm = _hand_made(tmp_path, indexing="cid", cid_clusters=2, cid_max_cluster_size=2)
    T5ForConditionalGeneration(T5Config(**TINY_T5, vocab_size=8)).save_pretrained(tmp_path / "t5")
    module = P5(model_path=str(tmp_path / "t5"))
    module._trainer = SimpleNamespace(datamodule=dm)
    module.setup("fit")
    module.configure_model()
    assert module.model.training and all(part.training for part in module.model.modules())  # dropout trains
    assert module.model.get_input_embeddings().num_embeddings == dm.vocabulary.size
    assert module.model.config.decoder_start_token_id == dm.tokenizer.pad_token_id == 0


def _sentencepiece_t5(directory, texts: list[str]) -> None:
    """A T5TokenizerFast over a SentencePiece unigram model trained in code, with a tiny T5 saved beside it: the
    layout of a local t5-small copy (no SentencePiece model can be downloaded here)."""
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import T5Config, T5ForConditionalGeneration, T5TokenizerFast

    pieces = SentencePieceUnigramTokenizer()
    pieces.train_from_iterator(texts, vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tokenizer = T5TokenizerFast(
        tokenizer_object=pieces._tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )
    tokenizer.save_pretrained(directory)
    T5ForConditionalGeneration(T5Config(**TINY_T5, vocab_size=len(tokenizer))).save_pretrained(directory)


def test_a_local_t5_directory_with_its_sentencepiece_tokenizer_fits_and_tests_through_the_cli(synthetic_dir, tmp_path):
    from datamodules.p5_prompts import TEMPLATES

    t5 = tmp_path / "t5-small"
    _sentencepiece_t5(t5, [*TEMPLATES.values(), "user_ 1 2 3 4 5 6 7 8 9 0 , item_ 1 0 2 4 ->"] * 30)
    root = tmp_path / "run"
    args = tiny_run_args(
        "synthetic/p5.yaml",
        synthetic_dir,
        root,
        "--data.init_args.eval_batch_size=8",
        f"--data.init_args.tokenizer_path={t5}",
        f"--data.init_args.export_dir={tmp_path / 'index'}",
        f"--model.init_args.model_path={t5}",
        "--model.init_args.t5_config=null",
        "--trainer.fast_dev_run=1",
        "--trainer.enable_progress_bar=false",
    )
    main(["fit", *args])
    lists = [json.loads(line) for line in next(root.rglob("topk_test.rank0.jsonl")).read_text().splitlines()]
    assert len(lists) == 8 and all(len(set(entry["items"])) == 20 for entry in lists)
    # the exported tokenizer is the SentencePiece one grown by the id tokens: labels decode to the items' id tokens
    exported = P5DataModule(
        data_dir=str(synthetic_dir),
        source="lcrec",
        dataset="Synthetic",
        tokenizer_path=str(tmp_path / "index" / "tokenizer"),
    )
    exported.setup("test")
    batch = exported.datasets["test"].__getitems__([0, 1])
    for labels, item in zip(batch["labels"].tolist(), batch["target_item"].tolist(), strict=True):
        assert exported.tokenizer.convert_ids_to_tokens(labels) == [*exported.item_ids.padded()[item], "</s>"]
    assert exported.tokenizer.backend_tokenizer.model.__class__.__name__ == "Unigram"
