"""The demo's report: report.json (a fixed schema other tools read), report.md and PNGs.

Systems: ``direct`` (the direct-only baseline), ``always`` (the final model, always reasoning),
``adaptive`` (the final model deciding by its own first token) and ``gate`` (the final model,
the plug-in gate deciding). The threshold sweep is exact and needs no extra encoding: in auto
mode a query that reasons gets exactly its reason-mode vector and one that does not gets its
direct-mode vector, so each query's outcome at any threshold is read off the final model's
reason run and direct run by its p(<think>).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_write_text, iter_jsonl, read_json, write_json
from .layout import Run, task_kinds

SYSTEMS = ("direct", "always", "adaptive", "gate")
LABELS = {"direct": "direct-only model (same training budget)", "always": "always reason",
          "adaptive": "adaptive (RL policy)", "gate": "adaptive (gate)"}
# The paper's ablations (pipeline `ablations.<name>=true`), each against the full method (adaptive).
ABLATION_SYSTEMS = {"no_selection": "no counterfactual selection (blind model, then the same GRPO)",
                    "no_rl": "no RL: the joint model's own p(<think>) >= threshold",
                    "rl_no_cost": "GRPO without the token-cost term",
                    "rl_delta": "GRPO rewarded by the paper's utility gap δ = s(chosen) − s(direct)",
                    "gate_alone": "the plug-in gate alone (joint model, no RL)",
                    "rl_depth": "GRPO choosing the depth too (learned budget)"}
# The selection ablation (pipeline `blind.enabled=true`): the joint model against one trained on
# all candidate rationales, each in both modes, before RL.
BEFORE_RL = {"joint_reason": "joint, selected rationales: reason mode",
             "joint_direct": "joint, selected rationales: direct mode",
             "blind_reason": "blind, all rationales: reason mode",
             "blind_direct": "blind, all rationales: direct mode"}


def build_report(run: Run) -> dict[str, Any]:
    kinds = task_kinds(run)
    summaries = {name: read_json(run.root / "eval" / name / "summary.json") for name in SYSTEMS}
    report: dict[str, Any] = {"seed": run.cfg.seed, "seconds": round(_wall_seconds(run), 1), "tasks": kinds,
                              "systems": {}, "selection": {"kept": _kept(run)}}
    timing = read_json(run.root / "timing.json")
    for name, s in summaries.items():
        report["systems"][name] = _system_entry(s, kinds)
        report["systems"][name]["encode_time_over_direct"] = timing["over_direct"][name]
    report["timing"] = {"queries": timing["items"], "rounds": timing["rounds"]}
    ablations = {name: _system_entry(read_json(run.root / "eval" / name / "summary.json"), kinds)
                 for name in ABLATION_SYSTEMS if (run.root / "eval" / name / "summary.json").is_file()}
    if ablations:
        report["ablations"] = ablations
    before_rl = {name: read_json(run.root / "eval" / name / "summary.json") for name in BEFORE_RL
                 if (run.root / "eval" / name / "summary.json").is_file()}
    if before_rl:
        report["ablation"] = {name: {"hit1": {t: s["tasks"][t]["main"] for t in kinds},
                                     "hit1_overall": s["overall"]["main"]} for name, s in before_rl.items()}
    report["sweep"] = threshold_sweep(run, kinds, run.cfg.eval.get("sweep", []))
    gate_metrics = run.root / "gate_metrics.json"
    if gate_metrics.is_file():
        report["gate"] = read_json(gate_metrics)
    report["stages"] = {p.stem: read_json(p)["seconds"] for p in sorted((run.root / ".stages").glob("*.json"))}
    return report


def _system_entry(summary: dict[str, Any], kinds: dict[str, str]) -> dict[str, Any]:
    tasks = summary["tasks"]
    return {"hit1": {t: tasks[t]["main"] for t in kinds}, "hit1_overall": summary["overall"]["main"],
            "invocation": {t: tasks[t]["invocation_ratio"] for t in kinds},
            "generated_tokens_per_query": summary["overall"]["generated_tokens_per_query"],
            "seconds_per_query": summary["overall"]["seconds_per_query"]}


def _kept(run: Run) -> dict[str, dict[str, float]]:
    from ..method.selection import kept_shares

    shares = kept_shares(run.root / "selection.jsonl")
    return {kind: shares.get(kind, {}) for kind in ("compositional", "easy")}


def _wall_seconds(run: Run) -> float:
    """From the first stage's start to the last stage's end (the report itself excluded)."""
    spans = [read_json(p) for p in (run.root / ".stages").glob("*.json")]
    if not spans:
        return 0.0
    return max(s["finished"] for s in spans) - min(s["finished"] - s["seconds"] for s in spans)


def threshold_sweep(run: Run, kinds: dict[str, str], thresholds: list[float]) -> list[dict[str, float]]:
    """Hit@1 (mean over tasks), invocation and generated tokens per query at each threshold."""
    per_task = {}
    for task in kinds:
        reason = list(iter_jsonl(run.root / "eval" / "always" / task / "predictions.jsonl"))
        direct = list(iter_jsonl(run.root / "eval" / "final_direct" / task / "predictions.jsonl"))
        per_task[task] = (np.array([r["p_think"] for r in direct]), np.array([r["hit@1"] for r in reason]),
                          np.array([r["hit@1"] for r in direct]), np.array([r["generated_tokens"] for r in reason]))
    points = []
    for t in sorted({*thresholds, 0.0, 1.01}):
        hits, inv, tokens = [], [], []
        by_kind: dict[str, list[float]] = {}
        for task, (p, hr, hd, tok) in per_task.items():
            think = p >= t
            hit = float(np.where(think, hr, hd).mean())
            hits.append(hit)
            by_kind.setdefault(kinds[task], []).append(hit)
            inv.append(think)
            tokens.append(np.where(think, tok, 0))
        points.append({"threshold": t, "hit1_overall": float(np.mean(hits)),
                       **{f"hit1_{k}": float(np.mean(v)) for k, v in by_kind.items()},
                       "invocation": float(np.concatenate(inv).mean()),
                       "generated_tokens_per_query": float(np.concatenate(tokens).mean())})
    return points


def _mean_of_kind(system: dict[str, Any], kinds: dict[str, str], kind: str) -> float:
    return float(np.mean([system["hit1"][t] for t, k in kinds.items() if k == kind]))


def ablation_rows(report: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """(label, Hit@1 easy, compositional, overall) of each ablation system, then of each model routed
    by task kind (reason on compositional tasks, direct on easy ones: the best a decision could do)."""
    kinds, ab = report["tasks"], report["ablation"]
    rows = [(BEFORE_RL[n], _mean_of_kind(s, kinds, "easy"), _mean_of_kind(s, kinds, "compositional"),
             s["hit1_overall"]) for n, s in ab.items()]
    for model, label in (("joint", "joint, selected rationales"), ("blind", "blind, all rationales")):
        if f"{model}_reason" in ab and f"{model}_direct" in ab:
            hit = {t: ab[f"{model}_reason" if k == "compositional" else f"{model}_direct"]["hit1"][t]
                   for t, k in kinds.items()}
            rows.append((f"{label}: routed by task kind", _mean_of_kind({"hit1": hit}, kinds, "easy"),
                         _mean_of_kind({"hit1": hit}, kinds, "compositional"), float(np.mean(list(hit.values())))))
    return rows


ABLATION_HEAD = ["| model and mode | Hit@1 easy | Hit@1 compositional | Hit@1 overall |", "|---|---:|---:|---:|"]


def _results_head(invocation: str) -> list[str]:
    return [f"| system | Hit@1 easy | Hit@1 compositional | Hit@1 overall | {invocation} | generated tokens / query "
            "| encode time / direct |", "|---|---:|---:|---:|---:|---:|---:|"]


def _quality(s: dict[str, Any], kinds: dict[str, str]) -> list[float]:
    """Hit@1 easy, compositional and overall and invocation (in %), generated tokens per query."""
    return [_mean_of_kind(s, kinds, "easy") * 100, _mean_of_kind(s, kinds, "compositional") * 100,
            s["hit1_overall"] * 100, float(np.mean(list(s["invocation"].values()))) * 100,
            s["generated_tokens_per_query"]]


def _system_values(report: dict[str, Any], name: str) -> list[float]:
    """The results table's columns for one system: :func:`_quality`, then its encode time relative to
    the direct-only model (interleaved on the same queries: the timing stage)."""
    s = report["systems"][name]
    return _quality(s, report["tasks"]) + [s["encode_time_over_direct"]]


def results_table(report: dict[str, Any]) -> str:
    lines = _results_head("invocation")
    for name in SYSTEMS:
        v = _system_values(report, name)
        lines.append(f"| {LABELS[name]} | " + " | ".join(f"{x:.1f}" for x in v[:5]) + f" | {v[5]:.2f} |")
    return "\n".join(lines)


FULL_METHOD = "full method: selection, joint training, GRPO (adaptive)"
ABLATIONS_HEAD = ["| system | Hit@1 easy | Hit@1 compositional | Hit@1 overall | invocation % | generated tokens / query |",
                  "|---|---:|---:|---:|---:|---:|"]


def ablation_values(report: dict[str, Any]) -> list[tuple[str, list[float]]]:
    """(label, :func:`_quality`) of the full method, then of each ablation the run has."""
    kinds = report["tasks"]
    rows = [(FULL_METHOD, _quality(report["systems"]["adaptive"], kinds))]
    rows += [(ABLATION_SYSTEMS[n], _quality(s, kinds)) for n, s in report.get("ablations", {}).items()]
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def write_report(run: Run) -> dict[str, Any]:
    report = build_report(run)
    write_json(run.root / "report.json", report)
    figures = run.root / "report"
    figures.mkdir(exist_ok=True)
    plot_hit1_by_meta_task(run, report, figures / "hit1_by_meta_task.png")
    plot_invocation(report, figures / "invocation_by_task.png")
    plot_tradeoff(report, figures / "accuracy_vs_tokens.png")
    from ..method.selection_report import plot_deltas

    plot_deltas(list(iter_jsonl(run.root / "selection.jsonl")), figures / "delta_by_type.png",
                run.cfg.select.get("margin", 0.0))
    atomic_write_text(run.root / "report.md", render_markdown(report))
    return report


def render_markdown(report: dict[str, Any]) -> str:
    kinds = report["tasks"]
    lines = [f"# mmemb demo report (seed {report['seed']})", "",
             f"MiniMMEB test split; the whole pipeline took {report['seconds'] / 60:.1f} minutes.", "",
             results_table(report), "",
             "Invocation: share of queries that reasoned. Encode time: relative to the direct-only model, the four "
             f"systems encoding the same {report['timing']['queries']} test queries in alternation; the median of "
             f"{report['timing']['rounds']} rounds' ratios.", "", "## Hit@1 per task", "",
             "| task | kind | " + " | ".join(SYSTEMS) + " |", "|---|---|" + "---:|" * len(SYSTEMS)]
    for t, k in kinds.items():
        lines.append(f"| {t} | {k} | " + " | ".join(_pct(report["systems"][s]["hit1"][t]) for s in SYSTEMS) + " |")
    lines += ["", "## Invocation ratio per task", "", "| task | " + " | ".join(SYSTEMS) + " |",
              "|---|" + "---:|" * len(SYSTEMS)]
    for t in kinds:
        lines.append(f"| {t} | " + " | ".join(_pct(report["systems"][s]["invocation"][t]) for s in SYSTEMS) + " |")
    types = sorted({ty for v in report["selection"]["kept"].values() for ty in v})
    lines += ["", "## Counterfactual selection: share of candidate rationales kept", "",
              "| kind | " + " | ".join(types) + " |", "|---|" + "---:|" * len(types)]
    for kind, shares in report["selection"]["kept"].items():
        lines.append(f"| {kind} | " + " | ".join(_pct(shares.get(ty, float("nan"))) for ty in types) + " |")
    if "ablations" in report:
        lines += ["", "## Ablations", ""] + ABLATIONS_HEAD
        lines += [f"| {label} | " + " | ".join(f"{x:.1f}" for x in v) + " |" for label, v in ablation_values(report)]
    if "ablation" in report:
        lines += ["", "## Ablation: counterfactual selection against blind reasoning (before RL)", ""]
        lines += ABLATION_HEAD + [f"| {label} | " + " | ".join(_pct(x) for x in vals) + " |"
                                  for label, *vals in ablation_rows(report)]
    lines += ["", "## Threshold sweep (the final model's own decision)", "",
              "| threshold | Hit@1 overall | invocation | generated tokens / query |", "|---:|---:|---:|---:|"]
    for p in report["sweep"]:
        lines.append(f"| {p['threshold']:.2f} | {_pct(p['hit1_overall'])} | {_pct(p['invocation'])} "
                     f"| {p['generated_tokens_per_query']:.1f} |")
    if "gate" in report:
        g = report["gate"]
        lines += ["", f"Plug-in gate: held-out accuracy {_pct(g['accuracy'])} % on {g['val_pairs']} labelled pairs "
                  f"(reason recall {_pct(g['recall_reason'])} %, direct recall {_pct(g['recall_direct'])} %)."]
    lines += ["", "## Stages (seconds)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["stages"].items()]
    lines += ["", "![Hit@1 by meta-task](report/hit1_by_meta_task.png)",
              "![Invocation by task](report/invocation_by_task.png)",
              "![Accuracy against generated tokens](report/accuracy_vs_tokens.png)",
              "![Utility delta by rationale type](report/delta_by_type.png)", ""]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grouped_bars(series: dict[str, list[float]], groups: list[str], ylabel: str, title: str, png: Path,
                  ymax: float = 1.0) -> None:
    """One bar per series within each group; series keyed by legend label."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(series.items()):
        ax.bar(np.arange(len(groups)) + i * width, vals, width, label=label)
    ax.set_xticks(np.arange(len(groups)) + width * (len(series) - 1) / 2)
    multiline = any("\n" in g for g in groups)
    ax.set_xticklabels(groups, fontsize=7 if multiline else None)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, ymax)
    # Below the axes, so no bar is hidden behind it.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2 if multiline else -0.1),
              ncol=len(series), frameon=False)
    ax.set_title(title)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_hit1_by_meta_task(run: Run, report: dict, png: Path) -> None:
    from ..data.minimmeb import manifest

    meta = {t: v["meta_task"] for t, v in manifest(run.benchmark)["tasks"].items()}
    groups = sorted(set(meta.values()))
    series = {LABELS[name]: [np.mean([report["systems"][name]["hit1"][t] for t in meta if meta[t] == g])
                             for g in groups] for name in SYSTEMS}
    _grouped_bars(series, groups, "Hit@1", "MiniMMEB test: Hit@1 per meta-task", png)


