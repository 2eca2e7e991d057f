"""Text-grounded codebook input and cold start: the text map, held-out items, new items from text, bad input."""

from __future__ import annotations

import json
import shutil

import lightning as L
import numpy as np
import pytest
import torch

from callbacks import CodeIndexExporter
from callbacks.cold_start import ColdStartError, assign_codes, load_codebook
from datamodules import ItemDataModule, load_item_index
from datamodules.artifacts import sha256_file
from datamodules.catalogue import DataFormatError, load_lcrec
from datamodules.cold_items import allowed_items, hold_out_items, read_cold_items
from datamodules.negatives import interaction_keys, sample_negatives
from datamodules.new_items import read_new_items
from datamodules.prompt_tasks import PromptTasks, TaskWeights
from datamodules.split import LeaveLastOutSplit
from datamodules.text_grounding import TextGrounding, TextGroundingError, TextGroundingSpec, TfidfEncoder
from experiments.cold_start import choose_cold_items, user_metrics
from lightning_modules import AlignmentTokenizer
from tests.conftest import write_inter

TOPICS = {
    0: ("red apple fruit orchard sweet", torch.tensor([4.0, 0.0, 0.0])),
    1: ("steel hammer tool workshop nail", torch.tensor([0.0, 4.0, 0.0])),
    2: ("blue ocean water wave salt", torch.tensor([0.0, 0.0, 4.0])),
}


def _topic_items(per_topic: int = 6) -> tuple[list[str], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    texts, rows = [], []
    for words, centre in TOPICS.values():
        for n in range(per_topic):
            vocabulary = words.split()
            texts.append(" ".join(vocabulary[n % 5 :] + vocabulary[: n % 5]) + f" model{n}")
            rows.append(centre + 0.3 * torch.randn(3, generator=generator))
    return texts, torch.stack(rows)


# ------------------------------------------------------------------------------------------ the text map
def test_a_sparse_item_lands_next_to_its_textual_neighbours():
    texts, behaviour = _topic_items()
    spec = TextGroundingSpec(min_interactions=5, ridge=0.1, tfidf_dim=4)
    texts.append("sweet red apple from the orchard")  # a new fruit item: no interaction, an untrained embedding
    behaviour = torch.cat([behaviour, torch.tensor([[0.0, -3.0, -3.0]])])
    interactions = torch.tensor([20] * 18 + [0])
    encoder = TfidfEncoder.fit(texts[:18], spec.tfidf_dim, spec.seed)
    features = encoder.transform(texts)
    grounding = TextGrounding.fit(spec, features, behaviour, interactions >= 5, encoder)
    x = grounding.inputs(behaviour, features, interactions, torch.ones(19, dtype=torch.bool))
    distances = torch.stack([(x[-1] - centre).norm() for _, centre in TOPICS.values()])
    assert int(distances.argmin()) == 0  # among the fruit, not where its untrained embedding was
    neighbours = (x[:18] - x[-1]).norm(dim=1).argsort()[:3]
    assert set(neighbours.tolist()) <= set(range(6))
    # the global scale gives the estimates the behaviour norm: the fit items' mean norms agree
    estimate = grounding.estimate(features[:18])
    assert estimate.norm(dim=1).mean() == pytest.approx(behaviour[:18].norm(dim=1).mean().double(), rel=1e-6)


def test_grounding_mix_by_hand():
    spec = TextGroundingSpec(prior_interactions=2.0)
    grounding = TextGrounding(
        spec, torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64), torch.zeros(2), 3.0
    )
    behaviour = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    features = torch.tensor([[2.0, 0.0], [0.0, 5.0], [0.0, 1.0], [1.0, 0.0]])  # unit directions e1, e2, e2, e1
    interactions = torch.tensor([0, 2, 6, 0])
    has_text = torch.tensor([True, True, True, False])
    x = grounding.inputs(behaviour, features, interactions, has_text)
    expected = torch.tensor(
        [[3.0, 0.0], [0.5, 0.5 + 1.5], [0.75, 0.75 + 0.75], [5.0, 5.0]]
    )  # a = 0, 1/2, 3/4, text-less
    torch.testing.assert_close(x, expected)
    with pytest.raises(TextGroundingError, match="2-dim tfidf features"):
        grounding.estimate(torch.zeros(1, 3))
    state = TextGrounding.from_state(grounding.state_dict())
    assert state.fingerprint() == grounding.fingerprint()


