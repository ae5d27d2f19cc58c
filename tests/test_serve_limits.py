"""The server under long inputs and hostile sources: the input token limit, timeouts that drop
abandoned work, length-aware batching, Matryoshka `dimensions`, the names it answers to, and the
URL fetcher's refusal of private addresses (every resolved address, every redirect)."""

from __future__ import annotations

import asyncio
import http.server
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from mmemb import Item
from mmemb.serve import inputs as serve_inputs
from mmemb.serve.batcher import DynamicBatcher

from .test_serve import error_message, post, running, static_files

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def embedder(embedders):
    return embedders["qwen3_vl"]


class Recording:
    """Counts the items the model is given; ``delay`` seconds per item."""

    def __init__(self, inner, delay: float = 0.0):
        self.inner, self.dim, self.delay = inner, inner.dim, delay
        self.backbone = inner.backbone  # so that the server can count tokens
        self.batches: list[list[str]] = []

    def encode(self, items, **kw):
        self.batches.append([it.text for it in items])
        time.sleep(self.delay * len(items))
        return self.inner.encode(items, **kw)


def test_inputs_over_the_token_limit_get_400_before_any_model_work(embedder):
    context = embedder.backbone.config.text_config.max_position_embeddings
    model = Recording(embedder)
    with running(model) as (url, app):  # default limit: the model's context length
        assert app.state.settings.max_input_tokens == context
        assert httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"] == context
        r = post(url, {"input": ["3 7 1", "1 " * context], "reasoning": "never"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert re.match(rf"input\[1\]: \d+ tokens exceed this server's limit of {context} tokens", error_message(r))
        assert model.batches == []
    with running(model, max_input_tokens=40) as (url, _):
        assert post(url, {"input": ["1 2 3"], "reasoning": "never"}).status_code == 200
        r = post(url, {"input": ["1 2 3", "1 2 3 " * 20], "reasoning": "never"})
        assert r.status_code == 400 and "limit of 40 tokens" in error_message(r)
        assert model.batches == [["1 2 3"]]


def test_a_timed_out_request_drops_its_queued_work(embedder):
    model = Recording(embedder, delay=0.1)  # 0.1 s per item: 12 items are 1.2 s of work
    with running(model, max_batch_size=2, max_wait_ms=0, request_timeout_s=0.35) as (url, app):
        r = post(url, {"input": [f"{i} 1" for i in range(12)], "reasoning": "never"})
        assert r.status_code == 504
        app.state.settings.request_timeout_s = 30
        assert post(url, {"input": "next", "reasoning": "never"}).status_code == 200
        time.sleep(0.3)
        encoded = sum(len(b) for b in model.batches if b != ["next"])
        assert encoded <= 6, model.batches  # the batch in flight finished; the rest was dropped
        assert app.state.batcher.queued_items == 0


class CostlyEmbedder:
    """Records each batch's token lengths; a batch costs its padded tokens."""

    dim = 4

    def __init__(self):
        self.batches: list[list[int]] = []

    def encode(self, items, **kw):
        from mmemb.model.embedder import Encoded

        lengths = [len(it.text) for it in items]
        self.batches.append(lengths)
        time.sleep(1e-5 * len(items) * max(lengths))
        n = len(items)
        return Encoded(np.ones((n, 4), np.float32), np.zeros(n, bool), [None] * n, [None] * n,
                       np.zeros(n, np.float32), np.array(lengths), np.zeros(n, np.int64), np.ones(n, bool))


def test_long_items_share_neither_batches_nor_turns_with_short_ones():
    async def scenario():
        model = CostlyEmbedder()
        batcher = DynamicBatcher(model, max_batch_size=8, max_wait_ms=0, max_batch_tokens=3000)
        await batcher.start()
        long = [Item(text="L" * 1000) for _ in range(9)]
        short = [Item(text="s" * 20) for _ in range(5)]
        done: list[str] = []

        async def send(name, items):
            await batcher.submit(items, [len(it.text) for it in items], mode="direct")
            done.append(name)

        first = asyncio.create_task(send("long", long))
        await asyncio.sleep(0)  # the long request is queued first
        await asyncio.gather(first, send("short", short))
        await batcher.close()
        return model.batches, done

    batches, done = asyncio.run(scenario())
    assert done == ["short", "long"]
    assert batches[:3] == [[1000] * 3, [20] * 5, [1000] * 3]  # a turn each; no short item padded to 1000
    assert all(len(b) * max(b) <= 3000 for b in batches) and sum(map(len, batches)) == 14


def test_dimensions_truncate_and_renormalise(embedder):
    ref = embedder.encode(["3 7 1", "2 2"], mode="direct", truncate_dim=16)
    full = embedder.encode(["3 7 1", "2 2"], mode="direct")
    assert ref.embeddings.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(ref.embeddings, axis=1), 1, atol=1e-6)
    expected = full.embeddings[:, :16] / np.linalg.norm(full.embeddings[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(ref.embeddings, expected, atol=1e-6)
    with running(embedder) as (url, _):
        r = post(url, {"input": ["3 7 1", "2 2"], "reasoning": "never", "dimensions": 16})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], ref.embeddings, atol=1e-5)
        same = post(url, {"input": ["3 7 1"], "reasoning": "never", "dimensions": embedder.dim})
        np.testing.assert_allclose(same.json()["data"][0]["embedding"], full.embeddings[0], atol=1e-5)


def test_the_readme_curl_example_is_answered(embedder, tmp_path, monkeypatch):
    from mmemb.cli import served_model_names

    text = README.read_text()
    model = re.search(r"mmemb serve --model (\S+)", text).group(1)
    body = re.search(r"curl -s localhost:8000/v1/embeddings .*?-d '(\{.*?\})'", text, re.S).group(1)
    names = served_model_names(model, [])
    with running(embedder, model_name=names[0], aliases=names[1:]) as (url, _):
        r = httpx.post(url + "/v1/embeddings", content=body, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 200, r.text
    # A folder of any name answers to the --model value as typed, its absolute path and its folder name.
    folder = tmp_path / "checkpoint-7"
    names = served_model_names(str(folder), [])
    assert names == ["checkpoint-7", str(folder)]
    with running(embedder, model_name=names[0], aliases=names[1:]) as (url, _):
        for name in [*names, None]:
            assert post(url, {"input": "x", "model": name, "reasoning": "never"}).status_code == 200
        r = post(url, {"input": "x", "model": "model"})
        assert r.status_code == 404 and "serves 'checkpoint-7'" in error_message(r)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    assert served_model_names("m", ["a", "b"]) == ["a", "b", "m", str((tmp_path / "m").resolve())]


def test_address_kinds():
    kind = serve_inputs.address_kind
    for address, expected in [("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
                              ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
                              ("fc00::1", "private"), ("169.254.169.254", "link-local"),
                              ("fe80::1%eth0", "link-local"), ("100.64.0.1", "non-public"),
                              ("0.0.0.0", "private"), ("224.0.0.1", "multicast"),
                              ("8.8.8.8", None), ("2606:4700::1111", None)]:
        assert kind(address) == expected, address


def test_url_guard_checks_every_resolved_address_and_every_redirect(embedder, tmp_path, monkeypatch):
    """Here 127.0.0.1 stands in for a public address and 127.0.0.2 for a private one."""
    from .conftest import random_image

    random_image(np.random.default_rng(0)).save(tmp_path / "a.png")
    monkeypatch.setattr(serve_inputs, "address_kind", lambda a: None if a == "127.0.0.1" else "private")
    names = {"public.test": ["127.0.0.1"], "mixed.test": ["127.0.0.1", "127.0.0.2"], "internal.test": ["127.0.0.2"]}

    async def resolve(host, port):
        return names[host]

    monkeypatch.setattr(serve_inputs, "resolve_host", resolve)
    with static_files(tmp_path) as files, redirector() as hops, running(embedder, allow_urls=True) as (url, _):
        port = files.rsplit(":", 1)[1]
        ok = post(url, {"input": [{"image": f"http://public.test:{port}/a.png"}], "reasoning": "never"})
        assert ok.status_code == 200, ok.text
        for source, refused in [(f"http://mixed.test:{port}/a.png", "mixed.test resolves to 127.0.0.2"),
                                (f"http://internal.test:{port}/a.png", "internal.test resolves to 127.0.0.2"),
                                (f"{hops}/to/http://internal.test:{port}/a.png", "internal.test resolves to 127.0.0.2")]:
            source = source.replace("127.0.0.1", "public.test")
            r = post(url, {"input": ["fine", {"image": source}]})
            assert r.status_code == 400 and refused in error_message(r), (source, r.text)
            assert "a private address: refused" in error_message(r)


class _Redirect(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", self.path.removeprefix("/to/"))
        self.end_headers()

    def log_message(self, *args):
        pass


class redirector:
    """A server whose /to/URL answers with a redirect to URL."""

    def __enter__(self):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
