"""GRPO's group-normalised advantages and clipped, KL-regularised objective (pure functions on tensors).

Group Relative Policy Optimization (Shao et al., *DeepSeekMath*, 2024, eq. 3 and 4): for a prompt ``q`` the
policy draws a group of ``G`` outputs ``o_1..o_G`` with rewards ``r_i``; each output's advantage is its reward
normalised within the group, ``A_i = (r_i - mean(r)) / (std(r) + eps)``, and the objective (maximised) is

    J = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1 - eps_clip, 1 + eps_clip) A_i) - beta KL_it ]

with ``rho_it = exp(logp_it - logp_old_it)`` (``logp_old``: the log-prob under the policy that drew the rollouts,
a constant) and the per-token ``k3`` estimator of KL(policy || reference),
``KL_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1`` (unbiased, always >= 0). ``std`` is the sample standard
deviation (``correction=1``, as Hugging Face TRL's ``GRPOTrainer``). Here an output is an item: its tokens are the
item's codes (and, without ``code_softmax: trie``, the EOS), so ``|o_i|`` is the same for every output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """``A = (r - mean(r)) / (std(r) + eps)`` within each row's valid entries; 0 on invalid entries.

    With ``scale=False`` the advantage is ``r - mean(r)`` (Dr. GRPO, Liu et al. 2025; TRL's ``scale_rewards=False``):
    a reward's weight then sets its share of the gradient, where dividing by the group's std would blow a small dense
    penalty up to unit scale in every group whose sparse reward is constant.

    Args:
        rewards: ``[B, G]`` one group of rewards per prompt.
        valid: ``[B, G]`` bool, False where the rollout is missing (fewer than ``G`` valid items were found).
        eps: keeps a group of equal rewards at advantage 0 instead of 0 / 0.
        scale: divide by the group's standard deviation (GRPO) or not (Dr. GRPO).

    Returns:
        ``[B, G]`` float advantages. A group with fewer than two valid rollouts carries no comparison: all 0.
    """
    valid = valid.bool()
    weights = valid.float()
    count = weights.sum(dim=1, keepdim=True)
    mean = (rewards * weights).sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = (rewards - mean) * weights
    std = (centred.square().sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
    advantages = centred / (std + eps) if scale else centred
    informative = valid & (count >= 2) & (std > 0)  # equal rewards: no preference, advantage exactly 0
    return torch.where(informative, advantages, torch.zeros_like(advantages))


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token ``exp(ref - logp) - (ref - logp) - 1``: Schulman's ``k3`` estimator of KL(policy || reference)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


@dataclass
class GRPOTerms:
    """The loss to minimise (``-J``) and its parts, each a mean over the valid rollouts (for logging)."""

    loss: torch.Tensor
    surrogate: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor


def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    clip_eps: float,
    kl_coef: float,
) -> GRPOTerms:
    """``-J`` of the module docstring over a batch of rollouts (every prompt's group flattened).

    Args:
        logp: ``[N, T]`` per-token log-probs under the policy (with gradient).
        logp_old: ``[N, T]`` the same under the policy that drew the rollouts (detached here).
        ref_logp: ``[N, T]`` the same under the frozen reference (detached here).
        advantages: ``[N]`` each rollout's group-normalised advantage.
        valid: ``[N]`` bool; invalid rollouts contribute nothing.
        clip_eps: the ratio's clipping range ``eps_clip`` (0.2 in PPO and DeepSeekMath).
        kl_coef: ``beta``, the weight of the KL penalty (0.04 in DeepSeekMath).
    """
    ratio = torch.exp(logp - logp_old.detach())
    advantage = advantages.detach()[:, None]
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    surrogate = torch.minimum(ratio * advantage, clipped * advantage)
    kl = k3_kl(logp, ref_logp.detach())
    weights = valid.float()
    count = weights.sum().clamp(min=1)

    def mean(per_token: torch.Tensor) -> torch.Tensor:  # 1/|o_i| sum_t, then the mean over valid rollouts
        return (per_token.float().mean(dim=1) * weights).sum() / count

    surrogate_mean, kl_mean = mean(surrogate), mean(kl)
    outside = ((ratio - 1).abs() > clip_eps).float()
    return GRPOTerms(-(surrogate_mean - kl_coef * kl_mean), surrogate_mean, kl_mean, mean(outside).detach())
