"""The vLLM engine backend: routing and errors on any machine; the engine itself where a GPU and vLLM are."""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmemb import Embedder
from mmemb.cli import app
from mmemb.model.vllm_engine import EngineUnavailable, trim

GPU_AND_VLLM = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


@pytest.fixture
def no_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError


@pytest.fixture
def vllm_but_no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_engine_vllm_without_vllm_says_how_to_install(no_vllm, embedders, mixed_items):
    e = embedders["qwen3_vl"]
    with pytest.raises(EngineUnavailable, match=r"pip install 'mmemb\[vllm\]'"):
        Embedder(e.backbone, engine="vllm")
    with pytest.raises(EngineUnavailable, match="needs vLLM"):
        e.encode(mixed_items, mode="auto", engine="vllm")
    # direct mode writes no rationale, so it needs no engine
    direct = e.encode(mixed_items, mode="direct", engine="vllm")
    assert np.abs(direct.embeddings - e.encode(mixed_items, mode="direct").embeddings).max() == 0


def test_engine_vllm_without_gpu_says_so(vllm_but_no_gpu, tiny_path):
    with pytest.raises(EngineUnavailable, match="needs a CUDA GPU"):
        Embedder.from_pretrained(tiny_path, engine="vllm")


def test_unknown_engine(embedders, mixed_items):
    with pytest.raises(ValueError, match="engine must be one of"):
        embedders["qwen3_vl"].encode(mixed_items, mode="reason", engine="sglang")


@pytest.mark.parametrize("verb", ["encode", "eval", "serve"])
def test_cli_engine_errors_before_any_work(no_vllm, tiny_path, minimmeb_small, tmp_path, verb):
    args = {"eval": ["eval", "--model", tiny_path, "--tasks", "DigitSum", "--data", str(minimmeb_small),
                     "--out", str(tmp_path / "run")],
            "serve": ["serve", "--model", tiny_path, "--port", "0"],
            "encode": ["encode", "--model", tiny_path, "--input", str(tmp_path / "items.jsonl"),
                       "--output", str(tmp_path / "run" / "vectors")]}[verb]
    (tmp_path / "items.jsonl").write_text('{"id": "q1", "text": "3 7 1"}\n')
    result = CliRunner().invoke(app, [*args, "--engine", "vllm"])
    assert result.exit_code == 2 and "pip install 'mmemb[vllm]'" in result.output
    assert not (tmp_path / "run").exists()
    bad = CliRunner().invoke(app, [*args, "--engine", "sglang"])
    assert bad.exit_code == 2 and "--engine" in bad.output


def test_trim_cuts_where_the_decoder_forces_the_close(embedders, mixed_items):
    """What vLLM returns (greedy, ``max_tokens + 1`` tokens or fewer ending in </think>), trimmed,
    equals what mmemb's own decoder writes under the same budget and sentence limit. A sentence end
    is steered toward the hidden states so that rationales have sentences to count."""
    e = embedders["qwen3_vl"]
    bb = e.backbone
    ids = bb.ids
    ends = e.reasoner.ends_sentence
    period = int(torch.nonzero(ends).flatten()[0])
    head = bb.lm_head.weight
    saved = head[period].clone()
    direction = torch.tensor(e.encode(mixed_items, mode="reason", max_reasoning_tokens=4).embeddings.mean(0))
    try:
        with torch.no_grad():
            head[period] = direction * 0.8
        free = e.encode(mixed_items, mode="reason", max_reasoning_tokens=24).rationale_token_ids
        # the model's own continuation: its rationale, then </think> where it closed before the budget
        continuations = [t + [ids.end_think] if len(t) < 24 else t for t in free]
        cut_by_sentences = 0
        for budget, steps in ((3, None), (10, None), (23, 1), (23, 2)):
            short = e.encode(mixed_items, mode="reason", max_reasoning_tokens=budget, max_reasoning_steps=steps)
            for i, seq in enumerate(continuations):
                tokens, closed = trim(seq[:budget + 1], ids.end_think, budget, steps, ends)
                assert tokens == short.rationale_token_ids[i], (budget, steps, i)
                assert closed == (seq[len(tokens):len(tokens) + 1] == [ids.end_think])
                cut_by_sentences += steps is not None and len(tokens) < min(budget, len(free[i]))
        assert cut_by_sentences  # the sentence limit was exercised
    finally:
        with torch.no_grad():
            head[period] = saved


@pytest.mark.skipif(not GPU_AND_VLLM, reason="needs a CUDA GPU and vLLM")
def test_vllm_engine_matches_hf_engine(tiny_path, mixed_items):
    hf = Embedder.from_pretrained(tiny_path, device="cuda", dtype="float32")
    vl = Embedder(hf.backbone, engine="vllm")
    for mode in ("reason", "auto"):
        a = hf.encode(mixed_items, mode=mode, max_reasoning_tokens=8, think_threshold=0.0)
        b = vl.encode(mixed_items, mode=mode, max_reasoning_tokens=8, think_threshold=0.0)
        same = [i for i in range(len(mixed_items)) if a.rationale_token_ids[i] == b.rationale_token_ids[i]]
        assert len(same) >= len(mixed_items) - 1  # greedy ties may break differently in vLLM's kernels
        assert np.abs(a.embeddings[same] - b.embeddings[same]).max() <= 1e-3
