"""Deciding what ``socratune train`` does with an existing run directory, before anything is written.

A run directory can be new, interrupted (checkpoints but no final model), finished, or finished
but asked for more epochs. ``plan_start`` tells them apart from files on disk, never from a float
epoch, and applies the guard: a run continues only with the settings it started with (data
content, base model, LoRA, quantization, sequence length, batching, seeds...). Settings that do
not change what is learned (logging and evaluation cadence, style sampling, checkpoint count,
the run directory's own path, the epoch count) may change; they are recorded in ``run.json``.

``prepare_resume`` then tidies the directory for the chosen checkpoint, moving aside what a
resumed Trainer would otherwise overwrite or misread: it sets newer checkpoints aside (never
deletes them) and cuts ``metrics.csv`` back to the resumed step so rows are not doubled.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..core.errors import ConfigError, RunDirError, StorageError, os_error_message
from ..core.rundir import (
    ADAPTER,
    CONFIG_YAML,
    METRICS,
    RUN_RECORD,
    SET_ASIDE,
    RunDir,
    checkpoint_problem,
    checkpoint_step,
    write_json_atomic,
    write_text_atomic,
)

logger = logging.getLogger("socratune")

# Keys whose change does not alter what the adapter learns; everything else is guarded.
HARMLESS_KEYS = frozenset({
    "preset",  # a name only: the values it stands for are compared key by key
    "run.output_dir",  # the run directory may be moved or copied
    "data.path",  # the data *content* is compared through its fingerprint instead
    "train.epochs",  # more epochs continue a finished run; see plan_start
    "train.eval_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.select",  # which saved step becomes the final adapter; training itself is the same
    "train.logging_steps",
    "train.eval_batch_size",
    "train.empty_cache_steps",
    "style.profile",
    "style.eval_samples",
    "style.max_new_tokens",
    # settings of `socratune prefs` (making pairs), not of training on them
    "prefs.samples",
    "prefs.temperature",
    "prefs.top_p",
    "prefs.max_new_tokens",
    "prefs.min_margin",
    "prefs.weights",
})
DATA_KEY = "data content"
WORLD_KEY = "training processes (world size)"


@dataclass
class StartPlan:
    """What ``train`` will do with the run directory."""

    kind: Literal["new", "resume", "finished"]
    checkpoint: Path | None = None
    harmless_changes: list[str] = field(default_factory=list)
    guarded_changes: list[str] = field(default_factory=list)
    more_epochs: bool = False


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def config_changes(recorded: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Differences between the recorded and the requested config as ``key: old -> new`` lines,
    split into (guarded, harmless)."""
    from ..core.config import Config

    old, new = _flatten(recorded), _flatten(current)
    defaults = _flatten(Config().to_dict())
    guarded, harmless = [], []
    for key in sorted(old.keys() | new.keys()):
        if key not in old and new.get(key) == defaults.get(key):
            continue  # a key added to socratune after the run started, at its default: nothing changed
        if old.get(key) != new.get(key):
            line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            (harmless if key in HARMLESS_KEYS else guarded).append(line)
    return guarded, harmless


def read_recorded_config(run: RunDir) -> dict[str, Any] | None:
    """The config a run directory was last trained with, or None for a new directory."""
    from ..core.config import read_yaml_file

    path = run / CONFIG_YAML
    if not os.path.lexists(path):
        return None
    try:
        return read_yaml_file(path, "the run's config")
    except ConfigError as exc:
        raise RunDirError(f"{exc}; move the run aside with --overwrite") from exc


def resolve_checkpoint(run: RunDir, name: str) -> Path:
    """``--resume-from``: a name under ``checkpoints/`` or a path; it must validate."""
    checkpoint = Path(name)
    if not checkpoint.is_dir():
        checkpoint = run.checkpoints_dir / name
    problem = checkpoint_problem(checkpoint) if checkpoint.is_dir() else "does not exist"
    if problem:
        raise RunDirError(f"cannot resume from {checkpoint}: {problem}")
    return checkpoint


def plan_start(run: RunDir, config: dict[str, Any], data_fingerprint: str, resume_from: str | None,
               allow_config_change: bool, world_size: int = 1) -> StartPlan:
    """Decide new / resume / finished for ``run`` and apply the guard; reads only, writes nothing.

    Raises RunDirError when the run is in use by a live process, or when a guarded setting
    differs and ``allow_config_change`` is False: the message lists every difference.
    """
    run.refuse_if_locked()
    recorded = read_recorded_config(run)
    if recorded is None:
        if resume_from:
            raise RunDirError(f"--resume-from needs an existing run, and {run.path} has none")
        return StartPlan("new")

    guarded, harmless = config_changes(recorded, config)
    record = run.read_json(RUN_RECORD) or {}
    recorded_fingerprint = record.get("data", {}).get("fingerprint")
    if recorded_fingerprint and recorded_fingerprint != data_fingerprint:
        guarded.append(f"{DATA_KEY}: sha256 {recorded_fingerprint[:12]}… -> {data_fingerprint[:12]}…")
    recorded_world = (record.get("starts") or [{}])[-1].get("world_size", 1)
    if recorded_world != world_size:  # per-process data shards and RNG states would not line up
        guarded.append(f"{WORLD_KEY}: {recorded_world} -> {world_size}")
    if guarded and not allow_config_change:
        shown = "\n  ".join(guarded)
        raise RunDirError(f"{run.path} was trained with different settings; continuing would mix two runs:\n"
                          f"  {shown}\nuse the original settings, --allow-config-change to continue anyway, "
                          "or --overwrite to start a new run (the old one is moved aside)")

    summary = run.summary() or {}
    finished_epochs = summary.get("epochs", recorded.get("train", {}).get("epochs"))
    more_epochs = run.is_finished() and config["train"]["epochs"] > finished_epochs
    if run.is_finished() and not more_epochs and not resume_from:
        return StartPlan("finished", harmless_changes=harmless, guarded_changes=guarded)

    if resume_from:
        checkpoint: Path | None = resolve_checkpoint(run, resume_from)
    else:
        checkpoint, invalid = run.latest_valid_checkpoint()
        for path, problem in invalid:
            logger.warning("skipping checkpoint %s: %s", path, problem)
    if more_epochs and checkpoint is None:
        raise RunDirError(f"{run.path} is finished but has no valid checkpoint to continue from; "
                          "use --overwrite to train again from the start")
    return StartPlan("resume", checkpoint, harmless, guarded, more_epochs)


