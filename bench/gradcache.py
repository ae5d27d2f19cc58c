"""GradCache against the plain step at the same batch, and the tiny backbone's training throughput.

    python bench/gradcache.py [--batch 64] [--chunk 32] [--repeats 7]

gradcache / plain      seconds of one GradCache training step over one plain step on the same
                       global batch (median of interleaved runs)              goal <= 1.4
examples/s             pairs per second of a whole training step (data loading, forward,
                       backward, optimizer) at batch 64 of direct-mode MiniMMEB pairs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_times  # noqa: E402


def setup(folder: Path, batch: int):
    import torch

    from mmemb.data.minimmeb import BuildConfig, build, tokenizer_corpus
    from mmemb.model.backbone import load_backbone
    from mmemb.model.tiny import build_tiny_backbone
    from mmemb.train.config import load_config
    from mmemb.train.data import BatchPlan, StepLoader, open_sources
    from mmemb.train.trainer import build_accelerator

    easy = ("DigitClass", "DigitCaption-I2T", "DigitCaption-T2I", "DigitGround")
    bench = build(folder / "minimmeb", BuildConfig(seed=0, train_pairs=8 * batch, val_queries=0, test_queries=1,
                                                   tasks=easy))
    model = build_tiny_backbone("qwen3_vl", folder / "tiny", corpus=tokenizer_corpus())
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny-minimmeb.yaml", [
        f"model={model}", f"output_dir={folder / 'run'}", f"datasets=[{bench}]", f"batch_size={batch}",
        "one_dataset_per_batch=false", "hard_negatives=0", "loss.reason_nce=0", "loss.lm=0", "loss.decision=0"])
    accelerator = build_accelerator(cfg)
    backbone = load_backbone(cfg.model, dtype=torch.float32)
    backbone.train()
    sources = open_sources(cfg.datasets)
    plan = BatchPlan([len(s) for s in sources], [1.0] * len(sources), batch, False, seed=0)
    loader = StepLoader(sources, plan, backbone.processor)
    return cfg, accelerator, backbone, loader


def measure(batch: int = 64, chunk: int = 32, repeats: int = 7) -> dict:
    import torch

    from mmemb.train.losses import JointObjective
    from mmemb.train.step import Encoder, TrainStep

    with tempfile.TemporaryDirectory(prefix="mmemb-bench-") as tmp:
        cfg, accelerator, backbone, loader = setup(Path(tmp), batch)
        model = Encoder(backbone)
        optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-5)
        objective = JointObjective(cfg.loss)
        steps = {"plain": TrainStep(accelerator, model, backbone, objective, 0),
                 "gradcache": TrainStep(accelerator, model, backbone, objective, chunk)}
        fixed = loader[0]
        counter = {"step": 1}

        def step_on(kind: str, batch_fn):
            def run():
                steps[kind](batch_fn())
                torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return run

        def fresh():  # a new global batch each time, loaded from disk as training does
            counter["step"] += 1
            return loader[counter["step"]]

        t = median_times({"plain": step_on("plain", lambda: fixed), "gradcache": step_on("gradcache", lambda: fixed),
                          "train_step": step_on("plain", fresh)}, repeats=repeats)
    return {
        "gradcache_over_plain": round(t["gradcache"] / t["plain"], 3),
        "examples_per_s": round(batch / t["train_step"], 1),
        "seconds": {k: round(v, 4) for k, v in t.items()},
        "batch": batch, "chunk_rows": chunk, "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=32, help="GradCache rows per forward")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    print(json.dumps(measure(args.batch, args.chunk, args.repeats), indent=2))
