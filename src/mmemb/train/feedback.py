"""Training feedback: a JSONL row per logged step, and a PNG of the loss curves at the end."""

from __future__ import annotations

from pathlib import Path

from ..fileio import JsonlAppender, iter_jsonl, write_jsonl

CURVES = ("loss", "nce_direct", "nce_reason", "lm", "decision")


class TrainLog:
    """``log.jsonl`` in the run folder. On resume, rows after the resumed step are dropped first."""

    def __init__(self, path: str | Path, resume_step: int = 0):
        self.path = Path(path)
        if self.path.exists():
            kept = [r for r in iter_jsonl(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
            write_jsonl(self.path, kept)
        self._out = JsonlAppender(self.path)

    def write(self, row: dict) -> None:
        self._out.write(row)

    def close(self) -> None:
        self._out.close()


def plot_losses(log_path: str | Path, out_png: str | Path) -> Path | None:
    """One panel per loss term against the step; returns the PNG path (None if nothing was logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(iter_jsonl(log_path)) if Path(log_path).exists() else []
    curves = [c for c in CURVES if any(c in r for r in rows)]
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.8), squeeze=False)
    for ax, name in zip(axes[0], curves):
        pts = [(r["step"], r[name]) for r in rows if name in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
