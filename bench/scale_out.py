"""Scale-out, measured in one run: 2 CPU processes against 1 (one torch thread each), and index memory.

    python bench/scale_out.py                      # both parts; writes bench/scale_out.json
    python bench/scale_out.py --only throughput    # or: --only memory

throughput  `mmemb encode` and `mmemb eval` items/s with 2 processes / with 1 (goal >= 1.6 on 2 cores),
            rounds interleaved (1, 2, 1, 2, ...), median of the per-round ratios; every round checks
            that the 2-process files equal the 1-process files (vectors within 1e-5, rows and
            predictions identical, score.json identical but for its timings). Each job is timed from
            the processes' common start (after start-up and model loading, which are constant costs)
            to the merged files. The processes are the ones torchrun starts, as under
            `mmemb encode --num-processes 2`.
memory      peak resident memory of building an index from 1 M random 128-d vectors kept on disk in
            10 shards (as `mmemb index build` streams its encoded chunks): IVF-PQ (16 bytes a
            vector) against flat float32, each in a fresh process; recall@10 of IVF-PQ against
            exact search on 100 queries near corpus vectors (random vectors are PQ's hard case: no
            structure to exploit, so recall here is a floor).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent / "src"))
ENCODE = dict(mode="auto", max_reasoning_tokens=16, batch_size=16, chunk_size=32)
EVAL = dict(mode="auto", max_reasoning_tokens=16, batch_size=8)  # saved chunks of 32 items
N_ITEMS, N_VECTORS, DIM, SHARDS = 768, 1_000_000, 128, 10


# ---- throughput ---------------------------------------------------------------------------------
def worker(job: str, work: Path, out: Path) -> None:
    """One process of a timed job (run as it is, or under torchrun): rank 0 writes OUT/timing.json."""
    import torch

    from mmemb import Embedder
    from mmemb.eval.runner import evaluate
    from mmemb.jobs.encode import run_encode
    from mmemb.parallel import processes

    torch.set_num_threads(1)
    procs = processes()
    embedder = Embedder.from_pretrained(str(work / "backbone"))
    procs.wait()
    start = time.perf_counter()
    if job == "encode":
        run_encode(embedder, work / "items.jsonl", out / "vecs", **ENCODE)
        items = N_ITEMS
    else:
        summary = evaluate(embedder, "minimmeb", out / "eval", data=str(work / "minimmeb"),
                           cache_dir=str(out / "cache"), show_progress=False, **EVAL)
        items = sum(s["num_queries"] for s in summary["tasks"].values()) + summary["candidates"]["unique"]
    seconds = time.perf_counter() - start
    if procs.is_main:
        (out / "timing.json").write_text(json.dumps({"seconds": seconds, "items": items, "processes": procs.count}))


def run_job(job: str, work: Path, out: Path, processes: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", job, str(work), str(out)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *cmd[1:]]
    subprocess.run(cmd, env=ENV, check=True, capture_output=True)
    return json.loads((out / "timing.json").read_text())


def same_results(job: str, one: Path, two: Path) -> bool:
    if job == "encode":
        return ((one / "vecs.jsonl").read_text() == (two / "vecs.jsonl").read_text()
                and np.allclose(np.load(one / "vecs.npy"), np.load(two / "vecs.npy"), atol=1e-5, rtol=0))
    for task in sorted(p.name for p in (one / "eval").iterdir() if p.is_dir()):
        a, b = (json.loads((d / "eval" / task / "score.json").read_text()) for d in (one, two))
        a.pop("run"), b.pop("run")
        if a != b or ((one / "eval" / task / "predictions.jsonl").read_text()
                      != (two / "eval" / task / "predictions.jsonl").read_text()):
            return False
    return True


def prepare(work: Path) -> None:
    from common import mixed_items

    from mmemb.data.minimmeb import BuildConfig, build, tokenizer_corpus
    from mmemb.model.tiny import build_tiny_backbone

    build_tiny_backbone("qwen3_vl", work / "backbone", corpus=tokenizer_corpus(), seed=0)
    build(work / "minimmeb", BuildConfig(seed=0, train_pairs=60, val_queries=1, test_queries=48))
    (work / "images").mkdir()
    with open(work / "items.jsonl", "w") as f:
        for i, item in enumerate(mixed_items(N_ITEMS)):
            row = {"id": f"i{i}", "text": item.text, "instruction": item.instruction}
            if item.images:
                item.images[0].save(work / "images" / f"{i}.png")
                row["image"] = f"images/{i}.png"
            f.write(json.dumps(row) + "\n")


def throughput(rounds: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="mmemb-scale-out-"))
    try:
        prepare(work)
        samples = {job: [] for job in ("encode", "eval")}
        for r in range(rounds):
            for job in samples:
                one, two = (run_job(job, work, _fresh(work / f"{job}-{r}-{n}"), n) for n in (1, 2))
                samples[job].append({"one": one, "two": two,
                                     "same": same_results(job, work / f"{job}-{r}-1", work / f"{job}-{r}-2")})
                shutil.rmtree(work / f"{job}-{r}-1"), shutil.rmtree(work / f"{job}-{r}-2")
        return {job: {
            "ratio_two_over_one": statistics.median(s["one"]["seconds"] / s["two"]["seconds"] for s in runs),
            "ratio_each_round": [round(s["one"]["seconds"] / s["two"]["seconds"], 3) for s in runs],
            "items_per_s_one": statistics.median(s["one"]["items"] / s["one"]["seconds"] for s in runs),
            "items_per_s_two": statistics.median(s["two"]["items"] / s["two"]["seconds"] for s in runs),
            "items": runs[0]["one"]["items"], "rounds": len(runs),
            "identical_every_round": all(s["same"] for s in runs)} for job, runs in samples.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


# ---- index memory -------------------------------------------------------------------------------
def memory_worker(kind: str, shards: Path, out: Path) -> None:
    """Build one index from the shards in this (fresh) process; print its memory and time as JSON."""
    import faiss  # noqa: F401  (imported before the baseline is read)

    from mmemb.index.store import IndexConfig, VectorIndex

    baseline = _status_mb("VmRSS")
    paths = sorted(shards.glob("*.npy"))

    def batches():
        first = 0
        for p in paths:
            vectors = np.load(p)
            yield vectors, [{"id": f"v{first + i}"} for i in range(len(vectors))]
            first += len(vectors)

    start = time.perf_counter()
    index = VectorIndex(IndexConfig(model="random", dim=DIM, kind=kind))
    index.add_batches(batches, N_VECTORS)
    index.save(out)
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")  # not ru_maxrss: after exec it also holds the parent's peak
    print(json.dumps({"kind": kind, "peak_mb": peak, "baseline_mb": baseline, "build_mb": peak - baseline,
                      "seconds": seconds, "index_file_mb": (out / "index.faiss").stat().st_size / 2**20,
                      "nlist": index.config.nlist, "pq_m": index.config.pq_m}))


def index_memory() -> dict:
    from mmemb.index.store import VectorIndex

    work = Path(tempfile.mkdtemp(prefix="mmemb-index-memory-"))
    try:
        rng = np.random.default_rng(0)
        for s in range(SHARDS):
            v = rng.standard_normal((N_VECTORS // SHARDS, DIM)).astype(np.float32)
            np.save(work / f"shard-{s:02d}.npy", v / np.linalg.norm(v, axis=1, keepdims=True))
        result = {}
        for kind in ("flat", "ivfpq"):
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "memory-worker", kind, str(work),
                                   str(work / f"index-{kind}")], env=ENV, check=True, capture_output=True, text=True)
            result[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        # queries near corpus vectors (cosine ~0.95 to their source), their exact neighbours by brute force
        queries = np.load(work / "shard-00.npy")[:100] + 0.03 * rng.standard_normal((100, DIM)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        exact = _exact_top10(queries, sorted(work.glob("shard-*.npy")))
        index = VectorIndex.load(work / "index-ivfpq")
        for nprobe in (8, 64):
            index.config.nprobe = nprobe
            found = [[int(h.id[1:]) for h in hs] for hs in index.search(queries, k=10)]
            result["ivfpq"][f"nprobe_{nprobe}"] = {  # 1-recall@10: the nearest neighbour among the 10 found
                "1_recall_at_10": float(np.mean([ex[0] in f for f, ex in zip(found, exact)])),
                "10_recall_at_10": float(np.mean([len(set(f) & set(ex.tolist())) / 10 for f, ex in zip(found, exact)]))}
        result["ivfpq_over_flat_build_mb"] = result["ivfpq"]["build_mb"] / result["flat"]["build_mb"]
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _exact_top10(queries: np.ndarray, shards: list[Path]) -> np.ndarray:
    scores = np.concatenate([queries @ np.load(p).T for p in shards], axis=1)
    return np.argsort(-scores, axis=1)[:, :10]


def _status_mb(field: str) -> float:
    """This process's resident memory (VmRSS: now; VmHWM: its peak), in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        return worker(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    if sys.argv[1:2] == ["memory-worker"]:
        return memory_worker(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["throughput", "memory"])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds for the throughput ratios")
    parser.add_argument("--out", default=str(HERE / "scale_out.json"))
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M")
    result = {"command": "python bench/scale_out.py" + (f" --only {args.only}" if args.only else ""),
              "date": started, "cpu_cores": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    if args.only in (None, "throughput"):
        result["throughput"] = throughput(args.rounds)
    if args.only in (None, "memory"):
        result["index_memory"] = index_memory()
    result["load_average_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\nrerun on a quiet machine: {result['command']}")


if __name__ == "__main__":
    main()
