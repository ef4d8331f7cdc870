"""The ``socratune`` command: parses arguments and calls the library, nothing more.

This is the only module that prints for the user or chooses exit codes: a ``SocratuneError``
becomes its message on stderr and its exit code (2 for bad input). Heavy libraries (torch,
transformers) are imported inside the handlers, so ``socratune --help`` answers at once.

    socratune train                       # tiny model on the bundled sample, offline
    socratune train --preset gemma2-2b-jpn-qlora --data dialogues.json --output runs/gemma
    socratune validate dialogues.json
    socratune generate runs/tiny "幸福とは何でしょうか？"
    socratune chat runs/tiny
    socratune export runs/tiny --merged merged/ --gguf tiny.gguf
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError, SocratuneError, TrainingInterrupted, os_error_message

EXIT_BAD_INPUT = 2


def _config_from_args(args: argparse.Namespace, continue_run: bool = False):
    """The config from preset, ``--config`` and flags; with ``continue_run``, an existing run
    directory's recorded config replaces the preset underneath, so ``train --output RUN`` resumes
    with the settings the run started with."""
    from .config import load_config

    overrides: dict[str, Any] = {}
    if args.model:
        overrides["model.name_or_path"] = args.model
    if args.data:
        # Absolute, so the run resumes from any directory; not resolve(), which raises on a symlink loop
        # that the data loader reports in words.
        overrides["data.path"] = os.path.abspath(args.data)
    if getattr(args, "output", None):
        overrides["run.output_dir"] = args.output
    if getattr(args, "epochs", None) is not None:
        overrides["train.epochs"] = args.epochs
    config = load_config(args.config, args.preset, overrides)
    if continue_run:
        from .resume import read_recorded_config
        from .rundir import RunDir

        recorded = read_recorded_config(RunDir(config.run.output_dir))
        if recorded is not None:
            config = load_config(args.config, args.preset, overrides, recorded=recorded)
    return config


def _quote(text: str) -> str:
    return shlex.quote(text)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    if args.delete_old and not args.overwrite:
        raise ConfigError("--delete-old only goes with --overwrite (it deletes the run that --overwrite moves aside)")
    config = _config_from_args(args, continue_run=not args.overwrite)
    try:
        result = train(config, resume_from=args.resume_from, show_example_first=args.show_example,
                       overwrite=args.overwrite, delete_old=args.delete_old,
                       allow_config_change=args.allow_config_change)
    except TrainingInterrupted as exc:
        print(f"error: {exc}\nresume with: {_resume_command(exc.run_dir)}", file=sys.stderr)
        return exc.exit_code
    if not result.main_process:
        return 0
    run = str(result.run_dir)
    for note in result.notes:
        print(note)
    if result.already_finished:
        print(f"{run} is already finished ({result.summary.get('global_step')} of "
              f"{result.summary.get('total_steps')} steps); nothing to do.")
    else:
        s = result.summary
        print(f"eval loss {s['eval_loss_initial']} -> {s['eval_loss_final']}; "
              f"style score {s['style_score_initial']} -> {s['style_score_final']} (0-4)")
        if result.sample_prompt is not None:
            print(f"sample reply to 「{result.sample_prompt}」: {result.sample_reply}")
    print(f"Model saved in {result.run_dir / 'adapter'}. Talk to it: socratune chat {_quote(run)}")
    return 0


def _resume_command(run_dir: str) -> str:
    """``socratune train --output RUN``: the run's recorded config supplies everything else."""
    return f"socratune train --output {_quote(run_dir)}"


def cmd_validate(args: argparse.Namespace) -> int:
    from .data import write_rejections
    from .train import load_tokenizer_for, prepare_examples

    args.data = args.file
    config = _config_from_args(args)
    report, examples = prepare_examples(config, load_tokenizer_for(config))
    print(report.summary())
    if args.rejected:
        write_rejections(report.rejections, Path(args.rejected))
    trained = sum(e.trained_tokens for e in examples)
    print(f"{len(examples)} dialogues ready to train, {trained} trained tokens in all")
    return 0


