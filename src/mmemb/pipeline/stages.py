"""The pipeline's stages. Each reads and writes plain files in the run folder:

    minimmeb/            the benchmark (data)              backbone/         the tiny backbone
    pairs/<set>/*.jsonl  derived training pairs            <stage>/model/    each training stage's model
    rationales.jsonl     candidate rationales              selection.jsonl   counterfactual verdicts (+ .md, .png)
    rl/model/            the GRPO policy                   gate/             the plug-in gate
    eval/<system>/       evaluation runs                   report.md, report.json, *.png
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from ..data.pairs import read_pairs
from ..fileio import write_json
from ..items import Pair
from .config import PipelineConfig
from .layout import Run


# ---- training stages ------------------------------------------------------------------------
def train_stage(run: Run, stage: str, model: Path, pairs_dir: Path, processes: int | None = None,
                extra: dict | None = None) -> Path:
    """Train ``stage`` from ``model`` on every pair file in ``pairs_dir``; resume a killed run."""
    from ..train.checkpoint import latest_checkpoint
    from ..train.config import config_from_dict

    values = run.cfg.stage_train(stage)
    values.update(extra or {})
    values.update(model=str(model), output_dir=str(run.root / stage),
                  datasets=[{"path": str(f)} for f in sorted(pairs_dir.glob("*.jsonl"))])
    cfg = config_from_dict(values)
    resume = latest_checkpoint(cfg.output_dir) is not None
    processes = run.cfg.processes if processes is None else processes
    if processes > 1 or run.cfg.accelerate_config:
        return _train_processes(run, stage, cfg, processes, resume)
    from ..train import train

    return train(cfg, resume=resume)


def _train_processes(run: Run, stage: str, cfg, processes: int, resume: bool) -> Path:
    """``mmemb train --num-processes N`` on a recipe written for this stage (one core each)."""
    import subprocess
    import sys

    import yaml

    recipe = run.root / f"{stage}.yaml"
    recipe.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    cmd = [sys.executable, "-m", "mmemb.cli", "train", "--config", str(recipe), "--num-processes", str(processes)]
    if resume:
        cmd.append("--resume")
    if run.cfg.accelerate_config:
        cmd += ["--accelerate-config", run.cfg.accelerate_config]
    subprocess.run(cmd, check=True)
    return Path(cfg.output_dir) / "model"


def faithful_pairs(pairs: list[Pair], seed: int) -> list[Pair]:
    """Pairs whose query carries its correct step-by-step rationale (MiniMMEB ground truth)."""
    from ..data.minimmeb_teacher import rationale

    rng = random.Random(seed)
    return [p.with_rationale(rationale("faithful", p.meta, rng)) for p in pairs]


def candidate_pairs(pairs: list[Pair], rationales: dict[str, list[dict]], seed: int) -> list[Pair]:
    """Pairs whose query carries one of its candidate rationales, drawn at random (seeded)."""
    rng = random.Random(seed)
    return [p.with_rationale(rng.choice(rationales[p.id])["text"]) for p in pairs if rationales.get(p.id)]


def examples_seen(values: dict, steps_key: str = "max_steps", batch_key: str = "batch_size") -> int:
    return int(values.get(steps_key, 0)) * int(values.get(batch_key, 0))


# ---- stage functions -----------------------------------------------------------------------
def stage_data(run: Run) -> None:
    from ..data.minimmeb import BuildConfig, build

    if run.cfg.benchmark or not run.is_minimmeb:
        if run.cfg.benchmark and not (run.benchmark / "manifest.json").is_file():
            raise FileNotFoundError(f"benchmark {run.benchmark} has no manifest.json")
        return
    build(run.benchmark, BuildConfig(seed=run.cfg.seed, **run.cfg.build), progress=True)


def stage_backbone(run: Run) -> None:
    from ..data.minimmeb import tokenizer_corpus
    from ..model.tiny import build_tiny_backbone

    if not run.cfg.model:
        build_tiny_backbone(run.cfg.backbone["arch"], run.root / "backbone", corpus=tokenizer_corpus(),
                            size=run.cfg.backbone.get("size", "tiny"),
                            seed=run.cfg.seed)


def stage_pretrain_lm(run: Run) -> None:
    if run.cfg.model:
        return
    run.write_pairs("pretrain", faithful_pairs(read_pairs(run.benchmark), run.cfg.seed))
    train_stage(run, "pretrain_lm", run.root / "backbone", run.pairs_dir("pretrain"), run.cfg.pretrain_processes)


def stage_pretrain(run: Run) -> None:
    if run.cfg.model:
        return
    train_stage(run, "pretrain", run.model("pretrain_lm"), run.pairs_dir("pretrain"), run.cfg.pretrain_processes)


def stage_rationales(run: Run) -> None:
    from ..method.rationales import run_rationales
    from ..method.teachers import make_teacher
    from ..model.backbone import load_tokenizer

    spec = run.cfg.rationales
    teachers = [make_teacher(t, seed=run.cfg.seed) for t in spec["teachers"]]
    tokenizer = load_tokenizer(run.start_model)  # to count rationale tokens: no weights needed
    run_rationales(run.subset(), teachers, int(spec["k"]), run.root / "rationales.jsonl", tokenizer=tokenizer)


def stage_warmup(run: Run) -> None:
    from ..method.rationales import load_rationales

    pairs = candidate_pairs(run.subset(), load_rationales(run.root / "rationales.jsonl"), run.cfg.seed)
    train_stage(run, "warmup", run.start_model, run.write_pairs("warmup", pairs))


def stage_select(run: Run) -> None:
    from ..method.rationales import load_rationales
    from ..method.selection import SelectionConfig, select
    from ..method.selection_report import write_selection_report

    opts = dict(run.cfg.select)
    opts.setdefault("temperature", run.cfg.stage_train("joint")["loss"]["temperature"])
    opts.setdefault("seed", run.cfg.seed)
    select(run.load(run.model("warmup")), run.subset(),
           load_rationales(run.root / "rationales.jsonl"), run.root / "selection.jsonl", SelectionConfig(**opts))
    write_selection_report(run.root / "selection.jsonl", run.root / "selection")


def stage_joint(run: Run) -> None:
    from ..method.selection import labelled_pairs

    pairs = labelled_pairs(run.subset(), run.root / "selection.jsonl")
    train_stage(run, "joint", run.model("warmup"), run.write_pairs("joint", pairs))


def stage_blind(run: Run) -> None:
    """The ablation: joint training on all candidate rationales, without selection."""
    from ..method.rationales import load_rationales

    if not run.cfg.blind.get("enabled"):
        return
    pairs = candidate_pairs(run.subset(), load_rationales(run.root / "rationales.jsonl"), run.cfg.seed + 1)
    steps = run.cfg.stage_train("joint")["max_steps"]
    train_stage(run, "blind", run.model("warmup"), run.write_pairs("blind", pairs), extra={"max_steps": steps})


def baseline_steps(cfg: PipelineConfig) -> int:
    """As many training examples as the method sees after pretraining (warm-up, joint, RL queries)."""
    seen = examples_seen(cfg.stage_train("warmup")) + examples_seen(cfg.stage_train("joint"))
    seen += int(cfg.rl["steps"]) * int(cfg.rl["queries_per_step"])
    return max(1, round(seen / cfg.stage_train("baseline")["batch_size"]))


def stage_baseline(run: Run) -> None:
    pairs = [p.with_rationale(None) for p in run.subset()]
    train_stage(run, "baseline", run.start_model, run.write_pairs("baseline", pairs),
                extra={"max_steps": baseline_steps(run.cfg)})


def stage_rl(run: Run) -> None:
    from ..method.grpo import RLConfig, run_rl

    opts = dict(run.cfg.rl)
    opts.setdefault("device", run.cfg.device)
    opts.setdefault("dtype", run.cfg.dtype)
    cfg = RLConfig(model=str(run.model("joint")), out=str(run.root / "rl"),
                   data=[str(run.pairs_dir("subset") / "*.jsonl")], seed=run.cfg.seed,
                   reward_temperature=run.cfg.stage_train("joint")["loss"]["temperature"], **opts)
    run_rl(cfg)


def stage_gate(run: Run) -> None:
    from ..method.gate_training import GateTrainConfig, train_gate
    from ..model.backbone import load_backbone

    pairs = run.read_pairs("joint")
    gate, metrics = train_gate(load_backbone(run.model("rl"), device=run.cfg.device, dtype=run.cfg.dtype), pairs,
                               GateTrainConfig(seed=run.cfg.seed, **run.cfg.gate), show_progress=True)
    gate.save(run.root / "gate")
    write_json(run.root / "gate_metrics.json", metrics)


def systems(run: Run) -> dict[str, tuple[Path, str, bool]]:
    """name -> (model, query mode, with the plug-in gate)."""
    out = {"direct": (run.model("baseline"), "direct", False), "always": (run.model("rl"), "reason", False),
           "adaptive": (run.model("rl"), "auto", False), "gate": (run.model("rl"), "auto", True),
           "final_direct": (run.model("rl"), "direct", False)}
    if run.cfg.blind.get("enabled"):
        out.update({"joint_reason": (run.model("joint"), "reason", False),
                    "joint_direct": (run.model("joint"), "direct", False),
                    "blind_reason": (run.model("blind"), "reason", False),
                    "blind_direct": (run.model("blind"), "direct", False)})
    return out


def stage_eval(run: Run) -> None:
    from ..eval.runner import evaluate
    from ..model.embedder import Embedder
    from ..model.gate import load_gate

    opts = {k: v for k, v in run.cfg.eval.items() if k != "sweep"}
    data = run.cfg.eval_data or str(run.benchmark)
    loaded: dict[Path, Embedder] = {}  # systems of one model share its weights (loaded once)
    for name, (model, mode, gated) in systems(run).items():
        if model not in loaded:
            loaded = {model: run.load(model)}  # one model in memory at a time
        base = loaded[model]
        embedder = Embedder(base.backbone, gate=load_gate(run.root / "gate") if gated else None,
                            max_image_pixels=base.max_image_pixels)
        evaluate(embedder, run.cfg.eval_tasks, run.root / "eval" / name, mode=mode, data=data,
                 cache_dir=str(run.root / "eval" / ".cache"), **opts)


def stage_report(run: Run) -> None:
    from .report import write_report

    if run.is_minimmeb:
        write_report(run)
    else:  # other benchmarks: the evaluation runs compared side by side
        from ..eval.report import write_report as compare_runs

        compare_runs([run.root / "eval" / name for name in systems(run)], run.root / "report")


STAGES: dict[str, Callable[[Run], None]] = {
    "data": stage_data, "backbone": stage_backbone, "pretrain_lm": stage_pretrain_lm, "pretrain": stage_pretrain,
    "rationales": stage_rationales, "warmup": stage_warmup, "select": stage_select, "joint": stage_joint,
    "blind": stage_blind, "rl": stage_rl, "gate": stage_gate, "baseline": stage_baseline, "eval": stage_eval,
    "report": stage_report,
}

# What each stage reads from earlier stages: --force STAGE redoes it and everything that depends on it.
DEPENDS: dict[str, list[str]] = {
    "data": [], "backbone": [], "pretrain_lm": ["data", "backbone"], "pretrain": ["pretrain_lm"],
    "rationales": ["data", "pretrain"], "warmup": ["rationales"], "select": ["warmup"], "joint": ["select"],
    "blind": ["warmup"], "rl": ["joint"], "gate": ["rl", "joint"], "baseline": ["pretrain", "rationales"],
    "eval": ["rl", "gate", "baseline", "blind", "joint"], "report": ["eval", "select"],
}

# What each stage leaves behind (removed by --force so the stage really runs again).
OUTPUTS: dict[str, list[str]] = {
    "data": ["minimmeb"], "backbone": ["backbone"], "pretrain_lm": ["pretrain_lm", "pairs/pretrain"],
    "pretrain": ["pretrain"], "rationales": ["rationales.jsonl", "pairs/subset"],
    "warmup": ["warmup", "pairs/warmup"], "select": ["selection.jsonl", "selection"],
    "joint": ["joint", "pairs/joint"], "blind": ["blind", "pairs/blind"], "rl": ["rl"],
    "gate": ["gate", "gate_metrics.json"], "baseline": ["baseline", "pairs/baseline"], "eval": ["eval"],
    "report": ["report.md", "report.json", "report"],
}
