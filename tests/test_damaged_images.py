"""Damaged images of every kind fail their own item with an ImageError that names the item and the
file, on every path: load_image, Embedder.encode (skip and raise), `mmemb encode`, `mmemb index
build`, evaluation and the server. The corpus: tests/damaged_images.py (fuzzed PNG/JPEG/WebP/GIF)."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from mmemb import Item
from mmemb.items import ImageError, ItemError, RankingTask, load_image

from .conftest import random_image
from .damaged_images import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(every damaged file, the ones that do not decode), sorted by name."""
    paths = write_corpus(tmp_path_factory.mktemp("damaged"))
    broken = []
    for p in paths:
        try:
            load_image(p)
        except ImageError:
            broken.append(p)
    return paths, broken


@pytest.fixture(scope="module")
def embedder(embedders):
    return embedders["qwen3_vl"]


def test_every_damaged_file_decodes_or_fails_with_an_image_error_naming_it(corpus):
    paths, broken = corpus
    kinds = {p.name.split("-")[0] for p in broken}
    assert kinds == {"png", "jpeg", "webp", "gif"} and len(broken) >= 80  # damage of every format
    for p in paths:
        data = p.read_bytes()
        sources = [p, data, "data:image/png;base64," + base64.b64encode(data).decode()]
        try:
            sources.append(Image.open(p))  # opened lazily: the damage may show at decode time only
        except Exception:
            pass
        for src in sources:
            try:
                img = load_image(src)
                assert img.mode == "RGB" and img.width * img.height > 0
            except ImageError as e:
                if src is p:
                    assert str(p) in str(e), e
                assert p in broken or isinstance(src, Image.Image), (p, e)


def test_encode_fails_each_damaged_item_alone(embedder, corpus):
    _, broken = corpus
    rng = np.random.default_rng(0)
    good = [Item(text="3 7 1", id="text"), Item(images=[random_image(rng)], text="a digit", id="image")]
    items = good[:1] + [Item(images=[p], text="which digits?", id=p.stem) for p in broken] + good[1:]
    out = embedder.encode(items, mode="direct", on_error="skip")
    assert out.ok.tolist() == [True] + [False] * len(broken) + [True]
    np.testing.assert_allclose(out.embeddings[[0, -1]], embedder.encode(good, mode="direct").embeddings, atol=1e-5)
    errors = sorted(out.errors, key=lambda e: e.index)
    for e, p in zip(errors, broken):
        assert str(e).startswith(f"item {e.index} (id '{p.stem}'): image 0: ") and str(p) in str(e)
    with pytest.raises(ItemError, match=rf"item 1 \(id '{broken[0].stem}'\): image 0: .*{broken[0].name}"):
        embedder.encode(items, mode="direct", on_error="raise")


def test_damaged_images_fail_alone_in_cli_encode_and_index_build(tiny_path, corpus, tmp_path):
    from typer.testing import CliRunner

    from mmemb.cli import app

    _, broken = corpus
    rows = [{"id": "good", "text": "3 7 1"}] + [{"id": p.stem, "image": str(p)} for p in broken]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = CliRunner().invoke(app, ["encode", "--model", tiny_path, "--input", str(path), "--output",
                                 str(tmp_path / "vecs"), "--mode", "direct"])
    assert r.exit_code == 0, r.output
    assert f"{len(rows)} items, {len(broken)} failed" in r.stdout
    results = [json.loads(line) for line in (tmp_path / "vecs.jsonl").read_text().splitlines()]
    assert [x["ok"] for x in results] == [True] + [False] * len(broken)
    for x, p in zip(results[1:], broken):
        assert x["id"] == p.stem and x["error"].startswith("image 0: ") and str(p) in x["error"]

    r = CliRunner().invoke(app, ["index", "build", "--model", tiny_path, "--input", str(path),
                                 "--out", str(tmp_path / "index")])
    assert r.exit_code == 0, r.output
    assert "added 1 items" in r.stdout and f"{len(broken)} failed" in r.stdout
    assert f"failed {broken[0].stem}: image 0: " in r.stderr and str(broken[0]) in r.stderr


def test_damaged_images_are_listed_misses_in_evaluation(embedder, corpus, tmp_path):
    from mmemb.eval.runner import evaluate

    _, broken = corpus
    rng = np.random.default_rng(1)
    bad_q, bad_c = broken[:3], broken[3:5]
    queries = [Item(images=[p], id=f"q{i}") for i, p in enumerate(bad_q)]
    queries += [Item(images=[random_image(rng)], id=f"q{i}") for i in range(3, 6)]
    candidates = [Item(text=f"{i} {i}", id=f"c{i}") for i in range(6)] + [Item(images=[p], id=f"b{k}")
                                                                          for k, p in enumerate(bad_c)]
    lists = {q.id: [f"c{i}", "b0", "b1"] for i, q in enumerate(queries)}
    task = RankingTask("Damaged", queries, candidates, {q.id: {f"c{i}": 1.0} for i, q in enumerate(queries)},
                       candidate_lists=lists)
    summary = evaluate(embedder, [task], tmp_path / "run", mode="direct", cache_dir=str(tmp_path / "cache"),
                       show_progress=False)
    score = json.loads((tmp_path / "run" / "Damaged" / "score.json").read_text())
    failures = {(f["side"], f["id"]): f["reason"] for f in score["failures"]["items"]}
    assert set(failures) == {("query", "q0"), ("query", "q1"), ("query", "q2"), ("candidate", "b0"),
                             ("candidate", "b1")}
    for (side, item_id), reason in failures.items():
        p = (bad_q + bad_c)[int(item_id[1:]) + (3 if side == "candidate" else 0)]
        assert reason.startswith("image 0: ") and str(p) in reason
    assert summary["tasks"]["Damaged"]["main"] is not None and score["num_queries"] == 6


def test_server_answers_400_naming_the_input_for_each_damaged_image(embedder, corpus):
    from mmemb.serve import ServeSettings, create_app, serve_in_thread

    _, broken = corpus
    app = create_app(embedder, ServeSettings(model_name="tiny"))
    with serve_in_thread(app) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        for p in broken:
            image = "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()
            r = client.post("/v1/embeddings", json={"input": ["fine", {"image": image}], "reasoning": "never"})
            assert r.status_code == 400, (p.name, r.text)
            err = r.json()["error"]
            assert err["param"] == "input[1]" and err["message"].startswith("input[1]: image 0: "), (p.name, err)
        r = client.post("/v1/embeddings", json={"input": ["fine"], "reasoning": "never"})
        assert r.status_code == 200  # the server is still up and serving
