"""Typed errors raised by library code.

Library modules never print or exit; they raise one of these and the CLI turns it into a
message and an exit code (2 for bad input a user can fix).
"""

from __future__ import annotations


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
