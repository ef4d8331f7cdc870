"""Typed errors raised by library code.

Library modules never print or exit; they raise one of these and the CLI turns it into a
message and an exit code (2 for bad input a user can fix). ``check_readable_file`` lives here too:
the one check that a path is a file that can be read, for config files and data files alike.
"""

from __future__ import annotations

import errno
import reprlib
import stat
from pathlib import Path


class SocratuneError(Exception):
    """Base class: a failure with a message meant for the user."""

    exit_code = 1


class ConfigError(SocratuneError):
    """A config file, preset or flag is invalid; names the key and the allowed values."""

    exit_code = 2

    def __init__(self, message: str, key: str | None = None, allowed: list[str] | None = None):
        super().__init__(message)
        self.key = key
        self.allowed = allowed or []


class DataError(SocratuneError):
    """The dialogue data cannot be used (unreadable file, or no usable dialogue left)."""

    exit_code = 2

    def __init__(self, message: str, rejections: list | None = None):
        super().__init__(message)
        self.rejections = rejections or []


class RunDirError(SocratuneError):
    """The run directory is in a state that refuses the requested command."""

    exit_code = 2


class ModelError(SocratuneError):
    """A base model or adapter could not be loaded or does not fit the request."""

    exit_code = 2


class TrainingInterrupted(SocratuneError):
    """SIGTERM or SIGINT stopped training after a checkpoint was saved; the run can be resumed.

    Exit code 128 + signal number, as a shell reports a process ended by that signal.
    """

    def __init__(self, message: str, signal_number: int, run_dir: str, step: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number
        self.run_dir = run_dir
        self.step = step


class EndpointError(SocratuneError):
    """An OpenAI-compatible endpoint (synth roles, the LLM judge) failed after its retries."""


class EndpointUnreachable(EndpointError):
    """The endpoint did not answer when a command started: nothing was sent or written yet."""

    exit_code = 2


class StorageError(SocratuneError):
    """A file or directory could not be written or read: disk full, read-only, a file in the way.

    Exit code 2: the user fixes it (frees space, picks another directory) and runs the same
    command again; a run resumes from its last checkpoint.
    """

    exit_code = 2


class EndpointFailed(EndpointError):
    """A request failed after its retries: ``status`` is the HTTP status (None: no answer at all)."""

    def __init__(self, message: str, status: int | None = None, attempts: int = 1):
        super().__init__(message)
        self.status = status
        self.attempts = attempts


class EndpointLost(EndpointError):
    """The endpoint stopped answering mid-run; what finished is on disk and the command resumes."""


class JudgeFailed(EndpointError):
    """The LLM judge rated none of the replies, so its column would be empty."""


class SynthInterrupted(SocratuneError):
    """Ctrl-C stopped ``synth``: finished dialogues are on disk, those in flight were dropped."""

    exit_code = 130


_CAPPED_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_CAPPED_REPR.maxlevel, _CAPPED_REPR.maxstring, _CAPPED_REPR.maxlong, _CAPPED_REPR.maxother = 3, 60, 40, 60
_CAPPED_REPR.maxtuple = _CAPPED_REPR.maxlist = _CAPPED_REPR.maxdict = _CAPPED_REPR.maxset = 4

# What the user can do about each kind of OSError met while writing or reading a path.
_OS_ERROR_ADVICE = {
    errno.ENOSPC: ("no space left on device", "free some space and run the same command again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space and run the same command again"),
    errno.EROFS: ("read-only file system", "choose a directory on a writable file system"),
    errno.EACCES: ("permission denied", "choose a directory you may write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a directory you may write to, or fix its permissions"),
    errno.ENOTDIR: ("a file is in the way (part of the path is a file, not a directory)", "choose another path"),
    errno.EEXIST: ("a file is in the way", "choose another path or remove it"),
    errno.EISDIR: ("it is a directory", "give a file path"),
    errno.ELOOP: ("too many levels of symbolic links (a symlink loop)", "fix the link"),
    errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter path"),
}


def quote_capped(value: object, limit: int = 80) -> str:
    """``repr(value)`` in at most about ``limit`` characters: an error message never quotes a huge
    input whole. ``reprlib`` also bounds nesting, so a deeply nested or alias-multiplied value is
    described by its first items, never expanded."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * limit:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    shown = _CAPPED_REPR.repr(value)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def os_error_message(exc: OSError, path: object, doing: str = "writing") -> str:
    """One line for the user: what failed, on which path, and what to do."""
    what, advice = _OS_ERROR_ADVICE.get(exc.errno or 0, (exc.strerror or str(exc), "check the path"))
    return f"{what} {doing} {path}; {advice}"


def check_readable_file(path: Path, what: str, error: type[SocratuneError] = DataError) -> None:
    """Raise DataError unless ``path`` is an existing regular file that can be opened: a missing
    path, a directory, a FIFO (which would block a reader forever), a symlink loop and an
    unreadable file each get one line naming ``what`` and the path."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise error(os_error_message(exc, path, f"reading {what}")) from exc
    if stat.S_ISDIR(mode):
        raise error(f"{what} {path} is a directory; give a file")
    if not stat.S_ISREG(mode):
        raise error(f"{what} {path} is not a regular file (a pipe, socket or device); give a file")
