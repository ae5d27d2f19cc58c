"""The pipeline's one config object: every stage's settings, loaded from YAML, overridable.

The defaults are the MiniMMEB recipe that ``mmemb demo`` runs (``configs/minimmeb.yaml`` lists
the same values; a test keeps the two equal). Training stages hold overrides of the trainer's
config (:class:`mmemb.train.config.TrainConfig`) on top of the shared ``train`` section.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..train.config import ConfigError, parse_override, set_dotted


ABLATIONS = ("no_selection", "no_rl", "rl_no_cost", "rl_delta", "gate_alone", "rl_depth")


def _lm_only() -> dict[str, float]:
    return {"lm": 1.0, "reason_nce": 0.0, "direct_nce": 0.0, "decision": 0.0}


@dataclass
class PipelineConfig:
    out: str = "runs/demo"
    seed: int = 0
    # Where the method starts: a checkpoint folder, or "" to build a tiny backbone and pretrain it.
    model: str = ""
    # MiniMMEB folder; "" builds one inside the run folder (the ``data`` stage).
    benchmark: str = ""
    build: dict[str, Any] = field(default_factory=lambda: {"train_pairs": 20_000, "val_queries": 100,
                                                          "test_queries": 200})
    backbone: dict[str, Any] = field(default_factory=lambda: {"arch": "qwen3_vl", "size": "tiny"})
    # Full scale: training pairs from elsewhere (a Pair-JSONL spec, e.g. `mmemb convert-mmeb-train`
    # output) and other evaluation tasks ("mmeb-v2" with eval_data = a local MMEB-V2 copy).
    train_data: str = ""  # "" = the benchmark's train split
    eval_tasks: str = "minimmeb"
    eval_data: str = ""  # "" = the benchmark folder
    # Training pairs the method's stages use (rationales, selection, warm-up, joint, RL), spread
    # evenly over the datasets; 0 = all.
    method_pairs: int = 3000
    # Processes for the pretraining stages (both cores); the rest runs one process per core:
    # the main chain here, the direct-only baseline beside it (parallel_baseline).
    pretrain_processes: int = 2
    processes: int = 1  # processes for warm-up, joint, blind and baseline training (GPUs at full scale)
    accelerate_config: str | None = None  # an accelerate config file (FSDP, DeepSpeed) for those launches
    parallel_baseline: bool = True
    device: str = "cpu"  # where selection, RL, the gate and evaluation run
    dtype: str = "auto"
    # Shared trainer settings, then per-stage overrides.
    train: dict[str, Any] = field(default_factory=lambda: {
        "batch_size": 32, "lr": 5.0e-4, "schedule": "cosine", "warmup_steps": 20, "one_dataset_per_batch": True,
        "hard_negatives": 1, "loss": {"temperature": 0.05}, "precision": "fp32", "save_every": 100,
        "log_every": 10, "keep_checkpoints": 1,
    })
    pretrain_lm: dict[str, Any] = field(default_factory=lambda: {
        "max_steps": 1200, "batch_size": 64, "lr": 2.0e-3, "warmup_steps": 50, "one_dataset_per_batch": False,
        "hard_negatives": 0, "loss": _lm_only()})
    pretrain: dict[str, Any] = field(default_factory=lambda: {
        "max_steps": 600, "loss": {"reason_nce": 1.0, "lm": 1.0, "direct_nce": 1.0, "decision": 0.0}})
    rationales: dict[str, Any] = field(default_factory=lambda: {"teachers": ["minimmeb"], "k": 4})
    # Short and gentle: most candidates are flawed, and a long warm-up on them teaches the model to
    # write (and trust) flawed reasoning, which blurs the utility the selection measures.
    warmup: dict[str, Any] = field(default_factory=lambda: {
        "max_steps": 100, "lr": 2.0e-4, "warmup_steps": 10,
        "loss": {"reason_nce": 1.0, "lm": 1.0, "direct_nce": 1.0, "decision": 0.0}})
    # Scored by the pretrained model (scorer: start): the warm-up model, trained on every candidate,
    # learns to discount what a rationale says and keeps too few faithful ones (README, Results).
    select: dict[str, Any] = field(default_factory=lambda: {"margin": 1.0, "sampled_negatives": 16, "scorer": "start"})
    joint: dict[str, Any] = field(default_factory=lambda: {
        "max_steps": 600, "loss": {"reason_nce": 1.0, "lm": 1.0, "direct_nce": 1.0, "decision": 1.0}})
    # The "blind reasoning" ablation: joint training on all candidates, no selection (off in the demo).
    blind: dict[str, Any] = field(default_factory=lambda: {
        "enabled": False, "loss": {"reason_nce": 1.0, "lm": 1.0, "direct_nce": 1.0, "decision": 0.0}})
    # The direct-only baseline: trained from the same pretrained model on as many examples as
    # warm-up + joint + RL see.
    baseline: dict[str, Any] = field(default_factory=lambda: {
        "loss": {"reason_nce": 0.0, "lm": 0.0, "direct_nce": 1.0, "decision": 0.0}})
    rl: dict[str, Any] = field(default_factory=lambda: {
        "steps": 80, "queries_per_step": 16, "group_size": 8, "lr": 1.0e-4, "max_reasoning_tokens": 64,
        "cost": 0.1, "beta": 0.04, "save_every": 20})
    gate: dict[str, Any] = field(default_factory=lambda: {"epochs": 6, "batch_size": 64, "lr": 1.0e-3})
    # The paper's ablations (off in the demo; `mmemb demo --ablations` turns every one on, with
    # blind.enabled). Each adds a system to the evaluation and a row to the report's ablation table:
    #   no_selection  GRPO, as the method runs it, from the blind model (no counterfactual selection)
    #   no_rl         the joint model deciding by its own p(<think>) (no GRPO)
    #   rl_no_cost    GRPO without the token-cost term (rl.cost = 0)
    #   rl_delta      GRPO rewarded by the paper's utility gap delta = s(chosen) - s(direct) (rl.reward = delta)
    #   gate_alone    the plug-in gate on the joint model (no GRPO)
    #   rl_depth      GRPO choosing the reasoning depth too (rl.depth = true; beyond the paper)
    ablations: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(ABLATIONS, False))
    eval: dict[str, Any] = field(default_factory=lambda: {
        "split": "test", "max_reasoning_tokens": 64, "think_threshold": 0.5, "batch_size": 64,
        "sweep": [0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98]})
    # Encode-time ratios of the four systems: a sample of test queries (spread over the tasks) encoded
    # by each system in alternation, `rounds` rounds; the median per-round ratio to the direct model.
    # A sample long enough that scheduler noise averages out within a round (~0.3 s a direct encode).
    timing: dict[str, Any] = field(default_factory=lambda: {"queries": 192, "rounds": 9})

    def stage_train(self, stage: str) -> dict[str, Any]:
        """The trainer overrides of a training stage: the shared section, then the stage's."""
        merged = copy.deepcopy(self.train)
        _deep_update(merged, {k: v for k, v in getattr(self, stage).items() if k != "enabled"})
        merged.setdefault("seed", self.seed)
        return merged

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Smaller everything: every stage runs, on a slice, in about three minutes (the test suite runs it).
QUICK = {
    "build": {"train_pairs": 600, "val_queries": 4, "test_queries": 8},
    "method_pairs": 96,
    "pretrain_processes": 1,
    "train": {"batch_size": 16, "save_every": 0, "log_every": 5, "warmup_steps": 2},
    "pretrain_lm": {"max_steps": 20, "batch_size": 16, "warmup_steps": 2},
    "pretrain": {"max_steps": 10},
    "warmup": {"max_steps": 6},
    "joint": {"max_steps": 6},
    "rl": {"steps": 2, "queries_per_step": 4, "group_size": 4, "max_reasoning_tokens": 16, "save_every": 1},
    "gate": {"epochs": 2},
    "eval": {"max_reasoning_tokens": 16, "sweep": [0.1, 0.5, 0.9]},
    "timing": {"queries": 12, "rounds": 2},
}


def load_pipeline_config(path: str | Path | None = None, overrides: Sequence[str] = (), quick: bool = False,
                         **values: Any) -> PipelineConfig:
    raw = dataclasses.asdict(PipelineConfig())
    if quick:
        _deep_update(raw, copy.deepcopy(QUICK))
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a pipeline config is a YAML mapping")
        _check_keys(loaded)
        _deep_update(raw, loaded)
    for item in overrides:
        key, value = parse_override(item)
        _check_keys({key.split(".")[0]: None})
        set_dotted(raw, key, value)
    for key, value in values.items():
        if value is not None:
            raw[key] = value
    unknown = sorted(set(raw["ablations"]) - set(ABLATIONS))
    if unknown:
        raise ConfigError(f"unknown ablation(s) {', '.join(unknown)}; known: {', '.join(ABLATIONS)}")
    return PipelineConfig(**raw)


def _check_keys(raw: dict) -> None:
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown pipeline key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def _deep_update(base: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
