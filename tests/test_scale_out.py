"""Inference on 2 processes (gloo): `encode`, `index build` and `eval` shared between them give the
files one process writes; a killed 2-process evaluation resumes; one progress bar, on rank 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mmemb.cli import app
from mmemb.eval.runner import evaluate
from mmemb.index.store import IndexConfig, VectorIndex
from mmemb.jobs.encode import read_items, run_encode
from mmemb.jobs.index import build_index

from .conftest import random_image
from .dist_helpers import ENV, one_thread
from .dist_infer_check import ENCODE, EVAL, INDEX, INDEX_CHUNK
from .eval_fixtures import write_minimmeb
from .test_index import write_corpus

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_path):
    """The 2-process run of tests/dist_infer_check.py (encode, index, and an evaluation killed on rank 1)."""
    root = tmp_path_factory.mktemp("scale_out")
    rng = np.random.default_rng(3)
    rows = []
    for i in range(30):
        if i % 5 == 0:
            random_image(rng, 16, 32).save(root / f"img{i}.png")
            rows.append({"id": f"d{i}", "image": f"img{i}.png", "text": "What is the sum of the digits?"})
        else:
            rows.append({"id": f"d{i}", "text": f"{i} {i * 7 % 10} caption {i}"})
    items = write_corpus(root / "items.jsonl", rows)
    data = write_minimmeb(root / "mini", n_queries=10, n_cands=4)
    out, logs = root / "two", root / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--redirects", "3", "--log-dir", str(logs), str(HERE / "dist_infer_check.py"), tiny_path, str(items),
           str(out), str(data), str(root / "cache-two"), "2"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    logs_of = {r: "".join(p.read_text() for p in sorted(logs.rglob(f"attempt_0/{r}/*.log"))) for r in (0, 1)}
    return {"root": root, "items": items, "data": data, "out": out, "proc": proc, "logs": logs_of}


def test_encode_on_two_processes_writes_what_one_process_writes(job, embedders, tmp_path):
    assert job["logs"][0] and "encode (auto)" in job["logs"][0], job["proc"].stderr[-3000:]
    with one_thread():
        run_encode(embedders["qwen3_vl"], job["items"], tmp_path / "one", **ENCODE)
    two = job["out"] / "vecs"
    assert (two.with_suffix(".jsonl")).read_text() == (tmp_path / "one.jsonl").read_text()
    np.testing.assert_allclose(np.load(two.with_suffix(".npy")), np.load(tmp_path / "one.npy"), atol=1e-5, rtol=0)
    assert not (job["out"] / "vecs.parts").exists()
    # one global bar, on rank 0 only: it counted rank 1's chunks too
    assert "30/30" in job["logs"][0] and "encode (" not in job["logs"][1]


def test_index_built_on_two_processes_equals_one_process(job, embedders, tiny_path, tmp_path):
    embedder = embedders["qwen3_vl"]
    with one_thread():
        build_index(embedder, job["items"], tmp_path / "one", IndexConfig(model=tiny_path, dim=embedder.dim, **INDEX),
                    chunk_size=INDEX_CHUNK)
    one, two = VectorIndex.load(tmp_path / "one"), VectorIndex.load(job["out"] / "index")
    assert list(two.rows) == list(one.rows) and len(two) == 30
    queries = embedder.encode(read_items(job["items"])).embeddings
    hits_one, hits_two = one.search(queries, k=3), two.search(queries, k=3)
    assert [[h.id for h in q] for q in hits_two] == [[h.id for h in q] for q in hits_one]
    assert np.allclose([[h.score for h in q] for q in hits_two], [[h.score for h in q] for q in hits_one], atol=1e-5)


def test_killed_two_process_eval_resumes_to_the_one_process_result(job, embedders, tiny_path, tmp_path):
    out, cache = job["out"] / "eval", job["root"] / "cache-two"
    assert job["proc"].returncode != 0  # rank 1 died at its 2nd encode call, before the first task's end
    assert (out / "MiniClass" / "queries").is_dir() and not (out / "MiniClass" / "score.json").exists()

    args = ["eval", "--model", tiny_path, "--tasks", "minimmeb", "--data", str(job["data"]), "--out", str(out),
            "--cache", str(cache), "--mode", EVAL["mode"], "--max-reasoning-tokens", str(EVAL["max_reasoning_tokens"]),
            "--batch-size", str(EVAL["batch_size"]), "--num-processes", "2"]
    proc = subprocess.run([sys.executable, "-m", "mmemb.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| MiniClass") == 1  # the summary is printed once, by rank 0

    with one_thread():
        evaluate(embedders["qwen3_vl"], "minimmeb", tmp_path / "one", data=str(job["data"]),
                 cache_dir=str(tmp_path / "cache-one"), show_progress=False, **EVAL)
    for task in ("MiniClass", "MiniCaption"):
        predictions = [(d / task / "predictions.jsonl").read_text() for d in (out, tmp_path / "one")]
        assert predictions[0] == predictions[1]
        two, one = (json.loads((d / task / "score.json").read_text()) for d in (out, tmp_path / "one"))
        assert {k: v for k, v in two.items() if k != "run"} == {k: v for k, v in one.items() if k != "run"}
    # each distinct candidate was encoded once, by one process, across the killed and the resumed run
    shards = [json.loads(p.read_text())["keys"] for p in cache.rglob("shard-*.json")]
    keys = [k for s in shards for k in s]
    assert len(keys) == len(set(keys)) == 6 and len(shards) == 2  # 6 words, in chunks of 4


def test_num_processes_relaunches_the_same_command(monkeypatch, tiny_path, tmp_path):
    launched = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: launched.append(cmd) or 0)
    args = ["index", "build", "--model", tiny_path, "--input", "c.jsonl", "--out", str(tmp_path / "i"),
            "--kind", "ivfpq", "--pq-m", "8", "--num-processes", "3", "--chunk-size", "100"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (cmd,) = launched
    assert cmd[1:5] == ["-m", "accelerate.commands.launch", "--num_processes", "3"]
    tail = cmd[cmd.index("mmemb.cli") + 1:]
    assert tail[:2] == ["index", "build"] and "--num-processes" not in tail
    options = dict(zip(tail[2::2], tail[3::2]))
    assert options["--kind"] == "ivfpq" and options["--pq-m"] == "8" and options["--chunk-size"] == "100"
    assert options["--model"] == tiny_path and options["--nprobe"] == "8"  # defaults are passed on as well
