"""The evaluation runner end to end on a tiny backbone: scores, dedup and the cache, bad items,
kill-and-resume, settings guard, and `mmemb report`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mmemb.data.loaders import rows_task
from mmemb.data.mmeb import TaskInfo
from mmemb.eval import metrics as M
from mmemb.eval.runner import EvalError, evaluate

from .eval_fixtures import write_image, write_minimmeb

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def embedder(embedders):
    return embedders["qwen3_vl"]


class EncodeCounter:
    """Counts the items each ``encode`` call gets, by mode."""

    def __init__(self, embedder, monkeypatch):
        self.calls: list[tuple[str, int]] = []
        original = embedder.encode

        def counting(items, mode="direct", **kw):
            items = list(items)
            self.calls.append((mode, len(items)))
            return original(items, mode=mode, **kw)

        monkeypatch.setattr(embedder, "encode", counting)

    def items(self) -> int:
        return sum(n for _, n in self.calls)


def _comparable(score: dict) -> dict:
    return {k: v for k, v in score.items() if k != "run"}


def test_end_to_end_scores_dedup_and_cache(embedder, tmp_path, monkeypatch):
    root = write_minimmeb(tmp_path / "mini", n_queries=6, n_cands=4)
    counter = EncodeCounter(embedder, monkeypatch)
    opts = dict(mode="direct", data=str(root), cache_dir=str(tmp_path / "cache"), batch_size=4, show_progress=False)
    summary = evaluate(embedder, "minimmeb", tmp_path / "run", **opts)

    # 2 tasks x 6 queries x 4 candidates = 48 references to 6 distinct words shared by both tasks:
    # each is encoded once, the second task takes them all from the cache.
    assert summary["candidates"] == {"references": 48, "unique": 6, "dedup_ratio": 0.125, "encoded": 6,
                                     "from_cache": 6}
    assert counter.items() == 12 + 6
    s1 = json.loads((tmp_path / "run" / "MiniClass" / "score.json").read_text())
    s2 = json.loads((tmp_path / "run" / "MiniCaption" / "score.json").read_text())
    assert (s1["run"]["candidates_encoded"], s2["run"]["candidates_encoded"]) == (6, 0)
    assert s1["num_queries"] == 6 and s1["num_candidates"] == 6 and s1["candidate_refs"] == 24
    assert s1["metric"] == "hit@1" and s1["main"] == s1["metrics"]["hit@1"] and s1["invocation_ratio"] == 0
    assert s1["kind"] == "easy" and summary["by_kind"]["compositional"]["tasks"] == 1

    # Scores match a hand recomputation: the same batches give the same vectors.
    from mmemb.data.loaders import load_task
    from mmemb.data.mmeb import resolve_tasks

    task = load_task(resolve_tasks("MiniClass", data=root)[0], data=root)
    q = embedder.encode(task.queries, mode="direct", batch_size=4).embeddings
    c = embedder.encode(task.candidates, mode="direct", batch_size=4).embeddings
    preds = [json.loads(line) for line in (tmp_path / "run" / "MiniClass" / "predictions.jsonl").open()]
    hits = []
    for i, row in enumerate(preds):
        ids = task.candidate_lists[row["query_id"]]
        scores = c[[int(cid[1:]) for cid in ids]] @ q[i]
        best = int(np.argmax(scores))
        assert row["top"][0] == [ids[best], round(float(scores[best]), 6)]
        assert row["gold"] == {ids[0]: 1.0} and len(row["top"]) == 4
        hits.append(float(best == 0))
    assert s1["main"] == pytest.approx(np.mean(hits))
    assert summary["tasks"]["MiniClass"]["main"] == s1["main"]
    md = (tmp_path / "run" / "summary.md").read_text()
    assert "| MiniClass | image | classification | easy | hit@1 |" in md and "dedup ratio 0.125" in md

    # A second run of the same model (another folder, same cache) re-encodes no candidate.
    counter.calls.clear()
    again = evaluate(embedder, "minimmeb", tmp_path / "run2", **opts)
    assert counter.items() == 12 and again["candidates"]["encoded"] == 0
    assert again["overall"]["main"] == summary["overall"]["main"]
    # A finished folder is read back, not recomputed.
    counter.calls.clear()
    evaluate(embedder, "minimmeb", tmp_path / "run", **opts)
    assert counter.calls == []
    # Other settings are refused in a used folder.
    with pytest.raises(EvalError, match="batch_size differ"):
        evaluate(embedder, "minimmeb", tmp_path / "run", **{**opts, "batch_size": 2})


class FixedGate:
    """A plug-in gate that gives every item the same p(think)."""

    def __init__(self, p: float):
        self.p = p

    def p_think(self, prompts, visuals, backbone):
        return [self.p] * len(prompts)

    def p_think_features(self, features, mask):
        return [self.p] * len(features)


def test_plug_in_gate_decides_in_auto_mode(embedder, tmp_path, monkeypatch):
    root = write_minimmeb(tmp_path / "mini", n_queries=3, n_cands=3)
    opts = dict(data=str(root), cache_dir=str(tmp_path / "cache"), batch_size=4, max_reasoning_tokens=2,
                show_progress=False)
    ratios = {}
    for p in (0.0, 1.0):
        monkeypatch.setattr(embedder, "gate", FixedGate(p))
        ratios[p] = evaluate(embedder, "MiniClass", tmp_path / f"gate{p}", mode="auto", **opts)["overall"]["invocation_ratio"]
    assert ratios == {0.0: 0.0, 1.0: 1.0}
    monkeypatch.setattr(embedder, "gate", None)  # a run made with a gate is not continued without it
    with pytest.raises(EvalError, match="gate differ"):
        evaluate(embedder, "MiniClass", tmp_path / "gate1.0", mode="auto", **opts)


def test_auto_mode_records_reasoning(embedder, tmp_path):
    root = write_minimmeb(tmp_path / "mini", n_queries=4, n_cands=3)
    summary = evaluate(embedder, "MiniCaption", tmp_path / "run", mode="auto", think_threshold=0.0,
                       max_reasoning_tokens=3, data=str(root), cache_dir=str(tmp_path / "cache"),
                       batch_size=4, show_progress=False)
    score = json.loads((tmp_path / "run" / "MiniCaption" / "score.json").read_text())
    assert score["invocation_ratio"] == 1.0 and summary["overall"]["invocation_ratio"] == 1.0
    assert 0 < score["generated_tokens_per_query"] <= 5  # <think> + up to 3 tokens + </think>
    row = json.loads((tmp_path / "run" / "MiniCaption" / "predictions.jsonl").open().readline())
    assert row["reasoned"] is True and isinstance(row["rationale"], str)


def test_bad_items_are_reported_and_count_as_misses(embedder, tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        write_image(root / f"q{i}.png", seed=i)
        write_image(root / f"t{i}.png", seed=10 + i)
    (root / "q1.png").write_bytes(b"not an image")
    (root / "t2.png").write_bytes(b"")
    info = TaskInfo("TinyT2I", "image", "retrieval", "hit@1", "local", "Find the image:", "Represent the given image.")
    rows = [{"qry_text": f"query {i}", "qry_img_path": f"q{i}.png",
             "tgt_text": ["", ""], "tgt_img_path": [f"t{i}.png", f"t{(i + 1) % 3}.png"]} for i in range(3)]
    task = rows_task(info, rows, root)
    evaluate(embedder, [task], tmp_path / "run", mode="direct", cache_dir=str(tmp_path / "cache"), batch_size=2,
             show_progress=False)
    score = json.loads((tmp_path / "run" / "TinyT2I" / "score.json").read_text())
    fails = {(f["side"], f["id"]): f["reason"] for f in score["failures"]["items"]}
    assert score["failures"]["count"] == 2 and set(fails) == {("query", "1"), ("candidate", "c2")}
    assert "q1.png" in fails[("query", "1")] or "corrupt" in fails[("query", "1")]
    assert "empty image file" in fails[("candidate", "c2")]
    preds = {p["query_id"]: p for p in map(json.loads, (tmp_path / "run" / "TinyT2I" / "predictions.jsonl").open())}
    assert preds["1"]["hit@1"] == 0 and preds["1"]["top"] == [] and "failed" in preds["1"]
    # query 2's positive is the unreadable t2.png: it ranks last, so query 2 misses
    assert preds["2"]["top"][-1] == ["c2", None] and preds["2"]["hit@1"] == 0


def test_kill_and_resume_gives_identical_scores(embedder, tiny_path, tmp_path, monkeypatch):
    root = write_minimmeb(tmp_path / "mini", n_queries=10, n_cands=4)
    cmd = [sys.executable, "-m", "mmemb.cli", "eval", "--model", tiny_path, "--tasks", "minimmeb",
           "--data", str(root), "--out", str(tmp_path / "killed"), "--cache", str(tmp_path / "cache_k"),
           "--batch-size", "2", "--mode", "direct"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_chunk = tmp_path / "killed" / "MiniClass" / "queries" / "000000.json"
    deadline = time.time() + 120
    while not first_chunk.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first_chunk.exists(), proc.stderr.read().decode()[-2000:]
    assert not (tmp_path / "killed" / "summary.json").exists()  # it was stopped mid-way
    saved_at = first_chunk.stat().st_mtime_ns

    counter = EncodeCounter(embedder, monkeypatch)
    opts = dict(mode="direct", data=str(root), batch_size=2, show_progress=False)
    evaluate(embedder, "minimmeb", tmp_path / "killed", cache_dir=str(tmp_path / "cache_k"), **opts)
    resumed_items = counter.items()
    evaluate(embedder, "minimmeb", tmp_path / "fresh", cache_dir=str(tmp_path / "cache_f"), **opts)
    fresh_items = counter.items() - resumed_items
    assert fresh_items == 2 * 10 + 6  # every query, each distinct candidate once
    assert resumed_items <= fresh_items - 8  # at least the first chunk of 8 queries was not redone
    assert first_chunk.stat().st_mtime_ns == saved_at
    for t in ("MiniClass", "MiniCaption"):
        a = json.loads((tmp_path / "killed" / t / "score.json").read_text())
        b = json.loads((tmp_path / "fresh" / t / "score.json").read_text())
        assert _comparable(a) == _comparable(b)
        assert (tmp_path / "killed" / t / "predictions.jsonl").read_bytes() == \
            (tmp_path / "fresh" / t / "predictions.jsonl").read_bytes()


def test_report_compares_runs(embedder, tmp_path):
    root = write_minimmeb(tmp_path / "mini", n_queries=3, n_cands=3)
    opts = dict(mode="direct", data=str(root), cache_dir=str(tmp_path / "cache"), batch_size=4, show_progress=False)
    evaluate(embedder, "minimmeb", tmp_path / "a" / "direct", **opts)
    evaluate(embedder, "MiniClass", tmp_path / "b" / "direct", max_reasoning_tokens=2, **opts)
    from typer.testing import CliRunner

    from mmemb.cli import app

    res = CliRunner().invoke(app, ["report", str(tmp_path / "a" / "direct"), str(tmp_path / "b" / "direct"),
                                   "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| task | metric | a/direct | b/direct |" in md
    assert "| MiniCaption | hit@1 |" in md and md.count("| MiniClass |") == 2  # score and invocation tables
    assert "| image/classification |" in md
    from PIL import Image

    for name in ("tasks.png", "meta_tasks.png"):
        with Image.open(tmp_path / "report" / name) as im:
            assert im.format == "PNG" and im.width > 300


def test_metrics_module_is_what_the_runner_reports(embedder, tmp_path):
    """score.json's metrics are the mean of the per-query metrics of predictions.jsonl's rankings."""
    root = write_minimmeb(tmp_path / "mini", n_queries=5, n_cands=4)
    evaluate(embedder, "MiniClass", tmp_path / "run", mode="direct", data=str(root),
             cache_dir=str(tmp_path / "cache"), batch_size=4, show_progress=False)
    score = json.loads((tmp_path / "run" / "MiniClass" / "score.json").read_text())
    per_query = []
    for row in map(json.loads, (tmp_path / "run" / "MiniClass" / "predictions.jsonl").open()):
        ranked = [row["gold"].get(cid, 0.0) for cid, _ in row["top"]]  # all 4 candidates are listed
        per_query.append(M.query_metrics(ranked, row["gold"].values()))
    assert score["metrics"] == pytest.approx(M.mean_metrics(per_query))


def test_global_ranking_video_and_visual_documents(embedder, tmp_path):
    """Global tasks rank the whole pool: a video classification task over its label set and a
    BEIR document task with graded relevance (main metric NDCG@5)."""
    from .eval_fixtures import write_jsonl

    data = tmp_path / "mmeb"
    videos = data / "video-tasks"
    for v in "ab":
        for i in range(4):
            write_image(videos / "frames" / v / f"{i}.jpg", seed=ord(v) + i, size=(16, 16))
    write_jsonl(videos / "UCF101" / "test.jsonl", [{"qry_video": "frames/a", "tgt_text": ["Surfing"]},
                                                   {"qry_video": "frames/b", "tgt_text": ["Rowing"]}])
    write_jsonl(videos / "UCF101" / "corpus.jsonl", [{"text": w} for w in ("Rowing", "Surfing", "Knitting")])
    docs = data / "visdoc-tasks" / "VisRAG_PlotQA"
    for i in range(4):
        write_image(docs / f"p{i}.png", seed=20 + i, size=(24, 32))
    write_jsonl(docs / "queries.jsonl", [{"query-id": "q", "query": "which plot rises?"}])
    write_jsonl(docs / "corpus.jsonl", [{"corpus-id": f"p{i}", "image": f"p{i}.png"} for i in range(4)])
    write_jsonl(docs / "qrels.jsonl", [{"query-id": "q", "corpus-id": "p2", "score": 2},
                                       {"query-id": "q", "corpus-id": "p0", "score": 1}])
    summary = evaluate(embedder, "UCF101,VisRAG_PlotQA", tmp_path / "run", mode="direct", data=str(data),
                       cache_dir=str(tmp_path / "cache"), batch_size=4, show_progress=False)
    assert set(summary["by_modality"]) == {"video", "visdoc"}
    video = json.loads((tmp_path / "run" / "UCF101" / "score.json").read_text())
    assert video["eval_type"] == "global" and video["num_candidates"] == 3
    for row in map(json.loads, (tmp_path / "run" / "UCF101" / "predictions.jsonl").open()):
        assert sorted(cid for cid, _ in row["top"]) == ["c0", "c1", "c2"]  # every label, not a local list
    doc = json.loads((tmp_path / "run" / "VisRAG_PlotQA" / "score.json").read_text())
    assert doc["metric"] == "ndcg@5" and doc["main"] == doc["metrics"]["ndcg@5"]
    row = json.loads((tmp_path / "run" / "VisRAG_PlotQA" / "predictions.jsonl").read_text())
    assert row["gold"] == {"p2": 2.0, "p0": 1.0} and len(row["top"]) == 4
    ranked = [row["gold"].get(cid, 0.0) for cid, _ in row["top"]]
    assert doc["main"] == pytest.approx(M.ndcg_at_k(ranked, [2.0, 1.0], 5))


def test_minimmeb_build_evaluates_end_to_end(embedder, tmp_path):
    """A small real MiniMMEB build (all six tasks, a few test queries each) through `mmemb eval`'s
    code path: every task scored, the easy/compositional split reported, candidates deduplicated."""
    from mmemb.data.minimmeb import BuildConfig, build

    root = build(tmp_path / "minimmeb", BuildConfig(seed=1, train_pairs=12, val_queries=1, test_queries=3))
    summary = evaluate(embedder, "minimmeb", tmp_path / "run", mode="direct", data=str(root),
                       cache_dir=str(tmp_path / "cache"), batch_size=16, show_progress=False)
    assert set(summary["tasks"]) == {"DigitClass", "DigitCaption-I2T", "DigitCaption-T2I", "DigitGround",
                                     "DigitSum", "DigitExpr"}
    assert set(summary["by_kind"]) == {"easy", "compositional"} and summary["by_kind"]["easy"]["tasks"] == 4
    assert all(0.0 <= t["main"] <= 1.0 and t["num_queries"] == 3 for t in summary["tasks"].values())
    cands = summary["candidates"]
    assert cands["unique"] == cands["encoded"] < cands["references"]  # shared candidates encoded once
    row = json.loads((tmp_path / "run" / "DigitSum" / "predictions.jsonl").open().readline())
    assert row["query_id"] == "DigitSum/test/0" and len(row["top"]) == 10


def test_limit_evaluates_the_first_queries_and_only_their_candidates(embedder, tmp_path, monkeypatch):
    root = write_minimmeb(tmp_path / "mini", n_queries=6, n_cands=4)
    opts = dict(mode="direct", data=str(root), batch_size=4, show_progress=False)
    evaluate(embedder, "MiniClass", tmp_path / "full", cache_dir=str(tmp_path / "c1"), **opts)
    counter = EncodeCounter(embedder, monkeypatch)
    summary = evaluate(embedder, "MiniClass", tmp_path / "quick", cache_dir=str(tmp_path / "c2"), limit=2, **opts)
    score = json.loads((tmp_path / "quick" / "MiniClass" / "score.json").read_text())
    assert score["num_queries"] == 2 and score["candidate_refs"] == 2 * 4
    assert counter.items() == 2 + score["num_candidates"] and score["num_candidates"] < 6
    full = [json.loads(line) for line in (tmp_path / "full" / "MiniClass" / "predictions.jsonl").open()]
    quick = [json.loads(line) for line in (tmp_path / "quick" / "MiniClass" / "predictions.jsonl").open()]
    assert [r["query_id"] for r in quick] == [r["query_id"] for r in full[:2]]
    assert [[c for c, _ in r["top"]] for r in quick] == [[c for c, _ in r["top"]] for r in full[:2]]
    assert summary["settings"]["limit"] == 2
    with pytest.raises(EvalError, match="limit differ"):  # a quick look never mixes into a full run
        evaluate(embedder, "MiniClass", tmp_path / "quick", cache_dir=str(tmp_path / "c2"), **opts)
