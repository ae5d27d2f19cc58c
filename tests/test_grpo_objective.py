"""The GRPO objective against a case computed by hand (2 groups of 2 completions)."""

from __future__ import annotations

import math

import pytest
import torch

from mmemb.method.grpo_objective import group_advantages, grpo_loss


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0])
    adv = group_advantages(rewards, group_size=2, eps_std=0.0 + 1e-4)
    s = math.sqrt(2.0)  # unbiased std of (1, 3)
    assert adv[:2].tolist() == pytest.approx([-1 / (s + 1e-4), 1 / (s + 1e-4)])
    assert adv[2:].tolist() == [0.0, 0.0]  # equal rewards: no signal


def test_grpo_loss_by_hand():
    # group 1: completion a (2 tokens), completion b (1 token + padding); group 2: c, d (1 token each)
    logp = torch.tensor([[-1.0, -0.5], [-2.0, 0.0], [-0.3, 0.0], [-0.7, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -0.5], [-1.5, 0.0], [-0.3, 0.0], [-0.7, 0.0]])
    ref = torch.tensor([[-1.0, -0.7], [-2.0, 0.0], [-0.5, 0.0], [-0.7, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 0], [1, 0]])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    eps, beta = 0.2, 0.1
    terms = grpo_loss(logp, old, ref, mask, adv, epsilon=eps, beta=beta)

    def tok(lp, lo, lr, a):
        rho = math.exp(lp - lo)
        surrogate = -min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
        d = lr - lp
        return surrogate + beta * (math.exp(d) - d - 1)

    a = (tok(-1.0, -1.2, -1.0, 1.0) + tok(-0.5, -0.5, -0.7, 1.0)) / 2  # rho=e^0.2 clipped to 1.2 on token 1
    b = tok(-2.0, -1.5, -2.0, -1.0)  # rho=e^-0.5 < 0.8: clipped, -min(-0.61,-0.8) = 0.8
    c = tok(-0.3, -0.3, -0.5, 0.5)
    d = tok(-0.7, -0.7, -0.7, -0.5)
    assert terms.loss.item() == pytest.approx((a + b + c + d) / 4, abs=1e-6)
    assert b == pytest.approx(0.8, abs=1e-6)
    assert terms.clipped_share.item() == pytest.approx(2 / 5)
    terms.loss.backward()
    # a clipped token gives no policy gradient: only the KL term moves it
    d_kl = lambda lp, lr: beta * (1 - math.exp(lr - lp))  # noqa: E731  d/dlp of k3
    assert logp.grad[1, 0].item() == pytest.approx(d_kl(-2.0, -2.0) / 4, abs=1e-6)
    assert logp.grad[0, 1].item() == pytest.approx((-1.0 + d_kl(-0.5, -0.7)) / 2 / 4, abs=1e-6)
    assert logp.grad[1, 1].item() == 0.0  # padding


def test_reciprocal_rank_reward():
    from mmemb.method.grpo import retrieval_reward

    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]])
    positive = torch.tensor([[False, True, False], [True, False, False]])
    # row 0 ranks target 0 (a negative) first, its positive second; row 1 ranks its positive last
    assert retrieval_reward(emb, targets, positive, "mrr", 0.02).tolist() == [0.5, pytest.approx(1 / 3)]
    lp = retrieval_reward(emb, targets, positive, "logprob", 1.0)
    assert lp[0].item() == pytest.approx(torch.log_softmax(targets @ emb[0], 0)[1].item())


def test_unscaled_advantages_keep_the_gap():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.9, 1.0, 1.0, 1.0, 0.1])
    scaled = group_advantages(rewards, 4)
    unscaled = group_advantages(rewards, 4, scale=False)
    assert scaled[3].item() == pytest.approx(scaled[7].item(), rel=1e-2)  # the std makes both pushes equal
    assert unscaled[3].item() == pytest.approx(-0.075) and unscaled[7].item() == pytest.approx(-0.675)


def test_delta_reward_is_the_utility_gap_of_the_chosen_action():
    """The paper's reward: s(completion) - s(the query's direct embedding), s = log p(positive). A direct
    completion gets 0; centred per group it gives the log-probability reward's advantages exactly."""
    from mmemb.method.grpo import retrieval_reward

    targets = torch.nn.functional.normalize(torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]]), dim=1)
    positive = torch.tensor([[False, True, False]] * 4)
    direct = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0]]), dim=1).expand(4, 2)
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.4], [0.5, 0.5], [1.0, 0.0]]), dim=1)
    delta = retrieval_reward(emb, targets, positive, "delta", 0.1, direct=direct)
    logprob = retrieval_reward(emb, targets, positive, "logprob", 0.1)
    assert delta[0].item() == 0.0 and delta[2].item() > delta[1].item() > 0  # closer to the positive: a larger gap
    torch.testing.assert_close(group_advantages(delta, 4, scale=False), group_advantages(logprob, 4, scale=False))
    with pytest.raises(ValueError, match="direct embedding"):
        retrieval_reward(emb, targets, positive, "delta", 0.1)
