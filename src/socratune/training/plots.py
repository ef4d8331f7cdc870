"""PNG plots of a run's ``metrics.csv``: losses, learning rate, style scores; and ``save_figure``,
which every plot of the package (training and evaluation report) is written with.

Drawn with matplotlib's non-interactive backend so it works on machines with no screen, and
written atomically so a viewer never sees half a file. Each plot is titled with the run's name
and marks the selected step (``train.select``) when there is one.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.rundir import write_bytes_atomic
from ..core.scores import SCORE_KEYS, style_metric

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LOSS_PNG, LR_PNG, STYLE_PNG = "loss.png", "learning_rate.png", "style.png"


def read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _series(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    return [s for s, _ in points], [v for _, v in points]


def save_figure(figure: Figure, path: Path) -> None:
    """Write ``figure`` as a PNG, atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    write_bytes_atomic(path, buffer.getvalue())


def mark_step(axes: Axes, step: int | None, label: str = "selected") -> None:
    """A dashed vertical line at ``step`` (no line when None), named in the legend."""
    if step is not None:
        axes.axvline(step, color="grey", linestyle="--", linewidth=1, label=f"{label} (step {step})")


def plot_metrics(metrics_path: Path, plots_dir: Path, run_name: str | None = None,
                 marked_step: int | None = None, marked_label: str = "selected") -> list[Path]:
    """Redraw every plot from the CSV, titled with ``run_name`` and with ``marked_step`` marked;
    returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    charts = {
        LOSS_PNG: ("loss", [("loss", "train loss"), ("eval_loss", "eval loss")]),
        LR_PNG: ("learning rate", [("learning_rate", "learning rate")]),
        STYLE_PNG: ("style score (0-4)", [(style_metric(key), key) for key in SCORE_KEYS]),
    }
    written = []
    for name, (ylabel, series) in charts.items():
        figure, axes = plt.subplots(figsize=(7, 4))
        for key, label in series:
            steps, values = _series(rows, key)
            if steps:
                axes.plot(steps, values, marker="o" if key.startswith("eval") else None, markersize=3, label=label)
        if axes.lines:
            mark_step(axes, marked_step, marked_label)
        axes.set_xlabel("step")
        axes.set_ylabel(ylabel)
        if run_name:
            axes.set_title(f"{run_name}: {ylabel}")
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend()
        save_figure(figure, plots_dir / name)
        plt.close(figure)
        written.append(plots_dir / name)
    return written
