"""AdamW implementation choice: fused where torch has it, DeepSpeed's CPU Adam under ZeRO-Offload."""

from __future__ import annotations

import sys
import types

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from lightning_modules.optimizers import adamw, offloads_optimizer


def params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(50, 8)), torch.nn.Parameter(torch.randn(8))]


def test_fused_on_cpu_and_the_same_update_as_the_default_loop():
    fused_params, loop_params = params(), params()
    fused = adamw(None, [{"params": fused_params, "weight_decay": 0.1}], lr=1e-2)
    loop = torch.optim.AdamW([{"params": loop_params, "weight_decay": 0.1}], lr=1e-2)
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    for step in range(3):
        for group in (fused_params, loop_params):
            for n, p in enumerate(group):
                p.grad = torch.full_like(p, 0.1 * (step + 1) * (n + 1))
        fused.step(), loop.step()
    for a, b in zip(fused_params, loop_params, strict=False):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_betas_reach_the_optimizer():
    assert adamw(None, params(), lr=1e-3, betas=[0.9, 0.95]).defaults["betas"] == (0.9, 0.95)  # a YAML list works too


def test_integer_or_meta_parameters_fall_back_to_the_default_implementation():
    meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    assert not adamw(None, [meta], lr=1e-3).defaults["fused"]


def deepspeed_trainer(offload: bool) -> types.SimpleNamespace:
    """A stand-in trainer: ``adamw`` reads only ``trainer.strategy`` (a real one would need deepspeed's launcher)."""
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    strategy.config = {
        "zero_optimization": {"stage": 2, **({"offload_optimizer": {"device": "cpu"}} if offload else {})}
    }
    return types.SimpleNamespace(strategy=strategy)


def test_deepspeed_offload_gets_deepspeed_cpu_adam(monkeypatch):
    built = {}

    class FakeCPUAdam(torch.optim.Optimizer):  # the real one compiles a C++ op on first use
        def __init__(self, groups, lr, betas, weight_decay, adamw_mode):
            built.update(lr=lr, betas=betas, weight_decay=weight_decay, adamw_mode=adamw_mode)
            super().__init__(groups, {"lr": lr})

    fake = types.ModuleType("deepspeed.ops.adam")
    fake.DeepSpeedCPUAdam = FakeCPUAdam
    monkeypatch.setitem(sys.modules, "deepspeed.ops.adam", fake)
    offloaded, sharded = deepspeed_trainer(True), deepspeed_trainer(False)
    assert offloads_optimizer(offloaded) and not offloads_optimizer(sharded) and not offloads_optimizer(None)
    assert isinstance(adamw(offloaded, params(), lr=2e-4, weight_decay=0.01, betas=(0.9, 0.95)), FakeCPUAdam)
    assert built == {"lr": 2e-4, "betas": (0.9, 0.95), "weight_decay": 0.01, "adamw_mode": True}
    plain = adamw(sharded, params(), lr=1e-3)  # ZeRO steps its own flat partitions: torch's default implementation
    assert type(plain) is torch.optim.AdamW and not plain.defaults["fused"]
