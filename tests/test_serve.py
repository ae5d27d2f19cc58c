"""The embedding server, end to end over loopback: the official `openai` client, multimodal items,
every limit and refusal, dynamic batching under concurrency, isolation of bad items, shutdown."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import http.server
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from mmemb import Item
from mmemb.items import image_to_data_url
from mmemb.serve import ServeSettings, create_app, serve_in_thread

from .conftest import random_image

MODEL = "tiny"
TEXTS = ["What is the sum of the digits?", "3 7 1", "a much longer caption with several words in it"]


@pytest.fixture(scope="module")
def embedder(embedders):
    return embedders["qwen3_vl"]


@contextlib.contextmanager
def running(embedder, **settings):
    settings.setdefault("max_reasoning_tokens", 4)
    settings.setdefault("model_name", MODEL)
    app = create_app(embedder, ServeSettings(**settings))
    with serve_in_thread(app) as (url, server):
        yield url, app


@pytest.fixture(scope="module")
def server(embedder):
    with running(embedder) as (url, app):
        yield url, app


def client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def post(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/embeddings", json=body, timeout=60, **kw)


def error_message(r: httpx.Response) -> str:
    return r.json()["error"]["message"]


class SlowEmbedder:
    """An embedder whose every model batch takes ``delay`` seconds longer."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay, self.dim = inner, delay, inner.dim

    def encode(self, items, **kw):
        time.sleep(self.delay)
        return self.inner.encode(items, **kw)


# ---- OpenAI compatibility ------------------------------------------------------------------------

def test_openai_client_gets_the_vectors_of_encode(server, embedder):
    url, _ = server
    ref = embedder.encode(TEXTS, mode="direct")
    c = client(url)
    by_default = c.embeddings.create(model=MODEL, input=TEXTS, extra_body={"reasoning": "never"})  # asks for base64
    as_float = c.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float", extra_body={"reasoning": "never"})
    as_b64 = c.embeddings.create(model=MODEL, input=TEXTS, encoding_format="base64", extra_body={"reasoning": "never"})
    np.testing.assert_allclose(vectors(by_default), ref.embeddings, atol=1e-5)
    np.testing.assert_allclose(vectors(as_float), ref.embeddings, atol=1e-5)
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in as_b64.data])
    np.testing.assert_array_equal(decoded, vectors(as_float))
    assert [d.index for d in as_float.data] == [0, 1, 2] and as_float.model == MODEL
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == int(ref.prompt_tokens.sum())
    assert [d.reasoned for d in as_float.data] == [False] * 3
    one = c.embeddings.create(model=MODEL, input=TEXTS[1], extra_body={"reasoning": "never"})
    np.testing.assert_allclose(vectors(one)[0], ref.embeddings[1], atol=1e-5)


def test_reasoning_always_returns_rationales_and_counts_generated_tokens(server, embedder):
    url, _ = server
    ref = embedder.encode(TEXTS[:2], mode="reason", max_reasoning_tokens=4)
    r = post(url, {"input": TEXTS[:2], "reasoning": "always", "model": MODEL})
    assert r.status_code == 200, r.text
    body = r.json()
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], ref.embeddings, atol=1e-5)
    assert [d["reasoned"] for d in body["data"]] == [True, True]
    assert [d["rationale"] for d in body["data"]] == ref.rationales
    usage = body["usage"]
    assert usage["generated_tokens"] == int(ref.generated_tokens.sum()) > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["generated_tokens"]


def test_multimodal_items_round_trip(server, embedder):
    url, _ = server
    rng = np.random.default_rng(3)
    a, b = random_image(rng, 16, 48), random_image(rng, 32, 32)
    inst = "Represent the given image with the following question:"
    frames = [random_image(rng, 32, 32) for _ in range(4)]
    items = [Item(text="What is the sum of the digits?", images=[a], instruction=inst),
             Item(images=[a, b], instruction="Represent the given images."),
             Item(text="3 7 1", instruction="Represent the given caption."),
             Item(text="what happens", video=frames, instruction="Represent the given images.")]
    ref = embedder.encode(items, mode="direct")
    payload = [{"text": "What is the sum of the digits?", "image": image_to_data_url(a), "instruction": inst},
               {"images": [image_to_data_url(a), image_to_data_url(b)]},
               {"text": "3 7 1", "instruction": "Represent the given caption."},
               {"text": "what happens", "video": [image_to_data_url(f) for f in frames]}]
    # The openai client passes multimodal items through unchanged; "instruction" at the request
    # level is the default for items without one.
    r = client(url).embeddings.create(model=MODEL, input=payload, encoding_format="float",
                                      extra_body={"reasoning": "never", "instruction": "Represent the given images."})
    np.testing.assert_allclose(vectors(r), ref.embeddings, atol=1e-5)


