"""Trainer callbacks: style of generated replies, the training monitor, checkpoint manifests and
rotation, checkpoints at the best step (``train.select``), early stopping, and stopping cleanly on
a signal.

They extend the transformers ``Trainer`` through its callback API only. Evaluation metrics are
logged by the Trainer *before* ``on_evaluate`` runs, so the style callback adds its
``eval_style_*`` numbers both to the metrics dict (what ``evaluate()`` returns and what
best-checkpoint tracking sees) and to the evaluation entry it just appended to
``state.log_history`` (what ``trainer_state.json`` keeps). Callbacks that need style numbers
are placed after it.
"""

from __future__ import annotations

import csv
import logging
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..core.rundir import CHECKPOINT_PREFIX, MANIFEST, checkpoint_step, write_manifest
from ..core.scores import SCORE_KEYS, Variety, reply_variety, style_metric
from ..generation.generate import GenParams, generate_replies
from ..model.memory import release_memory, resource_usage
from ..style import StyleScorer, summarize
from .distributed import SINGLE_PROCESS, Ranks
from .selection import EarlyStop, best_evaluation, early_stop, is_new_best

logger = logging.getLogger("socratune")
STYLE_RUNTIME = "eval_style_runtime"  # seconds spent generating and scoring, beside HF's eval_runtime
REPEATED_SHARE = "eval_style_repeated_share"  # share of the monitored prompts given the most common reply
METRIC_COLUMNS = [
    "step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm",
    *(style_metric(key) for key in SCORE_KEYS),
    "tokens_per_s", "rss_mb", "gpu_allocated_mb", "gpu_reserved_mb", "eval_runtime", STYLE_RUNTIME,
]


def _header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle), None) or METRIC_COLUMNS


class StyleCallback(TrainerCallback):
    """At every evaluation, answer a fixed sample of eval prompts (greedy, bounded length) and score
    the generated replies; teacher-forced argmax tokens are not replies and are never scored.

    The seconds it takes are logged as ``eval_style_runtime``, so what style monitoring costs
    against training is on record in every run (``training_summary.json`` adds them up).

    The main process generates alone, except when the model is ``sharded`` over the processes
    (FSDP, ZeRO-3): then each forward needs all of them, so all generate the same replies in step
    and the main one scores them.

    ``collapse_guard`` (preference runs) warns when the replies collapse onto one
    (``warn_if_collapsing``); the share of the most common reply is logged at every evaluation."""

    def __init__(self, conversations: list[list[dict[str, str]]], scorer: StyleScorer, max_new_tokens: int,
                 batch_size: int = 8, sharded: bool = False, collapse_guard: bool = False):
        self.conversations = conversations
        self.collapse_guard = collapse_guard
        self.sharded = sharded
        self.prompts = [c[-1]["content"] for c in conversations]
        self.scorer = scorer
        self.params = GenParams(max_new_tokens=max_new_tokens)
        self.batch_size = batch_size
        self.last_replies: list[str] = []

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, **kwargs):
        if not self.conversations or metrics is None or not (state.is_world_process_zero or self.sharded):
            return
        started = time.perf_counter()
        replies = generate_replies(model, processing_class, self.conversations, self.params, self.batch_size,
                                   synced=self.sharded)
        if not state.is_world_process_zero:
            return
        self.last_replies = replies
        variety = reply_variety(replies)
        if self.collapse_guard:
            warn_if_collapsing(variety, state.global_step, state.log_history)
        means = summarize([self.scorer.score(r, p) for r, p in zip(replies, self.prompts)])
        style = {style_metric(key): round(means[key], 4) for key in SCORE_KEYS}
        style[REPEATED_SHARE] = round(variety.most_common_share, 4)
        style[STYLE_RUNTIME] = round(time.perf_counter() - started, 3)
        metrics.update(style)
        if state.log_history and "eval_loss" in state.log_history[-1]:
            state.log_history[-1].update(style)


