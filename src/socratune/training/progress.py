"""Training progress with elapsed time and an estimate of the time left.

Where stderr is a terminal, a progress bar (tqdm, which transformers already depends on) that
the log lines print above; elsewhere (a log file, CI, ``nohup``), a plain line at most every
``interval_s`` seconds and at the end, so logs are not flooded with carriage returns. Shown only
where the socratune log reaches the console at INFO level (not with ``-q``), and only by the
main process of a distributed run.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

from transformers import TrainerCallback

logger = logging.getLogger("socratune.progress")


def format_duration(seconds: float) -> str:
    """``1:02:03`` or ``2:03``: hours only when there are any."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def estimate_left(elapsed_s: float, steps_done: int, steps_left: int) -> float | None:
    """Seconds left at the rate of the steps done in this process (evaluations and checkpoint
    saves included, as they will recur); None before the first step."""
    if steps_done <= 0:
        return None
    return elapsed_s / steps_done * steps_left


def progress_line(step: int, total: int, elapsed_s: float, left_s: float | None) -> str:
    share = f" ({step / total:.0%})" if total else ""
    eta = "?" if left_s is None else format_duration(left_s)
    return f"progress: step {step}/{total}{share}, elapsed {format_duration(elapsed_s)}, ETA {eta}"


def console_shows_info(log: logging.Logger) -> bool:
    """Whether INFO messages of ``log`` reach stderr or stdout (false under ``-q``)."""
    consoles = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    node: logging.Logger | None = log
    while node is not None:
        for handler in node.handlers:
            if (isinstance(handler, logging.StreamHandler) and handler.stream in consoles
                    and handler.level <= logging.INFO):
                return True
        node = node.parent if node.propagate else None
    return False


class ProgressCallback(TrainerCallback):
    """Elapsed time and ETA for the steps of this training session (a resumed run counts from
    where it resumed, so the rate is not inflated by steps done before)."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = 30.0, bar: bool | None = None):
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self.bar_wanted = bar
        self._bar: Any = None
        self._redirect: Any = None
        self._started = 0.0
        self._first_step = 0
        self._last_line = 0.0
        self._enabled = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._enabled = state.is_world_process_zero and console_shows_info(logging.getLogger("socratune"))
        self._started = self._last_line = time.perf_counter()
        self._first_step = state.global_step
        if not self._enabled:
            return
        use_bar = self.bar_wanted if self.bar_wanted is not None else self.stream.isatty()
        if use_bar:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", file=self.stream,
                             dynamic_ncols=True)
            # Log lines are printed above the bar instead of through it.
            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger("socratune")])
            self._redirect.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(state.global_step - self._bar.n)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.interval_s:
            self._last_line = now
            logger.info(self._line(state, now))

    def on_train_end(self, args, state, control, **kwargs):
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(state.global_step - self._bar.n)
            self._bar.close()
            self._redirect.__exit__(None, None, None)
            self._bar = self._redirect = None
        else:
            logger.info(self._line(state, time.perf_counter()))

    def _line(self, state, now: float) -> str:
        elapsed = now - self._started
        left = estimate_left(elapsed, state.global_step - self._first_step, state.max_steps - state.global_step)
        return progress_line(state.global_step, state.max_steps, elapsed, left)