def _gen_params(args: argparse.Namespace):
    """Generation settings from the flags; ``--seed`` seeds torch here, once, for sampled replies."""
    from .generate import GenParams

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    return GenParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     repetition_penalty=args.repetition_penalty)


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    from .data import check_readable_file
    from .generate import generate_replies, read_prompts, reply_records
    from .modeling import load_for_inference
    from .rundir import write_text_atomic

    if (args.prompt is None) == (args.input is None):
        raise ConfigError("give either a PROMPT or --input prompts.jsonl")
    if args.output and not args.input:
        raise ConfigError("--output goes with --input; a single PROMPT's reply is printed")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.input:
        check_readable_file(Path(args.input), "prompts file")  # a FIFO would block the reader
    items = read_prompts(args.input) if args.input else None  # bad lines fail before the model loads
    params = _gen_params(args)
    model, tokenizer = load_for_inference(args.run_dir, args.checkpoint, base_only=args.base)
    if items is None:
        print(generate_replies(model, tokenizer, [[{"role": "user", "content": args.prompt}]], params)[0])
        return 0
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n"
                    for r in reply_records(model, tokenizer, items, params, args.batch_size))
    if args.output:
        write_text_atomic(Path(args.output), lines)
        print(f"{len(items)} replies written to {args.output}; score them: socratune score {_quote(args.output)}",
              file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession, run_chat
    from .modeling import load_for_inference

    params = _gen_params(args)
    model, tokenizer = load_for_inference(args.run_dir, args.checkpoint, base_only=args.base)
    session = ChatSession(model, tokenizer, params, args.max_context)
    what = "the untuned base" if args.base else (f"checkpoint {args.checkpoint}" if args.checkpoint else "the adapter")
    print(f"Chatting with {what} of {args.run_dir} on {model.device}; context {session.max_context} tokens.")
    run_chat(session, sys.stdin, sys.stdout)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .modeling import load_for_inference
    from .serve import ChatServer, Engine, is_loopback, model_id_for

    if not is_loopback(args.host):
        print(f"warning: serving on {args.host}: anyone who can reach this machine on port {args.port} can use "
              "the model; there is no authentication", file=sys.stderr)
    params = _gen_params(args)  # the defaults for requests that name no temperature, max_tokens...
    server = ChatServer(args.host, args.port)  # binds now: a busy port fails before the model loads
    try:
        model, tokenizer = load_for_inference(args.run_dir, args.checkpoint, base_only=args.base)
        engine = Engine(model, tokenizer, model_id_for(args.run_dir, args.checkpoint, args.base), params)
        print(f"Serving {engine.model_id}: chat page {server.url}/ , OpenAI API {server.url}/v1 (Ctrl+C stops)",
              flush=True)
        server.serve(engine)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    if not args.merged and not args.gguf:
        raise ConfigError("nothing to export: give --merged OUT_DIR and/or --gguf OUT.gguf")
    result = export(args.run_dir, merged_dir=args.merged, gguf_path=args.gguf, checkpoint=args.checkpoint,
                    force=args.force)
    for note in result.notes:
        print(note)
    if result.merged_dir:
        print(f"merged model ({result.dtype}) saved in {result.merged_dir}; load it with "
              f"AutoModelForCausalLM.from_pretrained({str(result.merged_dir)!r})")
    if result.gguf_path:
        print(f"GGUF ({result.gguf_type}) written to {result.gguf_path}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from .rundir import RunDir, run_status

    status = run_status(RunDir(args.run_dir))
    if args.json:
        print(json.dumps(status, ensure_ascii=False, indent=2))
        return 0
    print(f"{status['run_dir']}: {status['state']}, step {status['step']} of {status['total_steps'] or '?'}")
    print(f"last valid checkpoint: {status['last_valid_checkpoint'] or 'none'}")
    for bad in status["invalid_checkpoints"]:
        print(f"invalid checkpoint {bad['path']}: {bad['reason']}")
    for label, key in (("best eval loss", "best_eval_loss"), ("best style score", "best_style_score")):
        if status[key]:
            print(f"{label}: {status[key]['value']:.4f} at step {status[key]['step']}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .data import check_readable_file
    from .style import format_summary_table, load_profile, score_jsonl

    check_readable_file(Path(args.file), "replies file")  # a FIFO would block the reader
    records, bad_lines, summary = score_jsonl(Path(args.file), Path(args.output) if args.output else None,
                                              load_profile(args.profile))
    if not args.output:
        import json

        for record in records:
            print(json.dumps(record, ensure_ascii=False))
    for message in bad_lines:
        print(f"skipped {message}", file=sys.stderr)
    print(format_summary_table(summary, len(records)), file=sys.stderr)
    return EXIT_BAD_INPUT if bad_lines and not records else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import check_readable_file
    from .evaluate import KEYS, REPORT_MD, evaluate
    from .style import load_profile

    if args.prompts:
        check_readable_file(Path(args.prompts), "prompts file")  # a FIFO would block the reader
    profile = load_profile(args.profile)
    judge = None
    if args.judge or args.judge_model:
        from .judge import Judge

        judge = Judge(args.judge or "", args.judge_model or "", profile, timeout=args.judge_timeout,
                      retries=args.judge_retries)
    result = evaluate(args.run_dir, prompts_path=args.prompts, limit=args.limit, checkpoints=args.checkpoints,
                      turns=args.turns, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      seed=args.seed, profile=profile, judge=judge, judge_workers=args.judge_workers)
    stats = result.data["statistics"]
    print(f"{'model':<18}" + "".join(f"{k:>10}" for k in KEYS))
    for name, means in stats["summary"].items():
        print(f"{name:<18}" + "".join(f"{means[k]['mean']:>10.2f}" for k in KEYS))
    for key, c in stats["tuned_vs_base"].items():
        verdict = "tuned beats base" if c["tuned_beats_base"] else "no significant gain"
        print(f"{key}: {verdict} (Wilcoxon p={c['p_greater']:.3g}, rank-biserial {c['rank_biserial']:+.2f})")
    for axis, agreement in stats.get("agreement", {}).items():
        rho = agreement["spearman"]
        print(f"judge agreement {axis}: Spearman {'n/a' if rho is None else f'{rho:.2f}'} over {agreement['n']} replies")
    print(f"Report: {result.folder / REPORT_MD}")
    if result.previous:
        print(f"The previous report was kept in {result.previous}")
    return 0


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file for the run")
    parser.add_argument("--preset", help="preset to start from: tiny (default) or gemma2-2b-jpn-qlora")
    parser.add_argument("--model", help='"tiny", a local model directory, or a hub id')


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="use checkpoints/NAME (or a path) instead of the final adapter")
    parser.add_argument("--base", action="store_true", help="the untuned base model, for comparison")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="socratune", description=__doc__.split("\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune (or resume) a run; no arguments = tiny model, bundled data")
    _add_config_flags(p)
    p.add_argument("--data", help="JSON or JSONL dialogues (default: bundled sample)")
    p.add_argument("--output", help="run directory (default: runs/PRESET)")
    p.add_argument("--epochs", type=float, help="override train.epochs")
    p.add_argument("--resume-from", help="checkpoint to resume from (name under checkpoints/ or a path)")
    p.add_argument("--show-example", action="store_true", help="log one templated example with trained tokens marked")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: move an existing run directory aside to RUN.old-TIMESTAMP first")
    p.add_argument("--delete-old", action="store_true", help="with --overwrite: delete the moved-aside run at the end")
    p.add_argument("--allow-config-change", action="store_true",
                   help="continue a run although data, model, LoRA, quantization or sequence settings changed")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("validate", help="check a dialogue file without training")
    p.add_argument("file")
    _add_config_flags(p)
    p.add_argument("--rejected", help="also write the rejected rows with reasons to this JSONL file")
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("generate", help="the tuned model's reply to a prompt, or replies to a JSONL file of prompts")
    p.add_argument("run_dir")
    p.add_argument("prompt", nargs="?", help="one prompt; its reply is printed")
    p.add_argument("--input", help='JSONL prompts: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]}')
    p.add_argument("--output", help='write {"id", "text", "prompt"} lines here (socratune score input); '
                                    "default stdout")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (left-padded)")
    _add_generation_flags(p)
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("chat", help="talk to a run in the terminal (streaming, multi-turn)")
    p.add_argument("run_dir")
    p.add_argument("--max-context", type=int,
                   help="tokens of conversation kept for the model (default and ceiling: the model's context)")
    _add_generation_flags(p)
    p.set_defaults(handler=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible API and a chat page in the browser")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    _add_generation_flags(p)  # the defaults for requests that do not name their own
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("export", help="merge the adapter into the base: transformers directory and/or GGUF")
    p.add_argument("run_dir")
    p.add_argument("--merged", help="directory for the merged transformers model and tokenizer")
    p.add_argument("--gguf", help="GGUF file for llama.cpp / Ollama (Llama-architecture models)")
    p.add_argument("--checkpoint", help="export checkpoints/NAME (or a path) instead of the final adapter")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory or existing file")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("status", help="state of a run: step, checkpoints, best scores")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("score", help="score replies for Socratic style (JSONL in, JSONL out)")
    p.add_argument("file", help='JSONL lines {"id": ..., "text": ..., "prompt": ... (optional)}')
    p.add_argument("--profile", default="socrates", help="style profile name or YAML path")
    p.add_argument("--output", help="write scores here instead of stdout")
    p.set_defaults(handler=cmd_score)

    p = sub.add_parser("evaluate", help="base vs tuned model vs checkpoints on held-out prompts; report in RUN/evaluation")
    p.add_argument("run_dir")
    p.add_argument("--prompts", help='JSONL {"id": ..., "prompt": ..., "followups": [...] (optional)}; '
                                     "default: 40 bundled held-out questions")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--checkpoints", default="all", help="all (default), none, or names: checkpoint-80,160")
    p.add_argument("--turns", type=int, default=0, help="continue each dialogue N more exchanges with a scripted user")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--seed", type=int, default=0, help="generation and bootstrap seed")
    p.add_argument("--profile", default="socrates", help="style profile name or YAML path")
    p.add_argument("--judge", metavar="URL", help="OpenAI-compatible server (e.g. http://localhost:8080/v1) to rate "
                                                  "replies too; key from SOCRATUNE_JUDGE_API_KEY or OPENAI_API_KEY")
    p.add_argument("--judge-model", metavar="NAME", help="model name the judge server should use")
    p.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request")
    p.add_argument("--judge-retries", type=int, default=3, help="retries of a failed judge request (with backoff)")
    p.add_argument("--judge-workers", type=int, default=4, help="judge requests in flight at once")
    p.set_defaults(handler=cmd_evaluate)
    return parser


def _setup_logging(quiet: bool) -> None:
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
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    log.addHandler(handler)
    log.setLevel(logging.INFO)  # train.log always gets everything


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    if args.command in ("train", "generate", "validate", "chat", "export", "serve", "evaluate"):
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