def warn_if_collapsing(variety: Variety, step: int, log_history: list[dict[str, Any]]) -> None:
    """The collapse guard: warn when one reply answers more than ``REPEATED_REPLY_SHARE`` of the
    monitored prompts, and more of them than when the run started (step 0 in the log history, the
    supervised model a preference run starts from). The sign of a model that found one reply the
    reward likes instead of answering each prompt. Supervised runs do not use it: a tiny model
    trained from random weights answers everything alike for a while on its way to answering at
    all, and ``evaluate`` warns about a final model that repeats itself."""
    start = next((e.get(REPEATED_SHARE) for e in log_history if e.get("step") == 0 and REPEATED_SHARE in e), None)
    if step > 0 and variety.repeats_itself() and (start is None or variety.most_common_share > start):
        logger.warning("step %d: one reply answers %d of the %d monitored prompts (%.0f%%): 「%s」; the model is "
                       "collapsing onto a reply that fits any prompt (a preference run: fewer epochs, a lower "
                       "learning rate or a larger prefs.beta)", step, variety.most_common_count, variety.replies,
                       100 * variety.most_common_share, variety.most_common[:60])


class CheckpointCallback(TrainerCallback):
    """Close every checkpoint the Trainer saves with a manifest of sizes and checksums, then keep
    only the newest ``keep`` of them, plus the best one by ``select`` (the final adapter may be
    taken from it).

    Rotation happens here rather than in the Trainer (``save_total_limit``), because the Trainer
    deletes old checkpoints before the new one is closed: a kill at that moment would leave no
    checkpoint to resume from.
    """

    def __init__(self, keep: int, ranks: Ranks = SINGLE_PROCESS, select: str = "last"):
        self.keep = keep
        self.ranks = ranks
        self.select = select

    def on_save(self, args, state, control, **kwargs):
        self.ranks.barrier()  # every process has written its RNG state before the manifest lists the files
        if not self.ranks.is_main:
            return
        checkpoints = Path(args.output_dir)
        newest = checkpoints / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if not newest.is_dir():
            return
        write_manifest(newest, self.ranks.world_size)
        closed = sorted((p for p in checkpoints.iterdir() if checkpoint_step(p) is not None
                         and (p / MANIFEST).is_file()), key=checkpoint_step)
        best = best_evaluation(state.log_history, self.select, {checkpoint_step(p) for p in closed})
        for old in closed[: max(0, len(closed) - self.keep)]:
            if old != newest and (best is None or checkpoint_step(old) != best["step"]):
                shutil.rmtree(old)
                logger.info("removed %s (keeping the newest %d checkpoints)", old.name, self.keep)


class BestCheckpointCallback(TrainerCallback):
    """Make the weights ``train.select`` may choose exist on disk: a checkpoint at every
    evaluation that is the best so far, and an evaluation at the last step (so the last weights
    are measured like the others). Placed after the style callback, whose numbers it may need.

    Under several processes only the main one has style numbers; the decision to save is shared
    so that every process saves together.
    """

    def __init__(self, select: str, ranks: Ranks = SINGLE_PROCESS):
        self.select = select
        self.ranks = ranks

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and args.eval_strategy != "no":  # "no": nothing to evaluate on
            control.should_evaluate = True

    def on_evaluate(self, args, state, control, **kwargs):
        if self.select == "last" or state.global_step == 0:
            return
        new_best = state.is_world_process_zero and is_new_best(state.log_history, self.select, state.global_step)
        if self.ranks.any_flag(new_best):
            control.should_save = True


class EarlyStopCallback(TrainerCallback):
    """End training at the evaluation that makes ``patience`` in a row without a new best by
    ``select`` (``selection.early_stop``). Placed after the style callback, whose numbers it may
    watch; only the main process has them, so the decision is shared.

    The stopping step gets no checkpoint of its own: the step the run keeps is the best one, which
    has a checkpoint already (``BestCheckpointCallback``). So a run killed after stopping but before
    its summary is written resumes from an earlier checkpoint, and its log history makes it stop
    at the same step again; a checkpoint at the stopping step would resume into steps the
    uninterrupted run never trained.
    """

    def __init__(self, select: str, patience: int, ranks: Ranks = SINGLE_PROCESS):
        self.select = select
        self.patience = patience
        self.ranks = ranks
        self.stopped: EarlyStop | None = None

    def on_evaluate(self, args, state, control, **kwargs):
        if state.global_step == 0 or state.global_step >= state.max_steps:
            return
        decision = early_stop(state.log_history, self.select, self.patience) if state.is_world_process_zero else None
        if self.ranks.any_flag(decision is not None and decision.step == state.global_step):
            self.stopped = decision
            control.should_training_stop = True
            control.should_save = False


