"""Teachers that generate: the OpenAI-compatible endpoint (against a server the test starts) and
a local checkpoint."""

from __future__ import annotations

import pytest

from mmemb.data.pairs import read_pairs
from mmemb.fileio import read_jsonl
from mmemb.method.rationales import run_rationales
from mmemb.method.teachers import EndpointTeacher, LocalTeacher, make_teacher

from .chat_server import BackgroundServer, make_app


def test_endpoint_teacher_against_a_local_server(tiny_path, minimmeb_small, tmp_path, monkeypatch):
    pairs = [p for p in read_pairs(minimmeb_small) if p.dataset == "DigitSum"][:4]
    monkeypatch.setenv("MMEMB_TEACHER_API_KEY", "sekrit")
    app = make_app(tiny_path, fail_first=2, api_key="sekrit")
    with BackgroundServer(app) as base:
        teacher = make_teacher(f"openai:{base}#tiny?concurrency=2&timeout=30&retries=3&max_tokens=6")
        assert isinstance(teacher, EndpointTeacher) and teacher.id == "openai:tiny"
        out = tmp_path / "r.jsonl"
        run_rationales(pairs, [teacher], 2, out, show_progress=False)
        rows = read_jsonl(out)
        assert len(rows) == 8 and {r["teacher"] for r in rows} == {"openai:tiny"}
        assert all(isinstance(r["text"], str) and r["tokens"] >= 0 for r in rows)
        assert app.state.requests == 4 + 2  # two 503s were retried
        # without the key the server refuses, and the teacher says which endpoint failed
        monkeypatch.delenv("MMEMB_TEACHER_API_KEY")
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        with pytest.raises(RuntimeError, match="teacher endpoint .* failed"):
            make_teacher(f"openai:{base}#tiny?retries=0").generate(pairs[:1], 1)


def test_local_teacher_generates_k_per_query(tiny_path, minimmeb_small):
    pairs = [p for p in read_pairs(minimmeb_small) if p.dataset == "DigitCaption-I2T"][:3]
    teacher = LocalTeacher(tiny_path, temperature=1.0, max_tokens=5, batch_size=2)
    out = teacher.generate(pairs, 2)
    assert [len(c) for c in out] == [2, 2, 2]
    assert all(1 <= c.tokens <= 5 for cands in out for c in cands)
