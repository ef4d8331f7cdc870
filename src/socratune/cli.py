"""The ``socratune`` command: parses arguments and calls the library, nothing more.

This is the only module that prints for the user or chooses exit codes: a ``SocratuneError``
becomes its message on stderr and its exit code (2 for bad input). Heavy libraries (torch,
transformers) are imported inside the handlers, so ``socratune --help`` answers at once.

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
import shlex
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError, SocratuneError, TrainingInterrupted, os_error_message

EXIT_BAD_INPUT = 2
MAX_PREF_SAMPLES = 64  # replies per prompt in prefs: more is a typo that would fill memory, not a plan
MAX_SKIPPED_SHOWN = 10  # score's unusable lines named one by one; the rest counted


def _config_from_args(args: argparse.Namespace, continue_run: bool = False):
    """The config from preset, ``--config``, ``--set`` and flags; with ``continue_run``, an existing run
    directory's recorded config replaces the preset underneath, so ``train --output RUN`` resumes
    with the settings the run started with."""
    from .config import load_config

    overrides: dict[str, Any] = {}
    if args.model:
        # A local directory is recorded absolute, so the run finds its base from any directory.
        local = Path(args.model).expanduser()
        overrides["model.name_or_path"] = str(local.resolve()) if local.is_dir() else args.model
    if args.data:
        # Absolute, so the run resumes from any directory; not resolve(), which raises on a symlink loop
        # that the data loader reports in words.
        overrides["data.path"] = os.path.abspath(args.data)
    if getattr(args, "output", None):
        overrides["run.output_dir"] = args.output
    if getattr(args, "epochs", None) is not None:
        overrides["train.epochs"] = args.epochs
    overrides.update(_preference_overrides(args))
    assignments = getattr(args, "set", None)
    config = load_config(args.config, args.preset, overrides, assignments=assignments)
    if continue_run:
        from .resume import read_recorded_config
        from .rundir import RunDir

        recorded = read_recorded_config(RunDir(config.run.output_dir))
        if recorded is None and config.prefs.from_run:  # a new preference run starts from its supervised run's settings
            recorded = read_recorded_config(RunDir(config.prefs.from_run))
        if recorded is not None:
            config = load_config(args.config, args.preset, overrides, recorded=recorded, assignments=assignments)
    return config


def _quote(text: str) -> str:
    return shlex.quote(text)


def cmd_train(args: argparse.Namespace) -> int:
    from .selection import describe_end, describe_selection
    from .train import train

    if args.delete_old and not args.overwrite:
        raise ConfigError("--delete-old only goes with --overwrite (it deletes the run that --overwrite moves aside)")
    config = _config_from_args(args, continue_run=not args.overwrite)
    if config.train.method == "sft" and (args.pairs or args.from_run):
        raise ConfigError("--pairs and --from go with --method dpo or orpo (train.method); a supervised run "
                          "trains on --data", key="train.method", allowed=["dpo", "orpo"])
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
        early = ", stopped early" if result.summary.get("stopped_early") else ""
        print(f"{run} is already finished ({result.summary.get('global_step')} of "
              f"{result.summary.get('total_steps')} steps{early}); nothing to do.")
    else:
        s = result.summary
        print(f"eval loss {s['eval_loss_initial']} -> {s['eval_loss_final']}; "
              f"style score {s['style_score_initial']} -> {s['style_score_final']} (0-4)")
        for line in filter(None, [describe_end(s), *describe_selection(s)]):
            print(line)
        if s.get("method") in ("dpo", "orpo"):
            print(f"{s['method']}: eval reward margin {s.get('reward_margin_final')}, "
                  f"reward accuracy {s.get('reward_accuracy_final')} (chosen above rejected)")
        if result.sample_prompt is not None:
            print(f"sample reply to 「{result.sample_prompt}」: {result.sample_reply}")
    print(f"Model saved in {result.run_dir / 'adapter'}. Talk to it: socratune chat {_quote(run)}")
    return 0


def _preference_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``train --method / --pairs / --from``: dotted config keys (paths made absolute, so the run resumes anywhere)."""
    overrides: dict[str, Any] = {}
    if getattr(args, "method", None):
        overrides["train.method"] = args.method
    if getattr(args, "pairs", None):
        overrides["prefs.pairs"] = os.path.abspath(args.pairs)
    if getattr(args, "from_run", None):
        overrides["prefs.from_run"] = os.path.abspath(args.from_run)
    return overrides


