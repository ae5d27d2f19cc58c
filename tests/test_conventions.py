"""The conventions users bring: one default per setting everywhere; sentence-transformers' encode
keywords and `similarity`; a SentenceTransformer-loadable export; an `mteb` model wrapper."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from mmemb import Embedder, Item, defaults

from .conftest import random_image

TEXTS = ["3 7 1", "What is the sum of the digits?", "a"]


@pytest.fixture(scope="module")
def embedder(embedders):
    return embedders["qwen3_vl"]


def _cli_defaults(command: str) -> dict:
    import typer

    from mmemb.cli import app

    group = typer.main.get_command(app)
    cmd = group.commands[command] if " " not in command else group.commands["index"].commands[command.split()[1]]
    return {p.name: p.default for p in cmd.params}


def test_one_default_per_setting_everywhere():
    from mmemb.eval.runner import EvalConfig, evaluate
    from mmemb.index.store import IndexConfig
    from mmemb.items import DEFAULT_MAX_IMAGE_PIXELS
    from mmemb.jobs.encode import read_items, run_encode
    from mmemb.jobs.index import search
    from mmemb.serve import ServeSettings

    enc = inspect.signature(Embedder.encode).parameters
    assert enc["mode"].default == defaults.DEFAULT_MODE == "auto"
    assert enc["on_error"].default == defaults.DEFAULT_ON_ERROR == "skip"
    assert enc["think_threshold"].default == defaults.THINK_THRESHOLD
    assert enc["max_reasoning_tokens"].default == defaults.MAX_REASONING_TOKENS
    assert enc["batch_size"].default == defaults.BATCH_SIZE
    assert inspect.signature(Embedder.from_pretrained).parameters["gate"].default == "auto"
    assert inspect.signature(Embedder.__init__).parameters["max_image_pixels"].default == defaults.MAX_IMAGE_PIXELS
    assert DEFAULT_MAX_IMAGE_PIXELS == defaults.MAX_IMAGE_PIXELS == 4096 * 4096
    # file jobs, index, search, evaluation, server
    assert inspect.signature(run_encode).parameters["on_error"].default == defaults.DEFAULT_ON_ERROR
    assert inspect.signature(read_items).parameters["on_error"].default == defaults.DEFAULT_ON_ERROR
    assert inspect.signature(search).parameters["mode"].default == defaults.DEFAULT_MODE
    assert inspect.signature(evaluate).parameters["mode"].default == defaults.DEFAULT_MODE
    cfg = EvalConfig()
    assert (cfg.mode, cfg.candidate_mode) == (defaults.DEFAULT_MODE, defaults.CORPUS_MODE)
    assert (cfg.think_threshold, cfg.max_reasoning_tokens, cfg.batch_size) == (
        defaults.THINK_THRESHOLD, defaults.MAX_REASONING_TOKENS, defaults.BATCH_SIZE)
    idx = IndexConfig(model="m", dim=8)
    assert (idx.mode, idx.think_threshold, idx.max_reasoning_tokens) == (
        defaults.CORPUS_MODE, defaults.THINK_THRESHOLD, defaults.MAX_REASONING_TOKENS)
    serve = ServeSettings()
    assert (serve.max_image_pixels, serve.think_threshold, serve.max_reasoning_tokens) == (
        defaults.MAX_IMAGE_PIXELS, defaults.THINK_THRESHOLD, defaults.MAX_REASONING_TOKENS)
    # the command line
    for command, mode in (("encode", defaults.DEFAULT_MODE), ("eval", defaults.DEFAULT_MODE),
                          ("index build", defaults.CORPUS_MODE)):
        opts = _cli_defaults(command)
        assert opts["mode"] == mode, command
        assert opts["think_threshold"] == defaults.THINK_THRESHOLD, command
        assert opts["max_reasoning_tokens"] == defaults.MAX_REASONING_TOKENS, command
        assert opts["batch_size"] == defaults.BATCH_SIZE, command
        assert opts["max_image_pixels"] == defaults.MAX_IMAGE_PIXELS, command
    assert _cli_defaults("eval")["candidate_mode"] == defaults.CORPUS_MODE
    assert _cli_defaults("encode")["on_error"] == defaults.DEFAULT_ON_ERROR
    assert _cli_defaults("search")["reasoning"] == "auto"  # = DEFAULT_MODE, in the server's words
    opts = _cli_defaults("serve")
    assert (opts["max_image_pixels"], opts["think_threshold"], opts["max_reasoning_tokens"]) == (
        defaults.MAX_IMAGE_PIXELS, defaults.THINK_THRESHOLD, defaults.MAX_REASONING_TOKENS)
    from mmemb.serve.app import EmbeddingRequest

    assert EmbeddingRequest.model_fields["reasoning"].default == "auto"


def test_encode_speaks_sentence_transformers(embedder):
    ref = embedder.encode(TEXTS, mode="direct")
    arr = embedder.encode(TEXTS, mode="direct", convert_to_numpy=True, batch_size=2, show_progress_bar=False)
    assert isinstance(arr, np.ndarray) and arr.shape == (3, embedder.dim)
    np.testing.assert_allclose(arr, ref.embeddings, atol=1e-6)
    one = embedder.encode(TEXTS[0], mode="direct", convert_to_numpy=True)
    assert one.shape == (embedder.dim,)  # a single string gives a single vector
    tensor = embedder.encode(TEXTS, mode="direct", convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and torch.allclose(tensor, torch.from_numpy(ref.embeddings), atol=1e-6)
    raw = embedder.encode(TEXTS, mode="direct", normalize_embeddings=False, convert_to_numpy=True)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1, atol=1e-3)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), ref.embeddings, atol=1e-5)
    # prompt / instruction: the task instruction of items that bring none
    inst = "Represent the given caption."
    with_prompt = embedder.encode(TEXTS, mode="direct", prompt=inst, convert_to_numpy=True)
    explicit = embedder.encode([Item(text=t, instruction=inst) for t in TEXTS], mode="direct", convert_to_numpy=True)
    np.testing.assert_allclose(with_prompt, explicit, atol=1e-6)
    assert not np.allclose(with_prompt, ref.embeddings, atol=1e-3)
    np.testing.assert_allclose(embedder.encode(TEXTS, mode="direct", instruction=inst, convert_to_numpy=True),
                               explicit, atol=1e-6)
    own = Item(text="1 2", instruction="Represent the given image.")
    np.testing.assert_allclose(embedder.encode([own], mode="direct", prompt=inst).embeddings,
                               embedder.encode([own], mode="direct").embeddings, atol=1e-6)
    with pytest.raises(ValueError, match="alias"):
        embedder.encode(TEXTS, prompt="a", instruction="b")


def test_similarity_and_the_query_and_document_sides(embedder):
    q = embedder.encode_query(TEXTS[:2], max_reasoning_tokens=3)
    d = embedder.encode_document(TEXTS)
    np.testing.assert_allclose(d.embeddings, embedder.encode(TEXTS, mode="direct").embeddings, atol=1e-6)
    np.testing.assert_allclose(q.embeddings, embedder.encode(TEXTS[:2], mode="auto", max_reasoning_tokens=3).embeddings,
                               atol=1e-6)
    sim = embedder.similarity(q, d.embeddings)
    assert isinstance(sim, torch.Tensor) and sim.shape == (2, 3)
    torch.testing.assert_close(sim, torch.from_numpy(q.embeddings @ d.embeddings.T), atol=1e-5, rtol=0)
    assert embedder.similarity(d.embeddings[0], torch.from_numpy(d.embeddings)).shape == (1, 3)
    assert embedder.similarity(d.embeddings[0] * 3, d.embeddings[:1]).item() == pytest.approx(1.0, abs=1e-6)


def test_sentence_transformers_export_gives_the_direct_embeddings(tiny_path, embedder, tmp_path):
    from sentence_transformers import SentenceTransformer
    from typer.testing import CliRunner

    from mmemb.cli import app

    r = CliRunner().invoke(app, ["export-st", "--model", tiny_path, "--out", str(tmp_path / "st")])
    assert r.exit_code == 0, r.output
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    rng = np.random.default_rng(0)
    a, b = random_image(rng, 16, 48), random_image(rng, 32, 32)
    inst = "Represent the given caption."
    cases = [
        (st.encode(TEXTS), embedder.encode(TEXTS, mode="direct")),  # a batch of different lengths
        (st.encode([a, b]), embedder.encode([Item(images=[a]), Item(images=[b])], mode="direct")),
        (st.encode([{"image": a, "text": "What is the sum?"}]),
         embedder.encode([Item(images=[a], text="What is the sum?")], mode="direct")),
        (st.encode(TEXTS, prompt=inst), embedder.encode(TEXTS, mode="direct", instruction=inst)),
    ]
    for got, want in cases:
        np.testing.assert_allclose(got, want.embeddings, atol=1e-5)


def test_mteb_wrapper_on_an_offline_image_task(embedder):
    import mteb

    from mmemb.eval.mteb_model import mteb_model

    from .mteb_task import DigitsToNames

    task = DigitsToNames()
    model = mteb_model(embedder, max_reasoning_tokens=3)
    calls = []
    original = embedder.encode

    def spy(items, **kw):
        calls.append((kw["mode"], items[0].instruction, bool(items[0].images)))
        return original(items, **kw)

    embedder.encode = spy
    try:
        result = mteb.evaluate(model, tasks=[task], cache=None, show_progress_bar=False)
    finally:
        del embedder.encode
    assert not result.exceptions
    assert calls == [("auto", DigitsToNames.QUERY, True), ("direct", DigitsToNames.DOCUMENT, False)]
    # the score MTEB reports is the nDCG@10 of mmemb's own vectors, ranked by cosine similarity
    queries, corpus, relevant = task.rows()
    q = embedder.encode([Item(images=[im], instruction=DigitsToNames.QUERY) for im in queries], mode="auto",
                        max_reasoning_tokens=3).embeddings
    d = embedder.encode([Item(text=t, instruction=DigitsToNames.DOCUMENT) for t in corpus], mode="direct").embeddings
    scores = q @ d.T
    ranks = [int((scores[i] > scores[i, relevant[i]]).sum()) for i in range(len(queries))]
    ndcg = np.mean([1 / np.log2(r + 2) for r in ranks])  # one relevant document, 10 in the corpus
    assert result.task_results[0].scores["test"][0]["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-4)
