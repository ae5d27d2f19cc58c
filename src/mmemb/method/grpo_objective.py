"""The GRPO objective (Shao et al., 2024, as in TRL's GRPOTrainer), on padded per-token log-probs.

For completion i of group g with reward r_i:

    A_i   = (r_i - mean_g r) / (std_g r + eps_std)                       group-normalised advantage
            (or r_i - mean_g r with ``scale=False``, as Dr. GRPO / TRL's scale_rewards="none")
    rho_t = exp(logp_t - logp_old_t)                                    importance ratio per token
    L_t   = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta * KL_t
    KL_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                   k3 estimator, >= 0
    loss  = mean over completions of (mean over the completion's tokens of L_t)

std is the unbiased (Bessel-corrected) standard deviation, as in TRL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps_std: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """rewards (N,) with N = groups * group_size, groups contiguous.

    Dividing by the group's std makes every group's push the same size however small its reward
    gap; ``scale=False`` keeps the push proportional to the gap.
    """
    r = rewards.view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if not scale:
        return centred.flatten()
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
    return (centred / (std + eps_std)).flatten()


@dataclass
class GRPOTerms:
    loss: torch.Tensor
    policy: torch.Tensor  # the clipped surrogate part
    kl: torch.Tensor  # mean per-token KL to the reference
    clipped_share: torch.Tensor  # share of tokens where the clip was active


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
              advantages: torch.Tensor, epsilon: float = 0.2, beta: float = 0.04) -> GRPOTerms:
    """All log-prob tensors (N, T) over completion tokens; ``mask`` (N, T) marks real tokens."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.view(-1, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv
    surrogate = -torch.min(unclipped, clipped)
    diff = ref_logp - logp
    kl = torch.exp(diff) - diff - 1
    per_token = surrogate + beta * kl
    tokens = mask.sum(dim=1).clamp(min=1)
    per_completion = (per_token * mask).sum(dim=1) / tokens
    n_tokens = mask.sum().clamp(min=1)
    return GRPOTerms(
        loss=per_completion.mean(),
        policy=((surrogate * mask).sum(dim=1) / tokens).mean(),
        kl=(kl * mask).sum() / n_tokens,
        clipped_share=(((unclipped != clipped).to(mask.dtype)) * mask).sum() / n_tokens,
    )
