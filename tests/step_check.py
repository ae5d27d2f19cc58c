"""One plain and one GradCache training step on a fixed batch: losses and gradients (shared by the tests
and by the 2-process script dist_train_check.py)."""

from __future__ import annotations

import torch

from mmemb.model.backbone import load_backbone
from mmemb.train import step as step_module
from mmemb.train.config import load_config
from mmemb.train.data import BatchPlan, StepLoader, open_sources
from mmemb.train.losses import JointObjective
from mmemb.train.params import configure_parameters
from mmemb.train.step import Encoder, TrainStep
from mmemb.train.trainer import build_accelerator

BATCH = 8


def step_results(model_path: str, data: str, distributed: bool = False, chunks=(0, 3), overrides=(),
                 plain_rows: int | None = None):
    """{chunk: (terms, {param: grad}, pairs, skipped)} for a plain step (chunk 0) and GradCache steps.

    Each step starts from the same RNG state; ``plain_rows`` makes the plain step embed in forwards
    of that many rows (the GradCache chunking), so dropout draws its masks in the same order.
    """
    cfg = load_config(None, [f"model={model_path}", "output_dir=unused", f"datasets=[{data}]",
                             f"batch_size={BATCH}", "hard_negatives=2", "loss.temperature=0.05", *overrides])
    accelerator = build_accelerator(cfg)
    # float64: the comparisons test the algorithm, not float32 rounding of a different summation order
    backbone = load_backbone(model_path, dtype=torch.float64)
    configure_parameters(backbone, cfg)  # LoRA, gradient checkpointing, as the overrides say
    backbone.train()
    model = accelerator.prepare(Encoder(backbone)) if distributed else Encoder(backbone)
    sources = open_sources(cfg.datasets)
    plan = BatchPlan([len(s) for s in sources], [1.0], BATCH, False, seed=0)
    loader = StepLoader(sources, plan, backbone.processor, accelerator.process_index, accelerator.num_processes,
                        cfg.hard_negatives)
    batch = loader[0]
    results = {}
    for chunk in chunks:
        step = TrainStep(accelerator, model, backbone, JointObjective(cfg.loss), chunk_size=chunk)
        torch.manual_seed(0)
        default_rows = step_module.PLAIN_ROWS_PER_FORWARD
        step_module.PLAIN_ROWS_PER_FORWARD = plain_rows or default_rows
        try:
            stats = step(batch)
        finally:
            step_module.PLAIN_ROWS_PER_FORWARD = default_rows
        grads = {n: p.grad.detach().clone() for n, p in backbone.named_parameters() if p.grad is not None}
        backbone.zero_grad(set_to_none=True)
        results[chunk] = (stats.terms, grads, stats.pairs, stats.skipped)
    return results, accelerator
