"""Alignment Tokenization: residual quantisation, k-means init, collisions, index export, cold start, LLM alignment."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks import CodeIndexExporter, CollisionLogger, KMeansInit, assign_codes, load_code_index
from datamodules import ItemDataModule, load_item_index, load_lcrec
from datamodules.artifacts import ArtifactWriter
from datamodules.catalogue import DataFormatError
from datamodules.code_index import codes_to_tokens, collision_rate, level_statistics, tokens_to_codes
from datamodules.errors import ArtifactError
from datamodules.llm_embeddings import LLMDirectoryError
from lightning_modules import AlignmentTokenizer
from lightning_modules.cli import main
from lightning_modules.components.code_assignment import make_unique
from lightning_modules.components.quantizer import ResidualCodebook, kmeans
from tests.conftest import shared_dataset, tiny_run_args


@pytest.fixture(scope="module")
def item_embeddings(tmp_path_factory) -> Path:
    """``[120, 32]`` random behaviour embeddings for the tiny synthetic catalogue."""
    path = tmp_path_factory.mktemp("emb") / "item_embeddings.pt"
    torch.save(torch.randn(120, 32, generator=torch.Generator().manual_seed(0)), path)
    return path


def _datamodule(data_dir: Path, embeddings, **kwargs) -> ItemDataModule:
    return ItemDataModule(
        data_dir=str(data_dir),
        dataset=kwargs.pop("dataset", "Synthetic"),
        source="lcrec",
        embeddings=str(embeddings),
        **kwargs,
    )


def _trainer(root: Path, callbacks: list, epochs: int = 1) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        num_sanity_val_steps=0,
    )


# ------------------------------------------------------------------------------------------ quantisation
def test_residual_quantisation_exact_codes():
    q = ResidualCodebook(dim=2, num_levels=2, codebook_size=3, distance="l2")
    q.codebooks.data = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    x = torch.tensor([[10.9, 0.2], [0.1, 10.8], [0.3, -0.2]])
    out = q(x)
    assert out.codes.tolist() == [[1, 1], [2, 2], [0, 0]]
    assert torch.allclose(out.quantized, torch.tensor([[11.0, 0.0], [0.0, 11.0], [0.0, 0.0]]))
    assert torch.allclose(
        out.inputs[:, 1], x - torch.tensor([[10.0, 0.0], [0.0, 10.0], [0.0, 0.0]])
    )  # level 2 sees the residual
    loss = q.behaviour_loss(out)
    assert loss.detach().item() == pytest.approx(float((out.inputs - out.chosen).pow(2).sum(-1).sum(1).mean()))
    loss.backward()
    assert q.codebooks.grad is not None and q.codebooks.grad[0, 1].abs().sum() > 0
    cosine = ResidualCodebook(dim=2, num_levels=2, codebook_size=3, distance="cosine")
    cosine.codebooks.data = q.codebooks.data.clone()
    assert cosine(torch.tensor([[3.0, 0.1]])).codes.tolist() == [[1, 2]]  # residual (-7, 0.1) points along (0, 1)


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 10.0], [-10.0, 10.0], [10.0, -10.0], [-10.0, -10.0]])
    x = (centres[:, None] + 0.1 * torch.randn(4, 50, 2, generator=g)).reshape(-1, 2)
    found = kmeans(x, 4, iters=10, seed=1)
    assert torch.allclose(
        found[torch.argsort(found[:, 0] * 100 + found[:, 1])],
        centres[torch.argsort(centres[:, 0] * 100 + centres[:, 1])],
        atol=0.1,
    )
    assert torch.equal(found, kmeans(x, 4, iters=10, seed=1))
    with pytest.raises(ValueError, match="at least k=8"):
        kmeans(x[:5], 8)


def test_collision_statistics():
    codes = torch.tensor([[0, 1], [0, 1], [1, 1], [2, 2]])
    assert collision_rate(codes) == 0.5
    stats = level_statistics(codes, codebook_size=4)
    assert (
        stats[0]["dead_codes"] == 1
        and stats[1]["usage"] == 0.5
        and stats[1]["perplexity"] == pytest.approx((4 / 3) ** 0.75 * 4**0.25)
    )


# ------------------------------------------------------------------------------------ collision resolution
def _heavy(n: int, levels: int, prefixes: int, last: int, k: int, seed: int = 0):
    """``n`` items on ``prefixes ** (levels - 1)`` prefixes (evenly) x ``last`` last codes, random costs."""
    i = torch.arange(n)
    prefix = [(i // prefixes**level) % prefixes for level in range(levels - 1)]
    codes = torch.stack([*prefix, i % last], 1)
    cost = torch.rand(n, k, generator=torch.Generator().manual_seed(seed))
    return codes, lambda items: cost[items], cost


def test_resolution_makes_heavy_collisions_unique():
    codes, last_cost, cost = _heavy(n=60, levels=3, prefixes=2, last=3, k=16)  # 12 tuples for 60 items
    assert collision_rate(codes) > 0.8
    result = make_unique(codes, last_cost, codebook_size=16)
    assert result.codes.shape == (60, 3) and collision_rate(result.codes) == 0 and result.extra_level == 0
    assert torch.equal(result.codes[:, :2], codes[:, :2])  # movers keep their prefix
    # in each raw group exactly one item keeps the tuple: the one closest to its code
    _, group = torch.unique(codes, dim=0, return_inverse=True)
    for g in group.unique():
        members = torch.nonzero(group == g).flatten()
        kept = members[(result.codes[members] == codes[members]).all(1)]
        own = cost[members, codes[members, -1]]
        assert kept.tolist() == [members[own.argmin()].item()]
    assert torch.equal(make_unique(codes, last_cost, 16).codes, result.codes)  # deterministic


def test_reassignment_is_the_minimum_cost_assignment():
    # hand case: items 0-2 share (0, 0); item 0 keeps it (own cost 0); free codes 1, 2 for movers 1, 2.
    # Cheapest-pair-first would give mover 2 code 1 (0.5) and mover 1 code 2 (10): 10.5; the optimum is 1 + 2 = 3.
    cost = torch.tensor([[0.0, 1.0, 2.0], [5.0, 1.0, 10.0], [5.0, 0.5, 2.0]])
    result = make_unique(torch.zeros(3, 2, dtype=torch.long), lambda items: cost[items], codebook_size=3)
    assert result.codes.tolist() == [[0, 0], [0, 1], [0, 2]] and result.reassigned == 2
    # brute force: 5 items on (0, 0), item 5 holds (0, 1); the 4 movers take 4 of the free codes 2..6
    cost = torch.rand(6, 7, generator=torch.Generator().manual_seed(3))
    codes = torch.tensor([[0, 0]] * 5 + [[0, 1]])
    result = make_unique(codes, lambda items: cost[items], codebook_size=7)
    keeper = int(cost[:5, 0].argmin())
    movers = [item for item in range(5) if item != keeper]
    assignments = itertools.permutations(range(2, 7), 4)
    best = min(sum(float(cost[m, c]) for m, c in zip(movers, chosen, strict=False)) for chosen in assignments)
    assert result.codes[keeper].tolist() == [0, 0] and result.codes[5].tolist() == [0, 1]
    assert sum(float(cost[m, result.codes[m, 1]]) for m in movers) == pytest.approx(best)


def test_full_prefix_falls_back_to_an_extra_level():
    codes, last_cost, _ = _heavy(n=40, levels=2, prefixes=1, last=2, k=16)  # one prefix, 16 slots, 40 items
    result = make_unique(codes, last_cost, codebook_size=16)
    assert result.codes.shape == (40, 3) and collision_rate(result.codes) == 0 and result.extra_level == 24
    assert codes_to_tokens(result.codes)[0][2].startswith("<c_")


# -------------------------------------------------------------------------------------- k-means callback
class _FirstBatchCodes(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "codes"):
            self.codes = pl_module.quantizer.codebooks.detach().clone()


def test_kmeans_init_runs_once_and_not_on_resume(synthetic_dir, item_embeddings, tmp_path):
    init = KMeansInit(iters=5)
    model = AlignmentTokenizer(num_levels=3, codebook_size=32)
    trainer = _trainer(tmp_path, [init, CollisionLogger()], epochs=2)
    trainer.fit(model, _datamodule(synthetic_dir, item_embeddings, batch_size=16))  # batch 16 < K=32
    assert init.runs == 1 and "whole catalogue (120 items)" in init.source and bool(model.quantizer.initialised)
    checkpoint = tmp_path / "epoch2.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = model.quantizer.codebooks.detach().clone()

    resumed_init, spy = KMeansInit(iters=5), _FirstBatchCodes()
    resumed = AlignmentTokenizer(num_levels=3, codebook_size=32)
    _trainer(tmp_path, [resumed_init, spy], epochs=3).fit(
        resumed, _datamodule(synthetic_dir, item_embeddings, batch_size=16), ckpt_path=checkpoint
    )
    assert resumed_init.runs == 0 and resumed_init.restored_runs == 1
    assert torch.equal(spy.codes, saved)  # training resumed from the trained codes, not from a new k-means


def test_rqvae_variant_trains_and_exports(synthetic_dir, item_embeddings, tmp_path):
    model = AlignmentTokenizer(
        num_levels=2, codebook_size=16, variant="rqvae", rqvae_hidden_dims=[32], rqvae_latent_dim=8
    )
    exporter = CodeIndexExporter(str(tmp_path / "export"))
    _trainer(tmp_path, [KMeansInit(iters=3, num_samples=0), exporter]).fit(
        model, _datamodule(synthetic_dir, item_embeddings, batch_size=32)
    )
    assert exporter.manifest["variant"] == "rqvae" and exporter.manifest["final_collision_rate"] == 0
    assert tokens_to_codes(load_code_index(tmp_path / "export"))[1].unique(dim=0).shape[0] == 120


# --------------------------------------------------------------------- CLI: export, LC-Rec format, cold start
def test_cli_export_round_trip_and_cold_start(synthetic_dir, item_embeddings, tmp_path):
    export, root = tmp_path / "codebook", tmp_path / "run"
    override = tmp_path / "callbacks.yaml"
    override.write_text(
        "trainer:\n  enable_progress_bar: false\n  callbacks:\n"
        "    - {class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true}}\n"
        "    - {class_path: callbacks.KMeansInit, init_args: {num_samples: 0, iters: 5}}\n"
        "    - class_path: callbacks.CollisionLogger\n"
        f"    - {{class_path: callbacks.CodeIndexExporter, init_args: {{output_dir: '{export}'}}}}\n"
    )
    common = [
        "--config",
        str(override),
        "--data.init_args.embeddings",
        str(item_embeddings),
        "--model.init_args.num_levels=3",
        "--model.init_args.codebook_size=8",
    ]
    main(["fit", *tiny_run_args("synthetic/codebook.yaml", synthetic_dir, root, *common, "--trainer.max_epochs=2")])
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["kind"] == "code_index" and manifest["num_levels"] == 3 and manifest["codebook_size"] == 8
    assert manifest["raw_collision_rate"] > 0 and manifest["final_collision_rate"] == 0
    assert manifest["dataset"]["name"] == "Synthetic"
    index = json.loads((export / "index.json").read_text())
    assert sorted(map(int, index)) == list(range(120))
    assert all(re.fullmatch(r"<a_\d+>", tokens[0]) and re.fullmatch(r"<c_\d+>", tokens[2]) for tokens in index.values())
    assert len({tuple(tokens) for tokens in index.values()}) == 120
    collisions = (root / "csv" / "version_0" / "collisions.csv").read_text().splitlines()
    assert collisions[0].startswith("epoch,step,collision_rate") and len(collisions) == 3

    # LC-Rec round trip: the file loads as <Name>.index.json through the catalogue loader
    lcrec = tmp_path / "lcrec"
    shutil.copytree(synthetic_dir, lcrec, ignore=shutil.ignore_patterns("*.index.json"))
    shutil.copy(export / "index.json", lcrec / "Synthetic.index.json")
    assert load_item_index(None, load_lcrec(lcrec, "Synthetic")).tokens() == [index[str(item)] for item in range(120)]
    # stage 3 reads the code vectors from the artifact's declared file, the [L, K, dim] codebooks
    vectors = load_item_index(export, load_lcrec(synthetic_dir, "Synthetic")).code_vectors()
    state = torch.load(export / "codebook.pt", weights_only=True)["quantizer_state"]
    assert manifest["code_vectors"] == "code_vectors.pt" and torch.equal(vectors, state["codebooks"])

    # cold start (API): 10 exact copies of indexed items (their raw tuples are taken) + 5 new vectors
    catalogue = torch.load(item_embeddings)
    new = torch.cat([catalogue[:10], torch.randn(5, 32, generator=torch.Generator().manual_seed(7))])
    extended = assign_codes(export, new, output_dir=tmp_path / "extended")
    assert len(extended) == 135 and all(extended[str(item)] == index[str(item)] for item in range(120))
    assert len({tuple(tokens) for tokens in extended.values()}) == 135
    record = json.loads((tmp_path / "extended" / "manifest.json").read_text())
    assert record["num_items"] == 135 and record["cold_start"][0]["raw_collision_rate"] >= 10 / 15
    with pytest.raises(ValueError, match="already added"):
        assign_codes(tmp_path / "extended", new)

    # cold start (lightning predict): the same through the CLI, extending the export in place
    torch.save(new, tmp_path / "new.pt")
    checkpoint = root / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    main(
        [
            "predict",
            *tiny_run_args("synthetic/codebook.yaml", synthetic_dir, tmp_path / "predict", *common),
            "--ckpt_path",
            str(checkpoint),
            "--data.init_args.cold_start_embeddings",
            str(tmp_path / "new.pt"),
        ]
    )
    assert load_code_index(export) == extended


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_embeddings_are_refused(synthetic_dir, tmp_path):
    cases = {
        "rows": (torch.randn(119, 32), DataFormatError, "119 rows but the catalogue has 120"),
        "nan": (
            torch.randn(120, 32)
            .index_fill_(0, torch.tensor([3, 7]), float("nan"))
            .index_fill_(0, torch.tensor([9]), float("inf")),
            DataFormatError,
            r"3 row\(s\) contain NaN or inf \(rows 3, 7, 9\)",
        ),
    }
    for name, (matrix, error, message) in cases.items():
        torch.save(matrix, tmp_path / f"{name}.pt")
        with pytest.raises(error, match=message):
            _datamodule(synthetic_dir, tmp_path / f"{name}.pt").setup("fit")
    with pytest.raises(FileNotFoundError, match="embeddings .* not found"):
        _datamodule(synthetic_dir, tmp_path / "missing.pt").setup("fit")
    # an ItemEmbeddingExporter directory: accepted for this dataset, refused for another
    artifact = tmp_path / "artifact"
    with ArtifactWriter(artifact, "item_embeddings") as writer:
        writer.save_torch("item_embeddings.pt", torch.randn(120, 32))
        manifest = writer.commit(
            {
                "dataset": load_lcrec(synthetic_dir, "Synthetic").fingerprint(),
                "num_items": 120,
                "dim": 32,
                "file": "item_embeddings.pt",
            }
        )
    datamodule = _datamodule(synthetic_dir, artifact)
    datamodule.setup("fit")
    assert datamodule.item_embeddings.shape == (120, 32) and datamodule.embedding_source["manifest"]["dim"] == 32
    assert datamodule.split is None  # the items view needs no leave-last-out split
    other = {**manifest, "dataset": {**manifest["dataset"], "content_hash": "other"}}
    (artifact / "manifest.json").write_text(json.dumps(other))
    with pytest.raises(ArtifactError, match=r"does not match this run \(dataset: .*'other'"):
        _datamodule(synthetic_dir, artifact).setup("fit")


def test_bad_codebook_settings_are_refused(synthetic_dir, item_embeddings, tmp_path):
    with pytest.raises(ValueError, match="num_levels must be >= 1"):
        AlignmentTokenizer(num_levels=0)
    with pytest.raises(ValueError, match="codebook_size 256 is larger than the number of items \\(120"):
        _trainer(tmp_path, []).fit(AlignmentTokenizer(codebook_size=256), _datamodule(synthetic_dir, item_embeddings))
    with pytest.raises(ValueError, match="needs LLM embeddings"):
        _trainer(tmp_path, []).fit(
            AlignmentTokenizer(codebook_size=8, llm_alignment_weight=1.0), _datamodule(synthetic_dir, item_embeddings)
        )


# -------------------------------------------------------------------------------------------- LLM alignment
@pytest.fixture(scope="module")
def tiny_llama(tiny_tokenizer, tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 32) with the in-code tokenizer, saved as an HF directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_llm_directory_without_tokenizer_or_embeddings_is_refused(synthetic_dir, item_embeddings, tiny_llama, tmp_path):
    no_tokenizer, no_weights = tmp_path / "no_tokenizer", tmp_path / "no_weights"
    shutil.copytree(tiny_llama, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    shutil.copytree(tiny_llama, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    for path, message in (
        (no_tokenizer, "no tokenizer"),
        (no_weights, "no model weights"),
        (tmp_path / "absent", "not a directory"),
    ):
        with pytest.raises(LLMDirectoryError, match=message):
            _datamodule(
                synthetic_dir, item_embeddings, llm_path=str(path), llm_cache_dir=str(tmp_path / "cache")
            ).setup("fit")
    wrong = tmp_path / "wrong_tensors"
    shutil.copytree(no_weights, wrong)
    from safetensors.torch import save_file

    save_file({"model.norm.weight": torch.ones(32)}, str(wrong / "model.safetensors"))
    with pytest.raises(LLMDirectoryError, match="no input embedding matrix"):
        _datamodule(synthetic_dir, item_embeddings, llm_path=str(wrong), llm_cache_dir=str(tmp_path / "cache")).setup(
            "fit"
        )


class _LLMLoss(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(trainer.callback_metrics["train/llm_loss"]))


def test_llm_alignment_on_industrial(tiny_llama, tmp_path, monkeypatch):
    data_dir = shared_dataset("Industrial_and_Scientific")
    g = torch.Generator().manual_seed(0)
    embeddings = tmp_path / "industrial.pt"
    torch.save(torch.randn(3527, 32, generator=g), embeddings)
    kwargs = {
        "dataset": "Industrial_and_Scientific",
        "llm_path": str(tiny_llama),
        "llm_cache_dir": str(tmp_path / "llm_cache"),
        "batch_size": 512,
    }
    datamodule = _datamodule(data_dir, embeddings, **kwargs)
    datamodule.setup("fit")
    llm = datamodule.llm_embeddings
    assert llm.shape == (3527, 32) and 3000 < int(datamodule.has_text.sum()) <= 3527
    assert (llm[~datamodule.has_text] == 0).all()
    # behaviour embeddings that partly reflect the text (as real ones do): a random map of the LLM embedding + noise
    text_part = torch.nn.functional.normalize(
        (llm - llm[datamodule.has_text].mean(0)) @ torch.randn(32, 32, generator=g), dim=1
    )
    torch.save(
        text_part * datamodule.has_text[:, None] + 0.7 * torch.randn(3527, 32, generator=g) / 32**0.5, embeddings
    )
    # a rerun reuses the cache instead of reading the model again
    monkeypatch.setattr(
        "datamodules.llm_embeddings.load_input_embeddings", lambda path: pytest.fail("cache not reused")
    )
    again = _datamodule(data_dir, embeddings, **kwargs)
    again.setup("fit")
    assert torch.equal(again.llm_embeddings, llm)

    codes = {}
    for weight in (1.0, 0.0):
        L.seed_everything(0)
        model, recorder = (
            AlignmentTokenizer(num_levels=3, codebook_size=32, llm_alignment_weight=weight, lr=0.005),
            _LLMLoss(),
        )
        _trainer(
            tmp_path,
            [KMeansInit(iters=10, num_samples=0), recorder] if weight else [KMeansInit(iters=10, num_samples=0)],
            epochs=6,
        ).fit(model, again)
        codes[weight] = model.encode_items(again.item_embeddings).codes
        if weight:
            first, last = sum(recorder.values[:5]) / 5, sum(recorder.values[-5:]) / 5
            assert last < 0.8 * first, recorder.values
    assert (codes[1.0] != codes[0.0]).any(1).float().mean() > 0.01  # LLM alignment changes the tokenization
