"""Quiet by default: progress with elapsed time and ETA, and the known-harmless library
messages silenced (others still shown)."""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest

from socratune.core.quiet import HARMLESS_LOG_LINES, HARMLESS_WARNINGS, silence_harmless_messages
from socratune.training.progress import (
    ProgressCallback,
    estimate_left,
    format_duration,
    progress_line,
)


def test_durations_and_the_estimate():
    assert format_duration(0) == "0:00" and format_duration(125.4) == "2:05" and format_duration(3723) == "1:02:03"
    assert estimate_left(60.0, 20, 60) == pytest.approx(180.0)
    assert estimate_left(5.0, 0, 100) is None
    assert progress_line(80, 320, 62, 186) == "progress: step 80/320 (25%), elapsed 1:02, ETA 3:06"
    assert progress_line(0, 320, 1, None).endswith("ETA ?")


@contextlib.contextmanager
def console(level: int = logging.INFO):
    """The socratune logger writing to stderr as the command line sets it up (INFO; WARNING
    under -q). Entered inside the test, so the handler holds the stderr that capsys reads."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    log = logging.getLogger("socratune")
    previous_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(previous_level)


def _simulate(callback: ProgressCallback, first: int, last: int, total: int) -> None:
    state = SimpleNamespace(is_world_process_zero=True, global_step=first, max_steps=total)
    callback.on_train_begin(None, state, None)
    for step in range(first + 1, last + 1):
        state.global_step = step
        callback.on_step_end(None, state, None)
    callback.on_train_end(None, state, None)


def test_plain_lines_with_elapsed_and_eta_where_output_is_not_a_terminal(capsys):
    with console():
        _simulate(ProgressCallback(stream=io.StringIO(), interval_s=0.0), first=40, last=43, total=320)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4  # one per step at interval 0, and the closing line
    assert lines[0].startswith("progress: step 41/320 (13%), elapsed 0:00, ETA ")
    assert lines[-1].startswith("progress: step 43/320")


def test_a_bar_where_output_is_a_terminal(capsys):
    bar_stream = io.StringIO()
    with console():
        _simulate(ProgressCallback(stream=bar_stream, bar=True), first=0, last=10, total=10)
    drawn = bar_stream.getvalue()
    assert "10/10" in drawn and "<" in drawn  # tqdm's [elapsed<remaining]
    assert capsys.readouterr().err == ""


def test_no_progress_under_quiet(capsys):
    bar_stream = io.StringIO()
    with console(logging.WARNING):
        _simulate(ProgressCallback(stream=bar_stream, bar=True, interval_s=0.0), first=0, last=3, total=3)
        _simulate(ProgressCallback(stream=bar_stream, interval_s=0.0), first=0, last=3, total=3)
    assert capsys.readouterr().err == "" and bar_stream.getvalue() == ""


def test_only_the_known_harmless_warnings_are_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_harmless_messages()
        for category, message in HARMLESS_WARNINGS:
            warnings.warn(message.replace("\\", "") + " and more", category, stacklevel=1)
        warnings.warn("`something_else` is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`something_else` is deprecated"]
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() == logging.ERROR


def test_known_harmless_log_lines_are_dropped_by_what_they_say(caplog):
    """The `kernels` offline notice goes; any other line of the same logger still shows."""
    silence_harmless_messages()
    silence_harmless_messages()  # idempotent: one filter, not two
    for name, _ in HARMLESS_LOG_LINES:
        assert len(logging.getLogger(name).filters) == 1
    kernels_log = logging.getLogger("kernels._internals.hf_hub")
    kernels_log.warning("Skipping publisher trust check for '%s' because Hugging Face Hub is in offline mode.",
                        "kernels-community/quantization-bitsandbytes")
    kernels_log.warning("Kernel repository 'x/y' could not verify publisher trust status.")
    assert [record.getMessage() for record in caplog.records] == [
        "Kernel repository 'x/y' could not verify publisher trust status."]


def test_the_silenced_logger_is_the_one_kernels_logs_to():
    """An upstream rename of the module would let the line through again: catch it here."""
    hf_hub = pytest.importorskip("kernels._internals.hf_hub")
    assert hf_hub.logger.name in {name for name, _ in HARMLESS_LOG_LINES}


@pytest.mark.slow
def test_generate_shows_the_reply_and_no_library_noise(default_run, tmp_path):
    command = [sys.executable, "-m", "socratune", "generate", str(default_run), "幸福とは？", "--max-new-tokens", "4"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "Warning" not in done.stderr and "kernels" not in done.stderr, done.stderr
