"""Scale-out on the GPUs of this machine (part of the GPU bench; ~3 minutes on one H100-class GPU).

    python bench/gpu_scale_out.py          # writes bench/gpu_scale_out.json

Training: a small random Qwen3-VL-class backbone (offline), MiniMMEB pairs, 20 steps of batch 32
with GradCache (8 rows per forward) in bf16: once as one process without an accelerate config,
then on every GPU of the machine with `--accelerate-config configs/accelerate/deepspeed-zero2.yaml`
and with `configs/accelerate/fsdp.yaml`, the repository's configs as they are. Reports each run's
seconds and the largest difference of its loss curve and final weights from the one-process run
(bf16: expect differences around 1e-2, not the 1e-5 of the fp32 CPU test on 2 gloo processes).

Inference, with 2 GPUs or more: `mmemb encode` and `mmemb eval` on every GPU against one GPU:
seconds, and whether the merged files equal the one-process files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MMEMB = [sys.executable, "-m", "mmemb.cli"]
STEPS = 20


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    return time.perf_counter() - start


def train_runs(work: Path, gpus: int) -> dict:
    from safetensors.torch import load_file

    recipe = [f"model={work / 'backbone'}", f"datasets=[{work / 'minimmeb'}]", f"max_steps={STEPS}",
              "batch_size=32", "gradcache_chunk=8", "precision=bf16", "lr=1e-4", "warmup_steps=2", "log_every=1",
              "save_every=10"]
    base = [*MMEMB, "train", "--config", str(CONFIGS / "tiny-minimmeb.yaml")]
    seconds = {"one": run([*base, f"output_dir={work / 'one'}", *recipe])}
    for name, config in (("zero2", "deepspeed-zero2.yaml"), ("fsdp", "fsdp.yaml")):
        seconds[name] = run([*base, "--num-processes", str(gpus), "--accelerate-config",
                             str(CONFIGS / "accelerate" / config), f"output_dir={work / name}", *recipe])
    losses = {k: [json.loads(line)["loss"] for line in (work / k / "log.jsonl").read_text().splitlines()]
              for k in seconds}
    weights = {k: load_file(str(work / k / "model" / "model.safetensors")) for k in seconds}
    out = {"processes": gpus, "steps": STEPS, "one_process_seconds": seconds["one"]}
    for k in ("zero2", "fsdp"):
        out[k] = {"seconds": seconds[k],
                  "max_loss_difference": max(abs(a - b) for a, b in zip(losses[k], losses["one"])),
                  "max_weight_difference": max(float((weights[k][n].float() - weights["one"][n].float()).abs().max())
                                               for n in weights["one"]),
                  "same_weight_names": weights[k].keys() == weights["one"].keys(),
                  "final_loss": losses[k][-1], "one_process_final_loss": losses["one"][-1]}
    return out


def inference_runs(work: Path, gpus: int) -> dict:
    import numpy as np

    items = work / "items.jsonl"
    queries = [json.loads(line)["query"] for line in (work / "minimmeb" / "train" / "DigitSum.jsonl").open()][:2000]
    rows = [{"id": str(i), "text": q.get("text"), "instruction": q.get("instruction"),  # absolute image paths
             "images": [str(work / "minimmeb" / p) for p in q.get("images", [])]} for i, q in enumerate(queries)]
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {}
    for n in (1, gpus):
        common = ["--model", str(work / "backbone"), "--device", "cuda", "--num-processes", str(n)]
        out[f"encode_seconds_{n}"] = run([*MMEMB, "encode", *common, "--input", str(items), "--output",
                                          str(work / f"vecs{n}"), "--mode", "auto", "--chunk-size", "128"])
        out[f"eval_seconds_{n}"] = run([*MMEMB, "eval", *common, "--tasks", "minimmeb", "--data",
                                        str(work / "minimmeb"), "--mode", "auto", "--out", str(work / f"eval{n}"),
                                        "--cache", str(work / f"cache{n}")])
    one, many = work / "vecs1", work / f"vecs{gpus}"
    out["encode_identical"] = (one.with_suffix(".jsonl").read_text() == many.with_suffix(".jsonl").read_text()
                               and bool(np.allclose(np.load(one.with_suffix(".npy")), np.load(many.with_suffix(".npy")),
                                                    atol=1e-5, rtol=0)))
    predictions = {n: {t.name: (t / "predictions.jsonl").read_text()
                       for t in (work / f"eval{n}").iterdir() if t.is_dir()} for n in (1, gpus)}
    out["eval_identical"] = predictions[1] == predictions[gpus]
    return out


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "gpu_scale_out.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_scale_out.py needs a GPU (FSDP and DeepSpeed are refused on CPU processes)")
    gpus = torch.cuda.device_count()
    with tempfile.TemporaryDirectory(prefix="mmemb-gpu-scale-out-") as tmp:
        work = Path(tmp)
        run([*MMEMB, "init-backbone", "--size", "small", "--out", str(work / "backbone")])
        run([*MMEMB, "minimmeb", "build", "--out", str(work / "minimmeb"), "--train-pairs", "2000",
             "--test-queries", "50", "--val-queries", "5"])
        result = {"command": "python bench/gpu_scale_out.py", "date": time.strftime("%Y-%m-%d %H:%M"),
                  "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)], "training": train_runs(work, gpus)}
        if gpus > 1:
            result["inference"] = inference_runs(work, gpus)
        else:
            result["inference"] = "skipped: one GPU (NCCL puts one process on each GPU)"
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
