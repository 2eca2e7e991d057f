"""LC-Rec's uniform semantic mapping: Sinkhorn-Knopp on the last code level to spread items that collide.

LC-Rec (Zheng et al., 2024; public code ``index/models/layers.py`` ``sinkhorn_algorithm`` and
``index/models/vq.py`` ``center_distance_for_constraint``, driven by ``index/generate_indices.py``) resolves
collisions at index generation: for each group of items sharing a full code tuple it recomputes the last level
with a Sinkhorn-Knopp transport plan between the group's items (uniform mass ``1/n``) and the level's codes
(uniform mass ``1/K``), so the group spreads over the codebook instead of piling onto the nearest code; the
other levels keep their nearest code (``sk_epsilons = [0, 0, 0, 0.003]``, ``sk_iters = 50``).

Here:

* :func:`sinkhorn_plan` is LC-Rec's iteration on its centred distances, computed in log space (the same fixed
  point; ``exp(-d / 0.003)`` overflows float32 and, for smaller epsilons, float64);
* :func:`balanced_assignment` rounds the plan to a hard assignment with at most ``ceil(n / K)`` items per code
  (a maximum-likelihood matching of the plan, each code offered ``ceil(n / K)`` times). LC-Rec takes the row
  argmax and repeats the whole pass up to 20 times, which bounds no code's load; the matching is balanced and
  deterministic in one pass. Without contention (no code is the nearest of more than ``ceil(n / K)`` items)
  the result is the plain argmin, as LC-Rec leaves non-colliding items alone;
* :func:`spread_collisions` applies it to every collision group; the caller's
  :func:`~lightning_modules.components.code_assignment.make_unique` then resolves whatever still collides (a
  spread item can land on a tuple another item of the same prefix already holds).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from lightning_modules.components.code_assignment import _group_ids


def center_distances(distances: torch.Tensor) -> torch.Tensor:
    """LC-Rec's ``center_distance_for_constraint``: an affine map of the whole matrix into ``[-1, 1]``.

    It makes ``epsilon`` a temperature relative to the spread of the distances rather than to their scale.
    """
    high, low = distances.max(), distances.min()
    middle = (high + low) / 2
    return (distances - middle) / (high - middle + 1e-5)


@torch.no_grad()
def sinkhorn_plan(distances: torch.Tensor, epsilon: float = 0.003, iterations: int = 50) -> torch.Tensor:
    """``[n, K]`` log transport plan between ``n`` items (mass ``1/n`` each) and ``K`` codes (``1/K`` each).

    LC-Rec's ``sinkhorn_algorithm``: ``Q = exp(-d / epsilon)`` normalised to sum 1, then ``iterations`` rounds of
    row normalisation (each item ``1/n``) and column normalisation (each code ``1/K``), here in log space.

    Args:
        distances: ``[n, K]`` item-to-code distances (already centred, see :func:`center_distances`).
        epsilon: entropic temperature (> 0): small values follow the distances, large ones spread uniformly.
        iterations: Sinkhorn-Knopp rounds.
    """
    if epsilon <= 0:
        raise ValueError(f"sinkhorn epsilon must be > 0, got {epsilon}")
    n, k = distances.shape
    log_q = -distances.double() / epsilon
    log_q = log_q - torch.logsumexp(log_q.flatten(), 0)
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True) - math.log(n)
        log_q = log_q - torch.logsumexp(log_q, 0, keepdim=True) - math.log(k)
    return log_q + math.log(n)


@torch.no_grad()
def balanced_assignment(
    distances: torch.Tensor, epsilon: float = 0.003, iterations: int = 50, capacity: int | None = None
) -> torch.Tensor:
    """One code per item, at most ``capacity`` items per code, by Sinkhorn-Knopp (see the module docstring).

    Args:
        distances: ``[n, K]`` cost of every code for every item (e.g. the last-level residual's distance).
        epsilon: Sinkhorn temperature on the centred distances (LC-Rec: 0.003).
        iterations: Sinkhorn rounds (LC-Rec: 50).
        capacity: items a code may take; default ``ceil(n / K)``, the balanced bound.

    Returns:
        ``[n]`` long codes: the argmin where no code is over capacity, else the balanced rounding of the plan.
    """
    if distances.dim() != 2 or distances.shape[0] == 0 or distances.shape[1] == 0:
        raise ValueError(f"distances must be a non-empty [n, K] matrix, got shape {tuple(distances.shape)}")
    n, k = distances.shape
    capacity = math.ceil(n / k) if capacity is None else capacity
    if capacity * k < n:
        raise ValueError(f"capacity {capacity} x {k} codes cannot hold {n} items")
    nearest = distances.argmin(1)
    if int(torch.bincount(nearest, minlength=k).max()) <= capacity:
        return nearest
    log_q = sinkhorn_plan(center_distances(distances.double()), epsilon, iterations)
    # each code offered `capacity` times; -inf (a plan entry that underflowed) stays a finite, very large cost
    cost = (-log_q).clamp(max=1e300).repeat_interleave(capacity, dim=1).cpu().numpy()
    rows, slots = linear_sum_assignment(cost)
    codes = np.empty(n, dtype=np.int64)
    codes[rows] = slots // capacity
    return torch.from_numpy(codes)


@torch.no_grad()
def spread_collisions(
    codes: torch.Tensor,
    last_cost: Callable[[torch.Tensor], torch.Tensor],
    epsilon: float = 0.003,
    iterations: int = 50,
) -> tuple[torch.Tensor, int]:
    """Re-choose the last code of every item that shares its full tuple, group by group, by Sinkhorn-Knopp.

    Args:
        codes: ``[N, L]`` raw codes (nearest code per level).
        last_cost: ``item indices [m] -> [m, K]`` last-level cost given the prefix (as for ``make_unique``).
        epsilon: Sinkhorn temperature (LC-Rec: 0.003).
        iterations: Sinkhorn rounds (LC-Rec: 50).

    Returns:
        The new ``[N, L]`` codes (only colliding items' last codes change) and how many items changed code.
    """
    codes = codes.clone().long()
    group = _group_ids(codes)
    sizes = torch.bincount(group)
    moved = 0
    for tuple_id in torch.nonzero(sizes > 1).flatten().tolist():  # a loop over collision groups only
        members = torch.nonzero(group == tuple_id).flatten()
        new = balanced_assignment(last_cost(members).double(), epsilon, iterations)
        moved += int((new != codes[members, -1]).sum())
        codes[members, -1] = new
    return codes, moved