def test_models_and_health(server, embedder):
    url, _ = server
    models = client(url).models.list()
    assert [m.id for m in models.data] == [MODEL]
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["dim"] == embedder.dim and health["batches"] >= 0


def test_bad_requests_say_what_is_wrong(server):
    url, _ = server
    cases = [
        ({"input": "x", "model": "other"}, 404, "model 'other' is not served here"),
        ({"input": [], "model": MODEL}, 400, "non-empty list"),
        ({"input": [[1, 2, 3]]}, 400, "input[0]: token-id input is not supported"),
        ({"input": ["ok", ""]}, 400, "input[1]: empty string"),
        ({"input": ["ok", {"txt": "typo"}]}, 400, "input[1]: unknown field(s) ['txt']"),
        ({"input": ["ok", {"instruction": "only"}]}, 400, "input[1]: an item needs a text, an image or a video"),
        ({"input": "x", "reasoning": "sometimes"}, 400, "reasoning"),
        ({"input": "x", "dimensions": 0}, 400, "dimensions must be between 1 and"),
        ({"input": "x", "dimensions": 100_000}, 400, "dimensions must be between 1 and"),
        ({"input": [{"image": "data:image/png;base64,bm90IGFuIGltYWdl"}]}, 400,
         "input[0]: image 0: cannot identify image data"),
    ]
    for body, status, message in cases:
        r = post(url, body)
        assert r.status_code == status, (body, r.text)
        assert message in error_message(r), (body, r.text)
    r = httpx.post(url + "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid request" in error_message(r)


# ---- limits ----------------------------------------------------------------------------------------

def test_limits(embedder):
    big = Image.new("RGB", (40, 40))
    with running(embedder, max_body_bytes=20_000, max_items=3, max_image_pixels=32 * 32) as (url, _):
        r = post(url, {"input": "x" * 30_000})
        assert r.status_code == 413 and "exceeds the limit of 20000 bytes" in error_message(r)
        chunked = httpx.post(url + "/v1/embeddings", content=iter([b'{"input": "', b"x" * 30_000, b'"}']))
        assert chunked.status_code == 413  # no content-length: counted while streaming
        r = post(url, {"input": ["a", "b", "c", "d"]})
        assert r.status_code == 400 and "at most 3 per request" in error_message(r)
        r = post(url, {"input": ["fine", {"text": "too big", "image": image_to_data_url(big)}], "reasoning": "never"})
        assert r.status_code == 400
        assert error_message(r).startswith("input[1]: image 0: image of 40x40 = 1600 pixels exceeds the limit of 1024")
        assert r.json()["error"]["param"] == "input[1]"
        assert post(url, {"input": ["a", "b", "c"], "reasoning": "never"}).status_code == 200


def test_timeout_gives_504_and_the_server_goes_on(embedder):
    with running(SlowEmbedder(embedder, 0.6), request_timeout_s=0.3) as (url, app):
        r = post(url, {"input": "slow", "reasoning": "never"})
        assert r.status_code == 504 and "longer than 0.3s" in error_message(r)
        app.state.settings.request_timeout_s = 30
        assert post(url, {"input": "next", "reasoning": "never"}).status_code == 200


class BrokenEmbedder:
    """A model that fails as a whole (not an item's fault)."""

    dim = 8

    def encode(self, items, **kw):
        raise MemoryError("out of memory")


def test_a_failing_model_answers_500_in_the_openai_format():
    with running(BrokenEmbedder()) as (url, _):
        r = post(url, {"input": "x"})
        assert r.status_code == 500 and error_message(r) == "internal error: MemoryError: out of memory"
        assert httpx.get(url + "/health").json()["status"] == "ok"


def test_busy_server_answers_503(embedder):
    with running(SlowEmbedder(embedder, 0.5), max_queued_items=2, max_wait_ms=0) as (url, _):
        def send(texts, out, k):
            out[k] = post(url, {"input": texts, "reasoning": "never"})

        out = {}
        first = threading.Thread(target=send, args=(["a"], out, 0))
        first.start()
        time.sleep(0.2)  # the first request is in the model now; the next two wait in the queue
        second = threading.Thread(target=send, args=(["b", "c"], out, 1))
        second.start()
        time.sleep(0.1)
        send(["d"], out, 2)
        first.join(), second.join()
        assert out[0].status_code == out[1].status_code == 200
        assert out[2].status_code == 503 and "retry later" in error_message(out[2])


# ---- where images may come from ---------------------------------------------------------------------

@pytest.fixture
def image_tree(tmp_path):
    """root/a.png, root/sub/b.png, outside.png, root/escape.png -> ../outside.png (a symlink)."""
    rng = np.random.default_rng(5)
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    random_image(rng, 16, 32).save(root / "a.png")
    random_image(rng, 16, 16).save(root / "sub" / "b.png")
    random_image(rng, 16, 16).save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "escape.png")
    return root