def cmd_prefs(args: argparse.Namespace) -> int:
    import json

    from .data import check_output_file
    from .errors import DataError
    from .generate import GenParams, read_prompts
    from .modeling import load_for_inference
    from .prefs import finished_run_config, make_pairs, parse_weights, ranking_weights, training_prompts
    from .rundir import write_text_atomic
    from .style import StyleScorer, load_profile

    recorded = finished_run_config(args.run_dir)  # not resolve_run_model: that builds a tiny run's base in RUN/base
    prefs = recorded.prefs
    samples = args.samples if args.samples is not None else prefs.samples
    if not 2 <= samples <= MAX_PREF_SAMPLES:
        raise ConfigError(f"--samples must be from 2 (a pair needs two replies) to {MAX_PREF_SAMPLES}, not {samples}",
                          key="--samples")
    _check_prefs_flags(args)
    chosen_weights = parse_weights(args.weights) if args.weights is not None else prefs.weights
    if bool(args.judge) != bool(args.judge_model):
        raise ConfigError("--judge URL and --judge-model NAME go together")
    output = Path(args.output)
    check_output_file(output, "--output")  # found now, not after every reply is sampled
    if (output.exists() or output.is_symlink()) and not args.force:
        raise ConfigError(f"{output} exists; choose another --output or add --force to replace it")
    prompts = ([i.messages for i in read_prompts(args.prompts)] if args.prompts
               else training_prompts(args.run_dir))
    if args.limit is not None:
        prompts = prompts[: args.limit]
    profile = load_profile(args.profile or recorded.style.profile)
    weights = ranking_weights(chosen_weights, profile)
    params = GenParams(max_new_tokens=args.max_new_tokens or prefs.max_new_tokens,
                       temperature=args.temperature if args.temperature is not None else prefs.temperature,
                       top_p=args.top_p if args.top_p is not None else prefs.top_p)
    judge = None
    if args.judge:
        from .judge import Judge

        judge = Judge(args.judge, args.judge_model, profile)
    model, tokenizer = load_for_inference(args.run_dir)
    result = make_pairs(model, tokenizer, prompts, samples=samples, params=params, seed=args.seed, weights=weights,
                        min_margin=args.min_margin if args.min_margin is not None else prefs.min_margin,
                        scorer=StyleScorer(profile), judge=judge, batch_size=args.batch_size)
    if not result.pairs:
        raise DataError(f"no pair reached the margin among {result.prompts} prompts; lower --min-margin or "
                        "raise --samples")
    write_text_atomic(output, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result.pairs))
    print(f"{len(result.pairs)} pairs from {result.prompts} prompts x {samples} replies written to {output} "
          f"({result.dropped_below_margin} prompts below the margin dropped; ranking weights {result.weights})")
    print(f"Train on them: socratune train --method dpo --pairs {_quote(str(output))} --from {_quote(args.run_dir)} "
          "--output RUN2")
    return 0


def _check_prefs_flags(args: argparse.Namespace) -> None:
    """prefs' sampling flags, each named, before the model loads: sampling divides by the
    temperature (a tiny or infinite one gives inf/nan probabilities), and a pair needs replies."""
    from .generate import MIN_DIVISOR

    checks = (("--temperature", args.temperature, lambda v: MIN_DIVISOR <= v < float("inf"),
               f"a number from {MIN_DIVISOR} (prefs samples, so not 0)"),
              ("--top-p", args.top_p, lambda v: 0 < v <= 1, "above 0 and at most 1"),
              ("--max-new-tokens", args.max_new_tokens, lambda v: v >= 1, "at least 1"),
              ("--min-margin", args.min_margin, lambda v: 0 <= v <= 4, "from 0 to 4"),
              ("--batch-size", args.batch_size, lambda v: v >= 1, "at least 1"),
              ("--limit", args.limit, lambda v: v >= 1, "at least 1"))
    for flag, value, good, wanted in checks:
        if value is not None and not good(value):
            raise ConfigError(f"{flag} must be {wanted}, not {value}", key=flag)


def _resume_command(run_dir: str) -> str:
    """``socratune train --output RUN``: the run's recorded config supplies everything else."""
    return f"socratune train --output {_quote(run_dir)}"


