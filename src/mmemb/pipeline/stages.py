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
from typing import Any, Callable

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
    scorer = opts.pop("scorer", "warmup")
    if scorer not in ("warmup", "start"):
        raise ValueError(f"select.scorer must be warmup or start, not {scorer!r}")
    opts.setdefault("temperature", run.cfg.stage_train("joint")["loss"]["temperature"])
    opts.setdefault("seed", run.cfg.seed)
    select(run.load(run.model("warmup") if scorer == "warmup" else run.start_model), run.subset(),
           load_rationales(run.root / "rationales.jsonl"), run.root / "selection.jsonl", SelectionConfig(**opts))
    write_selection_report(run.root / "selection.jsonl", run.root / "selection")


def stage_joint(run: Run) -> None:
    from ..method.selection import labelled_pairs

    pairs = labelled_pairs(run.subset(), run.root / "selection.jsonl")
    train_stage(run, "joint", run.model("warmup"), run.write_pairs("joint", pairs))


def stage_blind(run: Run) -> None:
    """The ablation: joint training on all candidate rationales, without selection."""
    from ..method.rationales import load_rationales

    if not (run.cfg.blind.get("enabled") or run.cfg.ablations.get("no_selection")):
        return
    if (run.model("blind") / "config.json").is_file():
        return  # trained under an earlier switch (see SCOPES)
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
    train_rl(run, run.model("joint"), run.root / "rl")


def train_rl(run: Run, start: Path, out: Path, **overrides) -> Path:
    """GRPO from ``start`` into ``out`` with the recipe's settings, ``overrides`` on top."""
    from ..method.grpo import RLConfig, run_rl

    opts = dict(run.cfg.rl)
    opts.update(overrides)
    opts.setdefault("device", run.cfg.device)
    opts.setdefault("dtype", run.cfg.dtype)
    cfg = RLConfig(model=str(start), out=str(out), data=[str(run.pairs_dir("subset") / "*.jsonl")], seed=run.cfg.seed,
                   reward_temperature=run.cfg.stage_train("joint")["loss"]["temperature"], **opts)
    return run_rl(cfg)


def stage_gate(run: Run) -> None:
    train_gate_on(run, run.model("rl"), run.root / "gate", run.root / "gate_metrics.json")


def train_gate_on(run: Run, model: Path, out: Path, metrics_path: Path) -> None:
    """The plug-in gate on ``model``'s layer-0 features, trained on the selection's labels."""
    from ..method.gate_training import GateTrainConfig, train_gate
    from ..model.backbone import load_backbone

    gate, metrics = train_gate(load_backbone(model, device=run.cfg.device, dtype=run.cfg.dtype), run.read_pairs("joint"),
                               GateTrainConfig(seed=run.cfg.seed, **run.cfg.gate), show_progress=True)
    gate.save(out)
    write_json(metrics_path, metrics)


# Each GRPO ablation: where it starts and what it changes in the recipe's `rl` section.
RL_ABLATIONS: dict[str, tuple[str, dict]] = {
    "no_selection": ("blind", {}), "rl_no_cost": ("joint", {"cost": 0.0}), "rl_delta": ("joint", {"reward": "delta"}),
    "rl_depth": ("joint", {"depth": True}),
}


def stage_ablations(run: Run) -> None:
    """The enabled ablations' models in ``ablations/<name>/``; each is skipped when it is there."""
    root = run.root / "ablations"
    for name, (start, overrides) in RL_ABLATIONS.items():
        if run.cfg.ablations.get(name) and not (root / name / "model" / "config.json").is_file():
            print(f"[mmemb] ablations: {name} (GRPO from {start}, {overrides or 'the same recipe'})", flush=True)
            train_rl(run, run.model(start), root / name, **overrides)
    if run.cfg.ablations.get("gate_alone") and not (root / "gate_alone" / "gate").is_dir():
        print("[mmemb] ablations: gate_alone (the plug-in gate on the joint model)", flush=True)
        train_gate_on(run, run.model("joint"), root / "gate_alone" / "gate", root / "gate_alone" / "gate_metrics.json")


def systems(run: Run) -> dict[str, tuple[Path, str, Path | None]]:
    """name -> (model, query mode, plug-in gate folder or None); systems of one model side by side."""
    rl, joint, gate = run.model("rl"), run.model("joint"), run.root / "gate"
    out = {"direct": (run.model("baseline"), "direct", None), "always": (rl, "reason", None),
           "adaptive": (rl, "auto", None), "gate": (rl, "auto", gate), "final_direct": (rl, "direct", None)}
    if run.cfg.blind.get("enabled"):
        out.update({"joint_reason": (joint, "reason", None), "joint_direct": (joint, "direct", None),
                    "blind_reason": (run.model("blind"), "reason", None),
                    "blind_direct": (run.model("blind"), "direct", None)})
    on = run.cfg.ablations
    if on.get("no_rl"):
        out["no_rl"] = (joint, "auto", None)
    if on.get("gate_alone"):
        out["gate_alone"] = (joint, "auto", run.root / "ablations" / "gate_alone" / "gate")
    for name in RL_ABLATIONS:
        if on.get(name):
            out[name] = (run.root / "ablations" / name / "model", "auto", None)
    return out


