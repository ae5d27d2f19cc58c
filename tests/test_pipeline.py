"""The pipeline: its recipe file, and `mmemb demo --quick` end to end (every stage, the report)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmemb.pipeline.config import PipelineConfig, load_pipeline_config
from mmemb.pipeline.run import ORDER
from mmemb.train.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_recipe_file_equals_the_code_defaults():
    assert load_pipeline_config(REPO / "configs" / "minimmeb.yaml") == PipelineConfig()


def test_overrides_and_errors():
    cfg = load_pipeline_config(None, ["joint.max_steps=7", "select.margin=0.5", "seed=3"])
    assert cfg.joint["max_steps"] == 7 and cfg.select["margin"] == 0.5 and cfg.seed == 3
    assert cfg.stage_train("joint")["max_steps"] == 7 and cfg.stage_train("joint")["batch_size"] == 32
    with pytest.raises(ConfigError, match="unknown pipeline key"):
        load_pipeline_config(None, ["jiont.max_steps=7"])


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = subprocess.run([sys.executable, "-m", "mmemb.cli", "demo", "--quick", "--out", str(out), "--seed", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_demo_runs_every_stage(quick_demo):
    out, stdout = quick_demo
    for stage in ORDER:
        assert (out / ".stages" / f"{stage}.json").is_file(), stage
    for model in ("pretrain_lm", "pretrain", "warmup", "joint", "baseline", "rl"):
        assert (out / model / "model" / "config.json").is_file(), model
    for f in ("rationales.jsonl", "selection.jsonl", "selection.md", "selection.png", "gate/gate.safetensors",
              "report.md", "report/hit1_by_meta_task.png", "report/invocation_by_task.png",
              "report/accuracy_vs_tokens.png", "report/delta_by_type.png", "rl/rl_curves.png", "pretrain/loss.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert "| system | Hit@1 easy | Hit@1 compositional |" in stdout


def test_report_json_schema(quick_demo):
    out, _ = quick_demo
    report = json.loads((out / "report.json").read_text())
    assert report["seed"] == 1 and report["seconds"] > 0
    tasks = report["tasks"]
    assert set(tasks.values()) == {"easy", "compositional"} and len(tasks) == 6
    assert set(report["systems"]) == {"direct", "always", "adaptive", "gate"}
    for name, s in report["systems"].items():
        assert set(s) == {"hit1", "hit1_overall", "invocation", "generated_tokens_per_query", "seconds_per_query"}
        assert set(s["hit1"]) == set(tasks) == set(s["invocation"])
        assert 0 <= s["hit1_overall"] <= 1 and s["seconds_per_query"] > 0
    assert all(v == 0 for v in report["systems"]["direct"]["invocation"].values())
    assert all(v == 1 for v in report["systems"]["always"]["invocation"].values())
    assert report["systems"]["direct"]["generated_tokens_per_query"] == 0
    kept = report["selection"]["kept"]
    assert set(kept) == {"compositional", "easy"}
    assert set(kept["compositional"]) <= {"faithful", "misread", "slip", "format_only"}
    # the sweep's end points are the final model's always-reason and direct runs
    ends = {p["threshold"]: p for p in report["sweep"]}
    assert ends[0.0]["invocation"] == 1.0 and ends[1.01]["invocation"] == 0.0
    assert ends[0.0]["hit1_overall"] == pytest.approx(report["systems"]["always"]["hit1_overall"])


def test_rerun_skips_and_force_redoes(quick_demo):
    out, _ = quick_demo
    args = [sys.executable, "-m", "mmemb.cli", "demo", "--quick", "--out", str(out), "--seed", "1"]
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert again.stdout.count("done already") == len(ORDER)
    before = (out / ".stages" / "gate.json").read_text()
    forced = subprocess.run(args + ["--force", "gate"], capture_output=True, text=True, timeout=300)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "[mmemb] gate ..." in forced.stdout and "[mmemb] rl: done already" in forced.stdout
    assert (out / ".stages" / "gate.json").read_text() != before


def test_full_scale_recipe_has_the_same_keys_and_parses():
    import yaml

    tiny = yaml.safe_load((REPO / "configs" / "minimmeb.yaml").read_text())
    full = yaml.safe_load((REPO / "configs" / "qwen3-vl-4b.yaml").read_text())
    assert set(full) == set(tiny)
    cfg = load_pipeline_config(REPO / "configs" / "qwen3-vl-4b.yaml")
    assert cfg.eval_tasks == "mmeb-v2" and cfg.device == "cuda"
    from mmemb.train.config import config_from_dict

    for stage in ("warmup", "joint", "baseline"):  # every training stage is a valid trainer config
        values = cfg.stage_train(stage)
        values.update(model="m", output_dir="o", datasets=[{"path": "d"}])
        assert config_from_dict(values).lora.enabled
    from mmemb.method.teachers import parse_spec

    assert all(parse_spec(t)[0] == "openai" for t in cfg.rationales["teachers"])


def test_demo_table_over_runs(quick_demo):
    out, _ = quick_demo
    proc = subprocess.run([sys.executable, "-m", "mmemb.cli", "demo-table", str(out), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("| system |") and len([x for x in lines if x.startswith("| ")]) == 1 + 4  # header, 4 systems
    assert "± 0.0" in lines[2] and "over 2 seeds (1, 1)" in proc.stdout


def test_blind_ablation_adds_its_rows(quick_demo, tmp_path):
    """`blind.enabled=true --force blind` on a finished run: the blind model is trained, both models are
    evaluated in both modes, and the report gains the ablation table."""
    import shutil

    out, _ = quick_demo
    run = tmp_path / "run"
    shutil.copytree(out, run)
    proc = subprocess.run([sys.executable, "-m", "mmemb.cli", "pipeline", "--config", str(run / "pipeline.yaml"),
                           "--out", str(run), "blind.enabled=true", "--force", "blind"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "blind" / "model" / "config.json").is_file()
    report = json.loads((run / "report.json").read_text())
    assert set(report["ablation"]) == {"joint_reason", "joint_direct", "blind_reason", "blind_direct"}
    assert all(set(a["hit1"]) == set(report["tasks"]) for a in report["ablation"].values())
    md = (run / "report.md").read_text()
    assert "## Ablation: counterfactual selection against blind reasoning" in md
    routed = [x for x in md.splitlines() if "routed by task kind" in x]
    assert len(routed) == 2  # joint and blind, each reasoning on compositional tasks only
    table = subprocess.run([sys.executable, "-m", "mmemb.cli", "demo-table", str(run), str(run)],
                           capture_output=True, text=True, timeout=120).stdout
    assert "Ablation, before RL:" in table and table.count("± 0.0 |") >= 6 * 3