def test_local_paths_refused_unless_allowed_and_inside_root(server, embedder, image_tree):
    url, _ = server
    r = post(url, {"input": [{"image": str(image_tree / "a.png")}]})
    assert r.status_code == 400 and "local file paths are not allowed" in error_message(r)
    with running(embedder, allow_local_root=str(image_tree)) as (url2, _):
        ok = post(url2, {"input": [{"image": "a.png"}, {"image": str(image_tree / "sub" / "b.png")}],
                         "reasoning": "never"})
        assert ok.status_code == 200, ok.text
        ref = embedder.encode([Item(images=[image_tree / "a.png"]), Item(images=[image_tree / "sub" / "b.png"])],
                              mode="direct")
        np.testing.assert_allclose([d["embedding"] for d in ok.json()["data"]], ref.embeddings, atol=1e-5)
        for outside in ("../outside.png", str(image_tree.parent / "outside.png"), "sub/../../outside.png",
                        "escape.png"):
            r = post(url2, {"input": ["fine", {"image": outside}]})
            assert r.status_code == 400 and "input[1]: path" in error_message(r)
            assert "outside the allowed root" in error_message(r), outside
        r = post(url2, {"input": [{"image": "file:///etc/passwd"}]})
        assert r.status_code == 400 and "unsupported image source" in error_message(r)


@contextlib.contextmanager
def static_files(folder):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_urls_refused_unless_allowed(server, embedder, image_tree):
    url, _ = server
    with static_files(image_tree) as files:
        r = post(url, {"input": [{"image": files + "/a.png"}]})
        assert r.status_code == 400 and "image URLs are not allowed" in error_message(r)
        with running(embedder, allow_urls=True) as (url2, _):  # public addresses only: not this loopback one
            r = post(url2, {"input": ["fine", {"image": files + "/a.png"}], "reasoning": "never"})
            assert r.status_code == 400 and "input[1]: could not fetch" in error_message(r)
            assert "resolves to 127.0.0.1, a loopback address: refused" in error_message(r)
        with running(embedder, allow_urls=True, allow_private_urls=True) as (url2, _):
            ok = post(url2, {"input": [{"image": files + "/a.png"}], "reasoning": "never"})
            assert ok.status_code == 200, ok.text
            ref = embedder.encode([Item(images=[image_tree / "a.png"])], mode="direct")
            np.testing.assert_allclose(ok.json()["data"][0]["embedding"], ref.embeddings[0], atol=1e-5)
            r = post(url2, {"input": ["fine", {"image": files + "/missing.png"}]})
            assert r.status_code == 400 and "input[1]: could not fetch" in error_message(r)
            assert "HTTP status 404" in error_message(r)


