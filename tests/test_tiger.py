"""TIGER: the semantic-ID samples, the encoder-decoder's trie-constrained beam search, a tiny fit + test via the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules import SemanticIdDataModule
from datamodules.errors import ConfigError
from datamodules.semantic_ids import SemanticIdVocabulary, encoder_inputs
from lightning_modules import TIGER
from lightning_modules.cli import main
from lightning_modules.components.seq2seq_decoding import encoder_decoder_topk
from lightning_modules.components.trie import CodeTrie
from tests.conftest import tiny_run_args, write_inter
from tests.test_prompts_llm import synthetic_codes, write_index

TINY_T5 = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2}
# three users over five items; item i is coded (i // 2, i % 2)
SEQUENCES = {"10": [0, 1, 2, 3, 4], "11": [4, 3, 2], "12": [1, 0, 3, 2]}


def _hand_made(tmp_path, **data_args) -> SemanticIdDataModule:
    write_inter(tmp_path / "data", "Tiny", SEQUENCES)
    index = write_index(tmp_path / "index.json", np.array([[i // 2, i % 2] for i in range(5)]))
    dm = SemanticIdDataModule(
        data_dir=str(tmp_path / "data"), source="lcrec", dataset="Tiny", index=str(index), **data_args
    )
    dm.setup("fit")
    return dm


def _all(dataset) -> dict[str, torch.Tensor]:
    return dataset.__getitems__(list(range(len(dataset))))


def test_vocabulary_layout():
    vocabulary = SemanticIdVocabulary((3, 3), user_buckets=4)
    assert vocabulary.code_offsets.tolist() == [2, 5] and vocabulary.user_offset == 8 and vocabulary.size == 12
    assert vocabulary.item_tokens(np.array([[2, 1]])).tolist() == [[4, 6]]
    assert vocabulary.user_tokens(np.array([0, 5])).tolist() == [8, 9]


def test_encoder_inputs_put_the_user_token_right_before_the_history():
    table = np.array([[2, 5], [2, 6], [0, 0]])  # items 0, 1 and the pad item
    ids, mask = encoder_inputs(np.array([[2, 0, 1], [2, 2, 1]]), table, np.array([8, 9]), pad=0)
    assert ids.tolist() == [[8, 2, 5, 2, 6], [0, 0, 9, 2, 6]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]


def test_samples_are_the_leave_last_out_split_as_code_tokens(tmp_path):
    dm = _hand_made(tmp_path, max_history=3, user_buckets=4)
    vocabulary = dm.vocabulary
    assert vocabulary.level_sizes == (3, 3) and vocabulary.size == 12
    tokens = {item: [2 + item // 2, 5 + item % 2] for item in range(5)}
    row_of = {int(user): row for row, user in enumerate(dm.catalogue.user_ids)}

    def expected(user: str, history: list[int]) -> list[int]:
        return [8 + row_of[int(user)] % 4] + [token for item in history for token in tokens[item]]

    cases = {
        "train": [("10", [0], 1), ("10", [0, 1], 2), ("12", [1], 0)],  # every prefix of s[:-2] -> its next item
        "valid": [("10", [0, 1, 2], 3), ("11", [4], 3), ("12", [1, 0], 3)],  # s[:-2][-3:] -> s[-2]
        "test": [("10", [1, 2, 3], 4), ("11", [4, 3], 2), ("12", [1, 0, 3], 2)],  # s[:-1][-3:] -> s[-1]
    }
    for stage, samples in cases.items():
        batch = _all(dm.datasets[stage])
        got = sorted(
            (int(dm.catalogue.user_ids[user]), ids[mask.bool()].tolist(), labels.tolist(), target)
            for user, ids, mask, labels, target in zip(
                batch["user"].tolist(),
                batch["input_ids"],
                batch["attention_mask"],
                batch["labels"],
                batch["target_item"].tolist(),
                strict=True,
            )
        )
        want = sorted((int(user), expected(user, history), tokens[t] + [1], t) for user, history, t in samples)
        assert got == want, stage
        assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()  # padding is the pad token
        assert bool(batch["attention_mask"][:, -1].all())  # left-padded
    test = _all(dm.datasets["test"])
    row = test["user"].tolist().index(row_of[10])
    assert sorted(test["seen_items"][test["seen_rows"] == row].tolist()) == [0, 1, 2, 3]  # uncapped history
    assert "seen_rows" not in _all(dm.datasets["train"])
    serve = _all(dm.datasets["predict"])  # serving: the whole sequence's last 3 items, no target
    row = serve["user"].tolist().index(row_of[10])
    assert serve["input_ids"][row][serve["attention_mask"][row].bool()].tolist() == expected("10", [2, 3, 4])
    assert "labels" not in serve and sorted(serve["seen_items"][serve["seen_rows"] == row].tolist()) == [0, 1, 2, 3, 4]
    without_users = _all(_hand_made(tmp_path / "b", max_history=3, user_buckets=0).datasets["test"])
    assert sorted(without_users["attention_mask"].sum(1).tolist()) == [4, 6, 6]  # 2 codes per item, no user


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="user_buckets"):
        SemanticIdDataModule(user_buckets=-1)
    with pytest.raises(ConfigError, match="eval_top_k"):
        TIGER(num_beams=20, eval_top_k=5)
    with pytest.raises(ConfigError, match="t5_config"):
        TIGER(model_path="somewhere", t5_config=TINY_T5)


def _tiny_tiger(synthetic_dir, tmp_path, **model_args) -> tuple[TIGER, SemanticIdDataModule]:
    index = write_index(tmp_path / "index.json", synthetic_codes())
    dm = SemanticIdDataModule(
        data_dir=str(synthetic_dir), source="lcrec", dataset="Synthetic", index=str(index), eval_batch_size=5
    )
    dm.setup("test")
    torch.manual_seed(0)
    module = TIGER(t5_config=TINY_T5, num_beams=12, eval_top_k=10, **model_args)
    module._trainer = SimpleNamespace(datamodule=dm)
    module.setup("test")
    module.configure_model()
    module.eval()
    return module, dm


def test_constrained_decoding_returns_valid_distinct_items_scored_by_their_likelihood(synthetic_dir, tmp_path):
    module, dm = _tiny_tiger(synthetic_dir, tmp_path, mask_history=True)
    batch = next(iter(dm.test_dataloader()))
    result = module.test_step(batch, 0)
    assert result.items.shape == result.scores.shape == (5, 10)
    assert ((result.items >= 0) & (result.items < 120)).all()  # 120 items, a few seen: every slot a valid item
    assert all(len(set(row)) == 10 for row in result.items.tolist())
    assert (result.scores[:, :-1] >= result.scores[:, 1:]).all() and (result.scores <= 0).all()
    for row in range(5):
        seen = set(batch["seen_items"][batch["seen_rows"] == row].tolist())
        assert seen and not seen & set(result.items[row].tolist())
    # the beam score is the item's teacher-forced log-likelihood (codes + EOS) under the model
    tokens = torch.from_numpy(dm.item_token_ids())
    labels = torch.cat([tokens[result.items[:, 0]], torch.ones(5, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = module.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        ).logits
    likelihood = logits.log_softmax(-1).gather(2, labels[:, :, None]).sum((1, 2))
    assert torch.allclose(likelihood, result.scores[:, 0], atol=1e-4)
    module.mask_history = False  # what the cache writer's exclude_seen sets
    assert not module.decoding.mask_history and module.hparams.mask_history
    served = module.predict_step(next(iter(dm.predict_dataloader())), 0)
    assert served["items"].shape == (5, 10) and (served["items"] >= 0).all()
    ranks = result.ranks.tolist()
    assert all(rank == 10 or result.items[i, rank] == batch["target_item"][i] for i, rank in enumerate(ranks))


def test_a_small_trie_returns_each_of_its_items_once():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(1)
    config = T5Config(**TINY_T5, vocab_size=12, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()
    trie = CodeTrie(torch.tensor([[2, 5], [2, 6], [3, 5], [3, 6], [4, 5]]), eos_token_id=1)
    inputs = torch.tensor([[8, 2, 5, 2, 6], [0, 0, 9, 4, 5]])
    items, scores = encoder_decoder_topk(model, inputs, (inputs != 0).long(), trie, 8, 8, 0, 0)
    for row in range(2):
        assert sorted(items[row, :5].tolist()) == [0, 1, 2, 3, 4] and (items[row, 5:] == -1).all()
        assert torch.isfinite(scores[row, :5]).all() and torch.isinf(scores[row, 5:]).all()
    exclude = (torch.tensor([0, 0, 1]), torch.tensor([1, 4, 0]))
    items, _ = encoder_decoder_topk(model, inputs, (inputs != 0).long(), trie, 8, 8, 0, 0, exclude=exclude)
    assert sorted(items[0, :3].tolist()) == [0, 2, 3] and (items[0, 3:] == -1).all()
    assert sorted(items[1, :4].tolist()) == [1, 2, 3, 4]


def test_tiny_fit_and_test_through_the_cli(synthetic_dir, tmp_path):
    index = write_index(tmp_path / "index.json", synthetic_codes())
    root = tmp_path / "run"
    args = tiny_run_args(
        "synthetic/tiger.yaml",
        synthetic_dir,
        root,
        f"--data.init_args.index={index}",
        "--data.init_args.eval_batch_size=8",
        f"--model.init_args.t5_config={json.dumps(TINY_T5)}",
        "--trainer.fast_dev_run=1",
        "--trainer.enable_progress_bar=false",
    )
    main(["fit", *args])
    written = json.loads(next(root.rglob("beam_test_metrics.json")).read_text())
    assert set(written["metrics"]) == {"hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10"} and written["users"] == 8
    lists = [json.loads(line) for line in next(root.rglob("topk_test.rank0.jsonl")).read_text().splitlines()]
    assert len(lists) == 8 and all(len(set(entry["items"])) == 20 for entry in lists)


def test_test_from_a_checkpoint_reproduces_the_final_evaluation(synthetic_dir, tmp_path):
    index = write_index(tmp_path / "index.json", synthetic_codes())
    common = (
        f"--data.init_args.index={index}",
        "--data.init_args.eval_batch_size=8",
        "--data.init_args.eval_max_users=8",
        "--data.init_args.test_all_users=false",
        f"--model.init_args.t5_config={json.dumps(TINY_T5)}",
        "--trainer.enable_progress_bar=false",
    )
    fit_root, test_root = tmp_path / "fit", tmp_path / "test"
    fit = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1")
    main(["fit", *tiny_run_args("synthetic/tiger.yaml", synthetic_dir, fit_root, *common, *fit)])
    checkpoint = next(fit_root.rglob("last.ckpt"))
    main(
        ["test", *tiny_run_args("synthetic/tiger.yaml", synthetic_dir, test_root, *common), f"--ckpt_path={checkpoint}"]
    )

    def lists(root):
        return (next(root.rglob("topk_test.rank0.jsonl")).read_text(), next(root.rglob("beam_test_metrics.json")))

    (fit_lists, fit_metrics), (test_lists, test_metrics) = lists(fit_root), lists(test_root)
    assert fit_lists == test_lists and len(fit_lists.splitlines()) == 8
    assert json.loads(fit_metrics.read_text())["metrics"] == json.loads(test_metrics.read_text())["metrics"]
