"""BERT4Rec and FMLP-Rec invariants: cloze masking, the [MASK] prediction slot, FMLP leakage, tiny CLI runs."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules import SequenceDataModule
from lightning_modules import BERT4Rec, FMLPRec
from lightning_modules.cli import main
from tests.conftest import tiny_run_args

NUM_ITEMS = 50
PAD = NUM_ITEMS


def _build(model, num_items: int = NUM_ITEMS):
    torch.manual_seed(0)
    model.num_items = num_items
    model.configure_model()
    return model.eval()


def _bert(**kwargs) -> BERT4Rec:
    return _build(BERT4Rec(hidden_size=32, num_heads=2, dropout=0.0, **kwargs))


def _fmlp(**kwargs) -> FMLPRec:
    return _build(FMLPRec(hidden_size=32, dropout=0.0, **kwargs))


def _window_batch() -> dict[str, torch.Tensor]:
    """Two causal windows: a user's first window (3 items + target) and a later one-target window (20 items + "
    "target)."""
    history = torch.full((2, 20), PAD)
    target = torch.full((2, 20), -100)
    history[0, -3:] = torch.tensor([1, 2, 3])
    target[0, -3:] = torch.tensor([2, 3, 4])
    history[1] = torch.arange(5, 25)
    target[1, -1] = 25
    return {"user": torch.tensor([0, 1]), "history": history, "target": target}


# ------------------------------------------------------------------------------------------------ BERT4Rec
def test_training_sequence_appends_the_last_target_and_limits_maskable_items():
    model = _bert()
    sequence, maskable = model.training_sequence(_window_batch())
    assert sequence.shape == (2, 21)
    assert sequence[0, -4:].tolist() == [1, 2, 3, 4] and (sequence[0, :-4] == PAD).all()
    assert sequence[1].tolist() == list(range(5, 26))
    # the first window masks any of its items; a later window only the item it exists for; never padding
    assert maskable[0].tolist() == [False] * 17 + [True] * 4
    assert maskable[1].tolist() == [False] * 20 + [True]


def test_masking_proportion_and_only_masked_positions_are_supervised():
    model = _bert(mask_prob=0.2, last_mask_prob=0.0)
    torch.manual_seed(1)
    maskable = torch.ones(4000, 21, dtype=torch.bool)
    maskable[:, :5] = False  # padding
    masked = model.cloze_mask(maskable)
    assert not masked[:, :5].any()
    assert masked[:, 5:].float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert masked.any(dim=1).all()  # every row supervises something

    last_only = _bert(mask_prob=0.2, last_mask_prob=1.0).cloze_mask(maskable)
    assert last_only[:, -1].all() and not last_only[:, :-1].any()

    # the loss is the cross-entropy at the masked positions only, whose inputs are [MASK]
    model = _bert(mask_prob=0.5, last_mask_prob=0.0)
    batch = _window_batch()
    sequence, maskable = model.training_sequence(batch)
    torch.manual_seed(2)
    masked = model.cloze_mask(maskable)
    torch.manual_seed(2)
    loss = model.training_loss(batch)
    tokens = sequence.masked_fill(masked, model.mask_token)
    expected = torch.nn.functional.cross_entropy(model.logits(model.encode_all(tokens)[masked]), sequence[masked])
    assert torch.allclose(loss, expected)
    assert (sequence[masked] != PAD).all()


def test_prediction_input_ends_with_mask_and_scores_are_finite():
    model = _bert()
    history = torch.full((3, 20), PAD)
    history[:, -2:] = torch.tensor([7, 8])
    history[2] = torch.arange(20)
    tokens = model.prediction_input(history)
    assert tokens.shape == (3, 21) and (tokens[:, -1] == model.mask_token).all()
    assert torch.equal(tokens[:, :-1], history)
    with torch.no_grad():
        scores = model.score_items({"history": history})
    assert scores.shape == (3, NUM_ITEMS) and torch.isfinite(scores).all()


def test_bert4rec_prefix_layout_trains():
    model = _bert().train()
    history = torch.full((2, 20), PAD)
    history[:, -2:] = torch.tensor([[1, 2], [3, 4]])
    loss = model.training_loss({"history": history, "target": torch.tensor([5, 6])})
    loss.backward()
    assert torch.isfinite(loss) and model.item_embedding.weight.grad is not None


