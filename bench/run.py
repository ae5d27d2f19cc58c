"""One benchmark suite: where the time goes, as ratios measured side by side in one run.

    python bench/run.py [--model RUN/rl/model --benchmark RUN/minimmeb] [--skip-server] [--out bench/results.json]

Absolute times on shared machines are noise; ratios between variants measured together are not.
Without --model the suite uses runs/demo (after `make demo`), else it runs the quick demo first
(about 30 s) for a trained model. Prints one table and writes bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import median_times, mixed_items, tiny_embedder  # noqa: E402

BUDGET = 64  # reasoning tokens, as the demo's evaluation
REPEATS = 7  # interleaved samples per timed variant
MEASURES = ("encode", "decode", "eval", "gradcache", "selection", "flops", "server")

ROWS = [  # key, measure, goal, the function it measures
    ("auto_no_think_over_direct", "auto mode that decides not to think / direct mode, encode time", "<= 1.05",
     "Embedder.encode"),
    ("adaptive_over_direct", "adaptive encode time / direct, MiniMMEB test mix (trained model)", "<= 1.25",
     "Embedder.encode"),
    ("always_over_direct", "always-reason encode time / direct, same mix (beside it)", "<= 1.5", "Embedder.encode"),
    ("compiled_over_eager_decode", "compiled / eager decode-step time, reason mode on the same mix", "<= 0.5",
     "generation.Reasoner.run"),
    ("compiled_over_eager_decode_adaptive", "compiled / eager decode-step time, adaptive mode's reasoning rows",
     "<= 0.5", "generation.Reasoner.run"),
    ("generate_over_reason", "generate(output_hidden_states) baseline / our reason mode, same rationales", ">= 1.5",
     "bench/baselines.py"),
    ("two_pass_over_reason", "two-pass baseline (generate, then re-encode) / our reason mode, same rationales",
     ">= 2.0", "bench/baselines.py"),
    ("generate_over_auto", "generate(output_hidden_states) baseline / our auto mode", "report", "bench/baselines.py"),
    ("two_pass_over_auto", "two-pass baseline / our auto mode", "report", "bench/baselines.py"),
    ("batched_speedup", "batched encode (batch 32) / item by item: speed-up", ">= 5", "Embedder.encode"),
    ("reason_tokens_ratio", "reasoning mode: tokens processed / (prompt + generated + 1)", "== 1",
     "Embedder.encode (generation.Reasoner)"),
    ("eval_encodes_over_unique", "evaluation: candidate encodes / unique candidates", "== 1",
     "eval.runner.evaluate"),
    ("gradcache_over_plain", "GradCache step / plain step, same batch", "<= 1.4", "train.step.TrainStep"),
    ("selection_reuse_over_no_reuse", "counterfactual selection: time with prompt reuse / without", "report",
     "train.selection.select"),
    ("server_over_in_process", "server throughput at 200 concurrent clients / in-process encode", "report",
     "serve (POST /v1/embeddings)"),
    ("encode_flops_over_matmul", "achieved FLOP/s of the direct encode / a plain matmul of the hidden size",
     "report", "Embedder.encode vs torch.mm"),
]


def trained_model(args) -> tuple[str, str]:
    if args.model:
        return args.model, args.benchmark
    demo = Path("runs/demo")
    if (demo / "rl" / "model" / "config.json").is_file():
        return str(demo / "rl" / "model"), str(demo / "minimmeb")
    out = Path(tempfile.mkdtemp(prefix="mmemb-bench-demo-"))
    subprocess.run([sys.executable, "-m", "mmemb.cli", "demo", "--quick", "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return str(out / "rl" / "model"), str(out / "minimmeb")


def test_mix(benchmark: str, per_task: int = 32):
    """Queries of every MiniMMEB task, as evaluation sees them."""
    from mmemb.data.loaders import load_task
    from mmemb.data.mmeb import resolve_tasks

    queries = []
    for info in resolve_tasks("minimmeb", benchmark):
        queries += load_task(info, benchmark, "test").queries[:per_task]
    return queries


def measure_encode(tiny, model: str, benchmark: str, per_task: int = 32, repeats: int = REPEATS) -> dict:
    """Direct, adaptive and always-reason encodes of the test mix beside the two peer baselines (on
    the rationales our reason mode wrote), interleaved; the first reason-mode call (which compiles
    the decoding step) is timed apart."""
    from baselines import generate_baseline, two_pass_baseline
    from encode_ratios import measure as ratios

    from mmemb import Embedder

    out = ratios(tiny, mixed_items(64))
    e = Embedder.from_pretrained(model)
    mix = test_mix(benchmark, per_task)
    last = {}  # each mode's latest result (greedy decoding: every run gives the same)

    def encode(mode: str) -> None:
        last[mode] = e.encode(mix, mode=mode, batch_size=32, max_reasoning_tokens=BUDGET)

    t = time.perf_counter()
    encode("reason")
    first_call = time.perf_counter() - t
    rationales = last["reason"].rationale_token_ids
    systems = {m: (lambda m=m: encode(m)) for m in ("direct", "auto", "reason")}
    systems["generate"] = lambda: last.update(generate=generate_baseline(e, mix, rationales))
    systems["two_pass"] = lambda: last.update(two_pass=two_pass_baseline(e, mix, rationales))
    t = median_times(systems, repeats=repeats)
    auto, reason = last["auto"], last["reason"]
    return {
        "auto_no_think_over_direct": out["auto_no_think_over_direct"],
        "batched_speedup": out["batched_speedup_over_one_by_one"],
        "adaptive_over_direct": t["auto"] / t["direct"],
        "always_over_direct": t["reason"] / t["direct"],
        "generate_over_reason": t["generate"] / t["reason"],
        "two_pass_over_reason": t["two_pass"] / t["reason"],
        "generate_over_auto": t["generate"] / t["auto"],
        "two_pass_over_auto": t["two_pass"] / t["auto"],
        "baselines_max_abs_diff": float(max(np.abs(last[k] - reason.embeddings).max() for k in ("generate", "two_pass"))),
        "adaptive_invocation": float(auto.reasoned.mean()),
        "reason_tokens_ratio": reason.tokens_processed / int((reason.prompt_tokens + reason.generated_tokens + 1).sum()),
        "first_reason_call_seconds": round(first_call, 2),
        "encode_seconds": {k: round(v, 4) for k, v in t.items()},
    }


def measure_decode(model: str, benchmark: str, per_task: int = 32, repeats: int = REPEATS) -> dict:
    """The decoding loop alone, compiled against eager, on the same prefilled rows: the whole test
    mix in reason mode, and the rows adaptive mode reasons on (its decoding pool). Both loops run as
    many steps (the longest rationale + 2), so their time ratio is the per-step ratio."""
    from mmemb import Embedder
    from mmemb.items import load_visuals
    from mmemb.model.generation import Reasoner, SamplingConfig
    from mmemb.model.prefix_cache import prefill
    from mmemb.model.prompts import THINK, render_prompt

    e = Embedder.from_pretrained(model, compile=False)
    bb = e.backbone
    mix = test_mix(benchmark, per_task)
    adaptive = e.encode(mix, mode="auto", max_reasoning_tokens=BUDGET).reasoned
    reasoners = {"compiled": Reasoner(bb, compile=True), "eager": Reasoner(bb, compile=False)}
    sampling = SamplingConfig(max_tokens=BUDGET)
    out = {}
    for pool, items in (("reason", mix), ("adaptive", [it for it, r in zip(mix, adaptive) if r])):
        prompts = [render_prompt(bb.processor, it) + THINK for it in items]
        visuals = [load_visuals(it) for it in items]
        seconds: dict[str, list[float]] = {name: [] for name in reasoners}
        for round_ in range(repeats + 1):  # round 0 warms up (and compiles)
            for name, reasoner in reasoners.items():
                states = [prefill(bb, prompts[i:i + 32], visuals[i:i + 32]) for i in range(0, len(items), 32)]
                t = time.perf_counter()
                result = reasoner.run([s.cache for s in states], [s.mask for s in states],
                                      torch.cat([s.next_pos for s in states]), torch.cat([s.logits for s in states]),
                                      sampling, first_is_logits=True)
                if round_:
                    seconds[name].append(time.perf_counter() - t)
        steps = max(len(r) for r in result.tokens) + 2
        compiled, eager = (statistics.median(seconds[k]) for k in ("compiled", "eager"))
        key = "" if pool == "reason" else "_adaptive"
        out[f"compiled_over_eager_decode{key}"] = compiled / eager
        out[f"decode{key}"] = {"rows": len(items), "steps": steps, "ms_per_step": {
            "compiled": round(1e3 * compiled / steps, 3), "eager": round(1e3 * eager / steps, 3)}}
    return out


def measure_eval(model: str, benchmark: str) -> dict:
    from mmemb import Embedder
    from mmemb.data.loaders import load_task
    from mmemb.data.mmeb import resolve_tasks
    from mmemb.eval.runner import evaluate

    tasks = [load_task(info, benchmark, "test") for info in resolve_tasks("minimmeb", benchmark)]
    unique = {c.content_key() for task in tasks for c in task.candidates}  # counted here, not by the runner
    with tempfile.TemporaryDirectory() as tmp:
        s = evaluate(Embedder.from_pretrained(model), tasks, Path(tmp) / "run", mode="direct",
                     cache_dir=str(Path(tmp) / "cache"), show_progress=False)
    return {"eval_encodes_over_unique": s["candidates"]["encoded"] / len(unique),
            "eval_candidate_references": s["candidates"]["references"], "eval_unique_candidates": len(unique)}


def measure_selection(model: str, benchmark: str) -> dict:
    from mmemb import Embedder
    from mmemb.data.pairs import read_pairs
    from mmemb.method.rationales import load_rationales, run_rationales
    from mmemb.method.selection import SelectionConfig, select
    from mmemb.method.teachers import make_teacher

    pairs = [p for p in read_pairs(benchmark) if p.dataset in ("DigitSum", "DigitCaption-I2T")][:64]
    e = Embedder.from_pretrained(model)
    with tempfile.TemporaryDirectory() as tmp:
        run_rationales(pairs, [make_teacher("minimmeb")], 4, Path(tmp) / "r.jsonl", show_progress=False)
        rats = load_rationales(Path(tmp) / "r.jsonl")
        n = {"k": 0}

        def run(reuse: bool):
            n["k"] += 1
            select(e, pairs, rats, Path(tmp) / f"s{n['k']}.jsonl", SelectionConfig(reuse_prompt=reuse),
                   show_progress=False)

        t = median_times({"reuse": lambda: run(True), "no_reuse": lambda: run(False)}, repeats=3)
    return {"selection_reuse_over_no_reuse": t["reuse"] / t["no_reuse"],
            "selection_seconds": {k: round(v, 3) for k, v in t.items()}}


def measure_flops(e) -> dict:
    """FLOPs of one direct-mode batch counted by torch's FlopCounterMode, over its time, against
    torch.mm at the model's hidden size (the floor: what this machine's matmul reaches)."""
    from torch.utils.flop_counter import FlopCounterMode

    items = mixed_items(64)
    with FlopCounterMode(display=False) as counter:
        e.encode(items, mode="direct", batch_size=64)
    flops = counter.get_total_flops()
    d = e.dim
    a, b = torch.randn(8192, d), torch.randn(d, 4 * d)
    t = median_times({"encode": lambda: e.encode(items, mode="direct", batch_size=64), "mm": lambda: a @ b}, repeats=5)
    encode_rate = flops / t["encode"]
    mm_rate = 2 * 8192 * d * 4 * d / t["mm"]
    return {"encode_flops_over_matmul": encode_rate / mm_rate, "encode_gflops_per_s": encode_rate / 1e9,
            "matmul_gflops_per_s": mm_rate / 1e9, "encode_flops": flops}


def measure_gradcache() -> dict:
    from gradcache import measure

    return measure(batch=64, chunk=32, repeats=5)


def measure_server() -> dict:
    proc = subprocess.run([sys.executable, str(HERE / "load.py"), "--concurrency", "200", "--requests", "1000",
                           "--rounds", "1", "--client", "raw", "--torch-threads", "1"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    m = out["median"]
    return {"server_over_in_process": m["server_over_in_process"], "server_errors": out["errors"],
            "server_requests_per_s": m["requests_per_s"], "server_p50_ms": m["p50_ms"], "server_p99_ms": m["p99_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a trained checkpoint (default: runs/demo/rl/model, else a quick demo's)")
    ap.add_argument("--benchmark", help="its MiniMMEB folder (with --model)")
    ap.add_argument("--skip-server", action="store_true", help="leave out the load test (it starts a server)")
    ap.add_argument("--only", help="comma-separated measures to take (default: all): " + ", ".join(MEASURES))
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own; 1 on a loaded machine, where "
                                                "threads waiting for each other dominate)")
    ap.add_argument("--out", default=str(HERE / "results.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(",")) if args.only else set(MEASURES)
    if args.skip_server:
        only.discard("server")
    torch.manual_seed(0)
    start = time.perf_counter()
    model, benchmark = trained_model(args)
    results: dict = {}
    tiny = tiny_embedder()  # an untrained tiny backbone for the model-independent ratios
    for name, fn in [("encode", lambda: measure_encode(tiny, model, benchmark)),
                     ("decode", lambda: measure_decode(model, benchmark)), ("eval", lambda: measure_eval(model, benchmark)),
                     ("gradcache", measure_gradcache), ("selection", lambda: measure_selection(model, benchmark)),
                     ("flops", lambda: measure_flops(tiny)), ("server", measure_server)]:
        if name not in only:
            continue
        t = time.perf_counter()
        results.update(fn())
        print(f"  {name}: {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    results["meta"] = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} "
                       f"torch threads, {platform.processor() or platform.platform()}", "model": model,
                       "seconds": round(time.perf_counter() - start, 1)}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    lines = ["| measure | value | goal | function |", "|---|---:|---|---|"]
    for key, text, goal, fn in ROWS:
        value = results.get(key)
        lines.append(f"| {text} | {'—' if value is None else f'{value:.3f}'} | {goal} | `{fn}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
