"""Running the stages in order: skipped when done, redone on --force, the baseline beside the chain.

A stage is done when its marker ``.stages/<stage>.json`` exists (written last, with its wall
time) and, for a stage whose work depends on switches (the ablations, the systems evaluated), was
written under the same switches: `mmemb demo --ablations` on a finished demo run trains and
evaluates just the ablations. ``--force STAGE`` removes the markers and outputs of that stage and of every stage that
depends on it (directly or not), so nothing stale survives and nothing else is redone.
The direct-only baseline needs only the pretrained model, so it is started in a second process
(one core) as soon as pretraining is done, while the main chain goes on here on the other core.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import yaml

from ..fileio import read_json, write_json
from .config import PipelineConfig
from .layout import Run
from .stages import DEPENDS, OUTPUTS, SCOPES, STAGES

ORDER = list(STAGES)


def marker(run: Run, stage: str) -> Path:
    return run.root / ".stages" / f"{stage}.json"


def is_done(run: Run, stage: str) -> bool:
    path = marker(run, stage)
    if not path.is_file():
        return False
    return stage not in SCOPES or read_json(path).get("scope") == SCOPES[stage](run)


def dependents(stage: str) -> list[str]:
    """``stage`` and every stage that depends on it, in run order."""
    out = {stage}
    for later in ORDER[ORDER.index(stage) + 1:]:
        if out & set(DEPENDS[later]):
            out.add(later)
    return [s for s in ORDER if s in out]


def force(run: Run, stage: str) -> None:
    """Forget ``stage`` and its dependents (markers and outputs)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(ORDER)}")
    for later in dependents(stage):
        if run.cfg.benchmark and later == "data":
            continue  # never delete a benchmark the run did not build
        marker(run, later).unlink(missing_ok=True)
        for rel in OUTPUTS[later]:
            path = run.root / rel
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def run_pipeline(cfg: PipelineConfig, until: str | None = None, only: str | None = None,
                 forced: Sequence[str] = ()) -> Run:
    run = Run(cfg)
    run.root.mkdir(parents=True, exist_ok=True)
    config_path = run.root / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    for stage in forced:
        force(run, stage)
    if only is not None:
        _run_stage(run, only)
        return run
    last = ORDER.index(until) if until else len(ORDER) - 1
    stages = ORDER[:last + 1]
    baseline = None
    for stage in stages:
        if stage == "baseline" and baseline is not None:
            _wait_baseline(run, baseline)
            continue
        _run_stage(run, stage)
        if stage == "pretrain" and cfg.parallel_baseline and "baseline" in stages and not is_done(run, "baseline"):
            baseline = _start_baseline(run, config_path)
    return run


def _run_stage(run: Run, stage: str) -> None:
    if is_done(run, stage):
        print(f"[mmemb] {stage}: done already (skipped; --force {stage} redoes it)", flush=True)
        return
    print(f"[mmemb] {stage} ...", flush=True)
    start = time.perf_counter()
    STAGES[stage](run)
    seconds = time.perf_counter() - start
    done = {"stage": stage, "seconds": round(seconds, 2), "finished": time.time()}
    if stage in SCOPES:
        done["scope"] = SCOPES[stage](run)
    write_json(marker(run, stage), done)
    print(f"[mmemb] {stage}: {seconds:.1f}s", flush=True)


def _start_baseline(run: Run, config_path: Path) -> subprocess.Popen:
    """The baseline in its own process on one core; this process keeps one core for the chain."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log = open(run.root / "baseline.log", "w")
    cmd = [sys.executable, "-m", "mmemb.cli", "pipeline", "--config", str(config_path), "--only", "baseline"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log = log  # type: ignore[attr-defined]
    proc.started = time.perf_counter()  # type: ignore[attr-defined]
    torch.set_num_threads(1)
    print(f"[mmemb] baseline: started beside the main chain (log: {run.root / 'baseline.log'})", flush=True)
    return proc


def _wait_baseline(run: Run, proc: subprocess.Popen) -> None:
    start = time.perf_counter()
    code = proc.wait()
    proc.log.close()  # type: ignore[attr-defined]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if code != 0 or not is_done(run, "baseline"):
        tail = (run.root / "baseline.log").read_text().splitlines()[-15:]
        raise RuntimeError("the baseline stage failed:\n" + "\n".join(tail))
    waited = time.perf_counter() - start
    info = read_json(marker(run, "baseline"))
    print(f"[mmemb] baseline: {info['seconds']:.1f}s in its own process (waited {waited:.1f}s for it)", flush=True)
