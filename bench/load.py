"""Load test of ``mmemb serve`` on loopback, against ``Embedder.encode`` on the same items in-process.

    python bench/load.py [--concurrency 200] [--requests 1000] [--reasoning never] [--rounds 3]
                         [--client httpx|raw] [--torch-threads N]
    python bench/load.py --mixed [--long-tokens 4000] [--long-clients 2] [--long-gap-ms 200] [--concurrency 16]
                         [--requests 200]

Starts the server (a subprocess, as in deployment) on a tiny backbone and sends ``--requests``
one-item requests (half image + question, half caption) from ``--concurrency`` concurrent
clients, each on its own keep-alive connection. Prints requests/s, p50/p99 latency, errors and
the server's model batches, the in-process ``Embedder.encode`` throughput on the same items (batch
size = the server's) and the ratio. Each round measures both side by side (the machine drifts);
the medians over the rounds come first. Goal: 0 errors at 200 concurrent clients.

The tiny backbone costs ~1-2 ms per item, about what a Python HTTP stack costs per request, so
the ratio here is a lower bound: with a real backbone the per-request cost is small beside the
model's. ``--client raw`` (a minimal asyncio client) leaves more of a small machine's CPU to the
server than httpx; ``--torch-threads`` sets torch's CPU threads alike in both (on a busy machine
they change throughput several-fold).

``--mixed``: long inputs beside short ones. ``--long-clients`` clients send one-item requests of
``--long-tokens`` tokens, each after a random pause (mean ``--long-gap-ms``), while ``--concurrency`` clients send the short requests; each
round measures the short requests alone, then with the long traffic, side by side. Prints the
short requests' p50/p99 both ways (and their ratio), the long requests served, every error, whether
an input over the server's token limit was refused with 400, and whether the server is still up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mixed_items, tiny_embedder  # noqa: E402


def payload(item) -> dict:
    from mmemb.items import image_to_data_url

    row = {"text": item.text, "instruction": item.instruction}
    if item.images:
        row["image"] = image_to_data_url(item.images[0])
    return {k: v for k, v in row.items() if v is not None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_batch_size: int, max_wait_ms: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmemb.cli", "serve", "--model", model, "--port", str(port), "--log-level", "warning",
         "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms), "--request-timeout", "300",
         "--served-model-name", "bench"])
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


async def load(url: str, bodies: list[dict], concurrency: int, client: str = "httpx") -> dict:
    """Send ``bodies`` from ``concurrency`` clients, each on its own keep-alive connection."""
    latencies, errors = [], []
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    connect = _httpx_connection if client == "httpx" else _raw_connection

    async def client_loop(post) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            t = time.perf_counter()
            try:
                status, text = await post("/v1/embeddings", json.dumps(body).encode())
                if status != 200:
                    errors.append(f"{status}: {text[:200]}")
            except (httpx.HTTPError, OSError, asyncio.IncompleteReadError) as e:
                errors.append(f"{type(e).__name__}: {e}")
            latencies.append(time.perf_counter() - t)

    async with contextlib.AsyncExitStack() as stack:
        # Clients are set up before the clock starts (an httpx client costs ~10 ms of CPU to create).
        posts = [await stack.enter_async_context(connect(url)) for _ in range(concurrency)]
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(post) for post in posts))
        seconds = time.perf_counter() - start
    return {"requests": len(bodies), "seconds": seconds, "requests_per_s": len(bodies) / seconds,
            **percentiles(latencies), "errors": len(errors), "first_errors": errors[:3]}


def percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


async def mixed_load(url: str, shorts: list[dict], long_body: dict, concurrency: int, long_clients: int,
                     client: str, gap_s: float = 0.2, seed: int = 0) -> tuple[dict, dict]:
    """The short requests from ``concurrency`` clients while ``long_clients`` clients send long ones
    (from before the first short request to after the last), each after a random pause (exponential,
    mean ``gap_s``): long requests arrive at any moment, not in step with the batches."""
    connect = _httpx_connection if client == "httpx" else _raw_connection
    stop, latencies, errors = asyncio.Event(), [], []
    rng = random.Random(seed)

    async def long_loop(post) -> None:
        while not stop.is_set():
            await asyncio.sleep(rng.expovariate(1 / gap_s))
            t = time.perf_counter()
            status, text = await post("/v1/embeddings", json.dumps(long_body).encode())
            latencies.append(time.perf_counter() - t)
            if status != 200:
                errors.append(f"{status}: {text[:200]}")

    async with contextlib.AsyncExitStack() as stack:
        posts = [await stack.enter_async_context(connect(url)) for _ in range(long_clients)]
        tasks = [asyncio.create_task(long_loop(post)) for post in posts]
        await asyncio.sleep(0.5)  # the long traffic is under way
        short = await load(url, shorts, concurrency, client)
        stop.set()
        await asyncio.gather(*tasks)
    return short, {"long_requests": len(latencies), **({f"long_{k}": v for k, v in percentiles(latencies).items()}
                                                        if latencies else {}),
                   "long_errors": len(errors), "first_long_errors": errors[:3]}


def long_text(embedder, tokens: int) -> str:
    """A text of about ``tokens`` tokens as the server counts them (its rendered prompt included)."""
    from mmemb import Item
    from mmemb.model.token_count import count_tokens

    words = " ".join(str(d) for d in range(10)) + " "
    text = words * max(1, tokens // 10)
    while count_tokens(embedder.backbone, [Item(text=text)])[0] > tokens:
        text = text[: int(len(text) * 0.95)]
    return text


def run_mixed(args, embedder, url: str, bodies: list[dict]) -> dict:
    import httpx as client_lib

    long_body = {"input": [long_text(embedder, args.long_tokens)], "reasoning": args.reasoning}
    context = client_lib.get(url + "/v1/models", trust_env=False).json()["data"][0]["max_model_len"]
    over = client_lib.post(url + "/v1/embeddings", json={"input": ["1 " * (2 * context)]}, timeout=300,
                           trust_env=False)
    rounds = []
    for _ in range(args.rounds):  # alone, then beside long traffic, side by side (the machine drifts)
        alone = asyncio.run(load(url, bodies, args.concurrency, args.client))
        beside, long_stats = asyncio.run(mixed_load(url, bodies, long_body, args.concurrency, args.long_clients,
                                                    args.client, args.long_gap_ms / 1000, seed=len(rounds)))
        rounds.append({"short_alone": alone, "short_with_long": beside, **long_stats,
                       "p99_with_over_without": beside["p99_ms"] / alone["p99_ms"]})
    health = client_lib.get(url + "/health", trust_env=False)
    return {
        "long_tokens": args.long_tokens, "long_clients": args.long_clients, "long_gap_ms": args.long_gap_ms,
        "short_concurrency": args.concurrency,
        "short_requests_per_round": len(bodies), "max_input_tokens": context,
        "over_limit_refused_400": over.status_code == 400,
        "errors": sum(r["short_alone"]["errors"] + r["short_with_long"]["errors"] + r["long_errors"] for r in rounds),
        "server_up": health.status_code == 200 and health.json()["status"] == "ok",
        "median": {
            "short_p50_ms_alone": statistics.median(r["short_alone"]["p50_ms"] for r in rounds),
            "short_p99_ms_alone": statistics.median(r["short_alone"]["p99_ms"] for r in rounds),
            "short_p50_ms_with_long": statistics.median(r["short_with_long"]["p50_ms"] for r in rounds),
            "short_p99_ms_with_long": statistics.median(r["short_with_long"]["p99_ms"] for r in rounds),
            "p99_with_over_without": statistics.median(r["p99_with_over_without"] for r in rounds),
            "long_p50_ms": statistics.median(r.get("long_p50_ms", float("nan")) for r in rounds),
        },
        "rounds": rounds,
    }


@contextlib.asynccontextmanager
async def _httpx_connection(url: str):
    # One httpx client per simulated client: a single pool of hundreds of connections costs httpx
    # far more CPU than the server spends (encode/httpx#3215).
    async with httpx.AsyncClient(base_url=url, timeout=300, trust_env=False) as c:
        async def post(path: str, body: bytes) -> tuple[int, str]:
            r = await c.post(path, content=body, headers={"content-type": "application/json"})
            return r.status_code, r.text
        yield post


@contextlib.asynccontextmanager
async def _raw_connection(url: str):
    """A minimal HTTP/1.1 keep-alive client on asyncio streams (a load generator like wrk): on a
    small machine shared by client and server, httpx's own CPU cost caps what can be measured."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        async def post(path: str, body: bytes) -> tuple[int, str]:
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
            text = (await reader.readexactly(int(headers["content-length"]))).decode()
            return int(head[0].split()[1]), text
        yield post
    finally:
        writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--reasoning", default="never", choices=["never", "auto", "always"])
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="tiny", choices=["tiny", "small"],
                    help="backbone size: small costs more per item, as real backbones do (far more)")
    ap.add_argument("--client", default="httpx", choices=["httpx", "raw"],
                    help="httpx, or a minimal asyncio HTTP/1.1 client that costs the shared CPU less")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch CPU threads, in-process and in the server (OMP_NUM_THREADS); default: torch's")
    ap.add_argument("--mixed", action="store_true", help="short requests alone and beside long ones (see above)")
    ap.add_argument("--long-tokens", type=int, default=4000, help="--mixed: tokens of each long input")
    ap.add_argument("--long-clients", type=int, default=2, help="--mixed: clients sending long inputs")
    ap.add_argument("--long-gap-ms", type=float, default=200, help="--mixed: mean pause before each long request")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # here and in the server (inherited)

    import torch

    from mmemb.model.embedder import REASONING_MODES

    torch.manual_seed(0)
    if args.torch_threads:  # the same in both: on a busy machine, CPU threads change throughput several-fold
        torch.set_num_threads(args.torch_threads)
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
    folder = tempfile.mkdtemp(prefix="mmemb-load-")
    embedder = tiny_embedder(folder=folder, size=args.size)
    model = embedder.backbone.source
    items = mixed_items(args.requests, seed=0)
    bodies = [{"input": [payload(item)], "reasoning": args.reasoning} for item in items]

    mode = REASONING_MODES[args.reasoning]

    def encode_throughput() -> float:
        t = time.perf_counter()
        embedder.encode(items, mode=mode, batch_size=args.max_batch_size)
        return len(items) / (time.perf_counter() - t)

    embedder.encode(items[:args.max_batch_size], mode=mode)  # warm-up
    port = free_port()
    proc = start_server(model, port, args.max_batch_size, args.max_wait_ms)
    url = f"http://127.0.0.1:{port}"
    rounds = []
    try:
        asyncio.run(load(url, bodies[:args.max_batch_size], min(args.concurrency, args.max_batch_size),
                         args.client))  # warm-up
        if args.mixed:
            print(json.dumps({"client": args.client, "backbone": args.size, "reasoning": args.reasoning,
                              "torch_threads": torch.get_num_threads(),
                              **run_mixed(args, embedder, url, bodies)}, indent=2))
            return
        # Rounds of (in-process encode, server load), side by side: the shared machine drifts.
        for _ in range(args.rounds):
            in_process = encode_throughput()
            start = httpx.get(url + "/health", trust_env=False).json()
            served = asyncio.run(load(url, bodies, args.concurrency, args.client))
            end = httpx.get(url + "/health", trust_env=False).json()
            batches = end["batches"] - start["batches"]
            served.update(model_batches=batches, mean_batch_items=(end["items"] - start["items"]) / max(batches, 1),
                          in_process_items_per_s=in_process,
                          server_over_in_process=served["requests_per_s"] / in_process)
            rounds.append(served)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        shutil.rmtree(folder, ignore_errors=True)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    print(json.dumps({
        "client": args.client, "backbone": args.size, "concurrency": args.concurrency,
        "requests_per_round": args.requests, "reasoning": args.reasoning, "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms, "torch_threads": torch.get_num_threads(),
        "errors": sum(r["errors"] for r in rounds),
        "median": {k: median(k) for k in ("requests_per_s", "p50_ms", "p99_ms", "mean_batch_items",
                                          "in_process_items_per_s", "server_over_in_process")},
        "rounds": rounds,
    }, indent=2))


if __name__ == "__main__":
    main()
