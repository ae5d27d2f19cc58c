"""Whole training runs: resume after SIGKILL, LoRA / merged checkpoints, NaN stop, logs and plots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmemb import Embedder, Item
from mmemb.data.minimmeb import BuildConfig, build
from mmemb.data.minimmeb_tasks import TASKS
from mmemb.eval.runner import evaluate
from mmemb.train.checkpoint import checkpoint_step, latest_checkpoint, list_checkpoints
from mmemb.train.config import load_config
from mmemb.train.step import TrainStep
from mmemb.train.trainer import Trainer, TrainingDiverged, train

from .train_helpers import write_pairs

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"), n_class=32, n_sum=16, negatives=2)


def recipe(tiny_path, pairs, out, *extra):
    return [f"model={tiny_path}", f"output_dir={out}", "batch_size=8", "hard_negatives=1", "lr=1e-3",
            "loss.temperature=0.05", f"datasets=[{pairs['DigitClass']}, {pairs['DigitSum']}]", *extra]


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_path, pairs, tmp_path):
    common = recipe(tiny_path, pairs, "unused", "max_steps=14", "save_every=3")
    reference = train(load_config(None, common + [f"output_dir={tmp_path / 'a'}"]))

    killed = tmp_path / "b"
    cfg_file = tmp_path / "recipe.yaml"
    cfg_file.write_text(yaml.safe_dump(load_config(None, common + [f"output_dir={killed}"]).to_dict()))
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "mmemb.cli", "train", "--config", str(cfg_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while latest_checkpoint(killed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = latest_checkpoint(killed)
    assert last is not None and checkpoint_step(last) < 14 and not (killed / "model").exists(), proc.stderr.read()

    resumed = train(load_config(None, common + [f"output_dir={killed}"]), resume=True)
    a, b = weights(reference), weights(resumed)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    base = weights(tiny_path)
    assert max(float((a[k] - base[k]).abs().max()) for k in base if a[k].shape == base[k].shape) > 1e-3  # it trained
    steps = [r["step"] for r in map(json.loads, (killed / "log.jsonl").read_text().splitlines())]
    assert steps == list(range(1, 15))  # rows after the checkpoint were re-done, not duplicated
    assert (killed / "loss.png").stat().st_size > 1000


def test_lora_adapter_and_merged_checkpoints_encode_like_the_trained_model(tiny_path, pairs, tmp_path):
    trainer = Trainer(load_config(None, recipe(tiny_path, pairs, tmp_path / "run", "max_steps=3", "lr=2e-2",
                                               "lora.enabled=true", "lora.rank=4", "lora.dropout=0.1",
                                               "save_format=adapter")))
    adapter = trainer.run()
    merged = trainer.export(tmp_path / "merged", save_format="merged")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == Path(tiny_path).resolve()
    assert not (merged / "adapter_config.json").exists()

    rng = np.random.default_rng(0)
    from PIL import Image

    items = [Item(text="3 7 1", instruction="Represent the given caption."), "seven",
             Item(images=[Image.fromarray((rng.random((16, 48, 3)) * 255).astype("uint8"))],
                  text="What is the sum of the digits?", instruction="Represent the given image with the following question:")]
    in_memory = Embedder(trainer.backbone).encode(items, mode="auto")
    base = Embedder.from_pretrained(tiny_path).encode(items, mode="auto")
    assert np.abs(in_memory.embeddings - base.embeddings).max() > 1e-3  # the adapter changed the model
    for folder, tol in ((adapter, 1e-6), (merged, 1e-4)):
        loaded = Embedder.from_pretrained(str(folder)).encode(items, mode="auto")
        assert np.abs(loaded.embeddings - in_memory.embeddings).max() <= tol, folder
        np.testing.assert_allclose(loaded.p_think, in_memory.p_think, atol=tol)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_path, pairs, tmp_path, monkeypatch):
    original = TrainStep.__call__

    def poisoned(self, batch):
        if batch.step == 4:  # the 5th step: a weight goes NaN, as an overflow would make it
            with torch.no_grad():
                next(self.backbone.parameters()).view(-1)[0] = float("nan")
        return original(self, batch)

    monkeypatch.setattr(TrainStep, "__call__", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"loss nan .* at step 5.*step-000004"):
        train(load_config(None, recipe(tiny_path, pairs, out, "max_steps=8", "save_every=2")))
    assert [checkpoint_step(p) for p in list_checkpoints(out)] == [2, 4]
    good = weights(latest_checkpoint(out))
    assert all(torch.isfinite(v).all() for v in good.values())
    assert not (out / "model").exists()
    Embedder.from_pretrained(str(latest_checkpoint(out))).encode(["3 7 1"], mode="direct")


EASY = ("DigitClass", "DigitCaption-I2T", "DigitCaption-T2I", "DigitGround")


def test_short_run_on_minimmeb_easy_tasks_rises_well_above_chance(tiny_path, tmp_path):
    root = build(tmp_path / "mm", BuildConfig(seed=3, train_pairs=1600, val_queries=0, test_queries=40, tasks=EASY))
    trainer = Trainer(load_config(HERE.parent / "configs" / "tiny-minimmeb.yaml", [
        f"model={tiny_path}", f"output_dir={tmp_path / 'run'}", f"datasets=[{root}]", "max_steps=100",
        "hard_negatives=0", "log_every=10", "seed=0"]))
    trainer.run()
    summary = evaluate(Embedder(trainer.backbone), "minimmeb-easy", tmp_path / "eval", mode="direct", data=str(root),
                       cache_dir=str(tmp_path / "cache"), show_progress=False)
    scores = {t: (summary["tasks"][t]["main"], 1 / TASKS[t].n_candidates) for t in EASY}  # held-out Hit@1, chance
    mean_hit, mean_chance = np.mean([s[0] for s in scores.values()]), np.mean([s[1] for s in scores.values()])
    # measured with seeds 0, 1, 2 (this backbone and data): mean 0.26-0.34 against chance 0.08,
    # DigitClass 0.58-0.78 against 0.10 (the untrained backbone: mean 0.09)
    assert mean_hit >= 0.2 and mean_hit >= 2.4 * mean_chance, scores
    assert scores["DigitClass"][0] >= 0.35, scores
