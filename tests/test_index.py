"""FAISS index: build -> search finds each item first, incremental adds keep ids, IVF / HNSW, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mmemb.cli import app
from mmemb.index.store import IndexConfig, VectorIndex
from mmemb.jobs.encode import read_items
from mmemb.jobs.index import add_to_index, build_index, search

from .conftest import random_image


def write_corpus(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def corpus(tmp_path):
    """40 items: captions, and image items (one image each) with a question."""
    rng = np.random.default_rng(7)
    rows = []
    for i in range(40):
        if i % 4 == 3:
            name = f"img{i}.png"
            random_image(rng, 16, 16 * (1 + i % 3)).save(tmp_path / name)
            rows.append({"id": f"d{i}", "image": name, "text": "What is the sum of the digits?",
                         "meta": {"n": i}})
        else:
            rows.append({"id": f"d{i}", "text": f"{i} {i * 7 % 10} {i % 3} caption {i}",
                         "instruction": "Represent the given caption.", "meta": {"n": i}})
    return write_corpus(tmp_path / "corpus.jsonl", rows)


@pytest.fixture(scope="module")
def embedder(embedders):
    return embedders["qwen3_vl"]


def config(embedder, tiny_path, **kw):
    return IndexConfig(model=tiny_path, dim=embedder.dim, **kw)


def own_vectors(embedder, path):
    return embedder.encode(read_items(path), mode="direct").embeddings


@pytest.mark.parametrize("kind,opts", [("flat", {}), ("ivf", {"nlist": 4, "nprobe": 1}), ("hnsw", {"hnsw_m": 8})])
def test_each_item_finds_itself_first(embedder, tiny_path, corpus, tmp_path, kind, opts):
    report = build_index(embedder, corpus, tmp_path / "idx", config(embedder, tiny_path, kind=kind, **opts))
    assert (report.added, report.total, report.failed) == (40, 40, [])
    index = VectorIndex.load(tmp_path / "idx")
    assert index.config.kind == kind and index.faiss.ntotal == 40
    hits = index.search(own_vectors(embedder, corpus), k=3)
    assert [h[0].id for h in hits] == [f"d{i}" for i in range(40)]
    assert np.allclose([h[0].score for h in hits], 1.0, atol=1e-4)
    assert all(h[0].score >= h[1].score >= h[2].score for h in hits)
    assert not (tmp_path / ".idx.work").exists()  # the resumable encode's work files are gone


def test_ivf_trains_on_the_corpus_and_refuses_too_few_vectors(embedder, tiny_path, corpus, tmp_path):
    build_index(embedder, corpus, tmp_path / "ivf", config(embedder, tiny_path, kind="ivf"))
    assert VectorIndex.load(tmp_path / "ivf").config.nlist == 1  # sqrt(40) lists need 39 vectors each
    with pytest.raises(ValueError, match="needs at least 64 vectors"):
        build_index(embedder, corpus, tmp_path / "bad", config(embedder, tiny_path, kind="ivf", nlist=64))


def test_metadata_and_failed_items(embedder, tiny_path, corpus, tmp_path):
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    rows[5] = {"id": "broken", "image": "no-such.png"}
    path = write_corpus(tmp_path / "with_bad.jsonl", rows)
    report = build_index(embedder, path, tmp_path / "idx", config(embedder, tiny_path))
    assert report.added == 39 and report.failed == [("broken", "image 0: image file not found: "
                                                                f"{tmp_path / 'no-such.png'}")]
    index = VectorIndex.load(tmp_path / "idx")
    assert "broken" not in [r["id"] for r in index.rows]
    img = next(r for r in index.rows if r["id"] == "d3")
    assert img["images"] == [str(tmp_path / "img3.png")] and img["meta"] == {"n": 3}
    assert img["reasoned"] is False and img["rationale"] is None
    cap = next(r for r in index.rows if r["id"] == "d0")
    assert cap["text"] == "0 0 0 caption 0" and cap["instruction"] == "Represent the given caption."


def test_incremental_add_keeps_ids_and_refuses_duplicates(embedder, tiny_path, corpus, tmp_path):
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    first = write_corpus(tmp_path / "first.jsonl", rows[:25])
    more = write_corpus(tmp_path / "more.jsonl", rows[25:])
    build_index(embedder, first, tmp_path / "idx", config(embedder, tiny_path))
    before = list(VectorIndex.load(tmp_path / "idx").rows)
    report = add_to_index(embedder, more, tmp_path / "idx")
    assert (report.added, report.total) == (15, 40)
    index = VectorIndex.load(tmp_path / "idx")
    assert index.rows[:25] == before
    hits = index.search(own_vectors(embedder, corpus), k=1)
    assert [h[0].id for h in hits] == [r["id"] for r in rows]

    again = (tmp_path / "idx" / "items.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"ids already in the index or repeated in the file: 'd25', 'd26'"):
        add_to_index(embedder, more, tmp_path / "idx")
    assert (tmp_path / "idx" / "items.jsonl").read_bytes() == again  # refused before anything was written


def test_search_with_reasoning_returns_the_rationale(embedder, tiny_path, corpus, tmp_path):
    build_index(embedder, corpus, tmp_path / "idx", config(embedder, tiny_path, max_reasoning_tokens=3))
    index = VectorIndex.load(tmp_path / "idx")
    hits, enc = search(index, embedder, ["3 1 0 caption 3"], k=5, mode="reason")
    assert enc.reasoned[0] and enc.rationales[0] is not None and enc.generated_tokens[0] == 3 + 2
    assert len(hits[0]) == 5 and hits[0][0].rank == 1


def test_load_refuses_a_damaged_index(embedder, tiny_path, corpus, tmp_path):
    build_index(embedder, corpus, tmp_path / "idx", config(embedder, tiny_path))
    items = tmp_path / "idx" / "items.jsonl"
    items.write_text("".join(items.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(ValueError, match="39 metadata rows, 40 vectors"):
        VectorIndex.load(tmp_path / "idx")


def test_cli_build_add_search(tiny_path, corpus, tmp_path):
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    first = write_corpus(tmp_path / "first.jsonl", rows[:30])
    more = write_corpus(tmp_path / "more.jsonl", rows[30:])
    runner = CliRunner()
    idx = str(tmp_path / "idx")
    r = runner.invoke(app, ["index", "build", "--model", tiny_path, "--input", str(first), "--out", idx,
                            "--kind", "hnsw", "--max-reasoning-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert "added 30 items" in r.output
    r = runner.invoke(app, ["index", "add", "--index", idx, "--input", str(more)])  # model from the index
    assert r.exit_code == 0 and "added 10 items" in r.output and "(40 in all)" in r.output
    r = runner.invoke(app, ["index", "add", "--index", idx, "--input", str(more)])
    assert r.exit_code == 1 and "error:" in r.output and "'d30'" in r.output

    r = runner.invoke(app, ["search", "--index", idx, "--query", rows[30]["text"], "--instruction",
                            rows[30]["instruction"], "--reasoning", "never", "-k", "3"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].split()[:2] == ["rank", "score"] and len(lines) == 4
    assert lines[1].split() == ["1", "1.0000", "d30", *rows[30]["text"].split()]
    image = str(tmp_path / "img3.png")
    r = runner.invoke(app, ["search", "--index", idx, "--image", image, "--query", rows[3]["text"],
                            "--reasoning", "never", "-k", "1"])
    assert r.output.strip().splitlines()[1].split()[:3] == ["1", "1.0000", "d3"]
    r = runner.invoke(app, ["search", "--index", idx, "--query", "x", "--reasoning", "always", "-k", "1"])
    assert r.exit_code == 0 and r.output.startswith("query rationale: ")


def test_ivfpq_index_streams_batches_and_keeps_its_metadata_on_disk(tmp_path):
    """IVF-PQ built batch by batch from vectors on disk (as `index build` does after encoding): trained
    on a sample drawn across every batch, 16 bytes per vector instead of 128, neighbours still found."""
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((3000, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    for b in range(6):
        np.save(tmp_path / f"part{b}.npy", vecs[b * 500:(b + 1) * 500])
    passes = []

    def batches():
        passes.append(0)
        for b in range(6):
            passes[-1] += 1
            yield np.load(tmp_path / f"part{b}.npy"), [{"id": f"v{b * 500 + i}", "n": b * 500 + i} for i in range(500)]

    index = VectorIndex(IndexConfig(model="m", dim=32, kind="ivfpq", pq_m=16, nlist=16, nprobe=16))
    index.add_batches(batches, 3000)
    assert passes == [6, 6]  # one pass for the training sample, one to add
    assert index.config.pq_m == 16 and index.faiss.code_size == 16 and index.faiss.ntotal == 3000
    index.save(tmp_path / "idx")
    loaded = VectorIndex.load(tmp_path / "idx")
    hits = loaded.search(vecs[:200], k=10)
    exact = np.argsort(-vecs[:200] @ vecs.T, axis=1)[:, :10]
    recall = np.mean([len({h.id for h in hs} & {f"v{j}" for j in ex}) / 10 for hs, ex in zip(hits, exact)])
    assert recall > 0.6 and sum(hs[0].id == f"v{i}" for i, hs in enumerate(hits)) >= 180
    assert hits[7][0].row == {"id": "v7", "n": 7}
    assert loaded.duplicate_ids(["v2999", "new", "new"]) == ["v2999", "new"]
    with pytest.raises(ValueError, match="needs at least 256 vectors to train its codebooks, got 100"):
        VectorIndex(IndexConfig(model="m", dim=32, kind="ivfpq", nlist=2)).add(vecs[:100],
                                                                               [{"id": str(i)} for i in range(100)])
    with pytest.raises(ValueError, match="pq_m \\(5\\) must divide the dimension \\(32\\)"):
        IndexConfig(model="m", dim=32, kind="ivfpq", pq_m=5)


def test_row_store_tells_a_shared_hash_from_a_shared_id(tmp_path, monkeypatch):
    from mmemb.index import rows as rows_module

    monkeypatch.setattr(rows_module, "_hash", lambda item_id: 7)  # every id collides
    store = rows_module.RowStore()
    store.extend([{"id": "a", "x": 1}, {"id": "b"}])
    assert store.duplicate_ids(["c", "a", "d", "d"]) == ["a", "d"]
    store.write(tmp_path / "items.jsonl")
    loaded = rows_module.RowStore(tmp_path / "items.jsonl")
    loaded.extend([{"id": "c"}])
    assert [r["id"] for r in loaded] == ["a", "b", "c"] and loaded[0] == {"id": "a", "x": 1} and loaded[-1]["id"] == "c"
    assert loaded.duplicate_ids(["e", "b"]) == ["b"]


def test_vector_database_example_runs(embedders, tmp_path, monkeypatch):
    """The Qdrant example of docs/scale-out.md, run as written (paths moved into tmp_path)."""
    import re
    from pathlib import Path

    from mmemb.jobs.encode import run_encode

    doc = (Path(__file__).resolve().parents[1] / "docs" / "scale-out.md").read_text()
    code = re.search(r"test_vector_database_example_runs -->\n```python\n(.*?)```", doc, re.S).group(1)
    rng = np.random.default_rng(0)
    random_image(rng).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    corpus = write_corpus(tmp_path / "corpus.jsonl", [
        {"id": "sum", "text": "What is the sum of the digits?"}, {"id": "img", "image": "a.png", "text": "digits"},
        {"id": "broken", "image": "bad.png"}, *({"id": f"c{i}", "text": f"{i} {i * 3} caption"} for i in range(6))])
    run_encode(embedders["qwen3_vl"], corpus, tmp_path / "runs" / "vecs", mode="auto")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mmemb.Embedder.from_pretrained", lambda path: embedders["qwen3_vl"])
    printed = []
    monkeypatch.setattr("builtins.print", lambda *a: printed.append(a))
    namespace = {}
    exec(compile(code, "docs/scale-out.md", "exec"), namespace)
    assert namespace["client"].count("corpus").count == 8  # the broken image has no vector
    (hits,) = printed[0]
    assert hits[0][0] == "sum" and hits[0][1] == pytest.approx(1.0, abs=1e-4) and len(hits) == 5
    namespace["client"].close()
