"""The run directory: every file name of a run, atomic writes, the writer lock, and checkpoint
validation. It is the unit a user sees and every command takes one.

Layout::

    RUN/
      config.yaml            resolved config the run was started with
      training_config.json   config + data fingerprint/counts + split seed + versions (written at the end)
      split.json             train/eval ids with content hashes, reused when the run continues
      rejected.jsonl         every rejected dialogue with file, index and reason
      metrics.csv, plots/    training monitor output
      train.log              log file
      base/                  the built-in tiny base model (only for model "tiny")
      run.json               data fingerprint the run is bound to; every start with its allowed changes
      checkpoints/checkpoint-N/   Trainer checkpoints, each closed by manifest.json
      checkpoints-set-aside/ checkpoints newer than a resume point, moved here rather than deleted
      adapter/               final adapter + tokenizer (plain PEFT loads it)
      training_summary.json  written last: its presence with ``finished: true`` means done

Files are written to a temporary sibling and renamed into place, so a kill at any moment leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import RunDirError, StorageError, os_error_message

CONFIG_YAML = "config.yaml"
TRAINING_CONFIG = "training_config.json"
SPLIT = "split.json"
REJECTED = "rejected.jsonl"
METRICS = "metrics.csv"
SUMMARY = "training_summary.json"
LOG = "train.log"
PLOTS = "plots"
BASE = "base"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
RUN_RECORD = "run.json"
SET_ASIDE = "checkpoints-set-aside"
LOCK = ".lock"
MANIFEST = "manifest.json"
CHECKPOINT_PREFIX = "checkpoint-"
# Files a Trainer checkpoint must hold to resume exactly (RNG state files are checked per process).
CHECKPOINT_REQUIRED = ("trainer_state.json", "scheduler.pt")
# The adapter and optimizer state, each in one of the layouts the Trainer writes: by itself on one
# process and under DDP; through accelerate under FSDP (sharded: torch.distributed.checkpoint
# folders, ``.metadata`` written last; full: one file each); DeepSpeed's engine keeps the optimizer
# state in ``global_stepN/``. A path ending in "/" is a folder that must hold a file.
CHECKPOINT_LAYOUTS = {
    "adapter weights": (("adapter_model.safetensors", "adapter_config.json"), ("pytorch_model_fsdp_0/.metadata",),
                        ("pytorch_model_fsdp.bin",)),
    "optimizer state": (("optimizer.pt",), ("optimizer_0/.metadata",), ("optimizer.bin",), ("global_step{step}/",)),
}


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` can only
    be read by setting it, which would race with threads creating files meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(parent: Path, name: str) -> tuple[int, str]:
    """``tempfile.mkstemp`` beside ``parent/name``, with the mode a plain ``open`` would give
    (mkstemp's 0600 would survive the rename: nobody else could read a model or a report)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, tmp


def temp_dir(parent: Path, name: str) -> Path:
    """``tempfile.mkdtemp`` beside ``parent/name``, with the mode ``mkdir`` would give (not 0700)."""
    staged = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    staged.chmod(0o777 & ~current_umask())
    return staged


def match_umask(tree: Path) -> None:
    """Give every file and folder under ``tree`` (itself included) the mode the umask gives a new
    one. safetensors writes its files 0600 whatever the umask, so a saved model, adapter or
    checkpoint would otherwise be unreadable by the other users or services (a model server)
    the umask admits."""
    mask = current_umask()
    for path in [tree, *tree.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def reports_storage_errors(write: Callable[..., None]) -> Callable[..., None]:
    """Turn an OSError met while writing the path given first (disk full, read-only, a file in the
    way) into a StorageError that names that path and says what to do."""

    @functools.wraps(write)
    def wrapped(path: Path, *args: Any, **kwargs: Any) -> None:
        try:
            write(path, *args, **kwargs)
        except OSError as exc:
            raise StorageError(os_error_message(exc, path)) from exc

    return wrapped


@reports_storage_errors
def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename;
    the file gets the user's umask, like any other file the user writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def replace_dir_atomic(staged: Path, final: Path) -> None:
    """Move a fully written directory into place, with the user's umask; an existing one is
    swapped out, then removed.

    A crash between the two renames leaves ``.NAME.old`` beside the missing final directory:
    the previous version is never lost.
    """
    match_umask(staged)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    if old.exists():
        shutil.rmtree(old)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_step(path: Path) -> int | None:
    suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def write_manifest(checkpoint: Path, world_size: int = 1) -> None:
    """Record size and checksum of every file of a finished checkpoint; written last, so a
    checkpoint without a valid manifest is one whose writing did not complete. ``world_size``
    is the number of training processes (one RNG state file each)."""
    match_umask(checkpoint)
    files = {
        str(p.relative_to(checkpoint)): {"size": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    write_json_atomic(checkpoint / MANIFEST,
                      {"step": checkpoint_step(checkpoint), "world_size": world_size, "files": files})


def _rng_state_files(world_size: int) -> list[str]:
    """The Trainer's RNG state file names: one, or one per process in a distributed run."""
    return ["rng_state.pth"] if world_size == 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or None when it is complete and consistent."""
    step = checkpoint_step(checkpoint)
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text(encoding="utf-8"))
        recorded = manifest["files"]
    except FileNotFoundError:
        return "no manifest.json (checkpoint writing did not finish)"
    except (ValueError, KeyError, TypeError, RecursionError):
        return "manifest.json is unreadable"
    for name in CHECKPOINT_REQUIRED:
        if name not in recorded:
            return f"{name} is missing"
    for part, layouts in CHECKPOINT_LAYOUTS.items():
        if not any(all(_recorded(recorded, name.format(step=step)) for name in layout) for layout in layouts):
            return f"no {part} ({' / '.join(' + '.join(layout) for layout in layouts).format(step=step)})"
    for name in _rng_state_files(int(manifest.get("world_size", 1))):
        if name not in recorded:
            return f"{name} is missing"
    for name, expected in recorded.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, manifest says {expected['size']}"
        if file_digest(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        global_step = int(state["global_step"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return "trainer_state.json does not parse"
    if not (global_step == step == manifest.get("step")):
        return f"step numbers disagree: directory {step}, trainer state {global_step}, manifest {manifest.get('step')}"
    return None


def _recorded(files: dict[str, Any], name: str) -> bool:
    """Whether the manifest lists ``name``, or for a name ending in "/" a file in that folder."""
    if name.endswith("/"):
        return any(recorded.startswith(name) for recorded in files)
    return name in files


class RunDir:
    """Paths and state of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER

    @property
    def staging_dir(self) -> Path:
        """Where the final adapter is written before it is renamed into place."""
        return self.path / f".{ADAPTER}.staging"

    @property
    def base_dir(self) -> Path:
        return self.path / BASE

    def exists(self) -> bool:
        return self.path.is_dir()

    def checkpoints(self) -> list[Path]:
        """Checkpoint directories, oldest step first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
        return sorted(found, key=lambda p: checkpoint_step(p) or 0)

    def latest_valid_checkpoint(self) -> tuple[Path | None, list[tuple[Path, str]]]:
        """The newest checkpoint that validates, and every newer one that does not, with why."""
        invalid: list[tuple[Path, str]] = []
        for checkpoint in reversed(self.checkpoints()):
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                return checkpoint, invalid
            invalid.append((checkpoint, problem))
        return None, invalid

    def read_json(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / name).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError, RecursionError):
            return None

    def summary(self) -> dict[str, Any] | None:
        return self.read_json(SUMMARY)

    def is_finished(self) -> bool:
        """Finished = final adapter saved, the summary records every planned step done (or an
        early stop), and no longer run has been started since (a finished run continued for more
        epochs and then interrupted keeps its old summary until the new one replaces it)."""
        summary = self.summary()
        planned = self._planned_epochs()
        return bool(
            summary
            and summary.get("finished")
            and (summary.get("global_step") == summary.get("total_steps") or summary.get("stopped_early"))
            and summary.get("epochs", planned) >= planned
            and (self.adapter_dir / "adapter_config.json").exists()
        )

    def _planned_epochs(self) -> float:
        try:
            recorded = yaml.safe_load((self.path / CONFIG_YAML).read_text(encoding="utf-8"))
            return float(recorded["train"]["epochs"])
        except (FileNotFoundError, yaml.YAMLError, KeyError, TypeError, ValueError):
            return 0.0

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    def lock_holder(self) -> int | None:
        """The pid of the process holding this run's lock (0 when it has not written its record
        yet), or None when the run is free."""
        holder = _lock_holder(self.lock_path)
        return None if holder is None else holder.pid

    def refuse_if_locked(self) -> None:
        """Raise RunDirError, naming the holder and the lock file, while another process writes this run."""
        holder = _lock_holder(self.lock_path)
        if holder is not None:
            raise RunDirError(holder.in_use_message(self.path, self.lock_path))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the single-writer lock for the ``with`` block: an exclusive ``flock`` on RUN/.lock.

        The kernel releases a flock when its process dies, however it dies, so a lock left by a
        killed run frees itself; the pid and host recorded inside only serve the messages. A
        record written by another host is respected (flock does not reach across NFS hosts).
        """
        lock_path = self.lock_path
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(os_error_message(exc, self.path, "creating")) from exc
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise RunDirError(os_error_message(exc, lock_path, "creating")) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _read_holder(lock_path) or LockHolder(0, socket.gethostname())
                raise RunDirError(holder.in_use_message(self.path, lock_path)) from None
            # A releasing holder unlinks the file after we opened it: our flock is then on a file
            # nobody else can see, so start again on the current one.
            try:
                same_file = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)
        try:
            recorded = _read_holder(lock_path)
            if recorded is not None and recorded.host != socket.gethostname():
                raise RunDirError(recorded.in_use_message(self.path, lock_path))
            record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except BaseException:
            os.close(fd)
            raise
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)  # unlinked while still locked: see the inode check above
            os.close(fd)


@dataclass(frozen=True)
class LockHolder:
    pid: int  # 0: the holder has taken the lock but not yet written its record
    host: str

    def in_use_message(self, run_path: Path, lock_path: Path) -> str:
        if self.host != socket.gethostname():
            return (f"{run_path} is in use by process {self.pid} on host {self.host} (lock file {lock_path}); "
                    f"if no socratune process on {self.host} uses this run any more, delete {lock_path}")
        who = f"process {self.pid}" if self.pid else "another process"
        return (f"{run_path} is in use by {who} (it holds the lock on {lock_path}); wait for it or stop it; "
                "the lock frees itself when that process ends")


def _read_holder(lock_path: Path) -> LockHolder | None:
    """The pid and host recorded in ``lock_path``, or None when it holds no readable record."""
    try:
        record = json.loads(lock_path.read_text(encoding="utf-8"))
        return LockHolder(int(record["pid"]), str(record.get("host") or socket.gethostname()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _lock_holder(lock_path: Path) -> LockHolder | None:
    """Who holds ``lock_path``: found by probing the flock on this host; a record from another host
    is taken at its word."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        # A shared probe: a writer taking the lock this instant is not refused because of it.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(lock_path) or LockHolder(0, socket.gethostname())
    finally:
        os.close(fd)
    recorded = _read_holder(lock_path)
    if recorded is not None and recorded.host != socket.gethostname():
        return recorded
    return None  # left by a process that has ended: the next writer takes it over


def run_status(run: RunDir) -> dict[str, Any]:
    """State of a run for ``socratune status``: running / interrupted / finished / new, the step
    reached, checkpoints valid and not, and the best eval loss and style score with their steps."""
    if not run.exists():
        raise RunDirError(f"{run.path} does not exist")
    latest, invalid = run.latest_valid_checkpoint()
    state = None
    if latest is not None:
        state = json.loads((latest / "trainer_state.json").read_text(encoding="utf-8"))
    summary = run.summary() if run.is_finished() else None
    history = (state or {}).get("log_history", [])
    evals = [e for e in history if "eval_loss" in e]
    if run.lock_holder() is not None:
        label = "running"
    elif summary:
        label = "finished"
    elif latest is not None or (run.path / CONFIG_YAML).exists():
        label = "interrupted"
    else:
        label = "new"

    def best(key: str, lowest: bool) -> dict[str, Any] | None:
        scored = [e for e in evals if e.get(key) is not None]
        if not scored:
            return None
        pick = (min if lowest else max)(scored, key=lambda e: e[key])
        return {"value": pick[key], "step": pick["step"]}

    return {
        "run_dir": str(run.path),
        "state": label,
        "step": (summary or {}).get("global_step", (state or {}).get("global_step", 0)),
        "total_steps": (summary or {}).get("total_steps", (state or {}).get("max_steps")),
        "stopped_early": (summary or {}).get("stopped_early"),
        "last_valid_checkpoint": str(latest) if latest else None,
        "invalid_checkpoints": [{"path": str(p), "reason": why} for p, why in invalid],
        "best_eval_loss": best("eval_loss", lowest=True),
        "best_style_score": best("eval_style_overall", lowest=False),
    }