def cmd_validate(args: argparse.Namespace) -> int:
    from .data import write_rejections
    from .examples import load_tokenizer_for, prepare_examples
    from .style import load_profile

    args.data = args.file
    config = _config_from_args(args)
    load_profile(config.style.profile)  # what train refuses, validate refuses
    report, examples = prepare_examples(config, load_tokenizer_for(config))
    print(report.summary())
    if args.rejected:
        write_rejections(report.rejections, Path(args.rejected))
    trained = sum(e.trained_tokens for e in examples)
    print(f"{len(examples)} dialogues ready to train, {trained} trained tokens in all")
    return 0


def _gen_params(args: argparse.Namespace):
    """Generation settings from the flags; ``--seed`` seeds torch here, once, for sampled replies."""
    from .generate import MIN_DIVISOR, GenParams

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    # Sampling divides logits by these: a tiny or infinite one turns them into inf/nan.
    if not (args.temperature == 0 or MIN_DIVISOR <= args.temperature < float("inf")):
        raise ConfigError(f"--temperature must be 0 (greedy) or a number from {MIN_DIVISOR}, not {args.temperature}")
    if not MIN_DIVISOR <= args.repetition_penalty < float("inf"):
        raise ConfigError(f"--repetition-penalty must be a number from {MIN_DIVISOR}, not {args.repetition_penalty}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be above 0 and at most 1, not {args.top_p}")
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
    from .serve import API_KEY_ENV, ChatServer, Engine, is_loopback, model_id_for

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host):
        if not api_key and not args.insecure_no_auth:
            raise ConfigError(f"serving on {args.host} would let anyone who can reach port {args.port} use the model: "
                              f"set an API key ({API_KEY_ENV}=... or --api-key), or pass --insecure-no-auth")
        if not api_key:
            print(f"warning: serving on {args.host} with --insecure-no-auth: anyone who can reach this machine on "
                  f"port {args.port} can use the model; there is no authentication", file=sys.stderr)
    params = _gen_params(args)  # the defaults for requests that name no temperature, max_tokens...
    if args.max_batch is not None and args.max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, got {args.max_batch}", "--max-batch")
    # binds now: a busy port fails before the model loads
    server = ChatServer(args.host, args.port, api_key=api_key, cors_origins=tuple(args.cors_origin or ()))
    try:
        model, tokenizer = load_for_inference(args.run_dir, args.checkpoint, base_only=args.base)
        engine = Engine(model, tokenizer, model_id_for(args.run_dir, args.checkpoint, args.base), params,
                        max_batch=args.max_batch)
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

    from .errors import RunDirError
    from .rundir import CONFIG_YAML, RunDir, run_status

    run = RunDir(args.run_dir)
    if run.exists() and not _looks_like_run(run):
        raise RunDirError(f"{run.path} is not a run directory (no {CONFIG_YAML}, no checkpoints/); "
                          "a run directory is what `socratune train --output DIR` creates")
    if (run.base_dir / "config.json").exists():  # a tiny-base run: re-point its adapters if it was moved
        from .modeling import point_adapters_at_base

        point_adapters_at_base(run, str(run.base_dir.resolve()))
    status = run_status(run)
    if args.json:
        print(json.dumps(status, ensure_ascii=False, indent=2))
        return 0
    early = f" (stopped early at step {status['stopped_early']['step']})" if status["stopped_early"] else ""
    print(f"{status['run_dir']}: {status['state']}, step {status['step']} of {status['total_steps'] or '?'}{early}")
    print(f"last valid checkpoint: {status['last_valid_checkpoint'] or 'none'}")
    for bad in status["invalid_checkpoints"]:
        print(f"invalid checkpoint {bad['path']}: {bad['reason']}")
    for label, key in (("best eval loss", "best_eval_loss"), ("best style score", "best_style_score")):
        if status[key]:
            print(f"{label}: {status[key]['value']:.4f} at step {status[key]['step']}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import synth_status

    if args.status:
        status = synth_status(args.status)
        planned = "?" if status["planned"] is None else status["planned"]
        print(f"{status['output']}: {status['done']} of {planned} dialogues done, {status['kept']} kept, "
              f"{status['rejected']} rejected" + (" (running now)" if status["running"] else ""))
        for reason, count in status["rejected_by_reason"].items():
            print(f"  rejected {reason}: {count}")
        return 0
    from .client import ChatClient
    from .synth import KEY_VARIABLES, SynthRequest, synth
    from .synth.run import check_counts

    if not args.output:
        raise ConfigError("synth needs --output FILE (or --status FILE)", key="--output")
    check_counts(args.dialogues, args.turns, args.concurrency)  # named one by one, before the clients check them
    if not 0 < args.timeout < float("inf"):
        raise ConfigError(f"--timeout must be a number of seconds above 0, not {args.timeout}", key="--timeout")
    if args.retries < 0:
        raise ConfigError(f"--retries must be 0 or more, not {args.retries}", key="--retries")
    clients = {}
    for role in ("student", "socrates"):
        url = getattr(args, f"{role}_url") or args.url
        model = getattr(args, f"{role}_model") or args.model
        if not url or not model:
            raise ConfigError(f"synth needs --url and --model (or --{role}-url and --{role}-model)",
                              key=f"--{role}-url")
        clients[role] = ChatClient(url, model, key_variables=KEY_VARIABLES[role], flag=f"--{role}-url",
                                   timeout=args.timeout, max_retries=args.retries, concurrency=args.concurrency,
                                   role=role)
    judge = None
    if args.judge or args.judge_model:
        from .judge import Judge
        from .style import load_profile

        judge = Judge(args.judge or "", args.judge_model or "", load_profile(), timeout=args.timeout,
                      retries=args.retries, concurrency=args.concurrency)
    request = SynthRequest(output=args.output, dialogues=args.dialogues, turns=args.turns,
                           concurrency=args.concurrency, seed=args.seed, config=args.config,
                           min_score=args.min_score, dedupe_against=tuple(args.dedupe_against or ()))
    summary = synth(request, clients["student"], clients["socrates"], judge, on_progress=_synth_progress())
    print(f"{summary['output']}: {summary['kept']} kept, {summary['rejected']} rejected "
          f"({summary['done']} of {summary['planned']} dialogues done)")
    for reason, count in summary["rejected_by_reason"].items():
        print(f"  rejected {reason}: {count}")
    for name, scores in (("kept", summary["scores_kept"]), ("all", summary["scores_all"])):
        cells = "  ".join(f"{k} {v['mean']:.2f} [{v['p10']:.2f}-{v['p90']:.2f}]" for k, v in scores.items()
                          if v["mean"] is not None)
        print(f"  style scores, {name} (mean [p10-p90]): {cells or 'none'}")
    usage = summary["usage"]
    print(f"  tokens: {usage['prompt_tokens']} prompt, {usage['completion_tokens']} completion in "
          f"{usage['requests']} requests ({usage['attempts'] - usage['requests']} retried)"
          + ("" if summary["cost"] is None else f"; cost {summary['cost']:.4f}"))
    run = summary["this_run"]
    print(f"  this run: {run['requests_per_s']:.2f} requests/s, {run['tokens_per_s']:.1f} tokens/s")
    return 0


def _synth_progress():
    """A tqdm bar on a terminal, a plain line every 10 s (and at the end) otherwise."""
    import time

    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = None

        def show(progress) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=progress.planned, initial=progress.done - 1, unit="dialogue", file=sys.stderr)
            bar.update(1)
            bar.set_postfix(kept=f"{progress.kept / max(1, progress.done):.0%}",
                            tok_s=f"{progress.tokens_per_s:.0f}", req_s=f"{progress.requests_per_s:.2f}")
            if progress.done >= progress.planned:
                bar.close()
        return show
    last = [0.0]

    def log_line(progress) -> None:
        now = time.monotonic()
        if now - last[0] >= 10 or progress.done >= progress.planned:
            last[0] = now
            print(f"synth: {progress.done}/{progress.planned} done, kept {progress.kept / max(1, progress.done):.0%}, "
                  f"{progress.tokens_per_s:.1f} tokens/s, {progress.requests_per_s:.2f} requests/s",
                  file=sys.stderr, flush=True)
    return log_line