def prepare_resume(run: RunDir, checkpoint: Path | None) -> list[Path]:
    """Make the directory consistent with resuming from ``checkpoint`` (None = from the start).

    Checkpoints newer than it move to ``checkpoints-set-aside/`` (the Trainer would write into
    their directories again); ``metrics.csv`` loses its rows after the resumed step; a final
    adapter staged by a killed run is removed (it is rebuilt). Returns the set-aside paths.
    """
    resume_step = checkpoint_step(checkpoint) if checkpoint else 0
    set_aside = []
    for path in run.checkpoints():
        if path != checkpoint and (checkpoint_step(path) or 0) > resume_step:
            target = _free_name(run / SET_ASIDE / path.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            logger.warning("set %s aside to %s: it is newer than the step training resumes from", path, target)
            set_aside.append(target)
    _truncate_metrics(run / METRICS, resume_step if checkpoint else -1)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(run.staging_dir)
    return set_aside


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the header and the rows up to ``last_step`` (rows after it will be logged again)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return
    # A row a kill cut short has fewer fields than the header: it is dropped, and logged again.
    kept = [rows[0]] + [r for r in rows[1:]
                        if len(r) == len(rows[0]) and r[0].isdigit() and int(r[0]) <= last_step]
    if len(kept) != len(rows):
        out = io.StringIO()
        csv.writer(out, lineterminator="\r\n").writerows(kept)
        write_text_atomic(path, out.getvalue())


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{n}")
        n += 1
    return candidate


def move_aside(run: RunDir) -> Path:
    """``--overwrite``: rename the run directory to ``RUN.old-YYYYmmdd-HHMMSS``; nothing is deleted."""
    run.refuse_if_locked()
    target = _free_name(run.path.with_name(f"{run.path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
    os.replace(run.path, target)
    logger.info("moved the previous run aside to %s", target)
    return target


def record_start(run: RunDir, plan: StartPlan, data_path: str, data_fingerprint: str, world_size: int = 1) -> None:
    """Append this start to ``run.json``: the data the run is bound to and every change allowed."""
    record = run.read_json(RUN_RECORD) or {"data": {"path": data_path, "fingerprint": data_fingerprint}, "starts": []}
    if plan.guarded_changes:
        record["data"] = {"path": data_path, "fingerprint": data_fingerprint}
    record["starts"].append({
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pid": os.getpid(),
        "world_size": world_size,
        "kind": "continue" if plan.more_epochs else plan.kind,
        "from_checkpoint": plan.checkpoint.name if plan.checkpoint else None,
        "harmless_changes": plan.harmless_changes,
        "allowed_guarded_changes": plan.guarded_changes,
    })
    write_json_atomic(run / RUN_RECORD, record)


# Below this much free space, a failed write is taken to be the disk filling up (torch.save reports
# a full disk as a RuntimeError without an errno).
_NEARLY_FULL_BYTES = 64 << 20


def _disk_full(exc: BaseException, path: Path) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a write that failed for lack of space."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, RuntimeError) and "writ" in str(exc).lower():
        with contextlib.suppress(OSError):
            return shutil.disk_usage(path).free < _NEARLY_FULL_BYTES
    return False


def _training_began(run: RunDir) -> bool:
    """Whether the run holds any work worth keeping: a checkpoint, an adapter, or logged steps."""
    if run.checkpoints() or (run / ADAPTER).exists():
        return True
    try:
        return len((run / METRICS).read_text(encoding="utf-8").splitlines()) > 1
    except (OSError, UnicodeDecodeError):
        return False


@contextlib.contextmanager
def start_guard(run: RunDir, moved_aside: Path | None, enabled: bool = True) -> Iterator[None]:
    """Wrap a start of training (run directory opened, model loaded, adapter created, training).

    If it fails before any training work exists, what the start did is undone: a directory it
    created (or an empty one it filled) is removed, and a finished run that ``--overwrite``
    moved aside is moved back, so a failed start never replaces a run. Once training has begun
    the directory is kept: it resumes. A full disk or another OSError becomes a StorageError
    naming the path, telling the user the same command resumes once the cause is fixed.
    """
    fresh = enabled and (not run.exists() or not any(run.path.iterdir()))
    try:
        yield
    except BaseException as exc:
        if not enabled:
            raise
        undone = ""
        if (fresh or moved_aside is not None) and run.exists() and not _training_began(run):
            shutil.rmtree(run.path, ignore_errors=True)
            if moved_aside is not None:
                os.replace(moved_aside, run.path)
                undone = f"; the previous run was moved back to {run.path}"
        if _disk_full(exc, run.path):
            where = getattr(exc, "filename", None) or run.path
            raise StorageError(f"no space left on device writing {where}; free some space and run the same "
                               f"command again{undone or ' (training resumes from the last checkpoint)'}") from exc
        if isinstance(exc, OSError):
            raise StorageError(os_error_message(exc, exc.filename or run.path) + undone) from exc
        if undone:
            logger.warning("the start failed%s", undone)
        raise
