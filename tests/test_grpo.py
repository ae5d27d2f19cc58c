"""The GRPO loop: logs, curves, resume, and the decision moving the way the reward says."""

from __future__ import annotations

import json

from mmemb.fileio import read_jsonl
from mmemb.method.grpo import RLConfig, run_rl
from mmemb.model.backbone import load_backbone
from mmemb.model.embedder import Embedder


def _cfg(tiny_path, minimmeb_small, out, **kw):
    base = dict(model=tiny_path, out=str(out), data=[str(minimmeb_small / "train" / "DigitSum.jsonl")],
                steps=3, queries_per_step=4, group_size=4, max_reasoning_tokens=6, save_every=2, seed=0)
    base.update(kw)
    return RLConfig(**base)


def test_cost_of_reasoning_pushes_p_think_down(tiny_path, minimmeb_small, tmp_path):
    cfg = _cfg(tiny_path, minimmeb_small, tmp_path / "rl", cost=20.0, lr=5e-3, beta=0.0, nce_weight=0.0, steps=4)
    final = run_rl(cfg, show_progress=False)
    rows = read_jsonl(tmp_path / "rl" / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) >= {"reward", "kl", "invocation", "invocation_per_task", "reasoning_tokens", "p_think"}
    assert (tmp_path / "rl" / "rl_curves.png").stat().st_size > 0
    queries = [json.loads(line)["query"]["text"] for line in
               (minimmeb_small / "train" / "DigitSum.jsonl").read_text().splitlines()[:8]]
    before = Embedder(load_backbone(tiny_path)).encode(queries, mode="direct").p_think.mean()
    after = Embedder(load_backbone(final)).encode(queries, mode="direct").p_think.mean()
    assert after < before - 0.05, (before, after)


def test_rl_resumes_from_last_state(tiny_path, minimmeb_small, tmp_path):
    full = run_rl(_cfg(tiny_path, minimmeb_small, tmp_path / "full", steps=4), show_progress=False)
    part = _cfg(tiny_path, minimmeb_small, tmp_path / "part", steps=2)
    run_rl(part, show_progress=False)
    part.steps = 4
    resumed = run_rl(part, show_progress=False)
    assert [r["step"] for r in read_jsonl(tmp_path / "part" / "log.jsonl")] == [1, 2, 3, 4]
    a, b = load_backbone(full), load_backbone(resumed)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert (p - q).abs().max() < 1e-5, n


def test_rl_with_lora_merges_into_a_plain_checkpoint(tiny_path, minimmeb_small, tmp_path):
    final = run_rl(_cfg(tiny_path, minimmeb_small, tmp_path / "lora", steps=2, lr=1e-2,
                        lora={"rank": 4, "alpha": 8}), show_progress=False)
    assert not (final / "adapter_config.json").exists() and (final / "model.safetensors").is_file()
    rows = read_jsonl(tmp_path / "lora" / "log.jsonl")
    assert rows[0]["kl"] == 0.0  # step 1: the adapter starts at zero, the policy is the reference
    a, b = load_backbone(tiny_path), load_backbone(final)
    assert any((p - q).abs().max() > 0 for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()))


class _Payload:
    """Unpickling this runs code (creates a file): what a tampered checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_loads_its_state_with_weights_only(tiny_path, minimmeb_small, tmp_path, monkeypatch):
    import pickle

    import torch

    import mmemb.method.grpo as grpo

    part = _cfg(tiny_path, minimmeb_small, tmp_path / "part", steps=1)
    run_rl(part, show_progress=False)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(grpo.torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    marker = tmp_path / "ran"
    torch.save({"state": {}, "param_groups": [], "x": _Payload(marker)}, tmp_path / "part" / "last" / "optimizer.pt")
    part.steps = 2
    try:
        run_rl(part, show_progress=False)
    except pickle.UnpicklingError:
        pass
    assert calls and all(kw.get("weights_only") is True for kw in calls), calls
    assert not marker.exists()