# ------------------------------------------------------------------------------ the cold-start protocol
def test_held_out_items_remain_only_as_test_targets(tmp_path):
    sequences = {"1": [0, 5, 1, 2, 3], "2": [5, 1, 2, 5], "3": [5, 5, 4], "4": [1, 2, 3, 4, 0]}
    write_inter(tmp_path, "Toy", sequences, {str(i): {"title": f"item {i}"} for i in range(6)})
    catalogue = load_lcrec(tmp_path, "Toy")
    (tmp_path / "cold.json").write_text(json.dumps({"items": [5]}))
    held = hold_out_items(catalogue, read_cold_items(tmp_path / "cold.json", catalogue.num_items))
    assert [held.sequence(u).tolist() for u in range(held.num_users)] == [[0, 1, 2, 3], [1, 2, 5], [1, 2, 3, 4, 0]]
    assert held.user_ids.tolist() == [1, 2, 4] and held.extras["cold_dropped_users"] == 1  # user 3 kept only [4]
    assert held.fingerprint() != catalogue.fingerprint()
    split = LeaveLastOutSplit(held)
    _, train_items = split.train_interactions()
    assert 5 not in train_items and 5 not in held.items[split.valid.target_pos]
    assert held.items[split.test.target_pos].tolist() == [3, 5, 0]
    # no negative names a held-out item
    keys = interaction_keys(*split.train_interactions(), held.num_items)
    draws = sample_negatives(keys, np.zeros(500, dtype=np.int64), held.num_items, np.random.default_rng(0),
                             allowed=allowed_items(held))  # fmt: skip
    assert set(draws.tolist()) == {2, 3, 4}  # user 1 trained on 0 and 1; 5 is held out


def test_cold_items_file_errors_name_the_file(tmp_path):
    (tmp_path / "bad.json").write_text('{"items": [1, 99]}')
    with pytest.raises(DataFormatError, match="item 99 is not a catalogue item"):
        read_cold_items(tmp_path / "bad.json", 10)
    (tmp_path / "text.json").write_text('["a"]')
    with pytest.raises(DataFormatError, match="text.json: expected a JSON list"):
        read_cold_items(tmp_path / "text.json", 10)


def test_choose_cold_items_and_user_metrics_by_hand(tmp_path):
    first, again = choose_cold_items(200, 0.05, 7), choose_cold_items(200, 0.05, 7)
    assert len(first) == 10 and np.array_equal(first, again) and np.all(np.diff(first) > 0)
    path = tmp_path / "topk.jsonl"
    path.write_text('{"user": 10, "items": [4, 9, 2]}\n{"user": 11, "items": [1, 2]}\n')
    metrics = user_metrics(path, {10: 9, 11: 7})
    assert metrics[10] == (1.0, pytest.approx(1 / np.log2(3))) and metrics[11] == (0.0, 0.0)


# -------------------------------------------------------------------- codebook with grounding + cold start
def fit_codebook(model: AlignmentTokenizer, datamodule: ItemDataModule, export) -> dict:
    """One seeded epoch of stage 2, exported to ``export``; returns the export's manifest."""
    L.seed_everything(0)
    exporter = CodeIndexExporter(str(export))
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[exporter],
    )
    trainer.fit(model, datamodule)
    return exporter.manifest


