"""Aggregate per-task scores into meta-task / modality / kind averages, and render them as markdown.

Every average is the unweighted mean of the tasks' main metrics (MMEB-V2's convention: each
task counts once, whatever its size).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import numpy as np


def group_key(score: dict) -> str:
    return f"{score.get('modality', '?')}/{score.get('meta_task', '?')}"


def aggregate(scores: Iterable[dict]) -> dict[str, Any]:
    """Per-task main metrics and their averages by meta-task, modality, kind and overall."""
    scores = list(scores)
    groups: dict[str, dict[str, list[float]]] = {"meta_task": defaultdict(list), "modality": defaultdict(list),
                                                 "kind": defaultdict(list)}
    tasks = {}
    for s in scores:
        tasks[s["task"]] = {
            "modality": s.get("modality"), "meta_task": s.get("meta_task"), "kind": s.get("kind"),
            "metric": s["metric"], "main": s["main"], "invocation_ratio": s.get("invocation_ratio", 0.0),
            "generated_tokens_per_query": s.get("generated_tokens_per_query", 0.0),
            "seconds_per_query": s.get("run", {}).get("seconds_per_query"),
            "num_queries": s.get("num_queries"), "failed_items": s.get("failures", {}).get("count", 0),
        }
        groups["meta_task"][group_key(s)].append(s["main"])
        groups["modality"][s.get("modality", "?")].append(s["main"])
        if s.get("kind"):
            groups["kind"][s["kind"]].append(s["main"])
    out: dict[str, Any] = {"tasks": tasks}
    for name, g in groups.items():
        out[f"by_{name}"] = {k: {"main": float(np.mean(v)), "tasks": len(v)} for k, v in g.items()}
    n_queries = sum(s.get("num_queries", 0) for s in scores)
    reasoned = sum(s.get("reasoned_queries", 0) for s in scores)
    tokens = sum(s.get("generated_tokens", 0) for s in scores)
    seconds = sum(s.get("run", {}).get("query_encode_seconds", 0.0) for s in scores)
    out["overall"] = {
        "main": float(np.mean([s["main"] for s in scores])) if scores else None,
        "tasks": len(scores),
        "queries": n_queries,
        "invocation_ratio": reasoned / n_queries if n_queries else 0.0,
        "generated_tokens": tokens,
        "generated_tokens_per_query": tokens / n_queries if n_queries else 0.0,
        "query_encode_seconds": seconds,
        "seconds_per_query": seconds / n_queries if n_queries else 0.0,
        "failed_items": sum(s.get("failures", {}).get("count", 0) for s in scores),
    }
    return out


def render_markdown(summary: dict[str, Any], title: str = "Evaluation") -> str:
    """summary.md: settings, per task, per meta-task, per modality, per kind (metrics x 100)."""
    lines = [f"# {title}", ""]
    settings = summary.get("settings", {})
    if settings:
        lines += [", ".join(f"{k}={v}" for k, v in settings.items() if v is not None), ""]
    ov = summary["overall"]
    lines += [f"Overall: **{pct(ov['main'])}** (mean main metric over {ov['tasks']} tasks, x100); "
              f"invocation ratio {ov['invocation_ratio']:.1%}; {ov['generated_tokens_per_query']:.1f} generated "
              f"tokens/query; {ov['seconds_per_query'] * 1000:.1f} ms/query to encode queries; "
              f"{ov['failed_items']} failed items.", ""]
    cands = summary.get("candidates")
    if cands:
        lines += [f"Candidates: {cands['references']} references, {cands['unique']} unique "
                  f"(dedup ratio {cands['dedup_ratio']:.3f}); {cands['encoded']} encoded in this run, "
                  f"{cands['from_cache']} found in the cache (counted per task).", ""]
    lines += ["| task | modality | meta-task | kind | metric | score | reasoned | gen tok/q | ms/q | failed |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for name, t in summary["tasks"].items():
        spq = t.get("seconds_per_query")
        lines.append(f"| {name} | {t['modality']} | {t['meta_task']} | {t.get('kind') or ''} | {t['metric']} | "
                     f"{pct(t['main'])} | {t['invocation_ratio']:.1%} | {t['generated_tokens_per_query']:.1f} | "
                     f"{'' if spq is None else f'{spq * 1000:.1f}'} | {t['failed_items']} |")
    for key, label in (("by_meta_task", "meta-task"), ("by_modality", "modality"), ("by_kind", "kind")):
        if summary.get(key):
            lines += ["", f"| {label} | tasks | score |", "|---|---:|---:|"]
            lines += [f"| {k} | {v['tasks']} | {pct(v['main'])} |" for k, v in summary[key].items()]
    return "\n".join(lines) + "\n"


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"
