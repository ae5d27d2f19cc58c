"""One config object per training job: dataclasses, loaded from YAML, overridden by ``key=value``.

    cfg = load_config("configs/tiny-minimmeb.yaml", ["lr=3e-4", "loss.temperature=0.05",
                                                     "datasets.0.weight=2", "lora.enabled=true"])

Override values are parsed as YAML (``true``, ``3e-4``, ``[q_proj, v_proj]``, ``null``); dotted
keys reach nested sections, integers index lists. An unknown key is an error that names it.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

SAVE_FORMATS = ("full", "adapter", "merged")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
TEXT_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    pass


@dataclass
class DatasetConfig:
    """Pair-JSONL training data: a file, a glob, or a benchmark folder (its ``train/*.jsonl``).

    Each file is one dataset of the mixture (a glob or folder gives one per task, for
    ``one_dataset_per_batch``). ``weight`` is an upsampling factor: each row is seen ``weight``
    times per epoch on average (1 = once, 0.5 = half the rows, 2 = twice). Relative image paths
    resolve against ``image_root``; by default the benchmark folder holding the file (the nearest
    ancestor with a ``manifest.json``, as MiniMMEB writes it), else the file's own folder.
    """

    path: str
    weight: float = 1.0
    name: str | None = None
    image_root: str | None = None


@dataclass
class LossConfig:
    """L = reason_nce·NCE(reasoning path) + lm·NLL(rationale) + direct_nce·NCE(direct path) + decision·CE.

    A weight of 0 switches its term off (and skips the passes only it needs).
    """

    temperature: float = 0.02
    reason_nce: float = 1.0  # w_r: InfoNCE of the rationale-conditioned query embedding
    lm: float = 1.0  # alpha: next-token loss on the rationale tokens and </think>
    direct_nce: float = 1.0  # beta: InfoNCE of the direct query embedding (every pair)
    decision: float = 1.0  # gamma: <think> vs <emb> at the first assistant token (labelled pairs)
    # Matryoshka: embedding sizes (smaller than the model's) trained to work alone as well: each adds
    # both NCE terms on the first d dimensions, re-normalised, with the same weights. [] = off.
    matryoshka_dims: list[int] = field(default_factory=list)


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Module names inside the language model's layers (the vision tower is left out).
    target_modules: list[str] = field(default_factory=lambda: list(TEXT_LORA_MODULES))
    # Train the embedding (and LM-head) rows of <emb>, <think>, </think>: they start as the mean
    # row, and the decision logits are read from them.
    train_new_tokens: bool = True


@dataclass
class TrainConfig:
    model: str = ""
    output_dir: str = ""
    datasets: list[DatasetConfig] = field(default_factory=list)

    # batches: the global batch is split evenly over processes
    batch_size: int = 64
    one_dataset_per_batch: bool = False  # each global batch from one dataset (negatives from the same task)
    hard_negatives: int = 0  # per pair, taken from pair.negatives
    gradcache_chunk: int = 0  # rows per forward on each process; 0 = plain step (whole batch at once)
    max_steps: int = 0  # 0 = derive from epochs
    epochs: float = 1.0

    # optimisation
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    loss: LossConfig = field(default_factory=LossConfig)

    # parameters
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze_vision: bool = False
    precision: str = "auto"  # auto: bf16 where the device supports it, else fp32
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    min_pixels: int | None = None
    max_pixels: int | None = None

    # checkpoints and feedback
    save_format: str = "full"  # full | adapter (LoRA only) | merged (LoRA merged into the base)
    save_every: int = 0  # steps; 0 = only the final model
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    num_workers: int = 0  # DataLoader workers that read rows and open images

    def validate(self) -> "TrainConfig":
        if not self.model:
            raise ConfigError("model: give a checkpoint folder (e.g. model=runs/tiny)")
        if not self.output_dir:
            raise ConfigError("output_dir: give a folder for checkpoints and logs")
        if not self.datasets:
            raise ConfigError("datasets: give at least one Pair JSONL file")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if self.save_format not in SAVE_FORMATS:
            raise ConfigError(f"save_format must be one of {SAVE_FORMATS}, not {self.save_format!r}")
        if self.save_format in ("adapter", "merged") and not self.lora.enabled:
            raise ConfigError(f"save_format={self.save_format} needs lora.enabled=true")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.loss.temperature <= 0:
            raise ConfigError("loss.temperature must be > 0")
        weights = dataclasses.asdict(self.loss)
        weights.pop("temperature")
        if any(d < 1 for d in weights.pop("matryoshka_dims")):
            raise ConfigError(f"loss.matryoshka_dims must be positive sizes, not {self.loss.matryoshka_dims}")
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ConfigError(f"loss weights must be >= 0 and at least one > 0, got {weights}")
        for d in self.datasets:
            if d.weight <= 0:
                raise ConfigError(f"dataset {d.path}: weight must be > 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), **values: Any) -> TrainConfig:
    """Read a YAML recipe (optional), apply ``key=value`` overrides, then keyword values; validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe is a YAML mapping of keys to values")
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    for key, value in values.items():
        set_dotted(raw, key, value)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    return build(TrainConfig, raw, "").validate()


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` from a command line: the key, and the value read as YAML (empty: None)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not key=value")
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def build(cls: type, raw: Any, where: str) -> Any:
    """A dataclass instance from a plain dict, checking every key (recursively)."""
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        if cls is DatasetConfig and isinstance(raw, str):
            return DatasetConfig(path=raw)
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        item = (typing.get_args(hint) or [None])[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(hint):  # a section, e.g. loss, lora
            value = build(hint, value or {}, f"{where}{name}.")
        elif dataclasses.is_dataclass(item):  # a list of sections, e.g. datasets
            value = [build(item, d, f"{where}{name}.{i}.") for i, d in enumerate(value or [])]
        else:
            value = _coerce(value, hint, f"{where}{name}")
        kwargs[name] = value
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Scalars as their field's type: YAML reads ``1e-3`` as a string, ``5`` for a float field as an int."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ConfigError(f"{key} cannot be null")
    base = args[0] if len(args) == 1 and typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    try:
        if base is bool and not isinstance(value, bool):
            if str(value).lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return str(value).lower() in ("true", "1", "yes")
        if base is float:
            return float(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base is str:
            return str(value)
        if typing.get_origin(base) is list:  # each entry as the list's item type
            item = (typing.get_args(base) or (str,))[0]
            return [_coerce(v, item, key) for v in (value if isinstance(value, (list, tuple)) else [value])]
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a valid {getattr(base, '__name__', base)}") from None
    return value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        nxt_is_index = parts[depth + 1].isdigit()
        if isinstance(node, list):
            if part.isdigit() and int(part) == len(node):  # one past the end: a new entry
                node.append([] if nxt_is_index else {})
            i = _index(node, part, key)
            if isinstance(node[i], str):  # a dataset given as a bare path
                node[i] = {"path": node[i]}
            node = node[i]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt_is_index else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        i = int(last)
        if i == len(node):
            node.append(value)
        else:
            node[_index(node, last, key)] = value
    else:
        node[last] = value


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key!r}: {part!r} is not an index of a list of {len(node)}")
    return int(part)