@pytest.fixture(scope="module")
def grounded(synthetic_dir, tmp_path_factory):
    """A text-grounded codebook (L=3, K=8) on the tiny catalogue with items 3, 50 and 77 held out of its fit."""
    root = tmp_path_factory.mktemp("grounded")
    torch.save(torch.randn(120, 16, generator=torch.Generator().manual_seed(0)), root / "embeddings.pt")
    (root / "cold.json").write_text(json.dumps([3, 50, 77]))
    datamodule = ItemDataModule(
        data_dir=str(synthetic_dir),
        dataset="Synthetic",
        source="lcrec",
        embeddings=str(root / "embeddings.pt"),
        cold_items=str(root / "cold.json"),
        text_grounding=TextGroundingSpec(min_interactions=1, tfidf_dim=8),
    )
    fit_codebook(AlignmentTokenizer(num_levels=3, codebook_size=8), datamodule, root / "export")
    return root, datamodule


def test_held_out_items_are_coded_by_cold_start_from_text(grounded):
    root, datamodule = grounded
    assert len(datamodule.datasets["train"]) == 117 and not {3, 50, 77} & set(datamodule.datasets["train"].ids.tolist())
    manifest = json.loads((root / "export" / "manifest.json").read_text())
    record = manifest["cold_start"][0]
    assert record["items"] == [3, 50, 77] and record["input"] == "text" and manifest["final_collision_rate"] == 0
    assert manifest["text_grounding"]["encoder"] == "tfidf" and manifest["text_grounding"]["text_dim"] == 8
    index = load_item_index(root / "export", datamodule.catalogue)
    assert index.cold_start_items().tolist() == [3, 50, 77]
    # held-out items never reach the stage-3 text task or the negatives
    catalogue = datamodule.catalogue
    tasks = PromptTasks(catalogue, LeaveLastOutSplit(catalogue), index, TaskWeights(), 1, 512, 0)
    assert not {3, 50, 77} & set(tasks.text_item.tolist()) and not {3, 50, 77} & set(tasks.negative_pool.tolist())


def test_recoding_held_out_items_keeps_the_trained_index_hash(grounded, tmp_path):
    root, datamodule = grounded
    export, catalogue = root / "export", datamodule.catalogue
    before = load_item_index(export, catalogue)
    codes = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 2, 3]])
    assign_codes(export, codes=codes, items=[3, 50, 77], output_dir=tmp_path / "random")
    after = load_item_index(tmp_path / "random", catalogue)
    assert after.trained_index_hash == before.trained_index_hash and before.trained_index_hash != before.index_hash
    keep = np.setdiff1d(np.arange(120), [3, 50, 77])
    assert np.array_equal(after.codes[keep], before.codes[keep]) and len({tuple(r) for r in after.codes}) == 120
    assert after.cold_start_items().tolist() == [3, 50, 77]


def test_new_text_only_items_get_unique_codes_and_existing_codes_never_change(grounded, tmp_path):
    root, datamodule = grounded
    export = root / "export"
    texts = [datamodule.catalogue.item_text[i]["title"] for i in (0, 0, 10, 20)] + ["Brand New Thing"]
    extended = assign_codes(export, texts=texts, output_dir=tmp_path / "extended")
    original = json.loads((export / "index.json").read_text())
    assert len(extended) == 125 and all(extended[key] == tokens for key, tokens in original.items())
    assert len({tuple(tokens) for tokens in extended.values()}) == 125
    manifest = json.loads((tmp_path / "extended" / "manifest.json").read_text())
    assert manifest["cold_start"][-1] | {"inputs_sha256": ""} == manifest["cold_start"][-1] | {
        "first_item": 120,
        "last_item": 124,
        "count": 5,
        "inputs_sha256": "",
        "input": "text",
    }
    # a new item with an indexed item's text takes that text's estimate: its codes start where the estimate's do
    codebook = load_codebook(export)
    estimate = codebook.grounding.estimate(codebook.grounding.features(texts[:1])).float()
    assert extended["120"][0] == f"<a_{int(codebook.quantizer(estimate).codes[0, 0])}>"
    index = load_item_index(tmp_path / "extended", datamodule.catalogue, new_items=True)
    assert (
        index.new_items == 5
        and index.trained_index_hash == load_item_index(export, datamodule.catalogue).trained_index_hash
    )


