"""The training step: GradCache equals the plain step; 2 processes (gloo) equal 1 process on the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .step_check import step_results
from .train_helpers import write_mixed

HERE = Path(__file__).resolve().parent
DIRECT_ONLY = ("loss.reason_nce=0", "loss.lm=0", "loss.decision=0")


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    # 7 good pairs (class words with duplicates, sums with rationales and labels) + 1 corrupt image
    return str(write_mixed(tmp_path_factory.mktemp("mixed"), n_class=4, n_sum=3, corrupt=1))


def assert_same(a, b, what):
    terms_a, grads_a = a[0], a[1]
    terms_b, grads_b = b[0], b[1]
    assert set(terms_a) == set(terms_b), what
    for k in terms_a:
        assert terms_a[k] == pytest.approx(terms_b[k], abs=1e-5), f"{what}: {k}"
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10, what
    worst = max(float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a)
    assert worst <= 1e-5, f"{what}: gradients differ by {worst}"


@pytest.mark.parametrize("overrides", [(), DIRECT_ONLY], ids=["joint", "direct-only"])
def test_gradcache_equals_plain_step(tiny_path, mixed_data, overrides):
    results, _ = step_results(tiny_path, mixed_data, chunks=(0, 3), overrides=overrides)
    plain, cached = results[0], results[3]
    assert plain[2] == 7 and plain[3] == 1  # the corrupt pair is skipped and counted
    expected = {"nce_direct", "acc_direct"} | (set() if overrides else {"nce_reason", "acc_reason", "lm", "decision",
                                                                      "acc_decision"})
    assert expected | {"loss"} == set(plain[0])
    assert_same(plain, cached, "gradcache vs plain")


def test_matryoshka_terms_in_the_step(tiny_path, mixed_data):
    overrides = (*DIRECT_ONLY, "loss.matryoshka_dims=[8]")
    results, _ = step_results(tiny_path, mixed_data, chunks=(0, 3), overrides=overrides)
    terms = results[0][0]
    assert {"nce_direct@8", "nce_matryoshka"} <= set(terms)
    assert terms["loss"] == pytest.approx(terms["nce_direct"] + terms["nce_direct@8"], abs=1e-9)
    assert_same(results[0], results[3], "gradcache vs plain, Matryoshka")


def test_gradcache_replays_dropout_masks_with_lora_and_checkpointing(tiny_path, mixed_data):
    # LoRA dropout 0.5: the second pass of each chunk must draw the masks of its first pass
    overrides = ("lora.enabled=true", "lora.dropout=0.5", "gradient_checkpointing=true")
    results, _ = step_results(tiny_path, mixed_data, chunks=(0, 3), overrides=overrides, plain_rows=3)
    assert any("lora_" in n for n in results[0][1]) and not any("visual" in n for n in results[0][1])
    assert_same(results[0], results[3], "gradcache vs plain, LoRA with dropout")


def test_two_processes_equal_one_process(tiny_path, mixed_data, tmp_path):
    out = tmp_path / "rank0.pt"
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_train_check.py"), tiny_path, mixed_data, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(out)
    one, _ = step_results(tiny_path, mixed_data, chunks=(0,))
    assert two[0][2] == 7 and two[0][3] == 1  # the corrupt pair, on one rank only: uneven local batches
    assert_same(one[0], two[0], "2 processes plain vs 1 process")
    assert_same(one[0], two[3], "2 processes GradCache vs 1 process")
