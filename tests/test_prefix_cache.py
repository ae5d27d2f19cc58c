"""Prompt reuse: one prefill, many continuations, same embeddings as separate full passes."""

from __future__ import annotations

import torch

from mmemb.items import load_visuals
from mmemb.model.prefix_cache import embed_tails, prefill
from mmemb.model.prompts import render_prompt
from mmemb.model.teacher_forcing import build_forced_batch, forced_forward, rationale_ids


def test_tails_on_a_shared_prefill_match_full_passes(embedders, mixed_items):
    e = embedders["qwen3_vl"]
    bb = e.backbone
    items = mixed_items[:4]
    prompts = [render_prompt(bb.processor, it) for it in items]
    visuals = [load_visuals(it) for it in items]
    texts = ["digits 8 7 6. 8+7=15.", "the digit is 4.", ""]
    rats = [rationale_ids(bb, t) for t in texts]
    ids = bb.ids
    # each query: the direct tail and three rationales of different lengths
    owners, tails, reference_rationales = [], [], []
    for q in range(len(items)):
        for r in [None, *rats]:
            owners.append(q)
            tails.append([ids.emb] if r is None else [ids.think, *r, ids.end_think, ids.emb])
            reference_rationales.append(r)
    state = prefill(bb, prompts, visuals)
    p_think = state.p_think(ids)
    got = embed_tails(bb, state.repeat(torch.tensor(owners)), tails)
    with torch.no_grad():
        ref = forced_forward(bb, bb, build_forced_batch(bb, [prompts[o] for o in owners],
                                                        [visuals[o] for o in owners], reference_rationales))
    torch.testing.assert_close(got, ref.embeddings, atol=1e-4, rtol=0)
    torch.testing.assert_close(p_think, torch.tensor(e.encode(items, mode="direct").p_think), atol=1e-5, rtol=0)