def test_cold_start_bad_input_leaves_the_index_untouched(grounded, synthetic_dir, tmp_path):
    root, _ = grounded
    work = tmp_path / "index"
    shutil.copytree(root / "export", work)
    digest = sha256_file(work / "index.json")
    with pytest.raises(TextGroundingError, match="fitted on 8-dim tfidf features"):
        assign_codes(work, text_features=torch.zeros(2, 5))  # another encoder's embeddings
    with pytest.raises(ColdStartError, match="new item 1: no title/description and no behaviour embedding"):
        assign_codes(work, texts=["Red Sword", ""])
    with pytest.raises(ColdStartError, match="numbered from 118"):
        assign_codes(work, texts=["Red Sword"], first_id=118)
    assign_codes(work, texts=["Red Sword"])
    digest = sha256_file(work / "index.json")
    with pytest.raises(ColdStartError, match="already added as items 120..120"):
        assign_codes(work, texts=["Red Sword"])  # the same batch twice
    with pytest.raises(ColdStartError, match="dim 4, but .* dim-16"):
        assign_codes(work, embeddings=torch.zeros(1, 4))
    assert sha256_file(work / "index.json") == digest
    new = {"119": {"title": "x"}}
    (tmp_path / "clash.json").write_text(json.dumps(new))
    with pytest.raises(DataFormatError, match="new item 119 clashes with a catalogue item"):
        read_new_items(tmp_path / "clash.json", 120, ["title"])
    (tmp_path / "gap.json").write_text(json.dumps({"120": {"title": "a"}, "122": {"title": "b"}}))
    with pytest.raises(DataFormatError, match="item 122 breaks the sequence"):
        read_new_items(tmp_path / "gap.json", 120, ["title"])
    plain = ItemDataModule(
        data_dir=str(synthetic_dir), dataset="Synthetic", source="lcrec", embeddings=str(root / "embeddings.pt")
    )
    (tmp_path / "new.json").write_text(json.dumps({"120": {"title": "Red Sword"}}))
    plain.cold_start_items = str(tmp_path / "new.json")
    with pytest.raises(DataFormatError, match="needs a text-grounded codebook"):
        plain.setup("predict")


def test_lightning_predict_codes_new_items_from_text(synthetic_dir, tmp_path):
    """`lightning fit` a grounded codebook, then `lightning predict` new item.json entries into the index."""
    from lightning_modules.cli import main
    from tests.conftest import tiny_run_args

    torch.save(torch.randn(120, 16, generator=torch.Generator().manual_seed(1)), tmp_path / "emb.pt")
    export = tmp_path / "codebook"
    common = [
        "--data.init_args.embeddings",
        str(tmp_path / "emb.pt"),
        "--data.init_args.text_grounding",
        '{"encoder": "tfidf", "min_interactions": 1, "tfidf_dim": 8}',
        "--model.init_args.num_levels=3",
        "--model.init_args.codebook_size=8",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks.init_args.output_dir",
        str(export),
    ]
    main(["fit", *tiny_run_args("synthetic/codebook.yaml", synthetic_dir, tmp_path / "run", *common)])
    before = json.loads((export / "index.json").read_text())
    (tmp_path / "new.json").write_text(json.dumps({"120": {"title": "Red Sword"}, "121": {"title": "Blue Shield"}}))
    checkpoint = tmp_path / "run" / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    predict = tiny_run_args("synthetic/codebook.yaml", synthetic_dir, tmp_path / "predict", *common)
    main(
        [
            "predict",
            *predict,
            "--ckpt_path",
            str(checkpoint),
            "--data.init_args.cold_start_items",
            str(tmp_path / "new.json"),
        ]
    )
    after = json.loads((export / "index.json").read_text())
    assert len(after) == 122 and all(after[key] == tokens for key, tokens in before.items())
    assert len({tuple(tokens) for tokens in after.values()}) == 122
    assert json.loads((export / "manifest.json").read_text())["cold_start"][-1]["input"] == "text"


