"""experiments/make_tiny_llama.py: the CPU run's from-scratch Llama, untied by default, never silently reused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, shared_tokenizer


def _script():
    spec = importlib.util.spec_from_file_location("make_tiny_llama", REPO / "experiments" / "make_tiny_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    return shared_tokenizer()


def test_untied_by_default_and_reused_only_with_the_same_shape(tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    script = _script()
    out = tmp_path / "tiny"
    script.make_tiny_llama(out, tokenizer_dir, hidden=16, layers=1, heads=2, seed=0)
    config = json.loads((out / "config.json").read_text())
    assert (
        config["tie_word_embeddings"] is False and config["intermediate_size"] == 43 and config["vocab_size"] == 32000
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert not torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)

    before = (out / "model.safetensors").stat().st_mtime_ns
    script.make_tiny_llama(out, tokenizer_dir, hidden=16, layers=1, heads=2, seed=0)  # same shape: kept as it is
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(SystemExit, match=r"tie_word_embeddings: False there, True asked.*delete"):
        script.make_tiny_llama(out, tokenizer_dir, hidden=16, layers=1, heads=2, seed=0, tie_embeddings=True)
    with pytest.raises(SystemExit, match=r"hidden_size: 16 there, 32 asked"):
        script.make_tiny_llama(out, tokenizer_dir, hidden=32, layers=1, heads=2, seed=0)


def test_tied_on_request(tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    out = _script().make_tiny_llama(
        tmp_path / "tied", tokenizer_dir, hidden=16, layers=1, heads=2, seed=0, tie_embeddings=True
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