def plot_invocation(report: dict, png: Path) -> None:
    tasks = list(report["tasks"])
    series = {LABELS[name]: [report["systems"][name]["invocation"][t] for t in tasks]
              for name in SYSTEMS if name != "direct"}
    _grouped_bars(series, [f"{t}\n({report['tasks'][t]})" for t in tasks], "share of queries that reason",
                  "Invocation ratio per task", png, ymax=1.05)


def plot_tradeoff(report: dict, png: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    sweep = sorted(report["sweep"], key=lambda p: p["generated_tokens_per_query"])
    ax.plot([p["generated_tokens_per_query"] for p in sweep], [p["hit1_overall"] for p in sweep], "-o", markersize=3,
            color="gray", label="final model, p(<think>) threshold sweep")
    for name, marker in zip(SYSTEMS, "sD^v"):
        s = report["systems"][name]
        ax.plot(s["generated_tokens_per_query"], s["hit1_overall"], marker, markersize=9, label=LABELS[name])
    ax.set_xlabel("generated tokens per query")
    ax.set_ylabel("Hit@1 (mean over tasks)")
    ax.set_title("Accuracy against reasoning cost")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _mean_std_cells(rows: np.ndarray, decimals: list[int]) -> list[str]:
    return [f"{m:.{d}f} ± {sd:.{d}f}" for m, sd, d in zip(rows.mean(0), rows.std(0), decimals)]


def seeds_table(reports: list[dict[str, Any]]) -> str:
    """The results table over several runs (seeds): mean ± std of each column; then each seed against
    the method's goals, and the ablation tables where every run has them."""
    rows = []
    for name in SYSTEMS:
        a = np.array([_system_values(r, name) for r in reports])
        rows.append(f"| {LABELS[name]} | " + " | ".join(_mean_std_cells(a, [1] * 5 + [2])) + " |")
    head = _results_head("invocation %")
    seeds = ", ".join(str(r["seed"]) for r in reports)
    text = "\n".join(head + rows) + f"\n\nmean ± std over {len(reports)} seeds ({seeds})"
    text += "\n\nEach seed against the goals:\n\n" + goals_table(reports)
    if all("ablations" in r for r in reports):
        per_run = [ablation_values(r) for r in reports]
        lines = [f"| {label} | " + " | ".join(_mean_std_cells(np.array([run[i][1] for run in per_run]), [1] * 5)) + " |"
                 for i, (label, _) in enumerate(per_run[0])]
        text += "\n\nAblations:\n\n" + "\n".join(ABLATIONS_HEAD + lines)
    if all("ablation" in r for r in reports):  # runs made with the blind stage
        per_run = [ablation_rows(r) for r in reports]
        lines = []
        for i, (label, *_) in enumerate(per_run[0]):
            a = np.array([run[i][1:] for run in per_run]) * 100
            lines.append(f"| {label} | " + " | ".join(_mean_std_cells(a, [1] * 3)) + " |")
        text += "\n\nAblation, before RL:\n\n" + "\n".join(ABLATION_HEAD + lines)
    return text


# The per-seed goals (README, Results): name, how it is computed from one report, the bound.
GOALS = ["adaptive overall − max(direct-only, always) ≥ 5", "adaptive easy − direct-only easy ≥ −0.5",
         "adaptive compositional − always compositional ≥ −0.5", "faithful compositional kept % ≥ 90",
         "format-only compositional dropped % ≥ 90"]
BOUNDS = [5.0, -0.5, -0.5, 90.0, 90.0]


def goal_values(report: dict[str, Any]) -> list[float]:
    v = {name: _system_values(report, name) for name in ("direct", "always", "adaptive")}
    kept = report["selection"]["kept"].get("compositional", {})
    return [v["adaptive"][2] - max(v["direct"][2], v["always"][2]), v["adaptive"][0] - v["direct"][0],
            v["adaptive"][1] - v["always"][1], 100 * kept.get("faithful", float("nan")),
            100 * (1 - kept.get("format_only", float("nan")))]


def goals_table(reports: list[dict[str, Any]]) -> str:
    lines = ["| seed | " + " | ".join(GOALS) + " |", "|---|" + "---:|" * len(GOALS)]
    for r in reports:
        cells = [f"{x:.1f} {'✓' if x >= bound else '✗'}" for x, bound in zip(goal_values(r), BOUNDS)]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    spread = float(np.std([r["systems"]["adaptive"]["hit1_overall"] * 100 for r in reports]))
    lines += ["", f"std of adaptive overall over the seeds: {spread:.1f} {'✓' if spread <= 3 else '✗'} (goal ≤ 3)"]
    return "\n".join(lines)
