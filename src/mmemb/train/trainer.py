"""The training loop: ``train(config) -> Path`` (the final model folder).

The same code runs as one process, as N processes (DDP; gloo on CPU), or under FSDP / DeepSpeed,
whichever way ``accelerate`` launched it. Each step is one *global* batch from the
:class:`~mmemb.train.data.BatchPlan`, split evenly over the processes.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..fileio import write_json
from ..model.backbone import load_backbone
from .checkpoint import (
    STATE_DIR,
    checkpoint_step,
    export_model,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
    save_final,
    shared_atomic_dir,
    trainable_weights_only,
)
from .config import ConfigError, TrainConfig, load_config
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
    """Train as the config says and return the final model folder (``output_dir/model``).

    With ``resume``, continue from the latest checkpoint in ``output_dir``.
    """
    return Trainer(config, overrides, resume=resume).run()


class Trainer:
    """One training job. After :meth:`run`, ``backbone`` holds the trained model in memory."""

    def __init__(self, config: TrainConfig | str | Path, overrides: Sequence[str] = (), resume: bool = False):
        from accelerate.utils import set_seed

        cfg = self.cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
        self.out = Path(cfg.output_dir)
        ckpt = check_output_dir(cfg, resume)
        self.accelerator = accelerator = build_accelerator(cfg)
        set_seed(cfg.seed)
        weights_dtype = torch.bfloat16 if _use_bf16(cfg) and cfg.lora.enabled else torch.float32
        self.backbone = load_backbone(cfg.model, dtype=weights_dtype, device=accelerator.device,
                                      attn_implementation=cfg.attn_implementation, min_pixels=cfg.min_pixels,
                                      max_pixels=cfg.max_pixels)
        configure_parameters(self.backbone, cfg)
        self.backbone.train()

        sources = open_sources(cfg.datasets)
        self.plan = BatchPlan([len(s) for s in sources], [s.weight for s in sources], cfg.batch_size,
                              cfg.one_dataset_per_batch, cfg.seed)
        self.total = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.plan.steps_per_epoch))
        optimizer = torch.optim.AdamW(_param_groups(self.backbone, cfg.weight_decay), lr=cfg.lr)
        scheduler = _scheduler(cfg, optimizer, self.total)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(Encoder(self.backbone), optimizer, scheduler)
        accelerator.register_save_state_pre_hook(trainable_weights_only)
        self.start = 0
        if resume and ckpt is not None:
            accelerator.load_state(str(ckpt / STATE_DIR), strict=False)
            self.start = checkpoint_step(ckpt)
        self.loader = StepLoader(sources, self.plan, self.backbone.processor, accelerator.process_index,
                                 accelerator.num_processes, cfg.hard_negatives)
        self.step_fn = TrainStep(accelerator, self.model, self.backbone, JointObjective(cfg.loss), cfg.gradcache_chunk)

    def run(self) -> Path:
        cfg, accelerator, out = self.cfg, self.accelerator, self.out
        main = accelerator.is_main_process
        if main:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "config.json", cfg.to_dict())
            tqdm.write(f"mmemb train: {parameter_summary(self.backbone)}; {self.total} steps of {cfg.batch_size} "
                       f"pairs ({self.plan.steps_per_epoch} per epoch) on {accelerator.num_processes} process(es)"
                       + (f"; resuming at step {self.start}" if self.start else ""))
        log = TrainLog(out / "log.jsonl", resume_step=self.start) if main else None
        bar = tqdm(total=self.total, initial=self.start, disable=not main, desc="train", unit="step",
                   dynamic_ncols=True)
        try:
            self._loop(log, bar)
            last = latest_checkpoint(out)
            if last is None or checkpoint_step(last) < self.total:
                save_checkpoint(accelerator, self.model, self.backbone, cfg, self.total)
            final = save_final(accelerator, self.model, self.backbone, cfg)
        finally:
            bar.close()
            if log is not None:
                log.close()
        if main:
            plot_losses(out / "log.jsonl", out / "loss.png")
        accelerator.wait_for_everyone()
        return final

    def export(self, out: str | Path, save_format: str | None = None) -> Path:
        """Write the current model to ``out`` (atomically), in the recipe's format or ``save_format``."""
        cfg = replace(self.cfg, save_format=save_format or self.cfg.save_format).validate()
        with shared_atomic_dir(self.accelerator, Path(out)) as tmp:
            export_model(self.accelerator, self.model, self.backbone, cfg, tmp)
        return Path(out)

    def _loop(self, log: TrainLog | None, bar) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        window_pairs, window_start = 0, time.perf_counter()
        for batch in local_batches(self.loader, self.start, self.total, cfg.num_workers):
            for reason in batch.skipped:
                tqdm.write(f"warning: skipped pair ({reason})")
            stats = self.step_fn(batch)
            grad_norm = float(accelerator.clip_grad_norm_(self.model.parameters(), clip))
            step = batch.step + 1
            loss = stats.terms["loss"]
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                last = latest_checkpoint(self.out)
                raise TrainingDiverged(
                    f"loss {loss} (gradient norm {grad_norm}) at step {step}: stopped before the optimizer step. "
                    f"Terms: {stats.terms}. The last good checkpoint is "
                    f"{last if last else 'none (no checkpoint was written yet)'}; lower lr or check the data, "
                    f"then continue with --resume.")
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            window_pairs += stats.pairs
            bar.update(1)
            if step % cfg.log_every == 0 or step == self.total:
                now = time.perf_counter()
                row = {"step": step, **{k: round(v, 6) for k, v in stats.terms.items()},
                       "lr": self.scheduler.get_last_lr()[0], "grad_norm": round(grad_norm, 6),
                       "examples_per_s": round(window_pairs / max(now - window_start, 1e-9), 2),
                       "pairs": stats.pairs, "skipped": stats.skipped}
                window_pairs, window_start = 0, now
                if log is not None:
                    log.write(row)
                    bar.set_postfix(loss=f"{loss:.4f}", ex_s=row["examples_per_s"])
            if cfg.save_every and step % cfg.save_every == 0 and step < self.total:
                save_checkpoint(accelerator, self.model, self.backbone, cfg, step)


