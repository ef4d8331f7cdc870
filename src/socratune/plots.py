"""PNG plots of a run's ``metrics.csv``: losses, learning rate, style scores.

Drawn with matplotlib's non-interactive backend so it works on machines with no screen, and
written atomically so a viewer never sees half a file.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .rundir import write_bytes_atomic

LOSS_PNG, LR_PNG, STYLE_PNG = "loss.png", "learning_rate.png", "style.png"


def read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _series(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    return [s for s, _ in points], [v for _, v in points]


def _save(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    write_bytes_atomic(path, buffer.getvalue())


def plot_metrics(metrics_path: Path, plots_dir: Path) -> list[Path]:
    """Redraw every plot from the CSV; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    charts = {
        LOSS_PNG: ("loss", [("loss", "train loss"), ("eval_loss", "eval loss")]),
        LR_PNG: ("learning rate", [("learning_rate", "learning rate")]),
        STYLE_PNG: ("style score (0-4)", [(f"eval_style_{a}", a) for a in ("tone", "approach", "format", "logic", "overall")]),
    }
    written = []
    for name, (ylabel, series) in charts.items():
        figure, axes = plt.subplots(figsize=(7, 4))
        for key, label in series:
            steps, values = _series(rows, key)
            if steps:
                axes.plot(steps, values, marker="o" if key.startswith("eval") else None, markersize=3, label=label)
        axes.set_xlabel("step")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend()
        _save(figure, plots_dir / name)
        plt.close(figure)
        written.append(plots_dir / name)
    return written
