"""The training loop: ``train(config) -> Path`` (the final model folder).

The same code runs as one process, as N processes (DDP; gloo on CPU), or under FSDP / DeepSpeed,
whichever way ``accelerate`` launched it. Each step is one *global* batch from the
:class:`~mmemb.train.data.BatchPlan`, split evenly over the processes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..backbone import load_backbone
from ..fileio import write_json
from .checkpoint import (STATE_DIR, checkpoint_step, latest_checkpoint, list_checkpoints, save_checkpoint, save_final,
                         trainable_weights_only)
from .config import TrainConfig, load_config
from .data import BatchPlan, StepLoader, local_batches, open_sources
from .feedback import TrainLog, plot_losses
from .losses import JointObjective
from .params import configure_parameters, parameter_summary
from .step import Encoder, TrainStep


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) stopped being finite; nothing after the last checkpoint was kept."""


class RunExists(RuntimeError):
    pass


def train(config: TrainConfig | str | Path, overrides: Sequence[str] = (), resume: bool = False) -> Path:
    """Train as the config says; with ``resume``, continue from the latest checkpoint in ``output_dir``."""
    cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
    accelerator = build_accelerator(cfg)
    out = Path(cfg.output_dir)
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not resume:
        raise RunExists(f"{out} already holds checkpoints (latest {ckpt.name}); pass --resume to continue that run "
                        f"or choose another output_dir")
    if not resume:
        ckpt = None

    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    weights_dtype = torch.bfloat16 if _use_bf16(cfg) and cfg.lora.enabled else torch.float32
    backbone = load_backbone(cfg.model, dtype=weights_dtype, device=accelerator.device,
                             attn_implementation=cfg.attn_implementation, min_pixels=cfg.min_pixels,
                             max_pixels=cfg.max_pixels)
    configure_parameters(backbone, cfg)
    backbone.train()

    sources = open_sources(cfg.datasets)
    plan = BatchPlan([len(s) for s in sources], [s.weight for s in sources], cfg.batch_size,
                     cfg.one_dataset_per_batch, cfg.seed)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * plan.steps_per_epoch))
    optimizer = torch.optim.AdamW(_param_groups(backbone, cfg.weight_decay), lr=cfg.lr)
    scheduler = _scheduler(cfg, optimizer, total)
    model, optimizer, scheduler = accelerator.prepare(Encoder(backbone), optimizer, scheduler)
    accelerator.register_save_state_pre_hook(trainable_weights_only)

    start = 0
    if ckpt is not None:
        accelerator.load_state(str(ckpt / STATE_DIR), strict=False)
        start = checkpoint_step(ckpt)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg.to_dict())
        tqdm.write(f"mmemb train: {parameter_summary(backbone)}; {total} steps of {cfg.batch_size} pairs "
                   f"({plan.steps_per_epoch} per epoch) on {accelerator.num_processes} process(es)"
                   + (f"; resuming at step {start}" if start else ""))

    loader = StepLoader(sources, plan, backbone.processor, accelerator.process_index, accelerator.num_processes,
                        cfg.hard_negatives)
    step_fn = TrainStep(accelerator, model, backbone, JointObjective(cfg.loss), cfg.gradcache_chunk)
    log = TrainLog(out / "log.jsonl", resume_step=start) if main else None
    bar = tqdm(total=total, initial=start, disable=not main, desc="train", unit="step", dynamic_ncols=True)
    clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    window_pairs, window_start = 0, time.perf_counter()
    try:
        for batch in local_batches(loader, start, total, cfg.num_workers):
            for reason in batch.skipped:
                tqdm.write(f"warning: skipped pair ({reason})")
            stats = step_fn(batch)
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), clip))
            step = batch.step + 1
            loss = stats.terms["loss"]
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                last = latest_checkpoint(out)
                raise TrainingDiverged(
                    f"loss {loss} (gradient norm {grad_norm}) at step {step}: stopped before the optimizer step. "
                    f"Terms: {stats.terms}. The last good checkpoint is "
                    f"{last if last else 'none (no checkpoint was written yet)'}; lower lr, check the data, "
                    f"then resume with --resume.")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window_pairs += stats.pairs
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                now = time.perf_counter()
                row = {"step": step, **{k: round(v, 6) for k, v in stats.terms.items()},
                       "lr": scheduler.get_last_lr()[0], "grad_norm": round(grad_norm, 6),
                       "examples_per_s": round(window_pairs / max(now - window_start, 1e-9), 2),
                       "pairs": stats.pairs, "skipped": stats.skipped}
                window_pairs, window_start = 0, now
                if main:
                    log.write(row)
                    bar.set_postfix(loss=f"{loss:.4f}", ex_s=row["examples_per_s"])
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                save_checkpoint(accelerator, model, backbone, cfg, step)
        if start < total or latest_checkpoint(out) is None or checkpoint_step(latest_checkpoint(out)) < total:
            save_checkpoint(accelerator, model, backbone, cfg, total)
        final = save_final(accelerator, model, backbone, cfg)
    finally:
        bar.close()
        if log is not None:
            log.close()
    if main:
        plot_losses(out / "log.jsonl", out / "loss.png")
    accelerator.wait_for_everyone()
    return final


def build_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # A trainable vision tower is unused by text-only batches: DDP must be told to look for that.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=not cfg.freeze_vision)
    # cpu=True where there is no GPU: N launched processes then form a gloo group (MULTI_CPU).
    return Accelerator(mixed_precision="bf16" if _use_bf16(cfg) else "no", step_scheduler_with_optimizer=False,
                       kwargs_handlers=[ddp], cpu=not torch.cuda.is_available())


def _use_bf16(cfg: TrainConfig) -> bool:
    if cfg.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cfg.precision == "bf16"


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay on matrices only (not on biases, norms, or the new-token rows)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "trainable_tokens" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _scheduler(cfg: TrainConfig, optimizer, total: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total))
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


__all__ = ["train", "TrainingDiverged", "RunExists", "list_checkpoints"]
