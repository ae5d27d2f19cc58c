"""The plug-in gate: learns a decision from labels, saves/loads, and drives Embedder's auto mode."""

from __future__ import annotations

import numpy as np
import torch

from mmemb import Embedder
from mmemb.data.pairs import read_pairs
from mmemb.items import load_visuals
from mmemb.method.gate_training import GateTrainConfig, train_gate
from mmemb.model.gate import gate_features, load_gate
from mmemb.model.prompts import render_prompt

from .embed_checks import assert_auto_matches_own_modes


def _labelled(minimmeb_small):
    pairs = [p for p in read_pairs(minimmeb_small) if p.dataset in ("DigitSum", "DigitClass", "DigitCaption-T2I")]
    for p in pairs:  # a learnable rule: reason on the compositional task only
        p.label = "reason" if p.meta["kind"] == "compositional" else "direct"
    return pairs


def test_gate_learns_labels_and_plugs_into_encode(embedders, minimmeb_small, tmp_path):
    e = embedders["qwen3_vl"]
    pairs = _labelled(minimmeb_small)
    gate, metrics = train_gate(e.backbone, pairs, GateTrainConfig(epochs=15, batch_size=16, lr=3e-3, seed=0))
    assert metrics["accuracy"] >= 0.9, metrics
    gate.save(tmp_path / "gate")
    again = load_gate(tmp_path / "gate")
    queries = [p.query for p in pairs[:8]]
    prompts = [render_prompt(e.backbone.processor, q) for q in queries]
    visuals = [load_visuals(q) for q in queries]
    np.testing.assert_allclose(gate.p_think(prompts, visuals, e.backbone),
                               again.p_think(prompts, visuals, e.backbone), atol=1e-6)

    gated = Embedder(e.backbone, gate=again)
    out = gated.encode(queries, mode="auto", max_reasoning_tokens=4)
    p = np.array(again.p_think(prompts, visuals, e.backbone))
    assert (out.reasoned == (p >= 0.5)).all()
    np.testing.assert_allclose(out.p_think, p, atol=1e-6)
    assert_auto_matches_own_modes(e, queries, out, max_reasoning_tokens=4)


def test_gate_features_put_image_features_in_place(embedders, mixed_items):
    bb = embedders["qwen3_vl"].backbone
    items = mixed_items[:2]
    x, m = gate_features(bb, [render_prompt(bb.processor, it) for it in items], [load_visuals(it) for it in items])
    ids = bb.prepare([render_prompt(bb.processor, it) for it in items], [load_visuals(it) for it in items])["input_ids"]
    token_rows = bb.core.get_input_embeddings()(ids)
    is_image = ids == bb.config.image_token_id
    assert is_image[0].any() and not is_image[1].any()
    assert torch.allclose(x[~is_image], token_rows[~is_image].float())
    assert not torch.allclose(x[is_image], token_rows[is_image].float())


def test_gate_decision_does_not_depend_on_batch_padding(embedders, mixed_items):
    from mmemb.model.gate import GateConfig, ReasoningGate

    bb = embedders["qwen3_vl"].backbone
    torch.manual_seed(0)
    gate = ReasoningGate(GateConfig(input_dim=bb.hidden_size))
    prompts = [render_prompt(bb.processor, it) for it in mixed_items]
    visuals = [load_visuals(it) for it in mixed_items]
    alone = gate.p_think([prompts[2]], [visuals[2]], bb)[0]  # short: left-padded when batched
    together = gate.p_think(prompts, visuals, bb)[2]
    assert abs(alone - together) < 1e-5
