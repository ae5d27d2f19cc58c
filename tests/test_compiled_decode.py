"""The compiled decoding step on a static cache against the eager loop: same tokens, same vectors,
one compilation for every batch composition, and the eager loop where compilation fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from mmemb import Embedder
from mmemb.method.rollout import sample_groups
from mmemb.model.generation import Reasoner, SamplingConfig
from mmemb.model.static_decoder import batch_bucket, length_bucket

from .conftest import ARCHES


@pytest.fixture
def traced_only(monkeypatch):
    """The step traced and run as one graph (dynamo + AOT autograd) without inductor's C++ code
    generation: the family-specific arithmetic (rotary, biases, norms) is all in the graph, and a
    cold C++ compile per family would cost minutes of the suite. Qwen3-VL runs through inductor."""
    from mmemb.model import static_decoder
    from mmemb.model.decode_step import decode_step

    monkeypatch.setattr(static_decoder, "_compiled_step", torch.compile(decode_step, backend="aot_eager",
                                                                         fullgraph=True))


def assert_same(compiled, eager) -> None:
    assert compiled.reasoned.tolist() == eager.reasoned.tolist()
    assert compiled.rationale_token_ids == eager.rationale_token_ids
    assert compiled.generated_tokens.tolist() == eager.generated_tokens.tolist()
    assert compiled.tokens_processed == eager.tokens_processed
    assert np.abs(compiled.embeddings - eager.embeddings).max() <= 1e-4


@pytest.mark.parametrize("arch", ARCHES)
def test_compiled_equals_eager_every_arch(embedders, mixed_items, arch, request):
    """Reason, auto (a mixed batch) and a sentence budget, pooled over batches of 2: Qwen2-VL's and
    Qwen2.5-VL's sectioned rotary and biases, Qwen3-VL's interleaved rotary and q/k norms."""
    if arch != "qwen3_vl":
        request.getfixturevalue("traced_only")
    eager = embedders[arch]
    compiled = Embedder(eager.backbone, compile=True)
    thr = float(np.median(eager.encode(mixed_items).p_think)) + 1e-7
    for kwargs in ({"mode": "reason", "max_reasoning_tokens": 10},
                   {"mode": "auto", "think_threshold": thr, "max_reasoning_tokens": 10, "batch_size": 2},
                   {"mode": "reason", "max_reasoning_tokens": 12, "max_reasoning_steps": 1}):
        assert_same(compiled.encode(mixed_items, **kwargs), eager.encode(mixed_items, **kwargs))
    assert compiled.reasoner.compile  # the compiled path ran (no fallback)


def test_another_batch_composition_does_not_recompile(embedders, mixed_items):
    e = Embedder(embedders["qwen3_vl"].backbone, compile=True)
    e.encode(mixed_items, mode="reason", max_reasoning_tokens=6)
    graphs = counters["stats"]["unique_graphs"]
    # other batch sizes (5, 3, 1 rows), prompt lengths and budgets (other length buckets), sampling
    e.encode(mixed_items[1:], mode="reason", max_reasoning_tokens=40)
    e.encode(mixed_items[:3], mode="auto", think_threshold=0.0, max_reasoning_tokens=3, batch_size=2)
    e.encode(mixed_items[4:5], mode="reason", temperature=1.0, max_reasoning_tokens=20)
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs and e.reasoner.compile


def test_eager_fallback_where_compilation_fails(tiny_path, mixed_items):
    """No working C++ compiler: inductor fails, the decoder warns once and decodes eagerly (a float64
    model, so that no graph compiled before in this process can serve it)."""
    reference = Embedder.from_pretrained(tiny_path, dtype=torch.float64, compile=False)
    expected = reference.encode(mixed_items, mode="reason", max_reasoning_tokens=6)
    e = Embedder(reference.backbone, compile=True)
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",), "force_disable_caches": True}):
        with pytest.warns(RuntimeWarning, match="decoding eagerly .* torch.compile failed"):
            got = e.encode(mixed_items, mode="reason", max_reasoning_tokens=6)
    assert e.reasoner.compile is False  # later calls go straight to the eager loop
    assert_same(got, expected)


def test_rollouts_compiled_equal_eager(embedders, mixed_items):
    bb = embedders["qwen3_vl"].backbone
    runs = [sample_groups(bb, Reasoner(bb, compile=flag), mixed_items[:3], 4, SamplingConfig(max_tokens=6),
                          torch.Generator().manual_seed(3)) for flag in (True, False)]
    assert runs[0].think.tolist() == runs[1].think.tolist() and runs[0].think.any()
    assert runs[0].rationale_ids == runs[1].rationale_ids
    assert runs[0].closed.tolist() == runs[1].closed.tolist()
    torch.testing.assert_close(runs[0].embeddings, runs[1].embeddings, atol=1e-4, rtol=0)


def test_default_follows_mmemb_compile(monkeypatch, embedders):
    from mmemb.model.generation import compile_by_default

    bb = embedders["qwen3_vl"].backbone
    monkeypatch.setenv("MMEMB_COMPILE", "0")
    assert not compile_by_default() and Reasoner(bb).compile is False and Embedder(bb).reasoner.compile is False
    assert Reasoner(bb, compile=True).compile  # an explicit choice wins
    monkeypatch.delenv("MMEMB_COMPILE")
    assert compile_by_default() and Reasoner(bb).compile and Embedder(bb).reasoner.compile


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 200)] == [2, 2, 4, 8, 8, 16, 256]
    assert [length_bucket(n) for n in (1, 16, 17, 100, 128, 129, 1000)] == [16, 16, 32, 112, 128, 160, 1024]


def test_local_teacher_compiled_equals_eager(tiny_path, minimmeb_small, traced_only):
    from mmemb.data.pairs import read_pairs
    from mmemb.method.teachers import LocalTeacher

    pairs = [p for p in read_pairs(minimmeb_small) if p.dataset == "DigitSum"][:2]
    got = [[[(c.text, c.tokens) for c in cands] for cands in
            LocalTeacher(tiny_path, temperature=0.0, max_tokens=8, compile=flag).generate(pairs, 2)]
           for flag in (True, False)]
    assert got[0] == got[1] and all(tokens > 0 for cands in got[0] for _, tokens in cands)


def test_many_model_layouts_in_one_process(monkeypatch, tiny_path, mixed_items):
    """A process that decodes with more model layouts than dynamo's default recompile limit (an
    evaluation of a dozen systems; this suite) still compiles; past the raised limit it decodes
    eagerly with a warning instead of failing."""
    import torch._dynamo.config as dynamo_config

    from mmemb.model import static_decoder

    static_decoder.compiled_step()
    assert dynamo_config.recompile_limit >= static_decoder.RECOMPILE_LIMIT

    def limit_hit(*args, **kwargs):
        raise torch._dynamo.exc.FailOnRecompileLimitHit("Hard failure due to fullgraph=True")

    reference = Embedder.from_pretrained(tiny_path, compile=False)
    expected = reference.encode(mixed_items, mode="reason", max_reasoning_tokens=6)
    monkeypatch.setattr(static_decoder, "compiled_step", lambda: limit_hit)
    e = Embedder(reference.backbone, compile=True)
    with pytest.warns(RuntimeWarning, match="decoding eagerly .* torch.compile failed"):
        got = e.encode(mixed_items, mode="reason", max_reasoning_tokens=6)
    assert e.reasoner.compile is False
    assert_same(got, expected)
