"""The meta-training plot artifact: meta-loss per step and the validation curve.

Drawn with matplotlib's object API on an Agg canvas: no pyplot, no global backend switch, no
display needed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .checkpoint import History, atomic_write_bytes

SMOOTHING = 20  # meta-steps in the moving average drawn over the raw meta-loss


def training_plot_png(history: History, *, title: str = "") -> bytes:
    """PNG bytes of two panels: meta-loss (raw and smoothed) and validation final loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    losses = np.asarray(history.meta_loss, dtype=np.float64)
    steps = np.arange(losses.size)
    left.plot(steps, losses, lw=0.6, alpha=0.4, label="meta-loss")
    finite = np.isfinite(losses)
    if finite.sum() >= SMOOTHING:
        window = np.ones(SMOOTHING) / SMOOTHING
        smooth = np.convolve(np.where(finite, losses, np.nanmean(losses)), window, mode="valid")
        left.plot(steps[SMOOTHING - 1 :], smooth, lw=1.5, label=f"mean of {SMOOTHING}")
    left.set_xlabel("meta-step")
    left.set_ylabel("meta-loss")
    left.set_title("meta-training loss")
    left.legend(loc="upper right")
    if history.validation_steps:
        right.plot(history.validation_steps, history.validation_loss, "o-")
        best = int(np.argmin(history.validation_loss))
        right.plot(
            [history.validation_steps[best]], [history.validation_loss[best]], "r*", ms=12,
            label="best θ",
        )
        right.legend(loc="upper right")
    else:
        right.text(0.5, 0.5, "no validation yet", ha="center", va="center")
    right.set_xlabel("meta-step")
    right.set_ylabel("final loss")
    right.set_title("validation (mean final loss)")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def save_training_plot(path: str | Path, history: History, *, title: str = "") -> Path:
    atomic_write_bytes(path, training_plot_png(history, title=title))
    return Path(path)
