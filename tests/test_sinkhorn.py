"""LC-Rec's Sinkhorn-Knopp uniform semantic mapping of colliding items, and its stage-2 export option."""

from __future__ import annotations

import json
import math

import pytest
import torch

from datamodules.code_index import collision_rate
from datamodules.errors import ConfigError
from lightning_modules import AlignmentTokenizer
from lightning_modules.cli import main
from lightning_modules.components.sinkhorn import balanced_assignment, sinkhorn_plan, spread_collisions
from tests.conftest import tiny_run_args


def test_no_contention_is_the_argmin():
    distances = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.8, 0.2, 0.6, 0.4], [0.9, 0.8, 0.1, 0.3]])
    assert balanced_assignment(distances).tolist() == [0, 1, 2]
    # capacity 2 (5 items on 3 codes): two items on one nearest code is no contention either
    distances = torch.tensor([[0.0, 1.0, 1.0], [0.1, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 0.2, 1.0], [1.0, 1.0, 0.0]])
    assert balanced_assignment(distances).tolist() == [0, 0, 1, 1, 2]


def test_contention_is_spread_to_at_most_ceil_n_over_k_per_code():
    # four items all nearest to code 0, four codes: one item per code
    distances = torch.tensor(
        [[0.0, 0.1, 0.9, 0.9], [0.0, 0.9, 0.1, 0.9], [0.0, 0.9, 0.9, 0.1], [0.0, 0.5, 0.5, 0.5]], dtype=torch.float64
    )
    codes = balanced_assignment(distances)
    assert sorted(codes.tolist()) == [0, 1, 2, 3]
    # each item moved to its own second-nearest code; the item with no close alternative keeps code 0
    assert codes.tolist() == [1, 2, 3, 0]
    generator = torch.Generator().manual_seed(0)
    for n, k in [(7, 3), (10, 4), (32, 8), (5, 5)]:
        distances = torch.rand(n, k, generator=generator)
        distances[:, 0] = 0.0  # everyone's nearest is code 0
        codes = balanced_assignment(distances)
        assert int(torch.bincount(codes, minlength=k).max()) <= math.ceil(n / k)
        assert torch.equal(codes, balanced_assignment(distances.clone()))  # deterministic


def test_plan_marginals_are_uniform():
    log_q = sinkhorn_plan(torch.rand(6, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1, 0.5, 200)
    q = log_q.exp()
    assert torch.allclose(q.sum(1), torch.ones(6, dtype=q.dtype), atol=1e-6)  # each item one unit of mass
    assert torch.allclose(q.sum(0), torch.full((4,), 6 / 4, dtype=q.dtype), atol=1e-6)  # each code n / K
    # a tiny epsilon does not overflow (LC-Rec's exp(-d / eps) would at 1e-4)
    assert torch.isfinite(sinkhorn_plan(torch.rand(5, 3) * 2 - 1, 1e-4, 50)).all()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_plan(torch.zeros(2, 2), 0.0)
    with pytest.raises(ValueError, match="non-empty"):
        balanced_assignment(torch.zeros(0, 3))
    with pytest.raises(ConfigError, match="collision_mapping"):
        AlignmentTokenizer(collision_mapping="greedy")
    with pytest.raises(ConfigError, match="sinkhorn_epsilon"):
        AlignmentTokenizer(sinkhorn_epsilon=0)


def test_spread_moves_only_colliding_items():
    codes = torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 1], [1, 2, 3], [0, 1, 1]])
    costs = torch.tensor([[0.0, 0.3, 0.9, 0.9], [0.0, 0.9, 0.2, 0.9], [0.0, 0.9, 0.9, 0.1]] * 2)[: len(codes)]

    def last_cost(items: torch.Tensor) -> torch.Tensor:
        return costs[items]

    new, moved = spread_collisions(codes, last_cost)
    assert torch.equal(new[3:], codes[3:]) and torch.equal(new[:, :2], codes[:, :2])
    assert len(set(new[:3, 2].tolist())) == 3 and moved == int((new[:3, 2] != 1).sum())
    assert collision_rate(new) == 0


def test_codebook_export_with_sinkhorn_mapping(synthetic_dir, tmp_path):
    torch.save(torch.randn(120, 16, generator=torch.Generator().manual_seed(0)), tmp_path / "item_embeddings.pt")
    export, root = tmp_path / "codebook", tmp_path / "run"
    override = tmp_path / "callbacks.yaml"
    override.write_text(
        "trainer:\n  enable_progress_bar: false\n  callbacks:\n"
        "    - {class_path: callbacks.KMeansInit, init_args: {num_samples: 0, iters: 5}}\n"
        f"    - {{class_path: callbacks.CodeIndexExporter, init_args: {{output_dir: '{export}'}}}}\n"
    )
    extra = [
        "--config",
        str(override),
        f"--data.init_args.embeddings={tmp_path / 'item_embeddings.pt'}",
        "--model.init_args.num_levels=3",
        "--model.init_args.codebook_size=8",
        "--model.init_args.collision_mapping=sinkhorn",
        "--trainer.max_epochs=1",
    ]
    main(["fit", *tiny_run_args("synthetic/codebook.yaml", synthetic_dir, root, *extra)])
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["collision_mapping"] == "sinkhorn" and manifest["final_collision_rate"] == 0
    assert manifest["raw_collision_rate"] > 0 and manifest["sinkhorn_moved_items"] > 0
    assert manifest["mapped_collision_rate"] < manifest["raw_collision_rate"]
    index = json.loads((export / "index.json").read_text())
    assert len({tuple(tokens) for tokens in index.values()}) == 120
