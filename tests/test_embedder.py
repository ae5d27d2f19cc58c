"""The token protocol and Embedder.encode, checked against plain full forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmemb import Embedder, Item
from mmemb.items import load_visuals
from mmemb.model.prompts import render_prompt

from .conftest import ARCHES
from .embed_checks import assert_auto_matches_own_modes


def full_forward_embedding(embedder: Embedder, item: Item, suffix_ids: list[int]) -> np.ndarray:
    """The reference: the HF model's own forward over prompt + suffix, one item, no padding."""
    bb = embedder.backbone
    images, frames = load_visuals(item)
    inputs = bb.processor(text=[render_prompt(bb.processor, item)], images=images or None, return_tensors="pt")
    suffix = torch.tensor([suffix_ids])
    kwargs = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
    with torch.no_grad():
        out = bb.hf_model.model(
            input_ids=torch.cat([inputs["input_ids"], suffix], 1),
            attention_mask=torch.ones(1, inputs["input_ids"].shape[1] + len(suffix_ids), dtype=torch.long),
            mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(suffix)], 1),
            **kwargs,
        )
    h = out.last_hidden_state[0, -1].float()
    return torch.nn.functional.normalize(h, dim=-1).numpy()


@pytest.mark.parametrize("arch", ARCHES)
def test_all_modes_every_arch(embedders, mixed_items, arch):
    e = embedders[arch]
    for mode in ("direct", "reason", "auto"):
        r = e.encode(mixed_items, mode=mode, max_reasoning_tokens=6)
        assert r.embeddings.shape == (len(mixed_items), e.dim)
        assert np.allclose(np.linalg.norm(r.embeddings, axis=1), 1.0, atol=1e-5)
        assert r.ok.all() and not r.errors
        assert (r.prompt_tokens > 0).all()
        if mode == "direct":
            assert not r.reasoned.any() and (r.generated_tokens == 0).all()
        if mode == "reason":
            assert r.reasoned.all()
            assert all(len(t) <= 6 for t in r.rationale_token_ids)
            assert (r.generated_tokens == [len(t) + 2 for t in r.rationale_token_ids]).all()


@pytest.mark.parametrize("arch", ARCHES)
def test_direct_equals_full_forward(embedders, mixed_items, arch):
    e = embedders[arch]
    r = e.encode(mixed_items, mode="direct", batch_size=8)
    for i, item in enumerate(mixed_items):
        ref = full_forward_embedding(e, item, [e.backbone.ids.emb])
        assert np.abs(r.embeddings[i] - ref).max() <= 1e-4, i


@pytest.mark.parametrize("arch", ARCHES)
def test_reason_equals_full_forward(embedders, mixed_items, arch):
    """Sampling makes rows finish at different steps, so rows leave the batch at different times."""
    e = embedders[arch]
    ids = e.backbone.ids
    torch.manual_seed(0)
    r = e.encode(mixed_items, mode="reason", batch_size=8, temperature=1.5, max_reasoning_tokens=12)
    for i, item in enumerate(mixed_items):
        tokens = r.rationale_token_ids[i]
        ref = full_forward_embedding(e, item, [ids.think, *tokens, ids.end_think, ids.emb])
        assert np.abs(r.embeddings[i] - ref).max() <= 1e-4, i


def test_rows_finish_at_different_steps(embedders, mixed_items):
    """Steer </think> toward the hidden states so rationales end at different lengths."""
    e = embedders["qwen3_vl"]
    bb = e.backbone
    head = bb.lm_head.weight
    saved = head[bb.ids.end_think].clone()
    direction = torch.tensor(e.encode(mixed_items, mode="reason", max_reasoning_tokens=4).embeddings.mean(0))
    found = None
    try:
        for scale in (0.6, 0.8, 1.0, 1.2):
            with torch.no_grad():
                head[bb.ids.end_think] = direction * scale
            for seed in range(5):
                torch.manual_seed(seed)
                r = e.encode(mixed_items, mode="reason", batch_size=8, temperature=1.0, max_reasoning_tokens=10)
                if len({len(t) for t in r.rationale_token_ids}) >= 3:
                    found = r
                    break
            if found:
                break
        assert found is not None, "could not get rationales of different lengths"
        for i, item in enumerate(mixed_items):
            tokens = found.rationale_token_ids[i]
            ref = full_forward_embedding(e, item, [bb.ids.think, *tokens, bb.ids.end_think, bb.ids.emb])
            assert np.abs(found.embeddings[i] - ref).max() <= 1e-4, i
    finally:
        with torch.no_grad():
            head[bb.ids.end_think] = saved