@pytest.mark.parametrize(
    "variant",
    [
        {"variant": "rqvae", "num_levels": 3, "codebook_size": 8},  # ED
        {"num_levels": 1, "codebook_size": 120},  # one level: every item its own code
        {"num_levels": 2, "codebook_size": 16, "llm_alignment_weight": 0.0},  # w/o LA, 2 levels
    ],
    ids=["ed", "levels1", "wo_la_levels2"],
)
def test_ablations_export_with_grounding_and_held_out_items(grounded, variant):
    root, datamodule = grounded
    out = root / f"export_{len(variant)}_{variant.get('num_levels')}"
    manifest = fit_codebook(AlignmentTokenizer(**variant), datamodule, out)
    assert manifest["final_collision_rate"] == 0 and manifest["cold_start"][0]["items"] == [3, 50, 77]


# ------------------------------------------------------------------------------ prefix retrieval of cold items
def test_cold_items_are_inserted_after_the_best_item_sharing_their_prefix():
    from lightning_modules.components.cold_ranking import ColdPrefixTable

    codes = torch.tensor([[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 1], [1, 1, 0], [2, 0, 0]])
    table = ColdPrefixTable(codes, torch.tensor([4, 5, 6]), prefix=1)  # cold: 4 (0,0,1), 5 (1,1,0), 6 (2,0,0)
    items = torch.tensor([[2, 0, 1, -1], [3, 2, 0, 1], [0, 4, 1, 2]])
    scores = torch.tensor([[-1.0, -2, -3, -9], [-1, -2, -3, -4], [-1, -2, -3, -4]])
    one_items, one_scores = table.insert(items, scores, slots=1)
    # row 0: item 2 starts with code 1 -> cold 5 after it, with its score; row 1: cold 5 shares 2 codes with item 3;
    # row 2: cold 4 is already listed and item 2's match would fall off the list: unchanged
    assert one_items.tolist() == [[2, 5, 0, 1], [3, 5, 2, 0], [0, 4, 1, 2]]
    assert one_scores.tolist() == [[-1, -1, -2, -3], [-1, -1, -2, -3], [-1, -2, -3, -4]]
    two_items, _ = table.insert(items, scores, slots=2)
    assert two_items[0].tolist() == [2, 5, 0, 4]  # the second slot anchors on item 0 (code 0) -> cold 4


def test_cold_insertion_matches_a_loop_reference():
    from lightning_modules.components.cold_ranking import ColdPrefixTable

    generator = torch.Generator().manual_seed(0)
    codes = torch.unique(torch.randint(0, 3, (80, 3), generator=generator), dim=0)
    n = len(codes)
    cold = torch.randperm(n, generator=generator)[:10]
    table = ColdPrefixTable(codes, cold, prefix=2)
    items = torch.stack([torch.randperm(n, generator=generator)[:6] for _ in range(50)])
    scores = -torch.arange(6.0).repeat(50, 1)
    got, _ = table.insert(items, scores, slots=1)
    for row, expected in zip(items.tolist(), got.tolist(), strict=True):
        reference = list(row)
        for position, item in enumerate(row[:-1]):
            matches = [c for c in sorted(cold.tolist()) if codes[c, :2].tolist() == codes[item, :2].tolist()]
            matches = [c for c in matches if c not in row]
            if matches:
                shared = [int((codes[c] == codes[item]).int().cumprod(0).sum()) for c in matches]
                best = matches[shared.index(max(shared))]
                reference = row[: position + 1] + [best] + row[position + 1 : -1]
                break
        assert expected == reference
