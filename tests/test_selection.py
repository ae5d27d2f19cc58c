"""Rationales job (resumable, kill-safe) and counterfactual selection (prompt reuse is exact)."""

from __future__ import annotations

import json
import math

import pytest

from mmemb.data.pairs import read_pairs
from mmemb.fileio import read_jsonl
from mmemb.method.rationales import load_rationales, run_rationales
from mmemb.method.selection import SelectionConfig, kept_shares, labelled_pairs, select
from mmemb.method.teachers import make_teacher, parse_spec


def test_teacher_specs():
    assert parse_spec("minimmeb:faithful=0.5,slip=0.5") == ("minimmeb", "", {"faithful": "0.5", "slip": "0.5"})
    assert parse_spec("openai:http://h:1/v1#m?concurrency=2") == ("openai", "http://h:1/v1#m", {"concurrency": "2"})
    with pytest.raises(ValueError, match="unknown teacher kind"):
        make_teacher("magic:x")


def test_rationales_resume_and_partial_row(minimmeb_small, tmp_path, tiny_path):
    from transformers import AutoTokenizer

    pairs = read_pairs(minimmeb_small)[:20]
    teacher = make_teacher("minimmeb", seed=1)
    out = tmp_path / "rationales.jsonl"
    tok = AutoTokenizer.from_pretrained(tiny_path)
    run_rationales(pairs[:8], [teacher], 3, out, tokenizer=tok, show_progress=False)
    first = out.read_text()
    with open(out, "a") as f:
        f.write('{"query_id": "half a row')  # a writer killed mid-row
    stats = run_rationales(pairs, [teacher], 3, out, tokenizer=tok, show_progress=False)
    rows = read_jsonl(out)
    assert stats == {"written": 36, "skipped": 24}
    assert len(rows) == 60 and out.read_text().startswith(first)
    assert len({(r["query_id"], r["teacher"], r["k"]) for r in rows}) == 60
    r = rows[0]
    assert set(r) == {"query_id", "dataset", "teacher", "k", "sampling", "text", "tokens", "type"}
    assert r["tokens"] == len(tok(r["text"], add_special_tokens=False)["input_ids"])
    # a rerun writes nothing and the candidates are the same (seeded per pair)
    again = tmp_path / "again.jsonl"
    run_rationales(pairs, [teacher], 3, again, tokenizer=tok, show_progress=False)
    assert [x["text"] for x in read_jsonl(again)] == [x["text"] for x in rows]


def test_selection_with_and_without_prompt_reuse_agree(minimmeb_small, tmp_path, embedders):
    e = embedders["qwen3_vl"]
    pairs = [p for p in read_pairs(minimmeb_small) if p.dataset in ("DigitSum", "DigitCaption-T2I")][:12]
    run_rationales(pairs, [make_teacher("minimmeb")], 3, tmp_path / "r.jsonl", show_progress=False)
    rats = load_rationales(tmp_path / "r.jsonl")
    cfg = dict(sampled_negatives=4, queries_per_batch=6, margin=0.0)
    select(e, pairs, rats, tmp_path / "a.jsonl", SelectionConfig(reuse_prompt=True, **cfg), show_progress=False)
    select(e, pairs, rats, tmp_path / "b.jsonl", SelectionConfig(reuse_prompt=False, **cfg), show_progress=False)
    a, b = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
    assert [r["pair_id"] for r in a] == [r["pair_id"] for r in b] and len(a) == 12
    for ra, rb in zip(a, b):
        assert ra["s_direct"] == pytest.approx(rb["s_direct"], abs=1e-3)
        for ca, cb in zip(ra["candidates"], rb["candidates"]):
            assert ca["delta"] == pytest.approx(cb["delta"], abs=1e-3)
            # the probability gain is the same comparison on the other scale
            assert ca["gain"] == pytest.approx(math.exp(ra["s_direct"] + ca["delta"]) - math.exp(ra["s_direct"]), abs=1e-6)
        best = max(ra["candidates"], key=lambda c: c["delta"])
        assert ra["label"] == ("reason" if best["delta"] > 0 else "direct")
        assert ra["rationale"] == (best["text"] if ra["label"] == "reason" else None)
    # resumable: a rerun scores nothing new
    assert select(e, pairs, rats, tmp_path / "a.jsonl", SelectionConfig(**cfg), show_progress=False)["pairs"] == 0
    labelled = labelled_pairs(pairs, tmp_path / "a.jsonl")
    assert [p.label for p in labelled] == [r["label"] for r in a]
    assert all((p.query.rationale is None) == (p.label == "direct") for p in labelled)
    shares = kept_shares(tmp_path / "a.jsonl")
    assert set(shares) <= {"easy", "compositional"}
    assert all(0.0 <= v <= 1.0 for kind in shares.values() for v in kind.values())
    json.dumps(shares)


def test_the_margin_applies_to_the_configured_utility():
    """A rationale that lifts the positive from p = 0.01 to 0.03 gains 1.1 nats but 0.02 in probability;
    one that lifts it from 0.7 to 1.0 gains 0.36 nats but 0.3: each scale keeps one and drops the other."""
    from mmemb.method.selection import kept_counts, utility

    tail = {"delta": math.log(3), "gain": 0.02}
    top = {"delta": math.log(1 / 0.7), "gain": 0.3}
    rows = [{"utility": u, "margin": m, "candidates": [tail, top]} for u, m in (("logprob", 0.5), ("prob", 0.1))]
    assert utility({"margin": 0.5}, tail) == tail["delta"]  # rows written before the field: delta
    kept = kept_counts(rows, lambda r, c: (r["utility"], c is top))
    assert kept == {("logprob", False): [1, 1], ("logprob", True): [0, 1], ("prob", False): [0, 1], ("prob", True): [1, 1]}
    with pytest.raises(ValueError, match="utility"):
        select(None, [], {}, "unused.jsonl", SelectionConfig(utility="rank"))
