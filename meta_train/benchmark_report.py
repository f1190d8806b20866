"""Writes a held-out benchmark report: docs/generalisation.md, its JSON and its two figures.

Every number in the document is read from the report dictionary that ``run_benchmark`` returns
and that is written beside it as JSON, so each cell can be traced to its runs.
"""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any

from .benchmark import UNSTABLE_CHECKPOINTS, UNSTABLE_FACTOR, UNSTABLE_RULE, dumps
from .checkpoint import atomic_write_bytes

MD_NAME = "generalisation.md"
JSON_NAME = "generalisation.json"
RATIO_FIGURE = "figures/heldout-ratios.png"
CURVES_FIGURE = "figures/heldout-curves.png"


def _unstable(count: object, cell: dict) -> str:
    """An unstable-run count, with † when it was judged by the first sittings' rule."""
    return f"{count}" if cell.get("unstable_rule") == UNSTABLE_RULE else f"{count}†"


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "∞" if x is not None else "–"
    return f"{x:.{digits}g}"


def host_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


NOTES_BEGIN, NOTES_END = "<!-- notes -->", "<!-- /notes -->"


def kept_notes(markdown: str) -> str:
    """The hand-written analysis between the notes markers of an earlier report (kept)."""
    start, end = markdown.find(NOTES_BEGIN), markdown.find(NOTES_END)
    if start < 0 or end < start:
        return ""
    return markdown[start : end + len(NOTES_END)]


def render_markdown(report: dict[str, Any], command: str, preamble: str = "") -> str:
    """The document: what was run, the summary per optimizer, then one row per task."""
    config, summary = report["config"], report["summary"]
    labels = sorted(summary["overall"])
    lines = [
        "# Generalisation: the held-out benchmark",
        "",
        preamble.strip() or f"{NOTES_BEGIN}\n{NOTES_END}",
        "",
        f"Command: `{command}`  ",
        f"Host: {report.get('host', 'unknown')}; wall time {report['wall_seconds'] / 60:.1f} min "
        f"for this sitting, {report.get('suite_seconds', 0.0) / 60:.1f} min for every task's "
        f"sittings together (`jobs` = {config['jobs']}).  ",
        f"Evaluation runs per task: {config['runs']} (seed {config['seed']}); Adam tuned on "
        f"{config['tuning_runs']} tuning runs per lr from a disjoint seed stream, grid 10^(k/2), "
        "widened until the best lr is inside it."
        + (" **Quick mode: short horizons, not a result.**" if config["quick"] else ""),
        "",
        "## Summary (ratio = final loss / tuned Adam's, same seeds; below 1 is better)",
        "",
        "| optimizer | tasks | IQM of ratios [95 % CI] | tasks with ratio < 1 | unstable runs |",
        "|---|---|---|---|---|",
    ]
    for label in labels:
        o = summary["overall"][label]
        lines.append(
            f"| {label} | {o['tasks']} | {_fmt(o['iqm_ratio'])} "
            f"[{_fmt(o['iqm_ci'][0])}, {_fmt(o['iqm_ci'][1])}] | "
            f"{o['fraction_below_1'] * 100:.0f} % | {_unstable(o['unstable_runs'], o)} |"
        )
    fast = summary.get("overall_fast", {})
    if fast:
        from .tasks.heldout import HELDOUT_FAST

        lines += [
            "",
            f"On the fast subset ({len(HELDOUT_FAST)} tasks: {', '.join(HELDOUT_FAST)}), "
            "where the ablation arms are compared:",
            "",
            "| optimizer | IQM of ratios [95 % CI] | tasks with ratio < 1 | unstable runs |",
            "|---|---|---|---|",
        ]
        for label in sorted(fast):
            o = fast[label]
            lines.append(
                f"| {label} | {_fmt(o['iqm_ratio'])} [{_fmt(o['iqm_ci'][0])}, "
                f"{_fmt(o['iqm_ci'][1])}] | {o['fraction_below_1'] * 100:.0f} % | "
                f"{_unstable(o['unstable_runs'], o)} |"
            )
    lines += [
        "",
        "## Per task",
        "",
        "Each optimizer's cell: ratio [95 % CI] · speed-up · unstable runs. The speed-up is the "
        "step at which tuned Adam's mean smoothed curve first reaches the optimizer's final "
        "smoothed loss, divided by T (below 1: Adam got there sooner; > 1: Adam never did "
        "within T). A run is unstable when its final loss is above "
        f"{UNSTABLE_FACTOR}× the lowest loss of its iterates at {UNSTABLE_CHECKPOINTS} "
        "evenly spaced steps, measured like the final loss; † marks counts made by the first "
        "sittings' rule (the lowest smoothed minibatch loss, which flags ordinary noise).",
        "",
        "| task | kind | T | Adam lr | Adam final loss · unstable | "
        + " | ".join(labels)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(labels),
    ]
    for key, task in report["tasks"].items():
        adam = task["results"]["adam"]
        finals = [v for v in adam["final_losses"] if v is not None]
        adam_mean = sum(finals) / len(finals) if len(finals) == len(adam["final_losses"]) else None
        edge = " (edge)" if task["adam_tuning"]["at_edge"] else ""
        cells = []
        for label in labels:
            c = summary["per_task"][key].get(label)
            if c is None:
                cells.append("not run")
                continue
            speed = ">1" if not c["adam_reaches"] else _fmt(c["speedup"], 2)
            cells.append(
                f"{_fmt(c['ratio'])} [{_fmt(c['ci'][0])}, {_fmt(c['ci'][1])}] · {speed} · "
                + _unstable(f"{c['unstable_runs']}/{c['runs']}", c)
            )
        adam_unstable = _unstable(
            f"{sum(adam['unstable'])}/{len(adam['unstable'])}",
            {"unstable_rule": adam.get("unstable_rule", "smoothed")},
        )
        lines.append(
            f"| {key} | {task['kind']} | {task['steps']} | "
            f"{task['adam_tuning']['best_lr']:.3g}{edge} | {_fmt(adam_mean, 4)} · "
            f"{adam_unstable} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        f"![per-task ratios]({RATIO_FIGURE})",
        "",
        f"![loss curves]({CURVES_FIGURE})",
        "",
    ]
    return "\n".join(lines)