def check_output_dir(cfg: TrainConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start afresh); refuses to start over an existing run."""
    ckpt = latest_checkpoint(cfg.output_dir)
    if ckpt is not None and not resume:
        raise RunExists(f"{cfg.output_dir} already holds checkpoints (latest {ckpt.name}); pass --resume to continue "
                        f"that run or choose another output_dir")
    return ckpt


def build_accelerator(cfg: TrainConfig):
    """The Accelerator of a job: DDP / FSDP / DeepSpeed come from how the processes were launched."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # A trainable vision tower is unused by text-only batches: DDP must be told to look for that.
    vision_trains = not (cfg.freeze_vision or cfg.lora.enabled)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=vision_trains)
    # cpu=True where there is no GPU: N launched processes then form a gloo group (MULTI_CPU).
    accelerator = Accelerator(mixed_precision="bf16" if _use_bf16(cfg) else "no", step_scheduler_with_optimizer=False,
                              kwargs_handlers=[ddp], cpu=not torch.cuda.is_available())
    _check_engine(accelerator)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # no dataloader goes through prepare(): DeepSpeed needs the per-GPU batch stated
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = max(1, cfg.batch_size // accelerator.num_processes)
    return accelerator


def _check_engine(accelerator) -> None:
    """Refuse to train when the accelerate config asks for FSDP or DeepSpeed and accelerate runs something else.

    accelerate turns them on only where its processes drive accelerators: on CPU processes it
    ignores the request and runs plain data parallelism, which would silently hold the whole model
    on each process.
    """
    import os

    for engine, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(flag, "false").lower() == "true" and accelerator.distributed_type.name != engine:
            raise ConfigError(f"the accelerate config asks for {engine}, but accelerate runs "
                              f"{accelerator.distributed_type.name} here: it enables {engine} only on GPUs (and "
                              "other accelerators), not on CPU processes. Run on GPUs, or leave out the "
                              "accelerate config to train with plain data parallelism.")


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


__all__ = ["train", "Trainer", "TrainingDiverged", "RunExists", "list_checkpoints", "build_accelerator"]
