"""``mmemb report``: compare evaluation runs — a markdown table and PNG bar charts.

Reads each run's ``<TASK>/score.json`` files (so an unfinished run shows what it has), writes
``report.md``, ``tasks.png`` (main metric per task) and ``meta_tasks.png`` (per meta-task mean).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..fileio import atomic_write_text, read_json
from .summary import aggregate, pct


def load_run(path: str | Path) -> list[dict[str, Any]]:
    """The task scores of one run folder, in task order of its summary when there is one."""
    path = Path(path)
    scores = [read_json(p) for p in sorted(path.glob("*/score.json"))]
    if not scores:
        raise FileNotFoundError(f"{path}: no <TASK>/score.json files (is it an `mmemb eval` output folder?)")
    summary = path / "summary.json"
    if summary.exists():
        order = {name: i for i, name in enumerate(read_json(summary)["tasks"])}
        scores.sort(key=lambda s: order.get(s["task"], len(order)))
    return scores


def run_labels(paths: Sequence[str | Path]) -> list[str]:
    """Folder names, made longer (parent/name) where two runs share a name."""
    paths = [Path(p).resolve() for p in paths]
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def write_report(runs: Sequence[str | Path], out: str | Path) -> dict[str, Path]:
    """Compare runs per task and per meta-task; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = run_labels(runs)
    summaries = [aggregate(load_run(r)) for r in runs]
    tasks = list(dict.fromkeys(t for s in summaries for t in s["tasks"]))
    groups = list(dict.fromkeys(g for s in summaries for g in s["by_meta_task"]))

    def task_value(s, t, key="main"):
        return s["tasks"][t][key] if t in s["tasks"] else None

    lines = ["# Run comparison", "", "Main metric x 100 (hit@1 for image/video tasks, ndcg@5 for visual documents).", "",
             "## Overall", "", "| run | tasks | score | reasoned | gen tok/q | ms/q |", "|---|---:|---:|---:|---:|---:|"]
    for label, s in zip(labels, summaries):
        o = s["overall"]
        lines.append(f"| {label} | {o['tasks']} | {pct(o['main'])} | {o['invocation_ratio']:.1%} | "
                     f"{o['generated_tokens_per_query']:.1f} | {o['seconds_per_query'] * 1000:.1f} |")
    lines += ["", "## Per meta-task", "", "| meta-task | " + " | ".join(labels) + " |",
              "|---|" + "---:|" * len(labels)]
    for g in groups:
        lines.append(f"| {g} | " + " | ".join(pct(s["by_meta_task"].get(g, {}).get("main")) for s in summaries) + " |")
    lines += ["", "## Per task", "", "| task | metric | " + " | ".join(labels) + " |",
              "|---|---|" + "---:|" * len(labels)]
    for t in tasks:
        metric = next(s["tasks"][t]["metric"] for s in summaries if t in s["tasks"])
        lines.append(f"| {t} | {metric} | " + " | ".join(pct(task_value(s, t)) for s in summaries) + " |")
    lines += ["", "## Invocation ratio per task (share of queries that reasoned)", "",
              "| task | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for t in tasks:
        vals = [task_value(s, t, "invocation_ratio") for s in summaries]
        lines.append(f"| {t} | " + " | ".join("" if v is None else f"{v:.1%}" for v in vals) + " |")
    lines += ["", "![per task](tasks.png)", "", "![per meta-task](meta_tasks.png)", ""]

    paths = {"markdown": out / "report.md", "tasks_png": out / "tasks.png", "meta_tasks_png": out / "meta_tasks.png"}
    atomic_write_text(paths["markdown"], "\n".join(lines))
    _bar_chart(paths["tasks_png"], tasks, labels, [[task_value(s, t) for t in tasks] for s in summaries],
               "Main metric per task")
    _bar_chart(paths["meta_tasks_png"], groups, labels,
               [[s["by_meta_task"].get(g, {}).get("main") for g in groups] for s in summaries],
               "Mean main metric per meta-task")
    return paths


def _bar_chart(path: Path, categories: list[str], labels: list[str], values: list[list[float | None]],
               title: str) -> None:
    """Grouped bars: one group per category, one bar per run (x 100; missing values left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_runs = len(labels)
    width = 0.8 / n_runs
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(categories) * max(1, n_runs) + 2), 4.5))
    x = np.arange(len(categories))
    for r, (label, vals) in enumerate(zip(labels, values)):
        heights = [np.nan if v is None else 100 * v for v in vals]
        ax.bar(x + (r - (n_runs - 1) / 2) * width, heights, width, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(categories, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("score x 100")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
