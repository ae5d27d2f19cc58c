"""Teacher-forced passes agree with inference (Embedder.encode) and with a plain HF forward."""

from __future__ import annotations

import numpy as np
import torch

from mmemb.items import load_visuals
from mmemb.model.prompts import render_prompt
from mmemb.model.teacher_forcing import build_forced_batch, forced_forward, rationale_ids


def _batch(e, items, rationales):
    bb = e.backbone
    return build_forced_batch(bb, [render_prompt(bb.processor, it) for it in items],
                              [load_visuals(it) for it in items], rationales)


def test_matches_encode_in_both_modes(embedders, mixed_items):
    e = embedders["qwen3_vl"]
    bb = e.backbone
    direct = e.encode(mixed_items, mode="direct")
    reason = e.encode(mixed_items, mode="reason", max_reasoning_tokens=7)
    # every other row reasons, with exactly the tokens the model wrote
    rats = [reason.rationale_token_ids[i] if i % 2 else None for i in range(len(mixed_items))]
    with torch.no_grad():
        out = forced_forward(bb, bb, _batch(e, mixed_items, rats))
    for i in range(len(mixed_items)):
        ref = reason if i % 2 else direct
        assert np.abs(out.embeddings[i].numpy() - ref.embeddings[i]).max() <= 1e-4
    p = torch.softmax(out.decision_logits, -1)[:, 0].numpy()
    np.testing.assert_allclose(p, direct.p_think, atol=1e-5)


def test_rationale_logprobs_match_plain_forward(embedders, mixed_items):
    e = embedders["qwen2_vl"]
    bb = e.backbone
    item = mixed_items[0]
    r = rationale_ids(bb, "digits 8 7 6. 8+7=15.")
    batch = _batch(e, [mixed_items[1], item], [None, r])
    with torch.no_grad():
        out = forced_forward(bb, bb, batch)
        images, _ = load_visuals(item)
        inputs = bb.processor(text=[render_prompt(bb.processor, item)], images=images, return_tensors="pt")
        tail = torch.tensor([[bb.ids.think, *r, bb.ids.end_think, bb.ids.emb]])
        full = bb.hf_model(input_ids=torch.cat([inputs["input_ids"], tail], 1),
                           mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tail)], 1),
                           pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    logp = torch.log_softmax(full.logits[0].float(), -1)
    P = inputs["input_ids"].shape[1]
    targets = [*r, bb.ids.end_think]
    ref = torch.stack([logp[P + k, t] for k, t in enumerate(targets)])  # position P is <think>
    assert out.target_row.tolist() == [1] * len(targets)
    torch.testing.assert_close(out.target_logprobs, ref, atol=1e-4, rtol=0)
    sums = out.rationale_logprob_sum(2)
    assert sums[0] == 0 and torch.isclose(sums[1], ref.sum(), atol=1e-4)
    dec = torch.log_softmax(full.logits[0, P - 1, [bb.ids.think, bb.ids.emb]].float(), -1)
    torch.testing.assert_close(out.decision_logprob(torch.tensor([False, True]))[1], dec[0], atol=1e-5, rtol=0)


def test_gradients_flow_to_all_terms(embedders, mixed_items):
    e = embedders["qwen3_vl"]
    bb = e.backbone
    batch = _batch(e, mixed_items[:3], [None, rationale_ids(bb, "digits 3 7 1."), []])
    out = forced_forward(bb, bb, batch)
    loss = out.embeddings.sum() + out.decision_logits.sum() + out.target_logprobs.sum()
    loss.backward()
    grads = [p.grad for p in bb.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    bb.zero_grad(set_to_none=True)