def _looks_like_run(run: Any) -> bool:
    """A run directory: the config a run records first, a checkpoint, or a live writer's lock."""
    from .rundir import CONFIG_YAML

    return (run / CONFIG_YAML).exists() or bool(run.checkpoints()) or run.lock_holder() is not None


def cmd_config(args: argparse.Namespace) -> int:
    from .config import commented_yaml

    print(commented_yaml(_config_from_args(args)), end="")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .data import check_readable_file
    from .style import format_summary_table, load_profile, score_jsonl

    check_readable_file(Path(args.file), "replies file")  # a FIFO would block the reader
    if args.output and os.path.realpath(args.output) == os.path.realpath(args.file):
        raise ConfigError(f"--output {args.output} is the replies file itself; the scores would replace the replies",
                          key="--output")
    records, bad_lines, summary = score_jsonl(Path(args.file), Path(args.output) if args.output else None,
                                              load_profile(args.profile))
    if not args.output:
        import json

        for record in records:
            print(json.dumps(record, ensure_ascii=False))
    for message in bad_lines[:MAX_SKIPPED_SHOWN]:
        print(f"skipped {message[:300]}", file=sys.stderr)
    if len(bad_lines) > MAX_SKIPPED_SHOWN:
        print(f"skipped {len(bad_lines) - MAX_SKIPPED_SHOWN} more lines", file=sys.stderr)
    print(format_summary_table(summary, len(records)), file=sys.stderr)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .style import load_profile
    from .style.calibrate import calibrate_file, format_calibration

    result = calibrate_file(Path(args.file), load_profile(args.profile), Path(args.output), folds=args.folds)
    print(format_calibration(result, args.output))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import check_readable_file
    from .evaluate import evaluate
    from .report import REPORT_MD, repeated_reply_warnings
    from .scores import SCORE_KEYS as KEYS
    from .style import load_profile

    if args.prompts:
        check_readable_file(Path(args.prompts), "prompts file")  # a FIFO would block the reader
    profile = load_profile(args.profile)
    judge = None
    if args.judge or args.judge_model:
        from .judge import Judge

        judge = Judge(args.judge or "", args.judge_model or "", profile, timeout=args.judge_timeout,
                      retries=args.judge_retries, concurrency=args.judge_workers)
        judge.check()  # a judge that is down fails now, not after every reply is generated
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
    for key, c in stats.get("tuned_vs_supervised", {}).items():
        verdict = "beats supervised" if c["tuned_beats_base"] else "no significant gain over supervised"
        print(f"{key}: {verdict} (Wilcoxon p={c['p_greater']:.3g}, rank-biserial {c['rank_biserial']:+.2f})")
    for axis, agreement in stats.get("agreement", {}).items():
        rho = agreement["spearman"]
        shown = "n/a" if rho is None else f"{rho:.2f}"
        print(f"judge agreement {axis}: Spearman {shown} over {agreement['n']} replies")
    for warning in repeated_reply_warnings(stats):
        print(f"warning: {warning}")
    print(f"Report: {result.folder / REPORT_MD}")
    if result.previous:
        print(f"The previous report was kept in {result.previous}")
    return 0


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


