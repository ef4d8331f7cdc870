"""Library messages that are known to be harmless here, silenced unless the user asks for
everything with ``-v``.

Each entry names the library that emits it and why it says nothing the user can act on. Only
these exact messages are silenced: any other warning from the same libraries still shows.
"""

from __future__ import annotations

import logging
import re
import warnings

# (category, start of the message): matched by ``warnings.filterwarnings``.
HARMLESS_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # transformers 5 deprecates the attribute that PEFT itself reads when it wraps a model; not our call.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # PEFT, at every adapter save of a run that adapts the embedding (the tiny preset does): saving
    # the embedding with the adapter is exactly what such a run needs.
    (UserWarning, r"Setting `save_embedding_layers` to `True`"),
)

# Loggers whose warnings are dropped: bitsandbytes announces at import, on CPUs with AVX-512 BF16,
# that the optional `kernels` package (a faster CPU 4-bit matmul) is missing, and tells the user
# to install it, also for runs that use no 4-bit weights at all.
HARMLESS_LOGGERS: dict[str, int] = {"bitsandbytes.backends.cpu.ops": logging.ERROR}

# (logger, start of the message): single log lines dropped by what they say, the rest of the logger
# still shows. `kernels` (installed by transformers 5.25) warns on every command run offline that it
# cannot check a kernel repository's publisher; the kernel is the one already in the local cache,
# trusted when it was fetched, and socratune runs offline by design.
HARMLESS_LOG_LINES: tuple[tuple[str, str], ...] = (
    ("kernels._internals.hf_hub", r"Skipping publisher trust check for .* because Hugging Face Hub is in offline mode"),
)


class _DropMessages(logging.Filter):
    """Rejects the records of one logger whose message matches one of ``patterns``."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(pattern) for pattern in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.match(message) for pattern in self.patterns)


def silence_harmless_messages() -> None:
    """Drop the known-harmless warnings and log lines above for the rest of this process."""
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, level in HARMLESS_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for name in dict.fromkeys(name for name, _ in HARMLESS_LOG_LINES):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropMessages) for existing in logger.filters):  # once per process
            logger.addFilter(_DropMessages([pattern for owner, pattern in HARMLESS_LOG_LINES if owner == name]))
