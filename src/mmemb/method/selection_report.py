"""selection.md + selection.png: what the counterfactual selection kept, per task, teacher and type."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fileio import atomic_write_text, iter_jsonl
from .selection import kept_counts, utilities_by_type


def write_selection_report(selection_path: str | Path, out_prefix: str | Path) -> None:
    rows = list(iter_jsonl(selection_path))
    out_prefix = Path(out_prefix)
    margin = rows[0]["margin"] if rows else 0.0
    lines = ["# Counterfactual selection", "",
             f"{len(rows)} pairs; a rationale is kept where {utility_label(rows)} > margin = {margin}.", ""]

    def table(title: str, key) -> None:
        groups = kept_counts(rows, key)
        lines.extend([f"## Kept share per {title}", "", f"| {title} | kept | candidates | share |", "|---|---:|---:|---:|"])
        for name, (kept, total) in sorted(groups.items()):
            lines.append(f"| {name} | {kept} | {total} | {kept / total:.1%} |")
        lines.append("")

    table("task", lambda r, c: r["dataset"])
    table("teacher", lambda r, c: c["teacher"])
    if any("type" in c for r in rows for c in r["candidates"]):
        table("rationale type (MiniMMEB)", lambda r, c: f"{r.get('kind') or 'all'} / {c.get('type', 'unknown')}")
    reason = sum(r["label"] == "reason" for r in rows)
    lines += ["## Pair labels", "", f"{reason} of {len(rows)} pairs labelled `reason` "
              f"({reason / max(1, len(rows)):.1%}); the rest `direct`.", ""]
    per_task: dict[str, list[int]] = {}
    for r in rows:
        per_task.setdefault(r["dataset"], []).append(r["label"] == "reason")
    lines += ["| task | reason share |", "|---|---:|"]
    lines += [f"| {t} | {np.mean(v):.1%} |" for t, v in sorted(per_task.items())]
    lines += ["", f"![delta by rationale type]({out_prefix.name}.png)", ""]
    atomic_write_text(out_prefix.with_suffix(".md"), "\n".join(lines))
    plot_deltas(rows, out_prefix.with_suffix(".png"), margin)


def utility_label(rows: list[dict]) -> str:
    if rows and rows[0].get("utility") == "prob":
        return "gain = p(t+ | q, r) - p(t+ | q)"
    return "delta = s(r) - s(no rationale) [nats]"


def plot_deltas(rows: list[dict], png: str | Path, margin: float) -> None:
    """Histograms of the candidates' utilities by rationale type, one panel per task kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = utilities_by_type(rows)
    kinds = sorted({k.split("/")[0] for k in groups})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        values = [v for k, v in groups.items() if k.startswith(kind + "/")]
        if not values:
            continue
        lo, hi = np.percentile(np.concatenate(values), [1, 99])
        bins = np.linspace(lo, hi, 40)
        for k, v in sorted(groups.items()):
            if k.startswith(kind + "/"):
                ax.hist(np.clip(v, lo, hi), bins=bins, alpha=0.5, label=k.split("/", 1)[1], density=True)
        ax.axvline(margin, color="black", linestyle="--", linewidth=1, label=f"margin {margin}")
        ax.set_title(f"{kind} tasks: utility by rationale type")
        ax.set_xlabel(utility_label(rows))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)

