"""GRPO rollouts: sampled decisions and rationales, embeddings equal to teacher-forced passes."""

from __future__ import annotations

import torch

from mmemb.items import load_visuals
from mmemb.method.rollout import completion_logprobs, sample_groups
from mmemb.model.generation import Reasoner, SamplingConfig
from mmemb.model.prompts import render_prompt
from mmemb.model.teacher_forcing import build_forced_batch, forced_forward


def test_rollouts_match_teacher_forcing(embedders, mixed_items):
    e = embedders["qwen3_vl"]
    bb = e.backbone
    items = mixed_items[:3]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ro = sample_groups(bb, Reasoner(bb), items, 6, SamplingConfig(max_tokens=5, temperature=1.0), g)
    assert ro.owners.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert 0 < int(ro.think.sum()) < 18  # p(<think>) is near 0.5 at initialisation
    assert all((r is None) != bool(t) for r, t in zip(ro.rationale_ids, ro.think))
    assert all(len(r) <= 5 for r in ro.rationale_ids if r is not None)
    batch = build_forced_batch(bb, [render_prompt(bb.processor, items[o]) for o in ro.owners.tolist()],
                               [load_visuals(items[o]) for o in ro.owners.tolist()], ro.rationale_ids)
    with torch.no_grad():
        out = forced_forward(bb, bb, batch, banned=Reasoner(bb).banned)
    torch.testing.assert_close(ro.embeddings, out.embeddings, atol=1e-4, rtol=0)
    logp, mask = completion_logprobs(out, ro)
    for i in range(18):
        expected = 1 if not ro.think[i] else 1 + len(ro.rationale_ids[i]) + int(ro.closed[i])
        assert int(mask[i].sum()) == expected
    p = ro.p_think[ro.owners]
    decision = torch.where(ro.think, p, 1 - p).log()
    torch.testing.assert_close(logp[:, 0], decision, atol=1e-5, rtol=0)
    assert (logp[mask.bool()] <= 0).all()


def test_greedy_rationales_leave_only_the_decision_to_the_policy(embedders, mixed_items):
    e = embedders["qwen3_vl"]
    bb = e.backbone
    items = mixed_items[:2]
    ro = sample_groups(bb, Reasoner(bb), items, 4, SamplingConfig(max_tokens=4, temperature=0.0),
                       torch.Generator().manual_seed(1))
    think = [i for i in range(8) if ro.think[i]]
    assert len({tuple(ro.rationale_ids[i]) for i in think if ro.owners[i] == ro.owners[think[0]]}) == 1
    batch = build_forced_batch(bb, [render_prompt(bb.processor, items[o]) for o in ro.owners.tolist()],
                               [load_visuals(items[o]) for o in ro.owners.tolist()], ro.rationale_ids)
    with torch.no_grad():
        out = forced_forward(bb, bb, batch)
    logp, mask = completion_logprobs(out, ro, decision_only=True)
    assert logp.shape == (8, 1) and mask.sum() == 8


def test_learned_depth_closes_after_a_sentence_with_the_policys_probability(embedders):
    """choose_depths: a reasoning completion reads on or closes at each sentence end with the policy's own
    p(</think>) there; one that closes keeps the sentences before and is embedded after them; its
    log-probs are the decision, then log(1 - p) where it read on and log p where it closed."""
    import dataclasses

    from mmemb import Item
    from mmemb.method.rollout import Rollouts, choose_depths, with_close_targets
    from mmemb.model.teacher_forcing import rationale_ids

    bb = embedders["qwen3_vl"].backbone
    item = Item(text="What is the sum of the digits?")
    prompts, visuals = [render_prompt(bb.processor, item)], [load_visuals(item)]
    full = rationale_ids(bb, "digits 8 7 6. 8+7=15. 15+6=21.")
    reasoner = Reasoner(bb)
    bounds = [k + 1 for k, tok in enumerate(full[:-1]) if reasoner.ends_sentence[tok]]
    assert len(bounds) == 2  # after "digits 8 7 6." and after "8+7=15."
    # An untrained model almost never closes; allowed only </think> and one other token, it closes often.
    reasoner.banned = torch.ones_like(reasoner.banned)
    reasoner.banned[[bb.ids.end_think, full[bounds[0]]]] = False
    n = 32
    ro = Rollouts(owners=torch.zeros(n, dtype=torch.long), think=torch.ones(n, dtype=torch.bool),
                  rationale_ids=[list(full)] * n, closed=torch.ones(n, dtype=torch.bool),
                  embeddings=torch.zeros(n, bb.hidden_size), p_think=torch.tensor([0.5]))
    # the policy's p(</think>) after each sentence, from one teacher-forced pass
    full_batch = build_forced_batch(bb, prompts, visuals, [full])
    with torch.no_grad():
        p_close = forced_forward(bb, bb, with_close_targets(full_batch, [bounds], bb.ids.end_think),
                                 banned=reasoner.banned).target_logprobs.exp().tolist()
    assert all(0.02 < p < 0.98 for p in p_close), p_close
    depth = choose_depths(bb, reasoner, ro, prompts, visuals, torch.Generator().manual_seed(0))
    g, expected = torch.Generator().manual_seed(0), []
    for _ in range(n):  # the same draws, by hand: close at each sentence end with probability p
        stops = []
        for j, p in zip(bounds, p_close):
            stops.append((j, float(torch.rand((), generator=g)) < p))
            if stops[-1][1]:
                break
        expected.append(stops)
    assert depth.stops == expected
    lengths = [len(r) for r in depth.rationale_ids]
    assert lengths == [s[-1][0] if s[-1][1] else len(full) for s in expected]
    assert all(r == full[:len(r)] for r in depth.rationale_ids) and len(set(lengths)) > 1
    cut = lengths.index(min(lengths))
    with torch.no_grad():
        ref = forced_forward(bb, bb, build_forced_batch(bb, prompts, visuals, [depth.rationale_ids[cut]]))
    torch.testing.assert_close(depth.embeddings[cut], ref.embeddings[0], atol=1e-4, rtol=0)

    two = dataclasses.replace(depth, owners=torch.zeros(2, dtype=torch.long), think=torch.ones(2, dtype=torch.bool),
                              rationale_ids=[full[:bounds[0]], list(full)], closed=torch.ones(2, dtype=torch.bool),
                              stops=[[(bounds[0], True)], [(bounds[0], False), (bounds[1], False)]])
    batch = with_close_targets(build_forced_batch(bb, prompts * 2, visuals * 2, two.rationale_ids),
                               [[j for j, _ in s] for s in two.stops], bb.ids.end_think)
    with torch.no_grad():
        out = forced_forward(bb, bb, batch, banned=reasoner.banned)
    logp, mask = completion_logprobs(out, two, decision_only=True)
    assert mask.sum(1).tolist() == [2, 3]
    p = p_close
    for row, probs in enumerate([[p[0]], [1 - p[0], 1 - p[1]]]):
        torch.testing.assert_close(logp[row, 1:1 + len(probs)].exp(), torch.tensor(probs), atol=1e-4, rtol=0)
