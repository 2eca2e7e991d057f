"""SASRec invariants: padding does not leak, causal outputs equal prefix encodings, both train layouts agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules import SequenceDataModule
from lightning_modules import SASRec

NUM_ITEMS = 50


def _model(**kwargs) -> SASRec:
    torch.manual_seed(0)
    model = SASRec(hidden_size=32, num_heads=2, dropout=0.0, **kwargs)
    model.num_items = NUM_ITEMS
    model.configure_model()
    return model.eval()


def test_padding_positions_do_not_change_the_user_state():
    model = _model()
    history = torch.full((2, 20), NUM_ITEMS)
    history[:, -3:] = torch.tensor([4, 9, 17])
    with torch.no_grad():
        base = model.encode(history)
        assert torch.isfinite(base).all()
        # an all-padding history is finite too (no NaN from fully masked attention rows)
        assert torch.isfinite(model.encode(torch.full((1, 20), NUM_ITEMS))).all()
        assert torch.allclose(base[0], base[1])


def test_causal_position_equals_shorter_history_ending_there():
    model = _model()
    history = torch.tensor([[NUM_ITEMS] * 15 + [3, 7, 11, 19, 23]])
    with torch.no_grad():
        all_states = model.encode_all(history)
        # the state at position 17 only depends on items up to position 17
        truncated = history.clone()
        truncated[0, 18:] = 1
        assert torch.allclose(model.encode_all(truncated)[0, 17], all_states[0, 17], atol=1e-6)


def test_window_and_prefix_layouts_give_the_same_pairs(synthetic_dir):
    prefix = SequenceDataModule(data_dir=str(synthetic_dir))
    prefix.setup("fit")
    windows = SequenceDataModule(data_dir=str(synthetic_dir), causal_windows=True)
    windows.setup("fit")
    pad = prefix.catalogue.pad_item

    def pairs_from_prefix():
        batch = prefix.datasets["train"].__getitems__(list(range(len(prefix.datasets["train"]))))
        return sorted(
            (tuple(h[h != pad].tolist()), int(t))
            for h, t in zip(batch["history"].numpy(), batch["target"].numpy(), strict=False)
        )

    def pairs_from_windows():
        dataset = windows.datasets["train"]
        batch = dataset.__getitems__(list(range(len(dataset))))
        result = []
        for history, targets in zip(batch["history"].numpy(), batch["target"].numpy(), strict=False):
            for position in np.flatnonzero(targets != -100):
                prefix_items = history[: position + 1]
                result.append((tuple(prefix_items[prefix_items != pad][-20:].tolist()), int(targets[position])))
        return sorted(result)

    assert pairs_from_windows() == pairs_from_prefix()
    assert len(windows.datasets["train"]) < len(prefix.datasets["train"])


def test_item_embeddings_shape():
    model = _model()
    assert model.item_embeddings().shape == (NUM_ITEMS, 32)


def test_config_errors_raise_config_error_naming_the_field():
    from datamodules.errors import ConfigError

    for kwargs, field in [
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_heads": 3}, "hidden_size"),
        ({"lr": 0.0}, "lr"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"top_k": 0}, "top_k"),
    ]:
        with pytest.raises(ConfigError, match=f"model.init_args.{field} must be"):
            SASRec(**kwargs)
    with pytest.raises(ConfigError, match="data.init_args.eval_batch_size must be >= 1, got -4"):
        SequenceDataModule(eval_batch_size=-4)