def test_api_key(embedder):
    with running(embedder, api_key="s3cret") as (url, _):
        assert post(url, {"input": "x"}).status_code == 401
        r = post(url, {"input": "x"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "API key" in error_message(r)
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").embeddings.create(model=MODEL, input="x")
        ok = client(url, api_key="s3cret").embeddings.create(model=MODEL, input="x", extra_body={"reasoning": "never"})
        assert len(ok.data[0].embedding) == embedder.dim
        assert httpx.get(url + "/health").status_code == 200  # health checks need no key


# ---- batching under concurrency ----------------------------------------------------------------------

async def _concurrent(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        return await asyncio.gather(*(c.post("/v1/embeddings", json=b) for b in bodies))


def test_concurrent_requests_share_model_batches(embedder):
    texts = [f"{i} {i * 7 % 10} {i % 3}" for i in range(50)]
    ref = embedder.encode(texts, mode="direct")
    with running(embedder, max_batch_size=32, max_wait_ms=20) as (url, app):
        responses = asyncio.run(_concurrent(url, [{"input": t, "reasoning": "never"} for t in texts]))
        assert [r.status_code for r in responses] == [200] * 50
        got = np.array([r.json()["data"][0]["embedding"] for r in responses])
        np.testing.assert_allclose(got, ref.embeddings, atol=1e-5)
        stats = httpx.get(url + "/health").json()
        assert stats["requests"] == 50 and stats["items"] == 50
        assert stats["batches"] < 50  # 50 requests, far fewer model batches
        assert stats["queued_items"] == 0


class PoisonedEmbedder:
    """The model fails on items whose text is "poison" (as a model may fail on one item of a batch)."""

    def __init__(self, inner):
        self.inner, self.dim, self.calls = inner, inner.dim, 0

    def encode(self, items, **kw):
        from mmemb.items import ItemError

        self.calls += 1
        res = self.inner.encode(items, **kw)
        for i, item in enumerate(items):
            if item.text == "poison":
                res.ok[i], res.embeddings[i] = False, 0
                res.errors.append(ItemError(i, None, "the model refused it"))
        return res


def test_a_bad_item_fails_only_its_own_request(embedder):
    # The batch leaves when it holds both requests' 5 items, however long the second takes to come.
    model = PoisonedEmbedder(embedder)
    with running(model, max_batch_size=5, max_wait_ms=10_000) as (url, app):
        bad, good = asyncio.run(_concurrent(url, [
            {"input": ["fine", "poison"], "reasoning": "never"},
            {"input": TEXTS, "reasoning": "never"},
        ]))
        assert app.state.batcher.batches == 1  # both requests were in the same model batch
        assert bad.status_code == 400 and error_message(bad) == "input[1]: the model refused it"
        assert good.status_code == 200
        np.testing.assert_allclose([d["embedding"] for d in good.json()["data"]],
                                   embedder.encode(TEXTS, mode="direct").embeddings, atol=1e-5)


def test_an_image_the_processor_refuses_gets_400_before_any_model_work(embedder):
    thin = Image.new("RGB", (600, 2))  # decodes fine, but the processor refuses its aspect ratio
    with running(embedder) as (url, app):
        r = post(url, {"input": ["fine", {"text": "thin", "image": image_to_data_url(thin)}], "reasoning": "never"})
        assert r.status_code == 400 and error_message(r).startswith("input[1]: ")
        assert "aspect ratio" in error_message(r) and app.state.batcher.batches == 0


def test_reasoning_modes_are_batched_separately(embedder):
    with running(embedder, max_wait_ms=300) as (url, app):
        never, always = asyncio.run(_concurrent(url, [{"input": TEXTS[:2], "reasoning": "never"},
                                                      {"input": TEXTS[:2], "reasoning": "always"}]))
        assert app.state.batcher.batches == 2
        assert [d["reasoned"] for d in never.json()["data"]] == [False, False]
        assert [d["reasoned"] for d in always.json()["data"]] == [True, True]
        np.testing.assert_allclose([d["embedding"] for d in always.json()["data"]],
                                   embedder.encode(TEXTS[:2], mode="reason", max_reasoning_tokens=4).embeddings,
                                   atol=1e-5)


# ---- shutdown ----------------------------------------------------------------------------------------

def test_shutdown_lets_in_flight_requests_finish(embedder):
    out = {}
    with running(SlowEmbedder(embedder, 0.8)) as (url, app):
        t = threading.Thread(target=lambda: out.setdefault("r", post(url, {"input": "x", "reasoning": "never"})))
        t.start()
        time.sleep(0.3)  # the request is in the model when shutdown starts
    t.join()
    assert out["r"].status_code == 200 and app.state.batcher.requests == 1


def test_cli_serve_with_api_key_from_env_stops_on_sigterm(tiny_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MMEMB_API_KEY="from-env")
    proc = subprocess.Popen([sys.executable, "-m", "mmemb.cli", "serve", "--model", tiny_path, "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        name = os.path.basename(tiny_path)
        r = client(url, api_key="from-env").embeddings.create(model=name, input="x", extra_body={"reasoning": "never"})
        assert len(r.data) == 1
        assert post(url, {"input": "x"}).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught: the exit says SIGTERM
        assert proc.wait(timeout=60) == -signal.SIGTERM
    assert b"Traceback" not in proc.stdout.read()
