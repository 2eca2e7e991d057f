"""AdamW in the implementation that suits where the parameters live and which strategy steps them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

#: Devices with torch's fused (single-kernel) AdamW.
_FUSED_DEVICES = ("cpu", "cuda")


def _is_deepspeed(trainer: L.Trainer | None) -> bool:
    return isinstance(getattr(trainer, "strategy", None), DeepSpeedStrategy)


def offloads_optimizer(trainer: L.Trainer | None) -> bool:
    """Whether the trainer's strategy is DeepSpeed with ZeRO-Offload of the optimizer state (CPU or NVMe)."""
    if not _is_deepspeed(trainer) or not isinstance(trainer.strategy.config, dict):
        return False
    offload = trainer.strategy.config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def adamw(
    trainer: L.Trainer | None,
    groups: Iterable[Any],
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (parameters or param-group dicts).

    * DeepSpeed with ``offload_optimizer``: ``DeepSpeedCPUAdam`` in AdamW mode. DeepSpeed refuses a torch optimizer
      under ZeRO-Offload (``zero_force_ds_cpu_optimizer``), and its vectorised CPU kernel is the fast one there.
    * Other DeepSpeed runs: torch's default implementation; ZeRO steps it on flattened partitions of its own.
    * Otherwise torch's ``fused`` AdamW when every parameter is a floating tensor on a CPU or CUDA device: one
      kernel per tensor instead of ~10 elementwise passes. torch picks the per-tensor loop on CPU by default, which
      was 14.3 of a 67 ms step of the Industrial tiny Llama on 2 cores (4.3M parameters); fused takes 1.9 ms.
    """
    groups = list(groups)
    if offloads_optimizer(trainer):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, adamw_mode=True)
    params = [p for group in groups for p in (group["params"] if isinstance(group, dict) else [group])]
    fusable = (
        not _is_deepspeed(trainer)
        and bool(params)
        and all(p.device.type in _FUSED_DEVICES and torch.is_floating_point(p) for p in params)
    )
    return torch.optim.AdamW(
        groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=True if fusable else None
    )
