"""Which parameters train: full fine-tuning or LoRA (peft), a frozen vision tower, checkpointing.

LoRA goes on the language model's linear layers only (the regex below keeps the vision tower's
``qkv``/``proj``/``linear_fc*`` out of it, whatever the Qwen-VL generation). The rows of the
protocol tokens (<emb>, <think>, </think>) are made trainable with peft's
``trainable_token_indices``: they start as the mean embedding row, the decision logits are read
from them, and training the whole embedding matrix (``modules_to_save``) would copy and train
150k rows for three. With tied embeddings (Qwen3-VL-4B, the tiny backbones) peft ties the LM-head
rows to them; with untied ones the LM-head rows are listed too. The rows are saved in the adapter
and merged by ``merge_and_unload``.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..model.backbone import Backbone
from .config import TrainConfig


def configure_parameters(backbone: Backbone, cfg: TrainConfig) -> None:
    """Apply LoRA / freezing / gradient checkpointing in place (``backbone.model`` may become a PeftModel)."""
    if cfg.lora.enabled:
        apply_lora(backbone, cfg)
    if cfg.freeze_vision:
        for p in backbone.core.visual.parameters():
            p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        backbone.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        backbone.hf_model.config.use_cache = False


def apply_lora(backbone: Backbone, cfg: TrainConfig) -> None:
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    names = "|".join(re.escape(m) for m in lc.target_modules)
    tokens = None
    if lc.train_new_tokens:
        ids = sorted({backbone.ids.emb, backbone.ids.think, backbone.ids.end_think})
        tied = bool(getattr(backbone.config, "tie_word_embeddings", False))
        tokens = {"embed_tokens": ids} if tied else {"embed_tokens": ids, "lm_head": ids}
    peft_cfg = LoraConfig(
        r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
        target_modules=rf".*language_model.*\.({names})$",
        trainable_token_indices=tokens,
    )
    backbone.model = get_peft_model(backbone.model, peft_cfg)
    # load_backbone(adapter_dir) finds the base here: an absolute path, so the adapter loads from anywhere.
    base = Path(cfg.model).expanduser()
    backbone.model.peft_config["default"].base_model_name_or_path = str(base.resolve()) if base.exists() else cfg.model


def parameter_summary(module) -> str:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return f"{trainable:,} trainable of {total:,} parameters ({trainable / max(total, 1):.2%})"
