"""DCCF and the graph view: exact normalisation, no leakage of held-out interactions, negatives, isolated items,
gradients of the edge-weighted propagation, and the item-embedding export (round trip and dataset guard)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import yaml

from callbacks import ItemEmbeddingExporter
from datamodules import GraphDataModule, SequenceDataModule, load_item_embeddings
from datamodules.artifacts import ArtifactWriter
from datamodules.catalogue import load_lcrec
from datamodules.errors import ArtifactError
from datamodules.graph import normalized_adjacency
from datamodules.negatives import sample_negatives
from lightning_modules import DCCF
from lightning_modules.cli import main
from lightning_modules.components.dccf import BipartiteGraph, DCCFEncoder, IntentAggregation
from tests.conftest import CONFIGS, tiny_run_args, write_inter

# items 5 and 6 are only ever validation/test targets: isolated in the training graph
ISOLATED_SEQUENCES = {"0": [0, 1, 2, 5], "1": [1, 2, 3, 6], "2": [0, 3, 4, 2], "3": [2, 4, 0, 1, 5]}


def _graph_module(data_dir, **kwargs) -> GraphDataModule:
    datamodule = GraphDataModule(data_dir=str(data_dir), **kwargs)
    datamodule.setup("fit")
    return datamodule


def _dccf(datamodule: GraphDataModule, **kwargs) -> DCCF:
    torch.manual_seed(0)
    model = DCCF(**kwargs)
    model.num_items = datamodule.catalogue.num_items
    model.attach_data(datamodule)
    model.configure_model()
    return model


def test_adjacency_is_symmetric_normalised_exactly():
    # users 0, 1; items 0, 1, 2 (nodes 2, 3, 4); item 2 has no interaction
    adjacency = normalized_adjacency(np.array([0, 0, 1]), np.array([0, 1, 1]), num_users=2, num_items=3).to_dense()
    r = 2**-0.5  # degrees: u0 = 2, u1 = 1, i0 = 1, i1 = 2
    expected = torch.tensor(
        [
            [0, 0, r, 0.5, 0],
            [0, 0, 0, r, 0],
            [r, 0, 0, 0, 0],
            [0.5, r, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ]
    )
    torch.testing.assert_close(adjacency, expected, atol=1e-7, rtol=0)


def test_graph_holds_exactly_the_training_interactions(synthetic_dir):
    datamodule = _graph_module(synthetic_dir)
    catalogue, num_users = datamodule.catalogue, datamodule.num_users
    rows, cols = datamodule.adjacency.indices().numpy()
    user_side = rows < num_users
    edges = set(zip(rows[user_side].tolist(), (cols[user_side] - num_users).tolist(), strict=False))
    training = {(user, int(item)) for user in range(catalogue.num_users) for item in catalogue.sequence(user)[:-2]}
    assert edges == training
    # so a held-out target is an edge only when the user also had it in training (a repeat)
    for user in range(catalogue.num_users):
        sequence = catalogue.sequence(user)
        for target in sequence[-2:]:
            assert ((user, int(target)) in edges) == (target in sequence[:-2])
    assert torch.isfinite(datamodule.adjacency.values()).all()


def test_isolated_items_get_finite_embeddings(tmp_path):
    datamodule = _graph_module(write_inter(tmp_path / "iso", "Iso", ISOLATED_SEQUENCES))
    assert datamodule.isolated_items.tolist() == [5, 6]
    model = _dccf(datamodule, embedding_dim=8, num_intents=4)
    embeddings = model.item_embeddings()
    assert embeddings.shape == (7, 8) and torch.isfinite(embeddings).all()
    batch = next(iter(datamodule.val_dataloader()))
    assert torch.isfinite(model.score_items(batch)).all()
    loss = model.training_loss(next(iter(datamodule.train_dataloader())))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(model.encoder.item_embedding.weight.grad).all()


def test_intent_aggregation_and_view_shapes():
    intent = IntentAggregation(dim=8, num_intents=5)
    x = torch.randn(10, 8)
    assert intent(x).shape == (10, 8)
    with torch.no_grad():  # orthogonal prototypes: a node aligned with one of them becomes that prototype
        intent.prototypes.copy_(20 * torch.eye(8)[:, :5])
    torch.testing.assert_close(intent(torch.eye(8)[:1]), 20 * torch.eye(8)[:1], atol=1e-4, rtol=0)
    adjacency = normalized_adjacency(np.array([0, 1, 2]), np.array([0, 0, 1]), num_users=3, num_items=2)
    encoder = DCCFEncoder(adjacency, num_users=3, num_items=2, dim=8, num_layers=3, num_intents=5)
    final, views = encoder()
    assert final.shape == (5, 8) and len(views) == 3
    assert all(view.shape == (5, 8) for layer in views for view in layer.values())
    assert set(views[0]) == {"gnn", "intent", "gnn_aug", "intent_aug"}


def test_edge_weighted_propagation_gradients():
    adjacency = normalized_adjacency(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), num_users=3, num_items=4)
    graph = BipartiteGraph(adjacency).double()
    x = torch.randn(7, 3, dtype=torch.double, requires_grad=True)
    values = torch.rand(graph.num_edges, dtype=torch.double, requires_grad=True)
    dense = torch.zeros(7, 7, dtype=torch.double)
    dense[graph.head, graph.col] = values.detach()
    torch.testing.assert_close(graph.propagate(x, values), dense @ x)
    assert torch.autograd.gradcheck(lambda v, e: graph.propagate(e, v), (values, x))
    for norm in ("row", "symmetric"):
        assert torch.autograd.gradcheck(lambda e, norm=norm: graph.similarity_weights(e, norm), (x,))
    # row normalisation: the adaptive weights of every non-isolated node sum to one
    row_sums = torch.zeros(7, dtype=torch.double).index_add_(0, graph.head, graph.similarity_weights(x, "row"))
    torch.testing.assert_close(row_sums[:6], torch.ones(6, dtype=torch.double))


def test_propagation_under_bf16_autocast_runs_in_fp32():
    """bf16-mixed training: the sparse products run in fp32 (CPU CSR kernels have no bf16) and gradients keep dtypes."""
    adjacency = normalized_adjacency(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), num_users=3, num_items=4)
    graph = BipartiteGraph(adjacency)
    x = torch.randn(7, 3, requires_grad=True)
    values = torch.rand(graph.num_edges, requires_grad=True)
    reference = graph.propagate(x, values)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = x @ torch.eye(3)  # bf16 under autocast, as a projection before propagation would be
        out = graph.propagate(hidden, values)
        weights = graph.similarity_weights(hidden)
    assert hidden.dtype == torch.bfloat16 and out.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=2e-2, rtol=2e-2)  # only the bf16 rounding of the input differs
    (out.sum() + weights.sum()).backward()
    assert x.grad.dtype == torch.float32 and values.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and torch.isfinite(values.grad).all()


def test_negatives_never_hit_a_training_interaction(synthetic_dir):
    datamodule = _graph_module(synthetic_dir, num_negatives=8)
    catalogue, dataset = datamodule.catalogue, datamodule.datasets["train"]
    training = {(user, int(item)) for user in range(catalogue.num_users) for item in catalogue.sequence(user)[:-2]}
    for epoch in (0, 1):
        negatives = dataset.negatives(epoch)
        assert negatives.shape == (len(dataset), 8)
        assert not any(
            (int(u), int(n)) in training for u, row in zip(dataset.users, negatives, strict=False) for n in row
        )
    assert not np.array_equal(dataset.negatives(0), dataset.negatives(1))  # re-drawn every epoch
    # a user who has all items but one: rejection sampling must converge on that item
    keys = np.arange(9, dtype=np.int64)  # user 0 with items 0..8 of 10
    forced = sample_negatives(keys, np.zeros(3000, dtype=np.int64), 10, np.random.default_rng(0))
    assert (forced == 9).all()


def test_train_loader_draws_the_epochs_negatives(synthetic_dir):
    datamodule = _graph_module(synthetic_dir, batch_size=64)
    dataset, loader = datamodule.datasets["train"], datamodule.train_dataloader()
    for epoch in (0, 3):
        loader.sampler.set_epoch(epoch)
        batch = next(iter(loader))
        assert set(batch) == {"user", "target", "negative"} and batch["negative"].shape == (64, 1)
        keys = batch["user"].numpy() * datamodule.catalogue.num_items + batch["target"].numpy()
        rows = np.searchsorted(dataset.keys, keys)
        np.testing.assert_array_equal(batch["negative"].numpy(), dataset.negatives(epoch)[rows])


def test_history_fold_in_adds_recency_weighted_items(tmp_path):
    datamodule = _graph_module(write_inter(tmp_path / "iso", "Iso", ISOLATED_SEQUENCES))
    plain = _dccf(datamodule, embedding_dim=8, num_intents=4)
    folded = _dccf(datamodule, embedding_dim=8, num_intents=4, history_weight=2.0, history_items=3, history_decay=0.5)
    users, items = plain.propagate()
    pad = datamodule.catalogue.num_items
    # user 0 has a one-item history behind padding, user 3 a four-item one (only the last three count)
    batch = {"user": torch.tensor([0, 3]), "history": torch.tensor([[pad, pad, pad, 0], [2, 4, 0, 1]])}
    torch.testing.assert_close(plain.score_items(batch), users[[0, 3]] @ items.T)
    expected_users = torch.stack(
        [
            users[0] + 2.0 * items[0],
            users[3] + 2.0 * (0.25 * items[4] + 0.5 * items[0] + 1.0 * items[1]),
        ]
    )
    torch.testing.assert_close(folded.score_items(batch), expected_users @ items.T)
    # scoring only: the exported embeddings are the plain model's
    torch.testing.assert_close(folded.item_embeddings(), items)
    with pytest.raises(ValueError, match="history_decay"):
        DCCF(history_decay=0.0)


def test_dccf_requires_the_graph_datamodule(synthetic_dir):
    with pytest.raises(TypeError, match="GraphDataModule"):
        DCCF().attach_data(SequenceDataModule(data_dir=str(synthetic_dir)))


# ------------------------------------------------------------------------------------------------ export
def _exporter_override(tmp_path, output_dir, config="synthetic/dccf.yaml", **exporter_args):
    """A config piece that re-points (or adds) the ItemEmbeddingExporter of a shipped config."""
    callbacks = yaml.safe_load((CONFIGS / config).read_text())["trainer"]["callbacks"]
    callbacks = [cb for cb in callbacks if cb["class_path"] != "callbacks.ItemEmbeddingExporter"]
    callbacks.append(
        {"class_path": "callbacks.ItemEmbeddingExporter", "init_args": {"output_dir": str(output_dir), **exporter_args}}
    )
    path = tmp_path / f"exporter_{len(list(tmp_path.glob('exporter_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return ["--config", str(path)]


def test_fit_test_and_export_round_trip(synthetic_dir, tmp_path):
    out, root = tmp_path / "embeddings", tmp_path / "run"
    main(
        [
            "fit",
            *tiny_run_args(
                "synthetic/dccf.yaml", synthetic_dir, root, "--trainer.max_epochs=2", *_exporter_override(tmp_path, out)
            ),
        ]
    )
    test_metrics = json.loads((root / "csv" / "version_0" / "test_metrics.json").read_text())["metrics"]
    assert 0 <= test_metrics["ndcg@10"] <= test_metrics["hr@10"] <= 1

    catalogue = load_lcrec(synthetic_dir, "Synthetic")
    embeddings, provenance = load_item_embeddings(out, catalogue)
    manifest = provenance["manifest"]
    assert embeddings.shape == (catalogue.num_items, 32) and embeddings.dtype == torch.float32
    assert torch.isfinite(embeddings).all()
    assert manifest["kind"] == "item_embeddings" and manifest["dataset"] == catalogue.fingerprint()
    assert manifest["dim"] == 32 and set(manifest["files"]) == {"item_embeddings.pt"}
    assert manifest["model_class"] == "lightning_modules.dccf.DCCF" and manifest["model_hparams"]["num_intents"] == 128
    assert manifest["datamodule_hparams"]["num_negatives"] == 1
    assert manifest["checkpoint"].endswith(".ckpt") and manifest["monitor"] == "val/ndcg@10"
    assert math.isclose(manifest["val_metrics"]["ndcg@10"], manifest["best_score"], rel_tol=1e-6)
    with pytest.raises(ArtifactError, match=r"does not match this run \(dataset: .*'num_items': 120.*'num_items': 121"):
        load_item_embeddings(out, dataclasses.replace(catalogue, num_items=catalogue.num_items + 1))


def test_export_refuses_another_datasets_artifact(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "embeddings"
    _artifact(out, {"name": "Games", "content_hash": "f00d" * 16, "num_items": 3})
    args = tiny_run_args("synthetic/dccf.yaml", synthetic_dir, tmp_path / "run", "--trainer.fast_dev_run=1")
    with pytest.raises(ArtifactError, match=r"'Games'.* trains on Synthetic.*overwrite_other_dataset"):
        main(["fit", "--debug", *args, *_exporter_override(tmp_path, out)])
    with pytest.raises(SystemExit) as exit_info:  # without --debug: one message, no traceback
        main(["fit", *args, *_exporter_override(tmp_path, out)])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "overwrite_other_dataset" in stderr and "Traceback" not in stderr
    assert json.loads((out / "manifest.json").read_text())["dataset"]["name"] == "Games"  # untouched
    # the flag lifts the guard; fast_dev_run saves no checkpoint, so the current weights are exported
    main(["fit", *args, *_exporter_override(tmp_path, out, overwrite_other_dataset=True)])
    embeddings, provenance = load_item_embeddings(out, load_lcrec(synthetic_dir, "Synthetic"))
    manifest = provenance["manifest"]
    assert manifest["dataset"]["name"] == "Synthetic" and manifest["checkpoint"] is None and embeddings.shape[0] == 120


def test_exporter_works_for_sasrec(synthetic_dir, tmp_path):
    out = tmp_path / "sasrec_embeddings"
    args = tiny_run_args(
        "synthetic/sasrec.yaml", synthetic_dir, tmp_path / "run", "--trainer.max_epochs=1", "--test_after_fit=false"
    )
    main(["fit", *args, *_exporter_override(tmp_path, out, config="synthetic/sasrec.yaml")])
    embeddings, provenance = load_item_embeddings(out, load_lcrec(synthetic_dir, "Synthetic"))
    manifest = provenance["manifest"]
    assert embeddings.shape == (120, 64) and manifest["model_class"] == "lightning_modules.sasrec.SASRec"


def _artifact(directory, fingerprint):
    """An item-embeddings artifact of 3 items written for ``fingerprint``."""
    with ArtifactWriter(directory, "item_embeddings") as writer:
        writer.save_torch("item_embeddings.pt", torch.zeros(3, 2))
        writer.commit({"dataset": fingerprint, "num_items": 3, "dim": 2, "file": "item_embeddings.pt"})


def test_exporter_check_is_a_no_op_for_the_same_dataset(tmp_path):
    fingerprint = {"name": "Synthetic", "content_hash": "ab" * 32, "num_items": 3}
    _artifact(tmp_path / "out", fingerprint)
    ItemEmbeddingExporter(str(tmp_path / "out")).check_target(fingerprint)
    with pytest.raises(ArtifactError, match="overwrite_other_dataset"):
        ItemEmbeddingExporter(str(tmp_path / "out")).check_target({**fingerprint, "content_hash": "cd" * 32})


class _Crash(RuntimeError):
    pass


def test_exporter_keeps_the_old_artifact_when_the_export_crashes(synthetic_dir, tmp_path, monkeypatch):
    out = tmp_path / "embeddings"
    args = tiny_run_args("synthetic/dccf.yaml", synthetic_dir, tmp_path / "run", "--trainer.fast_dev_run=1")
    main(["fit", *args, *_exporter_override(tmp_path, out)])
    catalogue = load_lcrec(synthetic_dir, "Synthetic")
    before, provenance = load_item_embeddings(out, catalogue)

    def crash(*args, **kwargs):
        raise _Crash("killed during the export")

    monkeypatch.setattr("datamodules.artifacts.ArtifactWriter.commit", crash)  # the tensor is staged, then the crash
    with pytest.raises(_Crash):
        main(["fit", *args, *_exporter_override(tmp_path, out)])
    after, again = load_item_embeddings(out, catalogue)  # the previous artifact, whole and verified
    assert torch.equal(after, before) and again["manifest"] == provenance["manifest"]
    leftovers = sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".embeddings"))
    assert leftovers == [".embeddings.lock"]  # no staging or old directory left behind
