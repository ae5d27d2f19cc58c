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
    """One quick seed with every ablation, through the several-seeds path (`--seeds 1`: OUT/s1)."""
    root = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "mmemb.cli", "demo", "--quick", "--ablations", "--seeds", "1",
                           "--out", str(root)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "s1", proc.stdout


def test_quick_demo_runs_every_stage(quick_demo):
    out, stdout = quick_demo
    for stage in ORDER:
        assert (out / ".stages" / f"{stage}.json").is_file(), stage
    for model in ("pretrain_lm", "pretrain", "warmup", "joint", "baseline", "rl", "blind", *(
            f"ablations/{name}" for name in ("no_selection", "rl_no_cost", "rl_delta", "rl_depth"))):
        assert (out / model / "model" / "config.json").is_file(), model
    for f in ("rationales.jsonl", "selection.jsonl", "selection.md", "selection.png", "gate/gate.safetensors",
              "ablations/gate_alone/gate/gate.safetensors", "timing.json",
              "report.md", "report/hit1_by_meta_task.png", "report/invocation_by_task.png",
              "report/accuracy_vs_tokens.png", "report/delta_by_type.png", "rl/rl_curves.png", "pretrain/loss.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    # each GRPO ablation starts where it should and changes what it says
    config = {name: json.loads((out / "ablations" / name / "rl_config.json").read_text())
              for name in ("no_selection", "rl_no_cost", "rl_delta", "rl_depth")}
    assert config["no_selection"]["model"].endswith("blind/model") and config["rl_delta"]["model"].endswith("joint/model")
    assert config["rl_no_cost"]["cost"] == 0 and config["rl_delta"]["reward"] == "delta" and config["rl_depth"]["depth"]
    assert "| system | Hit@1 easy | Hit@1 compositional |" in stdout and "Each seed against the goals" in stdout
    assert (out.parent / "table.md").read_text().startswith("| system |")


def test_report_json_schema(quick_demo):
    out, _ = quick_demo
    report = json.loads((out / "report.json").read_text())
    assert report["seed"] == 1 and report["seconds"] > 0
    tasks = report["tasks"]
    assert set(tasks.values()) == {"easy", "compositional"} and len(tasks) == 6
    assert set(report["systems"]) == {"direct", "always", "adaptive", "gate"}
    for name, s in report["systems"].items():
        assert set(s) == {"hit1", "hit1_overall", "invocation", "generated_tokens_per_query", "seconds_per_query",
                          "encode_time_over_direct"}
        assert set(s["hit1"]) == set(tasks) == set(s["invocation"])
        assert 0 <= s["hit1_overall"] <= 1 and s["seconds_per_query"] > 0 and s["encode_time_over_direct"] > 0
    assert report["systems"]["direct"]["encode_time_over_direct"] == 1.0
    timing = json.loads((out / "timing.json").read_text())
    assert report["timing"] == {"queries": timing["items"], "rounds": 2} and timing["threads"] == 1
    assert all(len(v) == 2 for v in timing["seconds"].values())  # every system timed in each round
    from mmemb.pipeline.config import ABLATIONS

    assert set(report["ablations"]) == set(ABLATIONS)
    assert all(set(a) == set(report["systems"]["direct"]) - {"encode_time_over_direct"}
               for a in report["ablations"].values())
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
    args = [sys.executable, "-m", "mmemb.cli", "demo", "--quick", "--ablations", "--out", str(out), "--seed", "1"]
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
    blocks = [b.splitlines() for b in proc.stdout.strip().split("\n\n")]
    assert blocks[0][0].startswith("| system |") and len(blocks[0]) == 2 + 4  # header, rule, 4 systems
    assert "± 0.0" in blocks[0][2] and "over 2 seeds (1, 1)" in blocks[1][0]
    goals = blocks[3]
    assert len(goals) == 2 + 2 and all(line.count("✓") + line.count("✗") == 5 for line in goals[2:])
    assert "std of adaptive overall over the seeds: 0.0 ✓" in proc.stdout
    ablations = blocks[blocks.index(["Ablations:"]) + 1]
    assert len(ablations) == 2 + 1 + 6 and ablations[2].startswith("| full method")
    assert "Ablation, before RL:" in proc.stdout


def test_ablations_in_the_report(quick_demo):
    """The ablation systems are evaluated and tabled; the blind model against the joint model, before RL."""
    out, _ = quick_demo
    report = json.loads((out / "report.json").read_text())
    assert set(report["ablation"]) == {"joint_reason", "joint_direct", "blind_reason", "blind_direct"}
    assert all(set(a["hit1"]) == set(report["tasks"]) for a in report["ablation"].values())
    md = (out / "report.md").read_text()
    assert "## Ablations" in md and "## Ablation: counterfactual selection against blind reasoning" in md
    routed = [x for x in md.splitlines() if "routed by task kind" in x]
    assert len(routed) == 2  # joint and blind, each reasoning on compositional tasks only
    # no RL is the joint model deciding by its own p(<think>): per query, its reason-mode outcome where it
    # reasoned, else its direct-mode outcome
    from mmemb.fileio import read_jsonl

    for task in report["tasks"]:
        auto, reason, direct = (read_jsonl(out / "eval" / name / task / "predictions.jsonl")
                                for name in ("no_rl", "joint_reason", "joint_direct"))
        for a, r, d in zip(auto, reason, direct):
            assert a["reasoned"] == (a["p_think"] >= 0.5) and a["hit@1"] == (r if a["reasoned"] else d)["hit@1"]


def test_seeds_option_and_ablation_names_are_checked():
    from mmemb.cli import parse_seeds

    assert parse_seeds("0-4") == [0, 1, 2, 3, 4] and parse_seeds("0,2,5") == [0, 2, 5] and parse_seeds("0-1,7") == [0, 1, 7]
    with pytest.raises(Exception, match="--seeds"):
        parse_seeds("a-b")
    with pytest.raises(ConfigError, match="unknown ablation"):
        load_pipeline_config(None, ["ablations.no_gate=true"])


def test_switches_rerun_the_stages_they_change(tmp_path, monkeypatch):
    """A stage's marker records the switches it ran under: turning an ablation on in a finished run
    makes the ablation, blind, eval and report stages run again (each resumes what it has), and
    nothing else."""
    from mmemb.pipeline.layout import Run
    from mmemb.pipeline.run import _run_stage, is_done
    from mmemb.pipeline.stages import STAGES

    plain = load_pipeline_config(None, [], out=str(tmp_path / "run"))
    run = Run(plain)
    ran = []
    for stage in ORDER:
        monkeypatch.setitem(STAGES, stage, lambda r, s=stage: ran.append(s))  # markers without the work
        _run_stage(run, stage)
    assert ran == ORDER and all(is_done(run, s) for s in ORDER)
    with_gate = Run(load_pipeline_config(None, ["ablations.gate_alone=true"], out=str(tmp_path / "run")))
    assert [s for s in ORDER if not is_done(with_gate, s)] == ["ablations", "eval", "report"]
    blind = Run(load_pipeline_config(None, ["blind.enabled=true"], out=str(tmp_path / "run")))
    assert [s for s in ORDER if not is_done(blind, s)] == ["blind", "eval", "report"]
    assert all(is_done(Run(plain), s) for s in ORDER)  # the same switches: nothing to redo