@pytest.mark.parametrize("mode", ["direct", "reason"])
def test_batch_equals_one_by_one(embedders, mixed_items, mode):
    e = embedders["qwen3_vl"]
    batched = e.encode(mixed_items, mode=mode, batch_size=32, max_reasoning_tokens=8)
    for i, item in enumerate(mixed_items):
        single = e.encode([item], mode=mode, batch_size=1, max_reasoning_tokens=8)
        assert np.abs(batched.embeddings[i] - single.embeddings[0]).max() <= 1e-4
        assert batched.rationale_token_ids[i] == single.rationale_token_ids[0]


def test_auto_threshold_extremes(embedders, mixed_items):
    e = embedders["qwen3_vl"]
    reason = e.encode(mixed_items, mode="reason", max_reasoning_tokens=8)
    direct = e.encode(mixed_items, mode="direct")
    always = e.encode(mixed_items, mode="auto", think_threshold=0.0, max_reasoning_tokens=8)
    never = e.encode(mixed_items, mode="auto", think_threshold=1.01, max_reasoning_tokens=8)
    assert always.reasoned.all() and not never.reasoned.any()
    assert np.abs(always.embeddings - reason.embeddings).max() <= 1e-4
    assert always.rationale_token_ids == reason.rationale_token_ids
    assert np.abs(never.embeddings - direct.embeddings).max() <= 1e-4
    assert (never.generated_tokens == 0).all()
    np.testing.assert_allclose(never.p_think, direct.p_think, atol=1e-6)


def test_auto_mixes_decisions_in_one_batch(embedders, mixed_items):
    """With a threshold between the items' p(<think>), both groups come out of one batch correctly."""
    e = embedders["qwen3_vl"]
    p = e.encode(mixed_items, mode="direct").p_think
    thr = float(np.median(p)) + 1e-7
    auto = e.encode(mixed_items, mode="auto", think_threshold=thr, max_reasoning_tokens=8)
    assert 0 < auto.reasoned.sum() < len(mixed_items)
    assert_auto_matches_own_modes(e, mixed_items, auto, max_reasoning_tokens=8)


def test_reasoning_depth_budget(embedders, mixed_items):
    e = embedders["qwen3_vl"]
    r = e.encode(mixed_items, mode="reason", max_reasoning_tokens=0)
    assert all(t == [] for t in r.rationale_token_ids)
    assert (r.generated_tokens == 2).all()


def test_tokens_processed_has_no_second_prefill(embedders, mixed_items):
    e = embedders["qwen3_vl"]
    r = e.encode(mixed_items, mode="reason", max_reasoning_tokens=5)
    assert r.tokens_processed == int((r.prompt_tokens + r.generated_tokens + 1).sum())
    d = e.encode(mixed_items, mode="direct")
    assert d.tokens_processed == int((d.prompt_tokens + 1).sum())


@pytest.mark.parametrize("mode", ["reason", "auto"])
def test_reasoning_rows_of_several_batches_decode_together(embedders, mixed_items, mode):
    """Small batches pool their reasoning rows into one decode on merged (left-padded) caches."""
    e = embedders["qwen3_vl"]
    thr = float(np.median(e.encode(mixed_items, mode="direct").p_think)) + 1e-7
    one = e.encode(mixed_items, mode=mode, batch_size=32, think_threshold=thr, max_reasoning_tokens=8)
    pooled = e.encode(mixed_items, mode=mode, batch_size=2, think_threshold=thr, max_reasoning_tokens=8)
    assert pooled.reasoned.tolist() == one.reasoned.tolist() and pooled.reasoned.sum() >= 3
    assert pooled.rationale_token_ids == one.rationale_token_ids
    assert np.abs(pooled.embeddings - one.embeddings).max() <= 1e-4
    assert pooled.tokens_processed == one.tokens_processed
