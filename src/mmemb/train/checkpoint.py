"""Checkpoints: the model in Hugging Face layout, plus the state to resume from, written atomically.

    OUT/checkpoints/step-000200/        the model (full | adapter | merged), loadable with
                                        Embedder.from_pretrained / load_backbone
    OUT/checkpoints/step-000200/trainer_state/   accelerate's save_state: trainable weights,
                                        optimizer, scheduler, RNG of every process
    OUT/checkpoints/step-000200/state.json       step (the data position), config
    OUT/model/                          the final model

A checkpoint folder appears only complete (temp folder + rename), so "the latest checkpoint" is
always one that can be resumed from.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Iterator

from ..fileio import atomic_dir, read_json, write_json
from ..model.backbone import load_backbone
from .config import TrainConfig

STATE_DIR = "trainer_state"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / "state.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def checkpoint_step(path: str | Path) -> int:
    return int(read_json(Path(path) / "state.json")["step"])


@contextlib.contextmanager
def shared_atomic_dir(accelerator: Any, path: Path) -> Iterator[Path]:
    """:func:`atomic_dir` made by the main process and shared with all (every rank may write into it)."""
    from accelerate.utils import broadcast_object_list

    if accelerator.is_main_process:
        with atomic_dir(path) as tmp:
            broadcast_object_list([str(tmp)])
            yield tmp
            accelerator.wait_for_everyone()  # every rank has written before the rename
    else:
        box = [None]
        broadcast_object_list(box)
        yield Path(box[0])
        accelerator.wait_for_everyone()
    accelerator.wait_for_everyone()


def export_model(accelerator: Any, model: Any, backbone: Any, cfg: TrainConfig, out: Path) -> None:
    """Write the model in the recipe's format into ``out`` (main process; collective under FSDP/DeepSpeed)."""
    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    state = accelerator.get_state_dict(model) if sharded else None  # gathers the full weights (all ranks)
    if not accelerator.is_main_process:
        return
    kwargs = {}
    if state is not None:  # keys of the Encoder wrapper -> keys of backbone.model
        prefix = "backbone.model."
        # the gathered copies of tied weights (lm_head = embed_tokens) no longer share storage, so
        # save_pretrained would keep both: keep the names the module itself lists once
        own = {n for n, _ in backbone.model.named_parameters()} | {n for n, _ in backbone.model.named_buffers()}
        kwargs["state_dict"] = {k[len(prefix):]: v for k, v in state.items()
                                if k.startswith(prefix) and k[len(prefix):] in own}
    if cfg.save_format != "merged":
        backbone.save_pretrained(out, **kwargs)
        return
    # merged: save the adapter, load it over a fresh base, merge, save the merged weights
    adapter = out / "_adapter"
    backbone.save_pretrained(adapter, **kwargs)
    merged = load_backbone(adapter, dtype=backbone.dtype, device="cpu", attn_implementation=cfg.attn_implementation)
    merged.model = merged.model.merge_and_unload()
    merged.save_pretrained(out)
    shutil.rmtree(adapter)


def save_checkpoint(accelerator: Any, model: Any, backbone: Any, cfg: TrainConfig, step: int) -> Path:
    path = checkpoint_dir(cfg.output_dir, step)
    with shared_atomic_dir(accelerator, path) as tmp:
        accelerator.save_state(str(tmp / STATE_DIR))
        export_model(accelerator, model, backbone, cfg, tmp)
        if accelerator.is_main_process:
            write_json(tmp / "state.json", {"step": step, "config": cfg.to_dict()})
    if accelerator.is_main_process:
        for old in list_checkpoints(cfg.output_dir)[: -max(cfg.keep_checkpoints, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def save_final(accelerator: Any, model: Any, backbone: Any, cfg: TrainConfig) -> Path:
    path = Path(cfg.output_dir) / "model"
    with shared_atomic_dir(accelerator, path) as tmp:
        export_model(accelerator, model, backbone, cfg, tmp)
    return path


def trainable_weights_only(models, weights, output_dir) -> None:
    """A ``save_state`` pre-hook: store only the weights that train (a LoRA run does not copy the base).

    Resume loads them with ``strict=False`` over the base weights loaded from ``cfg.model``.
    """
    for i, (m, w) in enumerate(zip(models, weights)):
        names = {n for n, p in m.named_parameters() if p.requires_grad}
        weights[i] = {k: v for k, v in w.items() if k in names}
