"""The method's verbs from the command line: rationales -> select -> gate, and rl."""

from __future__ import annotations

import json
import subprocess
import sys

from mmemb.fileio import read_jsonl


def _mmemb(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "mmemb.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_rationales_select_gate_rl(tiny_path, minimmeb_small, tmp_path):
    pairs = minimmeb_small / "train" / "DigitSum.jsonl"
    out = _mmemb("rationales", "--teacher", "minimmeb:faithful=0.5,format_only=0.5", "--data", pairs, "--k", 2,
                 "--out", tmp_path / "r.jsonl", "--tokenizer", tiny_path)
    assert "80 rationales written" in out
    assert {r["type"] for r in read_jsonl(tmp_path / "r.jsonl")} == {"faithful", "format_only"}
    out = _mmemb("select", "--model", tiny_path, "--pairs", pairs, "--rationales", tmp_path / "r.jsonl",
                 "--out", tmp_path / "selection.jsonl", "--margin", "0", "--sampled-negatives", 4)
    assert "40 pairs scored" in out
    assert (tmp_path / "selection.md").read_text().startswith("# Counterfactual selection")
    assert (tmp_path / "selection.png").stat().st_size > 0
    labels = [r["label"] for r in read_jsonl(tmp_path / "selection.jsonl")]
    if len(set(labels)) == 2:  # a random model's verdicts: the gate needs both labels to train
        metrics = json.loads(_mmemb("gate", "--model", tiny_path, "--selection", tmp_path / "selection.jsonl",
                                    "--pairs", pairs, "--out", tmp_path / "gate", "--epochs", 1).splitlines()[-1])
        assert 0 <= metrics["accuracy"] <= 1 and (tmp_path / "gate" / "gate_config.json").is_file()
    out = _mmemb("rl", f"model={tiny_path}", f"out={tmp_path / 'rl'}", f"data=[{pairs}]", "steps=1",
                 "queries_per_step=2", "group_size=2", "max_reasoning_tokens=4")
    assert (tmp_path / "rl" / "model" / "config.json").is_file() and "final policy" in out