def plot_ratios(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_task = report["summary"]["per_task"]
    keys = list(report["tasks"])
    labels = sorted(report["summary"]["overall"])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(keys) + 1.5))
    for j, label in enumerate(labels):
        ys, xs, lo, hi = [], [], [], []
        for i, key in enumerate(keys):
            c = per_task[key].get(label)
            if c is None or not math.isfinite(c["ratio"]):
                continue
            ys.append(i + (j - (len(labels) - 1) / 2) * 0.15)
            xs.append(c["ratio"])
            lo.append(max(c["ratio"] - c["ci"][0], 0.0) if math.isfinite(c["ci"][0]) else 0.0)
            hi.append(max(c["ci"][1] - c["ratio"], 0.0) if math.isfinite(c["ci"][1]) else 0.0)
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", ms=4, capsize=2, label=label)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(keys)), keys, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("final loss / tuned Adam's (95 % CI); diverged runs are not drawn")
    ax.invert_yaxis()
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(report["tasks"])
    cols = 4
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for label, res in sorted(report["tasks"][key]["results"].items()):
            steps = [s for s, v in zip(res["curve"]["steps"], res["curve"]["loss"], strict=True)
                     if v is not None and v > 0]  # fmt: skip
            values = [v for v in res["curve"]["loss"] if v is not None and v > 0]
            ax.plot(steps, values, lw=1, label=label)
        ax.set_title(key, fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(
    report: dict[str, Any], out: Path, command: str, preamble: str = ""
) -> list[Path]:
    """Writes the JSON, the two figures and the markdown into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / JSON_NAME
    atomic_write_bytes(json_path, dumps(report).encode())
    ratio_png, curves_png = out / RATIO_FIGURE, out / CURVES_FIGURE
    plot_ratios(report, ratio_png)
    plot_curves(report, curves_png)
    md_path = out / MD_NAME
    if not preamble and md_path.is_file():
        preamble = kept_notes(md_path.read_text())
    atomic_write_bytes(md_path, render_markdown(report, command, preamble).encode())
    return [md_path, json_path, ratio_png, curves_png]