def timing_sample(run: Run, n: int) -> list:
    """About ``n`` test queries, the first of each evaluation task in equal shares."""
    from ..data.loaders import load_task
    from ..data.mmeb import resolve_tasks

    data = run.cfg.eval_data or str(run.benchmark)
    infos = resolve_tasks(run.cfg.eval_tasks, data)
    per_task = max(1, n // len(infos))
    return [q for info in infos for q in load_task(info, data, run.cfg.eval.get("split", "test")).queries[:per_task]]


def system_embedder(run: Run, loaded: dict, model: Path, gate: Path | None, keep: int):
    """The embedder of one system: its model's weights, shared by the systems of that model (kept in
    ``loaded``, at most ``keep`` models in memory), with the system's plug-in gate where it has one."""
    from ..model.embedder import Embedder
    from ..model.gate import load_gate

    if model not in loaded:
        while len(loaded) >= keep:
            loaded.pop(next(iter(loaded)))
        loaded[model] = run.load(model)
    base = loaded[model]
    return Embedder(base.backbone, gate=load_gate(gate) if gate else None, max_image_pixels=base.max_image_pixels)


def stage_eval(run: Run) -> None:
    from ..eval.runner import evaluate

    opts = {k: v for k, v in run.cfg.eval.items() if k != "sweep"}
    data = run.cfg.eval_data or str(run.benchmark)
    loaded: dict = {}
    for name, (model, mode, gate) in systems(run).items():  # systems of one model are listed together
        embedder = system_embedder(run, loaded, model, gate, keep=1)
        evaluate(embedder, run.cfg.eval_tasks, run.root / "eval" / name, mode=mode, data=data,
                 cache_dir=str(run.root / "eval" / ".cache"), **opts)


def stage_timing(run: Run) -> None:
    """The four systems' encode times on one query sample, interleaved (see mmemb.eval.timing)."""
    from ..eval.runner import EvalConfig
    from ..eval.timing import encode_time_ratios

    encode = EvalConfig(**{k: v for k, v in run.cfg.eval.items() if k != "sweep"})
    loaded: dict = {}
    timed, every = {}, systems(run)
    for name in TIMED:  # timed in alternation: every system's model in memory at once
        model, mode, gate = every[name]
        timed[name] = (system_embedder(run, loaded, model, gate, keep=len(TIMED)), encode.encode_kwargs(mode))
    queries = timing_sample(run, int(run.cfg.timing["queries"]))
    result = encode_time_ratios(timed, queries, "direct", rounds=int(run.cfg.timing["rounds"]))
    write_json(run.root / "timing.json", result)


TIMED = ("direct", "always", "adaptive", "gate")  # the systems of the report's results table


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
    "blind": stage_blind, "rl": stage_rl, "gate": stage_gate, "ablations": stage_ablations, "baseline": stage_baseline,
    "eval": stage_eval, "timing": stage_timing, "report": stage_report,
}

# The switches a stage's work depends on, recorded in its marker: where they differ from the run's
# (an ablation turned on), the stage runs again; each of these skips or resumes the work it has.
SCOPES: dict[str, Callable[[Run], Any]] = {
    "blind": lambda run: bool(run.cfg.blind.get("enabled") or run.cfg.ablations.get("no_selection")),
    "ablations": lambda run: sorted(name for name, on in run.cfg.ablations.items() if on),
    "eval": lambda run: sorted(systems(run)),
    "report": lambda run: sorted(systems(run)),
}

# What each stage reads from earlier stages: --force STAGE redoes it and everything that depends on it.
DEPENDS: dict[str, list[str]] = {
    "data": [], "backbone": [], "pretrain_lm": ["data", "backbone"], "pretrain": ["pretrain_lm"],
    "rationales": ["data", "pretrain"], "warmup": ["rationales"], "select": ["warmup"], "joint": ["select"],
    "blind": ["warmup"], "rl": ["joint"], "gate": ["rl", "joint"], "ablations": ["joint", "blind"],
    "baseline": ["pretrain", "rationales"], "eval": ["rl", "gate", "baseline", "blind", "joint", "ablations"],
    "timing": ["rl", "gate", "baseline"], "report": ["eval", "select", "timing"],
}

# What each stage leaves behind (removed by --force so the stage really runs again).
OUTPUTS: dict[str, list[str]] = {
    "data": ["minimmeb"], "backbone": ["backbone"], "pretrain_lm": ["pretrain_lm", "pairs/pretrain"],
    "pretrain": ["pretrain"], "rationales": ["rationales.jsonl", "pairs/subset"],
    "warmup": ["warmup", "pairs/warmup"], "select": ["selection.jsonl", "selection"],
    "joint": ["joint", "pairs/joint"], "blind": ["blind", "pairs/blind"], "rl": ["rl"],
    "gate": ["gate", "gate_metrics.json"], "ablations": ["ablations"], "baseline": ["baseline", "pairs/baseline"],
    "eval": ["eval"], "timing": ["timing.json"], "report": ["report.md", "report.json", "report"],
}