# ------------------------------------------------------------------------------------------------ FMLP-Rec
def test_fmlp_filter_shapes():
    model = _fmlp(num_layers=3)
    assert len(model.blocks) == 3
    for block in model.blocks:
        assert block.filter.complex_weight.shape == (20 // 2 + 1, 32, 2)
    history = torch.randint(0, NUM_ITEMS, (4, 20))
    with torch.no_grad():
        states = model.encode_all(history)
        assert states.shape == (4, 20, 32)
        # the scoring path computes the last feed-forward at the last position only: same state
        assert torch.allclose(model.encode(history), states[:, -1], atol=1e-6)
        assert model.score_items({"history": history}).shape == (4, NUM_ITEMS)


def test_fmlp_filter_mixes_all_positions_so_windows_are_refused():
    model = _fmlp()
    history = torch.full((1, 20), PAD)
    history[0, -5:] = torch.tensor([3, 7, 11, 19, 23])
    changed = history.clone()
    changed[0, -1] = 40
    with torch.no_grad():
        # position -2 sees the item after it: supervising it with that item would leak the target
        assert not torch.allclose(model.encode_all(history)[0, -2], model.encode_all(changed)[0, -2])
    with pytest.raises(ValueError, match="causal_windows: false"):
        model.training_loss(_window_batch())


def test_fmlp_scored_position_does_not_see_the_target(synthetic_dir):
    datamodule = SequenceDataModule(data_dir=str(synthetic_dir), causal_windows=False)
    datamodule.setup("fit")
    model = _build(FMLPRec(hidden_size=32, dropout=0.0), datamodule.catalogue.num_items)
    batch = datamodule.datasets["train"].__getitems__(list(range(64)))
    with torch.no_grad():
        scores = model.score_items(batch)
        shuffled = dict(batch, target=batch["target"].roll(1))
        # the prediction is a function of the history alone: changing the targets changes nothing
        assert torch.equal(model.score_items(shuffled), scores)
    # the scored position is the last history item, which precedes the target in the user's sequence
    catalogue = datamodule.catalogue
    positions = datamodule.split.train.target_pos[:64]
    assert torch.equal(batch["history"][:, -1], torch.from_numpy(catalogue.items[positions - 1]))
    assert torch.equal(batch["target"], torch.from_numpy(catalogue.items[positions]))
    with torch.no_grad():
        assert torch.isfinite(model.encode(torch.full((1, 20), model.num_items))).all()


def test_item_embeddings_shape():
    assert _bert().item_embeddings().shape == (NUM_ITEMS, 32)
    assert _fmlp().item_embeddings().shape == (NUM_ITEMS, 32)


# ------------------------------------------------------------------------------------------------ CLI runs
@pytest.mark.parametrize("config", ["synthetic/bert4rec.yaml", "synthetic/fmlp.yaml"])
def test_tiny_fit_then_test_writes_metrics(config, synthetic_dir, tmp_path):
    main(["fit", *tiny_run_args(config, synthetic_dir, tmp_path, "--trainer.max_epochs=1")])
    record = json.loads((tmp_path / "csv" / "version_0" / "test_metrics.json").read_text())
    metrics = record["metrics"]
    assert set(metrics) == {"hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10"}
    assert 0 <= metrics["hr@1"] <= metrics["hr@5"] <= metrics["hr@10"] <= 1
    assert metrics["ndcg@10"] <= metrics["hr@10"]


@pytest.mark.parametrize(
    ("model", "kwargs", "message"),
    [
        (BERT4Rec, {"mask_prob": 1.5}, "model.init_args.mask_prob must be in [0, 1], got 1.5"),
        (BERT4Rec, {"last_mask_prob": -0.1}, "model.init_args.last_mask_prob must be in [0, 1], got -0.1"),
        (BERT4Rec, {"num_heads": 5}, "model.init_args.hidden_size must be a multiple of num_heads=5"),
        (FMLPRec, {"num_layers": 0}, "model.init_args.num_layers must be >= 1, got 0"),
        (FMLPRec, {"max_history": 0}, "model.init_args.max_history must be >= 1, got 0"),
        (FMLPRec, {"dropout": -0.2}, "model.init_args.dropout must be in [0, 1), got -0.2"),
    ],
)
def test_out_of_range_settings_are_refused_naming_the_field(model, kwargs, message):
    from datamodules.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        model(**kwargs)
    assert message in str(error.value)
