"""The ``socratune`` command: parses arguments and calls the library, nothing more.

Each command is a module of this folder that owns its arguments: ``NAME``, ``SUMMARY``,
``DESCRIPTION`` and ``EXAMPLE`` for its help, ``add_arguments(parser)`` and ``run(args)``;
``build_parser`` here composes them, in ``COMMANDS`` order (the order of ``--help``), and
``main`` is the one place where errors become exit codes: a ``SocratuneError`` becomes its
message on stderr and its exit code (2 for bad input). The command modules import heavy libraries
(torch, transformers) inside ``run``, so ``socratune --help`` answers at once.

    socratune train                       # tiny model on the bundled sample, offline
    socratune train --preset gemma2-2b-jpn-qlora --data dialogues.json --output runs/gemma
    socratune validate dialogues.json
    socratune config --preset gemma2-2b-jpn-qlora --set train.epochs=5 > run.yaml
    socratune generate runs/tiny "幸福とは何でしょうか？"
    socratune chat runs/tiny
    socratune export runs/tiny --merged merged/ --gguf tiny.gguf
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..core.errors import SocratuneError, os_error_message
from . import calibrate, chat, config, evaluate, export, generate, prefs, score, serve, status, synth, train, validate

EXIT_BAD_INPUT = 2
# The commands in the order --help lists them.
COMMANDS = (train, prefs, validate, config, generate, chat, serve, export, status, score, calibrate, evaluate, synth)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help, where there is one worth showing (not for switches
    and unset options); descriptions and examples keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


PROGRAM_DESCRIPTION = """\
Fine-tune a causal language model into a Japanese Socratic chatbot with LoRA or QLoRA, and
manage the run: validate data, train (resumable), chat, generate, evaluate, serve, export.

Start here (tiny built-in model, bundled data, offline, a few minutes on a CPU):
    socratune train
    socratune chat runs/tiny
"""


def _common_parent() -> argparse.ArgumentParser:
    """-q / -v, accepted before or after the subcommand. SUPPRESS as default, so the subcommand's
    parser does not reset a flag given before the subcommand."""
    parent = argparse.ArgumentParser(add_help=False)
    verbosity = parent.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                           help="only warnings, errors and results")
    verbosity.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                           help="also the libraries' own warnings and messages (silenced by default)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    common = _common_parent()
    parser = argparse.ArgumentParser(prog="socratune", description=PROGRAM_DESCRIPTION, parents=[common],
                                     formatter_class=_HelpFormatter,
                                     epilog="Each command has its own help: socratune COMMAND --help")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        summary = command.SUMMARY
        p = sub.add_parser(command.NAME, help=summary, epilog=f"example:\n  {command.EXAMPLE}", parents=[common],
                           description=f"{summary[0].upper()}{summary[1:]}.\n\n{command.DESCRIPTION}".rstrip(),
                           formatter_class=_HelpFormatter)
        command.add_arguments(p)
        p.set_defaults(handler=command.run)
    return parser


def _setup_logging(quiet: bool, verbose: bool = False) -> None:
    log = logging.getLogger("socratune")
    for previous in [h for h in log.handlers if h.get_name() == "socratune-cli"]:
        log.removeHandler(previous)  # main() called again in one process (tests, notebooks)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("socratune-cli")
    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun / accelerate launch: name the rank; others warn only
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
        quiet = quiet or rank != 0
    else:
        handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)  # train.log always gets everything


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    _setup_logging(getattr(args, "quiet", False), verbose)
    if not verbose:
        from ..core.quiet import silence_harmless_messages

        silence_harmless_messages()
    if args.command in ("train", "generate", "validate", "chat", "export", "serve", "evaluate", "prefs"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight-loading bars would drown the training log
    # A log handler that cannot write (disk full) must not print its own traceback; the write that
    # matters fails too and is reported below with the path.
    logging.raiseExceptions = False
    try:
        return args.handler(args)
    except SocratuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a write or read no library layer translated: still the user's to fix
        message = os_error_message(exc, exc.filename, "on") if exc.filename else (exc.strerror or str(exc))
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a bug, never a traceback on screen
        print(f"error: unexpected {type(exc).__name__}: {_first_line(exc)}; {_save_crash_report(args)}",
              file=sys.stderr)
        return 1


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else "(no message)"


def _save_crash_report(args: argparse.Namespace) -> str:
    """Write the traceback of the exception being handled to a file; say where, for a bug report."""
    import tempfile
    import traceback

    try:
        fd, path = tempfile.mkstemp(prefix="socratune-crash-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as handle:
            handle.write(f"socratune {args.command}\n{traceback.format_exc()}")
    except OSError:
        return "no crash report could be written"
    return f"the full report is in {path}; please include it in a bug report"
