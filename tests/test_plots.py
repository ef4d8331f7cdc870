"""Training plots: titled with the run, the selected step marked; drawn from metrics.csv alone."""

from __future__ import annotations

import csv

from socratune.training import plots


def test_training_plots_are_titled_with_the_run_and_mark_the_step(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.csv"
    with metrics.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "loss", "eval_loss", "learning_rate", "eval_style_overall"])
        writer.writeheader()
        writer.writerows([{"step": 0, "eval_loss": 7.0, "eval_style_overall": 0.4},
                          {"step": 10, "loss": 6.0, "learning_rate": 0.002},
                          {"step": 20, "loss": 5.0, "eval_loss": 4.8, "learning_rate": 0.001,
                           "eval_style_overall": 1.5}])
    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: drawn.setdefault(path.name, figure))
    written = plots.plot_metrics(metrics, tmp_path, run_name="my-run", marked_step=20, marked_label="best")
    assert [p.name for p in written] == [plots.LOSS_PNG, plots.LR_PNG, plots.STYLE_PNG] == list(drawn)
    for figure in drawn.values():
        axes = figure.axes[0]
        assert axes.get_title().startswith("my-run: ")
        assert "best (step 20)" in [line.get_label() for line in axes.lines]
    plots.plot_metrics(metrics, tmp_path / "unmarked")  # no run name, no step: still drawn, nothing marked
