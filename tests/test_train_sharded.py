"""FSDP and DeepSpeed ZeRO-2 on 2 CPU processes (gloo), launched with configs/accelerate/fsdp.yaml and
deepspeed-zero2.yaml: the same loss curve and weights as one process on the joined batch (GradCache;
LoRA), checkpoints that load in one process, and the refusal to run either where accelerate would
silently fall back to plain DDP. How accelerate is made to accept CPU processes: dist_sharded_check.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.torch import load_file

from mmemb import Embedder
from mmemb.fileio import read_json
from mmemb.train import step as step_module
from mmemb.train.config import ConfigError, load_config
from mmemb.train.data import Side
from mmemb.train.step import Row, TrainStep
from mmemb.train.trainer import build_accelerator, train

from .dist_helpers import ENV, free_port, one_thread
from .train_helpers import write_mixed

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs" / "accelerate"
VARIANTS = {  # dropout 0: each process draws its own masks, so only a dropout-free run can match one process
    "gradcache": ["gradcache_chunk=3"],
    "lora": ["lora.enabled=true", "lora.rank=4", "lora.dropout=0", "save_format=adapter"],
}
RUNS = [("fsdp", "gradcache"), ("fsdp", "lora"), ("zero2", "gradcache")]
WEIGHTS = {"gradcache": "model.safetensors", "lora": "adapter_model.safetensors"}


def write_half_text(root: Path) -> Path:
    """Image pairs (one corrupt) interleaved with text-only pairs: in a step one process may hold images
    where the other holds none, which FSDP's sharded vision tower and ZeRO's gradient buckets must survive."""
    path = write_mixed(root, n_class=4, n_sum=3, corrupt=1)
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        rows.append(line)
        rows.append(json.dumps({
            "id": f"text-{i}", "query": {"instruction": "Represent the number.", "text": f"number {i}"},
            "positive": {"instruction": "Represent the given text answer.", "text": str(i)},
            "negatives": [{"instruction": "Represent the given text answer.", "text": str(i + d)} for d in (1, 2)]}))
    out = root / "train" / "half_text.jsonl"
    out.write_text("\n".join(rows) + "\n")
    return out


def recipe(tiny_path: str, data: Path, out: Path, variant: str) -> list[str]:
    return [f"model={tiny_path}", f"datasets=[{data}]", f"output_dir={out}", "batch_size=8", "hard_negatives=2",
            "lr=1e-3", "warmup_steps=0", "schedule=constant", "loss.temperature=0.05", "max_steps=3", "log_every=1",
            "save_every=2", "one_dataset_per_batch=false", *VARIANTS[variant]]


def launch(config: str, engine: str, recipes: list[list[str]]) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", "2", "--main_process_port", str(free_port()), str(HERE / "dist_sharded_check.py"),
           engine, json.dumps(recipes)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_path):
    """RUNS/<engine>/<variant>: trained on 2 processes; RUNS/one/<variant>: on one process."""
    root = tmp_path_factory.mktemp("sharded")
    data = write_half_text(root / "data")
    launch("fsdp.yaml", "FSDP", [recipe(tiny_path, data, root / "fsdp" / v, v) for v in VARIANTS])
    launch("deepspeed-zero2.yaml", "DEEPSPEED", [recipe(tiny_path, data, root / "zero2" / "gradcache", "gradcache")])
    with one_thread():
        for v in VARIANTS:
            train(load_config(None, recipe(tiny_path, data, root / "one" / v, v)))
    return root


def adapted(weights: dict) -> dict:
    """LoRA pairs as the change they make, B·A: the weight the model uses. (Adam normalises each gradient
    element, and A's gradients start near zero while B is zero: there summation-order noise can set the
    sign of A's first update, which B·A, and the model, hardly see.)"""
    out = {k: v for k, v in weights.items() if "lora_" not in k}
    for k, v in weights.items():
        if "lora_A" in k:
            out[k.replace("lora_A", "lora_BA")] = weights[k.replace("lora_A", "lora_B")] @ v
    return out


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("engine,variant", RUNS)
def test_trains_like_one_process_on_the_joined_batch(runs, tiny_path, engine, variant):
    two, one = runs / engine / variant, runs / "one" / variant
    losses = [(a["loss"], b["loss"]) for a, b in zip(log(two), log(one))]
    assert len(losses) == 3 and all(a == pytest.approx(b, abs=1e-4) for a, b in losses), losses
    a, b = load_file(str(two / "model" / WEIGHTS[variant])), load_file(str(one / "model" / WEIGHTS[variant]))
    assert a.keys() == b.keys() and len(a) > 20  # no gathered copy of a tied weight either
    a, b = adapted(a), adapted(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-4
    if variant == "gradcache":  # ... and they moved well beyond that tolerance
        base = load_file(str(Path(tiny_path) / "model.safetensors"))
        moved = max(float((a[k] - base[k]).abs().max()) for k in base if a[k].shape == base[k].shape)
    else:  # B starts at zero, so B·A is all the change
        moved = max(float(a[k].abs().max()) for k in a if "lora_BA" in k)
    assert moved > 5e-4
    state = two / "checkpoints" / "step-000002" / "trainer_state"
    sharded = {"fsdp": ["pytorch_model_fsdp_0", "optimizer_0"], "zero2": ["pytorch_model"]}[engine]
    assert all((state / name).is_dir() for name in sharded)


@pytest.mark.parametrize("engine,variant", RUNS)
def test_checkpoints_load_in_one_process(runs, engine, variant):
    items = ["3 7 1", "number 4"]
    for folder in ("model", "checkpoints/step-000002"):
        got = Embedder.from_pretrained(str(runs / engine / variant / folder)).encode(items).embeddings
        want = Embedder.from_pretrained(str(runs / "one" / variant / folder)).encode(items).embeddings
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_zero2_config_reaches_the_engine(runs):
    ds = read_json(runs / "zero2" / "gradcache" / "deepspeed_config.json")
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and ds["gradient_clipping"] == 1.0 and ds["gradient_accumulation_steps"] == 1
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 8  # global batch 8 on 2


@pytest.mark.parametrize("engine", ["FSDP", "DEEPSPEED"])
def test_fsdp_or_deepspeed_on_cpu_is_refused_not_run_as_ddp(tiny_path, monkeypatch, engine):
    from accelerate.state import AcceleratorState

    monkeypatch.setenv(f"ACCELERATE_USE_{engine}", "true")
    cfg = load_config(None, [f"model={tiny_path}", "output_dir=unused", "datasets=[unused.jsonl]"])
    try:
        with pytest.raises(ConfigError, match=f"asks for {engine}, but accelerate runs NO here"):
            build_accelerator(cfg)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_a_text_only_chunk_gets_the_image_and_video_another_process_has(tiny_path, monkeypatch):
    """What keeps FSDP / ZeRO processes in step, checked in one process: the other process (faked by
    the all-reduce) has images and video in this chunk, this one has text only."""
    from accelerate.utils import DistributedType

    from mmemb.model.backbone import load_backbone
    from mmemb.train.config import LossConfig
    from mmemb.train.losses import JointObjective

    backbone = load_backbone(tiny_path)
    step = TrainStep(SimpleNamespace(distributed_type=DistributedType.FSDP), None, backbone,
                     JointObjective(LossConfig()))
    text = step._dummy_row("text")
    chunk = [Row(Side(text.side.prompt, ([], None), 1), None, step_module.TARGET)]
    monkeypatch.setattr(step_module, "max_across", lambda t: t.new_ones(t.shape))
    step._same_vision_calls([chunk])
    assert [r.kind for r in chunk] == [step_module.TARGET, step_module.DUMMY, step_module.DUMMY]
    assert len(chunk[1].side.visuals[0]) == 1 and len(chunk[2].side.visuals[1]) == 2
    out = step_module.forced_forward(backbone, backbone, step._forced(chunk))
    assert out.embeddings.shape[0] == 3  # the processor and the model take the dummy image and video
