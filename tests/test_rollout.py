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
