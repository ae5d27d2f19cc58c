"""Recipes (YAML + key=value overrides) and the data mixture (weights, one dataset per batch, resumable order)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from mmemb.train.config import ConfigError, DatasetConfig, load_config
from mmemb.train.data import BatchPlan, PairSource, StepLoader, open_sources

from .train_helpers import write_mixed, write_pairs

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, f"{prefix}{k}.")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            out |= _keys(v[0], f"{prefix}{k}.0.")
    return out


def test_recipes_load_and_share_one_structure():
    tiny, big = (yaml.safe_load((CONFIGS / name).read_text()) for name in ("tiny-minimmeb.yaml", "qwen3-vl-4b-train.yaml"))
    assert _keys(tiny) == _keys(big) == _keys(load_config(CONFIGS / "tiny-minimmeb.yaml").to_dict())
    cfg = load_config(CONFIGS / "qwen3-vl-4b-train.yaml")
    assert cfg.lora.enabled and cfg.batch_size == 1024 and cfg.gradcache_chunk > 0 and cfg.precision == "bf16"
    assert cfg.lr == 5e-5 and isinstance(cfg.lr, float)  # YAML's "5.0e-5" and "5e-5" both end up floats


def test_overrides_reach_nested_keys_and_are_typed():
    cfg = load_config(CONFIGS / "tiny-minimmeb.yaml", [
        "lr=1e-3", "loss.temperature=0.05", "lora.enabled=true", "lora.target_modules=[q_proj, v_proj]",
        "datasets.0.weight=2", "datasets.1.path=extra.jsonl", "max_steps=7", "save_format=merged"])
    assert cfg.lr == 1e-3 and cfg.loss.temperature == 0.05 and cfg.max_steps == 7
    assert cfg.lora.enabled and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert [(d.path, d.weight) for d in cfg.datasets] == [("runs/demo/minimmeb", 2.0), ("extra.jsonl", 1.0)]


@pytest.mark.parametrize("override, message", [
    ("lossx.lm=1", "unknown config key"),
    ("loss.lmm=1", "loss.lmm"),
    ("lr=fast", "lr"),
    ("save_format=adapter", "lora.enabled"),
    ("loss.temperature=0", "temperature"),
    ("batch_size", "key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny-minimmeb.yaml", [override])


def test_batch_plan_is_a_pure_function_of_seed_and_step():
    a = BatchPlan([10, 30], [1.0, 1.0], 8, False, seed=3)
    b = BatchPlan([10, 30], [1.0, 1.0], 8, False, seed=3)
    assert a.steps_per_epoch == 5
    later_first = [b.batch(s).tolist() for s in (7, 2, 0)]  # order of asking does not matter
    assert later_first == [a.batch(s).tolist() for s in (7, 2, 0)]
    epoch = np.concatenate([a.batch(s) for s in range(5)])
    assert sorted(map(tuple, epoch.tolist())) == sorted([(0, r) for r in range(10)] + [(1, r) for r in range(30)])
    assert a.batch(5).tolist() != a.batch(0).tolist()  # a new epoch, a new order
    assert BatchPlan([10, 30], [1.0, 1.0], 8, False, seed=4).batch(0).tolist() != a.batch(0).tolist()


def test_weights_upsample_and_one_dataset_per_batch():
    plan = BatchPlan([10, 30], [2.0, 0.5], 5, True, seed=0)
    rows = np.concatenate([plan.batch(s) for s in range(plan.steps_per_epoch)])
    assert plan.steps_per_epoch == 4 + 3  # 20 rows of dataset 0 and 15 of dataset 1, batches of 5
    counts = np.bincount(rows[:, 0])
    assert counts.tolist() == [20, 15]
    assert np.bincount(rows[rows[:, 0] == 0, 1], minlength=10).tolist() == [2] * 10  # each row twice
    for s in range(plan.steps_per_epoch):
        assert len(set(plan.batch(s)[:, 0].tolist())) == 1  # one dataset per batch


def test_processes_split_the_global_batch_and_bad_pairs_are_skipped(tmp_path, tiny_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_path)
    path = write_mixed(tmp_path / "mixed", n_class=4, n_sum=3, corrupt=1)
    sources = open_sources([DatasetConfig(path=str(path))])
    plan = BatchPlan([len(sources[0])], [1.0], 8, False, seed=0)
    whole = StepLoader(sources, plan, processor, 0, 1)[0]
    parts = [StepLoader(sources, plan, processor, r, 2)[0] for r in range(2)]
    assert [p.id for p in whole.pairs] == [p.id for part in parts for p in part.pairs]
    assert len(whole.pairs) == 7 and len(whole.skipped) == 1 and "corrupt-0" in whole.skipped[0]
    assert "image 0" in whole.skipped[0] and "query" in whole.skipped[0]
    assert sum(len(p.skipped) for p in parts) == 1
    sums = [p for p in whole.pairs if p.rationale]
    assert sums and all(p.label in (0, 1) for p in sums)


def test_pair_source_indexes_lines_and_ignores_blank_and_partial_lines(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3')  # blank line; last line cut by a kill
    src = PairSource(f, "p")
    assert len(src) == 2 and [src.read(i)[0]["a"] for i in range(2)] == [1, 2]
    assert src.image_root == str(tmp_path)  # no manifest above: the file's own folder


def test_benchmark_folder_gives_one_dataset_per_task(tmp_path):
    paths = write_pairs(tmp_path / "bench", n_class=4, n_sum=2)
    sources = open_sources([DatasetConfig(path=str(tmp_path / "bench"), weight=0.5)])
    assert [s.name for s in sources] == sorted(paths) and all(s.weight == 0.5 for s in sources)
    assert all(s.image_root == str((tmp_path / "bench").resolve()) for s in sources)


def test_cli_relaunches_through_accelerate_and_refuses_an_existing_run(tmp_path):
    from typer.testing import CliRunner

    from mmemb.cli import app
    from mmemb.parallel import launch_command

    cmd = launch_command(["train", "--config=r.yaml", "--resume", "lr=1e-4"], 2)
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--num_processes"] and cmd[4] == "2"
    assert cmd[-6:] == ["-m", "mmemb.cli", "train", "--config=r.yaml", "--resume", "lr=1e-4"]
    assert "--config_file" in launch_command(["train"], 8, "configs/accelerate/fsdp.yaml")

    ckpt = tmp_path / "run" / "checkpoints" / "step-000003"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text('{"step": 3}')
    args = ["train", "--config", str(CONFIGS / "tiny-minimmeb.yaml"), "--num-processes", "2",
            f"output_dir={tmp_path / 'run'}"]
    result = CliRunner().invoke(app, args)  # checked before any process is launched
    assert result.exit_code == 1 and "already holds checkpoints (latest step-000003)" in result.output
    result = CliRunner().invoke(app, args + ["loss.weird=1"])
    assert result.exit_code == 1 and "loss.weird" in result.output