def _profile_names() -> list[str]:
    """Shipped style profiles, read from the package folder (no scorer import for --help)."""
    from importlib import resources

    folder = resources.files("socratune") / "profiles"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _preset_names() -> list[str]:
    from .config import available_presets

    return available_presets()


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


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (see `socratune config`)")
    parser.add_argument("--preset", help=f"preset to start from: {', '.join(_preset_names())} "
                                         "(default: the config file's preset:, else tiny)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="set one config key, in the YAML's dotted form (train.epochs=5, "
                             "lora.target_modules=[q_proj,v_proj]); repeatable; over --config and --preset, "
                             "under the named flags such as --epochs")
    parser.add_argument("--model", help='"tiny", a local model directory, or a hub id (model.name_or_path)')


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="use checkpoints/NAME (or a path) instead of the final adapter")
    parser.add_argument("--base", action="store_true", help="the untuned base model, for comparison")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest reply, in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of "
                                                                 "tokens whose probabilities sum to this")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = none; >1 discourages repeats")
    parser.add_argument("--seed", type=int, help="seed for sampled replies (temperature > 0)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    common = _common_parent()
    parser = argparse.ArgumentParser(prog="socratune", description=PROGRAM_DESCRIPTION, parents=[common],
                                     formatter_class=_HelpFormatter,
                                     epilog="Each command has its own help: socratune COMMAND --help")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, epilog=f"example:\n  {example}", parents=[common],
                              description=f"{summary[0].upper()}{summary[1:]}.\n\n{description}".rstrip(),
                              formatter_class=_HelpFormatter)

    p = command("train", "fine-tune a run, or resume or continue it",
                "With no arguments: the built-in tiny model on the bundled sample dialogues, into runs/tiny.\n"
                "Run it again on the same --output to resume from the last valid checkpoint, with the\n"
                "settings the run started with; a finished run says so and does nothing.",
                "socratune train --preset gemma2-2b-jpn-qlora --data dialogues.json --output runs/gemma "
                "--set train.learning_rate=1e-4")
    _add_config_flags(p)
    p.add_argument("--data", help="JSON or JSONL dialogues (default: the bundled sample)")
    p.add_argument("--output", help="run directory (default: the config's run.output_dir, runs/PRESET)")
    p.add_argument("--epochs", type=float, help="train.epochs (a finished run given more continues from its end)")
    p.add_argument("--resume-from", help="checkpoint to resume from (name under checkpoints/ or a path)")
    p.add_argument("--show-example", action="store_true", help="log one templated example with trained tokens marked")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: move an existing run directory aside to RUN.old-TIMESTAMP first")
    p.add_argument("--delete-old", action="store_true", help="with --overwrite: delete the moved-aside run at the end")
    p.add_argument("--allow-config-change", action="store_true",
                   help="continue a run although data, model, LoRA, quantization or sequence settings changed")
    p.add_argument("--method", choices=["sft", "dpo", "orpo"], help="sft (default): supervised on dialogues; "
                   "dpo / orpo: preference tuning on --pairs, from the supervised run --from (docs/prefs.md)")
    p.add_argument("--pairs", help="preference pairs JSONL written by socratune prefs (prefs.pairs)")
    p.add_argument("--from", dest="from_run", metavar="RUN",
                   help="supervised run whose adapter preference tuning continues (prefs.from_run)")
    p.set_defaults(handler=cmd_train)

    p = command("prefs", "preference pairs from a run's own sampled replies, ranked by the style scorer or a judge",
                "Samples several replies per training prompt, scores them and writes the best and worst as a\n"
                "chosen / rejected pair (docs/prefs.md); then train with --method dpo|orpo --pairs.",
                "socratune prefs runs/tiny --output pairs.jsonl --samples 6")
    p.add_argument("run_dir", help="the supervised run directory whose model answers")
    p.add_argument("--output", required=True, help="pairs JSONL to write")
    p.add_argument("--prompts", help="JSONL prompts (as for generate --input); default: the run's training split")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--samples", type=int, help="replies sampled per prompt (default prefs.samples)")
    p.add_argument("--temperature", type=float, help="default prefs.temperature")
    p.add_argument("--top-p", type=float, help="default prefs.top_p")
    p.add_argument("--max-new-tokens", type=int, help="default prefs.max_new_tokens")
    p.add_argument("--min-margin", type=float,
                   help="drop pairs ranked closer than this (0-4; default prefs.min_margin)")
    p.add_argument("--weights", metavar="AXIS=W,...",
                   help="ranking weight per style axis, e.g. approach=0.6,logic=0.2,tone=0.1,format=0.1 "
                        "(default: the run's prefs.weights, else the profile's overall weights)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    p.add_argument("--profile", help="style profile (default: the run's style.profile)")
    p.add_argument("--judge", metavar="URL", help="rank by an OpenAI-compatible judge instead of the scorer")
    p.add_argument("--judge-model", metavar="NAME", help="model name the judge server should use")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    p.set_defaults(handler=cmd_prefs)

    p = command("validate", "check a dialogue file without training",
                "Templates and tokenizes every dialogue as training would, and reports what would be\n"
                "rejected and why.", "socratune validate dialogues.json --rejected rejected.jsonl")
    p.add_argument("file", help="JSON or JSONL dialogues to check")
    _add_config_flags(p)
    p.add_argument("--rejected", help="also write the rejected rows with reasons to this JSONL file")
    p.set_defaults(handler=cmd_validate)

    p = command("config", "print the resolved config as YAML, each key explained",
                "The preset, --config file and --set assignments resolved into one YAML file, with each\n"
                "key's meaning as a comment; save it, edit it, and train with --config.",
                "socratune config --preset gemma2-2b-jpn-qlora --set train.epochs=5 > my.yaml")
    _add_config_flags(p)
    p.set_defaults(handler=cmd_config, data=None)

    p = command("generate", "the tuned model's reply to a prompt, or replies to a JSONL file of prompts",
                "One PROMPT: its reply is printed. --input: one reply per line, as JSONL that\n"
                "`socratune score` reads.", 'socratune generate runs/tiny "幸福とは何でしょうか？"')
    p.add_argument("run_dir", help="run directory (what `socratune train --output` wrote)")
    p.add_argument("prompt", nargs="?", help="one prompt; its reply is printed")
    p.add_argument("--input", help='JSONL prompts: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]}')
    p.add_argument("--output", help='write {"id", "text", "prompt"} lines here (socratune score input); '
                                    "default stdout")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (left-padded)")
    _add_generation_flags(p)
    p.set_defaults(handler=cmd_generate)

    p = command("chat", "talk to a run in the terminal (streaming, multi-turn)",
                "Type a message and Enter. /reset starts over, /system TEXT sets a system prompt,\n"
                "/save FILE appends the conversation to FILE as training data, /quit ends.", "socratune chat runs/tiny")
    p.add_argument("run_dir", help="run directory (what `socratune train --output` wrote)")
    p.add_argument("--max-context", type=int,
                   help="tokens of conversation kept for the model (default and ceiling: the model's context)")
    _add_generation_flags(p)
    p.set_defaults(handler=cmd_chat)

    p = command("serve", "OpenAI-compatible API and a chat page in the browser",
                "The generation flags are the defaults for requests that do not name their own.",
                "socratune serve runs/tiny --port 8000")
    p.add_argument("run_dir", help="run directory (what `socratune train --output` wrote)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1 (default: the "
                   "SOCRATUNE_API_KEY environment variable, which keeps the key out of the process list)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow --host beyond loopback without an API key (anyone who can reach it can use it)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let pages from ORIGIN (e.g. https://example.com) call the API; repeatable; none by default")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="replies decoded together; as many more requests may wait, the rest get 429 "
                   "(default: 8 on CPU, 32 on a GPU)")
    _add_generation_flags(p)  # the defaults for requests that do not name their own
    p.set_defaults(handler=cmd_serve)

    p = command("export", "merge the adapter into the base: transformers directory and/or GGUF",
                "Give --merged, --gguf or both.", "socratune export runs/tiny --merged merged/ --gguf tiny.gguf")
    p.add_argument("run_dir", help="run directory (what `socratune train --output` wrote)")
    p.add_argument("--merged", help="directory for the merged transformers model and tokenizer")
    p.add_argument("--gguf", help="GGUF file for llama.cpp / Ollama (Llama-architecture models)")
    p.add_argument("--checkpoint", help="export checkpoints/NAME (or a path) instead of the final adapter")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory or existing file")
    p.set_defaults(handler=cmd_export)

    p = command("status", "state of a run: step, checkpoints, best scores",
                "A directory that is not a run is an error (exit 2).", "socratune status runs/tiny --json")
    p.add_argument("run_dir", help="run directory (what `socratune train --output` wrote)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_status)

    profiles = ", ".join(_profile_names())
    p = command("score", "score replies for Socratic style (JSONL in, JSONL out)",
                "A summary table goes to stderr.", "socratune score replies.jsonl --output scores.jsonl")
    p.add_argument("file", help='JSONL lines {"id": ..., "text": ..., "prompt": ... (optional)}')
    p.add_argument("--profile", default="socrates", help=f"style profile: one of {profiles}, or a YAML path")
    p.add_argument("--output", help="write scores here instead of stdout")
    p.set_defaults(handler=cmd_score)

    p = command("calibrate", "fit the style scorer's weights to judge ratings; writes a profile",
                "Prints cross-validated agreement (Spearman, folds grouped by dialogue) beside the uncalibrated "
                "scorer's; the profile records what it was fitted on.",
                "socratune calibrate runs/gemma/evaluation/judged.jsonl --output my_profile.yaml")
    p.add_argument("file", help='JSONL lines {"id", "prompt", "text", "judge": {"tone": 0-4, ...}} '
                                "(evaluate --judge writes RUN/evaluation/judged.jsonl)")
    p.add_argument("--profile", default="socrates", help="profile to start from: name or YAML path")
    p.add_argument("--output", required=True, help="the calibrated profile YAML to write (must not exist)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds, grouped by dialogue")
    p.set_defaults(handler=cmd_calibrate)

    p = command("evaluate", "base vs tuned model vs checkpoints on held-out prompts",
                "Writes a report (Markdown, JSON, plots) into RUN/evaluation; the previous report is kept.",
                "socratune evaluate runs/tiny --limit 20 --checkpoints none")
    p.add_argument("run_dir", help="run directory (what `socratune train --output` wrote)")
    p.add_argument("--prompts", help='JSONL {"id": ..., "prompt": ..., "followups": [...] (optional)}; '
                                     "default: 40 bundled held-out questions")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--checkpoints", default="all", help="all, none, or names: checkpoint-80,160")
    p.add_argument("--turns", type=int, default=0, help="continue each dialogue N more exchanges with a scripted user")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest reply, in tokens")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--seed", type=int, default=0, help="generation and bootstrap seed")
    p.add_argument("--profile", default="socrates", help=f"style profile: one of {profiles}, or a YAML path")
    p.add_argument("--judge", metavar="URL", help="OpenAI-compatible server (e.g. http://localhost:8080/v1) to rate "
                                                  "replies too; key from SOCRATUNE_JUDGE_API_KEY or OPENAI_API_KEY")
    p.add_argument("--judge-model", metavar="NAME", help="model name the judge server should use")
    p.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request")
    p.add_argument("--judge-retries", type=int, default=3, help="retries of a failed judge request (with backoff)")
    p.add_argument("--judge-workers", type=int, default=4, help="judge requests in flight at once")
    p.set_defaults(handler=cmd_evaluate)

    p = command("synth", "generate Socratic training dialogues by self-play of two chat models, filtered",
                "A student and Socrates talk through any OpenAI-compatible server; every Socrates reply is scored\n"
                "and near-duplicates are dropped. Keys come from environment variables only (docs/synth.md).\n"
                "Run the same command again to continue where it stopped.",
                "socratune synth --output data.jsonl --url http://127.0.0.1:8000/v1 --model tiny --dialogues 20")
    p.add_argument("--output", metavar="OUT",
                   help="JSONL file of kept dialogues (rejects go to OUT.rejected.jsonl beside it)")
    p.add_argument("--status", metavar="OUT", help="show done / kept / rejected of a synth output and exit")
    p.add_argument("--url", metavar="URL", help="OpenAI-compatible server for both roles (e.g. http://127.0.0.1:8000/v1)")
    p.add_argument("--model", metavar="M", help="model name for both roles")
    p.add_argument("--student-url", metavar="URL", help="server for the student role (default --url)")
    p.add_argument("--student-model", metavar="M", help="model for the student role (default --model)")
    p.add_argument("--socrates-url", metavar="URL", help="server for the Socrates role (default --url)")
    p.add_argument("--socrates-model", metavar="M", help="model for the Socrates role (default --model)")
    p.add_argument("--config", metavar="FILE",
                   help="synth profile YAML: questions, personas, prompts, per-role temperature and "
                        "max_tokens, thresholds, prices (default: the bundled one)")
    p.add_argument("--dialogues", type=int, default=100, metavar="N",
                   help="dialogues in all; a rerun continues to this count (default %(default)s)")
    p.add_argument("--turns", type=int, default=3, metavar="K",
                   help="student/Socrates exchanges per dialogue (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=4, metavar="C",
                   help="dialogues in flight at once, and requests per endpoint (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="picks each dialogue's question, persona and sampling seeds (default %(default)s)")
    p.add_argument("--min-score", type=float, metavar="S",
                   help="overall style score (0-4) a dialogue needs; 0 keeps every "
                        "completed one (default: the profile's filter.min_overall)")
    p.add_argument("--dedupe-against", action="append", metavar="FILE",
                   help="drop near-duplicates of the dialogues in this data file too (repeatable)")
    p.add_argument("--judge", metavar="URL", help="also rate every Socrates reply with this LLM judge")
    p.add_argument("--judge-model", metavar="NAME", help="model name the judge server should use")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS", help="per request (default %(default)s)")
    p.add_argument("--retries", type=int, default=4, metavar="N",
                   help="retries of a failed request, with backoff and jitter (default %(default)s)")
    p.set_defaults(handler=cmd_synth)
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
        from .quiet import silence_harmless_messages

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