class StopOnSignal(TrainerCallback):
    """Turn SIGTERM and SIGINT during training into "save a checkpoint at this step, then stop".

    The handler only sets a flag; the Trainer saves at the end of the optimizer step under way,
    so the checkpoint sits on a step boundary and resumes exactly. A second SIGINT falls back to
    Python's default (KeyboardInterrupt) for a user who really wants out now. With several
    processes the flag is shared at every step, so all of them stop at the same step even when
    only one was signalled.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, ranks: Ranks = SINGLE_PROCESS):
        self.ranks = ranks
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signal_number: int, frame: Any) -> None:
        self.received = signal_number
        signal.signal(signal.SIGINT, signal.default_int_handler)
        logger.warning("received %s: saving a checkpoint at the end of this step, then stopping",
                       signal.Signals(signal_number).name)

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        if self.ranks.any_flag(self.received is not None):
            self.received = self.received or signal.SIGTERM
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """Put the previous handlers back (also called when training raised)."""
        for signal_number, handler in self._previous.items():
            signal.signal(signal_number, handler)
        self._previous = {}


class TrainingMonitorCallback(TrainerCallback):
    """Append one ``metrics.csv`` row per log and evaluation (the file outlives resumes), refresh
    the plots after each evaluation (titled ``run_name``, the best step so far by ``select``, or
    by eval loss under ``last``, marked), and track peak memory."""

    def __init__(self, metrics_path: Path, plots_dir: Path, run_name: str | None = None, select: str = "last"):
        self.metrics_path = metrics_path
        self.plots_dir = plots_dir
        self.run_name = run_name
        self.select = select
        self.peak_rss_mb = 0.0
        self.peak_gpu_mb: float | None = None
        self._last_time: float | None = None
        self._last_tokens = 0
        self._columns: list[str] | None = None  # decided at the first row, from the file if it exists

    def _row(self, state, values: dict[str, Any]) -> None:
        usage = resource_usage()
        self.peak_rss_mb = max(self.peak_rss_mb, usage["rss_mb"] or 0.0)
        if usage["gpu_reserved_mb"] is not None:
            self.peak_gpu_mb = max(self.peak_gpu_mb or 0.0, usage["gpu_reserved_mb"])
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **usage, **values}
        new_file = not self.metrics_path.exists()
        if self._columns is None:
            # A run started by an earlier version keeps its own columns, so its file stays one table.
            self._columns = METRIC_COLUMNS if new_file else _header(self.metrics_path)
        with self.metrics_path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen
        elapsed = now - (self._last_time or now)
        rate = (tokens - self._last_tokens) / elapsed if elapsed > 0 else None
        self._last_time, self._last_tokens = now, tokens
        self._row(state, {**logs, "tokens_per_s": round(rate, 1) if rate else None})
        logger.info("step %d/%d  epoch %.2f  loss %.4f  lr %.3g  %s tokens/s", state.global_step, state.max_steps,
                    state.epoch or 0.0, logs["loss"], logs.get("learning_rate", 0.0), f"{rate:.0f}" if rate else "-")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero or not metrics:
            return
        self._row(state, metrics)
        logger.info("eval at step %d: loss %.4f  style %s", state.global_step, metrics.get("eval_loss", float("nan")),
                    metrics.get("eval_style_overall", "-"))
        from .plots import plot_metrics

        marked_by = self.select if self.select != "last" else "best_eval_loss"  # "last" has no best to mark
        best = best_evaluation(state.log_history, marked_by)
        plot_metrics(self.metrics_path, self.plots_dir, self.run_name, best["step"] if best else None,
                     f"best by {marked_by}")
        release_memory()
