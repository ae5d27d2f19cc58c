"""Load test of ``mmemb serve`` on loopback, against ``Embedder.encode`` on the same items in-process.

    python bench/load.py [--concurrency 200] [--requests 1000] [--reasoning never] [--rounds 3]
                         [--client httpx|raw] [--torch-threads N]

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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
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
         "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms), "--request-timeout", "300"])
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
    latencies.sort()
    return {"requests": len(bodies), "seconds": seconds, "requests_per_s": len(bodies) / seconds,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "errors": len(errors), "first_errors": errors[:3]}


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
