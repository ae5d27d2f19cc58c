"""The GPU measurements of bench/gpu.sh, on the Qwen3-VL-4B shape with random weights.

    python bench/gpu.py [--smoke] [--out bench/gpu-results.json] [--deadline 470]

Sections, each written to the JSON as soon as it is measured (a run cut short keeps what it has):

  setup      the backbone `mmemb init-backbone --size 4b` builds, loaded in bf16 with sdpa
  matmul     the measured bf16 matmul rate (the utilisation's denominator)
  direct     encode tokens/s and FLOP utilisation (FlopCounterMode's FLOPs / time / matmul rate) at
             batch 32 and 128
  adaptive   adaptive / direct and always / direct at 50 % invocation (the threshold is the median
             p(<think>)), beside the generate(output_hidden_states) and two-pass baselines on our
             rationales; the first reasoning call (compile + CUDA-graph capture) timed apart
  train      one LoRA + GradCache training step at per-device batch 128 (configs/qwen3-vl-4b-train.yaml)
  vllm       reason-mode encode with engine="vllm" against engine="hf", where vLLM is installed

Peak GPU memory is recorded per section. --smoke runs every section on a tiny backbone on the CPU
in well under a minute (the test suite does), so the first GPU run needs no change. Sections that
would not finish before --deadline seconds are skipped and listed as such.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from baselines import generate_baseline, two_pass_baseline  # noqa: E402

FULL = dict(size="4b", device="cuda", dtype="bfloat16", items=256, side=448, batches=(32, 128), budget=32,
            train_batch=128, chunk=32, repeats=3)
SMOKE = dict(size="tiny", device="cpu", dtype="float32", items=8, side=32, batches=(4, 8), budget=4,
             train_batch=8, chunk=4, repeats=1)
NEEDS = {"matmul": 5, "direct": 60, "adaptive": 150, "train": 90, "vllm": 120}  # seconds a section may take


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny backbone on the CPU: checks the script, not a GPU")
    ap.add_argument("--out", default=str(HERE / "gpu-results.json"))
    ap.add_argument("--deadline", type=float, default=470.0, help="seconds; later sections are skipped past it")
    args = ap.parse_args()
    run(SMOKE if args.smoke else FULL, Path(args.out), args.deadline)


def run(cfg: dict, out: Path, deadline: float) -> dict:
    start = time.perf_counter()
    results: dict = {"config": cfg, "skipped": []}
    device = torch.device(cfg["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --smoke to check the script on the CPU")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="mmemb-gpu-") as tmp:
        embedder, results["setup"] = section(device, lambda: setup(cfg, Path(tmp)))
        items = synthetic_items(cfg["items"], cfg["side"])
        steps = [("matmul", lambda: matmul_rate(embedder, device)),
                 ("direct", lambda: direct(embedder, items, cfg, device, results["matmul"]["tflops"])),
                 ("adaptive", lambda: adaptive(embedder, items, cfg, device)),
                 ("train", lambda: train_step(cfg, Path(tmp), embedder.backbone.source, device)),
                 ("vllm", lambda: vllm_path(embedder, items, cfg, device))]
        for name, fn in steps:
            if time.perf_counter() - start + NEEDS[name] > deadline:
                results["skipped"].append(name)
                continue
            _, results[name] = section(device, fn)
            results["seconds"] = round(time.perf_counter() - start, 1)
            out.write_text(json.dumps(results, indent=2) + "\n")
    results["seconds"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


def section(device, fn):
    """Run one section; its result dict gains the section's seconds and peak GPU memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    result = fn()
    value, info = result if isinstance(result, tuple) else (None, result)
    info["section_seconds"] = round(time.perf_counter() - t, 1)
    if device.type == "cuda":
        info["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    return value, info


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fns: dict, device, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run A B C A B C ... after one warm-up round."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def synthetic_items(n: int, side: int):
    """Image + question queries (a side x side image: ~(side/32)^2 visual tokens on Qwen3-VL) and
    short text queries, alternating."""
    from PIL import Image

    from mmemb import Item

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if i % 2 == 0:
            img = Image.fromarray((rng.random((side, side, 3)) * 255).astype("uint8"))
            out.append(Item(images=[img], text="What is shown, and what would match it?",
                            instruction="Represent the given image with the following question:"))
        else:
            out.append(Item(text=" ".join(str(d) for d in rng.integers(0, 10, 12)),
                            instruction="Represent the given caption."))
    return out


def setup(cfg: dict, tmp: Path):
    from mmemb import Embedder
    from mmemb.data.minimmeb import tokenizer_corpus
    from mmemb.model.tiny import build_tiny_backbone

    t = time.perf_counter()
    folder = build_tiny_backbone("qwen3_vl", tmp / "backbone", corpus=tokenizer_corpus(), size=cfg["size"])
    built = time.perf_counter() - t
    embedder = Embedder.from_pretrained(str(folder), device=cfg["device"], dtype=cfg["dtype"],
                                        attn_implementation="sdpa")
    params = sum(p.numel() for p in embedder.backbone.parameters())
    return embedder, {"build_seconds": round(built, 1), "load_seconds": round(time.perf_counter() - t - built, 1),
                      "parameters_b": round(params / 1e9, 3), "device": torch.cuda.get_device_name()
                      if cfg["device"] == "cuda" else "cpu"}


def matmul_rate(embedder, device) -> dict:
    d = embedder.dim
    a = torch.randn(8192, d, device=device, dtype=embedder.backbone.dtype)
    b = torch.randn(d, 4 * d, device=device, dtype=embedder.backbone.dtype)
    t = interleaved({"mm": lambda: a @ b}, device, 5)["mm"]
    return {"tflops": 2 * 8192 * d * 4 * d / t / 1e12, "shape": [8192, d, 4 * d]}


def direct(embedder, items, cfg, device, matmul_tflops: float) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for bs in cfg["batches"]:
        with FlopCounterMode(display=False) as counter:
            res = embedder.encode(items, mode="direct", batch_size=bs)
        t = interleaved({"encode": lambda bs=bs: embedder.encode(items, mode="direct", batch_size=bs)}, device,
                        cfg["repeats"])["encode"]
        flops = counter.get_total_flops()
        out[f"batch_{bs}"] = {"seconds": round(t, 4), "tokens_per_s": round(res.tokens_processed / t, 1),
                              "tflops": round(flops / t / 1e12, 3),
                              "utilisation": round(flops / t / 1e12 / matmul_tflops, 3)}
    return out


def adaptive(embedder, items, cfg, device) -> dict:
    budget, bs = cfg["budget"], cfg["batches"][0]
    p = embedder.encode(items, mode="direct", batch_size=bs).p_think
    threshold = float(np.sort(p)[len(p) // 2])  # half the items at or above it
    t = time.perf_counter()
    last = {"reason": embedder.encode(items, mode="reason", batch_size=bs, max_reasoning_tokens=budget)}
    first_call = time.perf_counter() - t
    rationales = last["reason"].rationale_token_ids

    def encode(mode):
        last[mode] = embedder.encode(items, mode=mode, batch_size=bs, max_reasoning_tokens=budget,
                                     think_threshold=threshold)

    t = interleaved({"direct": lambda: encode("direct"), "auto": lambda: encode("auto"),
                     "reason": lambda: encode("reason"),
                     "generate": lambda: last.update(generate=generate_baseline(embedder, items, rationales, bs)),
                     "two_pass": lambda: last.update(two_pass=two_pass_baseline(embedder, items, rationales, bs))},
                    device, cfg["repeats"])
    reason = last["reason"]
    return {"invocation": float(last["auto"].reasoned.mean()), "first_reason_call_seconds": round(first_call, 2),
            "adaptive_over_direct": t["auto"] / t["direct"], "always_over_direct": t["reason"] / t["direct"],
            "generate_over_reason": t["generate"] / t["reason"], "two_pass_over_reason": t["two_pass"] / t["reason"],
            "generate_over_auto": t["generate"] / t["auto"], "two_pass_over_auto": t["two_pass"] / t["auto"],
            "reason_tokens_per_s": round(reason.tokens_processed / t["reason"], 1),
            "baselines_max_abs_diff": float(max(np.abs(last[k] - reason.embeddings).max()
                                                for k in ("generate", "two_pass"))),
            "seconds": {k: round(v, 4) for k, v in t.items()}}


def train_step(cfg: dict, tmp: Path, model: str, device) -> dict:
    """One LoRA + GradCache step of the 4B recipe at per-device batch ``train_batch``, after a warm-up step."""
    from mmemb.data.minimmeb import BuildConfig, build
    from mmemb.train.config import load_config
    from mmemb.train.trainer import Trainer

    batch = cfg["train_batch"]
    easy = ("DigitClass", "DigitCaption-I2T", "DigitCaption-T2I", "DigitGround")
    data = build(tmp / "minimmeb", BuildConfig(seed=0, train_pairs=4 * batch, val_queries=0, test_queries=1,
                                               tasks=easy))
    recipe = load_config(HERE.parent / "configs" / "qwen3-vl-4b-train.yaml", [
        f"model={model}", f"output_dir={tmp / 'train'}", f"datasets=[{data}]", f"batch_size={batch}",
        f"gradcache_chunk={cfg['chunk']}", "one_dataset_per_batch=false", "num_workers=0", "max_steps=2",
        f"precision={'bf16' if device.type == 'cuda' else 'fp32'}", "loss.reason_nce=0", "loss.lm=0",
        "loss.decision=0"])
    trainer = Trainer(recipe)
    params = [p for p in trainer.backbone.parameters() if p.requires_grad]

    def step(k: int):
        trainer.step_fn(trainer.loader[k])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    step(0)
    t = timed(lambda: step(1), device)
    return {"step_seconds": round(t, 3), "pairs_per_s": round(batch / t, 1), "batch": batch, "chunk": cfg["chunk"],
            "trainable_parameters_m": round(sum(p.numel() for p in params) / 1e6, 2)}


def vllm_path(embedder, items, cfg, device) -> dict:
    if device.type != "cuda" or importlib.util.find_spec("vllm") is None:
        return {"status": "vLLM not installed" if device.type == "cuda" else "needs a GPU (smoke run)"}
    from mmemb import Embedder

    engine = Embedder(embedder.backbone, engine="vllm")
    kwargs = dict(mode="reason", batch_size=cfg["batches"][0], max_reasoning_tokens=cfg["budget"])
    t = interleaved({"hf": lambda: embedder.encode(items, **kwargs), "vllm": lambda: engine.encode(items, **kwargs)},
                    device, cfg["repeats"])
    return {"vllm_over_hf": t["vllm"] / t["hf"], "seconds": {k: round(v, 4) for k, v in t.items()}}


if __name__ == "__main__":
    main()
