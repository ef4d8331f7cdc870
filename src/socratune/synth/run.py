"""A synth run: its files (output, rejects, lock and record), resume, the quality filter, the
thread pool that keeps ``concurrency`` dialogues in flight, and the summary (see the package doc).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

from ..core.errors import (
    ConfigError,
    DataError,
    EndpointFailed,
    EndpointLost,
    SynthInterrupted,
    quote_capped,
)
from ..core.rundir import RunDir, write_json_atomic
from ..data.dialogues import check_output_file, jsonl_lines, load_dialogues, read_text_file
from .client import ChatClient
from .conversation import Conversation, Dropped, converse
from .dedupe import NearDuplicates, dialogue_text
from .profile import AXES_AND_OVERALL, SynthProfile, load_synth_profile, plan_dialogue

logger = logging.getLogger("socratune")

KEY_VARIABLES = {  # per role, then shared: the first one set is used
    "student": ("SOCRATUNE_SYNTH_STUDENT_API_KEY", "SOCRATUNE_SYNTH_API_KEY", "OPENAI_API_KEY"),
    "socrates": ("SOCRATUNE_SYNTH_SOCRATES_API_KEY", "SOCRATUNE_SYNTH_API_KEY", "OPENAI_API_KEY"),
}
RECORD_VERSION = 1


# --- files ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthPaths:
    output: Path  # kept dialogues, socratune's data format
    rejected: Path  # OUT.rejected.jsonl: every dropped dialogue with its reason
    state: Path  # OUT.synth/: lock and run record
    record: Path

    @classmethod
    def for_output(cls, output: str | Path) -> SynthPaths:
        output = Path(output)
        stem = output.name.removesuffix(".jsonl").removesuffix(".json")
        state = output.with_name(f"{stem}.synth")
        return cls(output, output.with_name(f"{stem}.rejected.jsonl"), state, state / "run.json")


def _repair_torn_tail(path: Path) -> None:
    """Cut a last line that has no newline: a write interrupted by a kill; that dialogue is redone."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        data = handle.seek(0) or handle.read()
        keep = data.rfind(b"\n") + 1
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    logger.warning("synth: %s ended in a half-written line (an interrupted write); it was removed and that "
                   "dialogue will be generated again", path)


def read_lines(path: Path, complete_only: bool = False) -> list[dict[str, Any]]:
    """The JSON objects of a synth output file; a line that is not one is a DataError naming it.
    ``complete_only`` leaves out a last line without a newline (a torn write a resume cuts off)."""
    if not path.exists() and not path.is_symlink():
        return []
    text = read_text_file(path, "synth output")  # a directory, a FIFO, not UTF-8: one line naming it
    if complete_only:
        text = text[: text.rfind("\n") + 1]
    lines = []
    for number, record, error in jsonl_lines(text):
        if error is not None or not _is_synth_line(record):
            raise DataError(f"{path}:{number} is not a synth line (a JSON object with meta.index, meta.scores.style "
                            "and meta.usage); fix or remove that line, then run the command again")
        lines.append(record)
    return lines


def _is_synth_line(record: Any) -> bool:
    """The fields the summary and a resume read, with their types: a hand-edited or foreign line
    is refused by name rather than failing later inside the arithmetic."""
    meta = record.get("meta") if isinstance(record, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("index"), int) or isinstance(meta["index"], bool):
        return False
    scores, usage = meta.get("scores"), meta.get("usage")
    style = scores.get("style") if isinstance(scores, dict) else None
    number = (int, float)
    return (isinstance(style, dict) and isinstance(usage, dict) and isinstance(record.get("reason", ""), str)
            and all(k in style and (style[k] is None or isinstance(style[k], number)) for k in AXES_AND_OVERALL)
            and all(isinstance(v, number) for v in usage.values()))


def _append(handle: Any, line: dict[str, Any]) -> None:
    """One line on disk before the next dialogue counts as done; a failed write names the file."""
    try:
        handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as exc:
        raise DataError(f"{exc.strerror or exc} writing {handle.name}; the dialogues before it are on disk and "
                        "the same command continues once this is fixed") from None


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


# --- the run --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthRequest:
    """Everything ``synth`` is started with, minus keys (those stay in the environment)."""

    output: str
    dialogues: int
    turns: int
    concurrency: int
    seed: int
    config: str | None = None
    min_score: float | None = None
    dedupe_against: tuple[str, ...] = ()


@dataclass
class Progress:
    """What the progress display shows, updated after every finished dialogue."""

    planned: int
    done: int
    kept: int
    rejected: int
    completion_tokens: int = 0
    requests: int = 0
    elapsed_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _plan_identity(request: SynthRequest, profile_hash: str, student: ChatClient,
                   socrates: ChatClient) -> dict[str, Any]:
    """What must not change between a run and its resume: otherwise one file mixes two plans."""
    return {"seed": request.seed, "turns": request.turns, "profile_sha256": profile_hash,
            "student_model": student.model, "socrates_model": socrates.model}


def _update_record(paths: SynthPaths, request: SynthRequest, identity: dict[str, Any], source: str,
                   endpoints: dict[str, Any], done_before: int) -> dict[str, Any]:
    record: dict[str, Any] = {}
    if paths.record.exists():
        try:
            record = json.loads(paths.record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise DataError(f"{paths.record} is unreadable; move it away to start the record anew") from None
        recorded = record.get("plan", {})
        changed = [k for k, v in identity.items() if recorded.get(k) != v]
        if changed:
            details = ", ".join(f"{k}: recorded {recorded.get(k)!r}, now {identity[k]!r}" for k in changed)
            raise ConfigError(f"{paths.output} was started with other settings ({details}); rerun with the recorded "
                              "ones to continue it, or choose another --output", key=changed[0])
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record.update({"version": RECORD_VERSION, "plan": identity, "profile": source, "arguments": vars_of(request),
                   "endpoints": endpoints})
    record.setdefault("starts", []).append({"time": now, "dialogues_done": done_before,
                                            "arguments": vars_of(request)})
    write_json_atomic(paths.record, record)
    return record


def vars_of(request: SynthRequest) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in request.__dict__.items()}


MAX_COUNTS = {"--dialogues": 10_000_000, "--turns": 1_000, "--concurrency": 1_024}  # beyond: a typo, not a plan


def check_counts(dialogues: int, turns: int, concurrency: int) -> None:
    """Each count from 1 to its ceiling, named in the error; checked before any request."""
    for flag, value in (("--dialogues", dialogues), ("--turns", turns), ("--concurrency", concurrency)):
        if not 1 <= value <= MAX_COUNTS[flag]:
            raise ConfigError(f"{flag} must be a whole number from 1 to {MAX_COUNTS[flag]}, not {quote_capped(value)}",
                              key=flag)


def synth(request: SynthRequest, student: ChatClient, socrates: ChatClient, judge: Any = None,
          on_progress: Callable[[Progress], None] | None = None) -> dict[str, Any]:
    """Generate, filter and append dialogues until ``request.dialogues`` are done; the summary."""
    check_counts(request.dialogues, request.turns, request.concurrency)
    profile, profile_hash, source = load_synth_profile(request.config)
    thresholds = profile.filter
    min_overall = thresholds.min_overall if request.min_score is None else request.min_score
    if not 0 <= min_overall <= 4:
        raise ConfigError(f"--min-score must be between 0 and 4, got {min_overall}", key="--min-score")
    paths = SynthPaths.for_output(request.output)
    check_output_file(paths.output, "--output")
    duplicates = NearDuplicates(thresholds.near_duplicate, thresholds.shingle_chars)
    for other in request.dedupe_against:
        report = load_dialogues(other)
        if not report.kept:  # the wrong file, most likely: deduplicating against nothing would hide that
            first = (f"{report.rejections[0].where()}: {report.rejections[0].message[:200]}" if report.rejections
                     else "it is empty")
            raise DataError(f"--dedupe-against {other} holds no usable dialogue; {first}")
        for dialogue in report.kept:
            duplicates.add(f"{other}#{dialogue.id}", dialogue_text(dialogue.messages()))
    for path in (paths.output, paths.rejected):
        read_lines(path, complete_only=True)  # a foreign or damaged output is named before any request
    for client in (student, socrates, *([judge] if judge is not None else [])):
        client.check()  # before anything is written

    try:
        return _run(request, paths, profile, profile_hash, source, min_overall, duplicates, student, socrates,
                    judge, on_progress)
    except OSError as exc:  # the output's folder is read-only, or lies under a file
        raise DataError(f"cannot write {exc.filename or paths.output}: {exc.strerror or exc}; choose another "
                        "--output") from None


def _run(request: SynthRequest, paths: SynthPaths, profile: SynthProfile, profile_hash: str, source: str,
         min_overall: float, duplicates: NearDuplicates, student: ChatClient, socrates: ChatClient, judge: Any,
         on_progress: Callable[[Progress], None] | None) -> dict[str, Any]:
    """The locked part of ``synth``: resume, generate, filter, write, summarize."""
    from ..style import StyleScorer, load_profile

    scorer = StyleScorer(load_profile())
    with RunDir(paths.state).lock():
        for path in (paths.output, paths.rejected):
            _repair_torn_tail(path)
        kept_lines, rejected_lines = read_lines(paths.output), read_lines(paths.rejected)
        done = {line["meta"]["index"] for line in kept_lines} | {line["meta"]["index"] for line in rejected_lines}
        for line in kept_lines:
            duplicates.add(f"{paths.output.name}#{line['meta']['index']}", dialogue_text(line["messages"]))
        identity = _plan_identity(request, profile_hash, student, socrates)
        endpoints = {"student": student.describe(), "socrates": socrates.describe(),
                     "judge": None if judge is None else judge.describe()}
        _update_record(paths, request, identity, source, endpoints, len(done))
        todo = [i for i in range(request.dialogues) if i not in done]
        progress = Progress(request.dialogues, len(done & set(range(request.dialogues))),
                            sum(line["meta"]["index"] < request.dialogues for line in kept_lines),
                            sum(line["meta"]["index"] < request.dialogues for line in rejected_lines))
        if todo:
            logger.info("synth: %d of %d dialogues to generate into %s (%d done before)", len(todo),
                        request.dialogues, paths.output, len(done))
        started = time.monotonic()

        stop = threading.Event()
        decide = partial(_decide, request=request, paths=paths, profile=profile, min_overall=min_overall,
                         duplicates=duplicates, scorer=scorer, student=student, socrates=socrates)
        work = partial(_work, request=request, profile=profile, student=student, socrates=socrates, judge=judge,
                       stop=stop)
        lost, unwritable, interrupted = _generate(todo, request, paths, progress, started, work, decide, stop,
                                                  on_progress)
        summary = summarize(paths, request.dialogues, profile)
        summary["this_run"] = {"elapsed_s": round(time.monotonic() - started, 2), "requests": progress.requests,
                               "completion_tokens": progress.completion_tokens,
                               "requests_per_s": round(progress.requests_per_s, 3),
                               "tokens_per_s": round(progress.tokens_per_s, 2)}
        record = json.loads(paths.record.read_text(encoding="utf-8"))
        record["summary"] = summary
        write_json_atomic(paths.record, record)
    _raise_unless_complete(summary, request, paths, lost, unwritable, interrupted)
    return summary


def _decide(talk: Conversation, request: SynthRequest, paths: SynthPaths, profile: SynthProfile, min_overall: float,
            duplicates: NearDuplicates, scorer: Any, student: ChatClient, socrates: ChatClient
            ) -> tuple[dict[str, Any], str | None]:
    """A finished dialogue's line to write and the reason to reject it (None: keep); a kept one joins
    ``duplicates``."""
    from ..style import AXES

    thresholds = profile.filter
    bot = [m for m in talk.messages if m["role"] == "assistant"]
    prompts = [talk.messages[i - 1]["content"] for i, m in enumerate(talk.messages) if m["role"] == "assistant"]
    per_reply = [scorer.score(m["content"], p) for m, p in zip(bot, prompts)]
    style = {k: _mean([getattr(s, k) for s in per_reply]) for k in AXES_AND_OVERALL}
    judged = None
    if talk.judge:
        values = [s for v in talk.judge for s in v.scores.values() if s is not None]
        judged = {"mean": _mean(values), "verdicts": [v.as_dict() for v in talk.judge]}
    line = {"messages": talk.messages, "meta": {
        "index": talk.index, "seed": request.seed, "question": talk.question,
        "persona": talk.persona.model_dump(),
        "models": {"student": student.model, "socrates": socrates.model},
        "temperatures": {"student": profile.student.temperature, "socrates": profile.socrates.temperature},
        "scores": {"style": style, "replies": [{k: getattr(s, k) for k in AXES_AND_OVERALL}
                                               for s in per_reply], "judge": judged},
        "finish_reasons": [r.finish_reason for r in talk.replies],
        "usage": {"prompt_tokens": sum(r.prompt_tokens for r in talk.replies),
                  "completion_tokens": sum(r.completion_tokens for r in talk.replies),
                  "requests": len(talk.replies), "attempts": sum(r.attempts for r in talk.replies)},
    }}
    if talk.failure:
        return line, talk.failure
    empty = next((n for n, m in enumerate(talk.messages, 1) if not m["content"]), None)
    if empty is not None:
        return line, f"empty_reply: message {empty} is empty"
    if style["overall"] < min_overall:
        return line, f"low_score: overall {style['overall']:.2f} < {min_overall:g}"
    for axis in AXES if min_overall > 0 else ():  # --min-score 0 keeps every completed dialogue
        floor = thresholds.min_axis.get(axis, 0.0)
        if style[axis] < floor:
            return line, f"low_score: {axis} {style[axis]:.2f} < {floor:g}"
    if (judged is not None and min_overall > 0
            and (judged["mean"] is None or judged["mean"] < thresholds.min_judge)):
        shown = "no score" if judged["mean"] is None else f"{judged['mean']:.2f}"
        return line, f"low_judge_score: {shown} < {thresholds.min_judge:g}"
    twin = duplicates.find(dialogue_text(talk.messages))
    if twin is not None:
        return line, f"near_duplicate: of {twin[0]} (Jaccard {twin[1]:.2f} >= {thresholds.near_duplicate:g})"
    duplicates.add(f"{paths.output.name}#{talk.index}", dialogue_text(talk.messages))
    return line, None


def _work(index: int, request: SynthRequest, profile: SynthProfile, student: ChatClient, socrates: ChatClient,
          judge: Any, stop: threading.Event) -> Conversation:
    """One dialogue talked through (and judged); raises Dropped once ``stop`` is set."""
    question, persona = plan_dialogue(profile, request.seed, index)
    talk = converse(index, question, persona, profile, request.turns, request.seed, student, socrates, stop)
    if judge is not None and talk.failure is None:
        for i, message in enumerate(talk.messages):
            if message["role"] == "assistant":
                if stop.is_set():
                    raise Dropped
                talk.judge.append(judge.rate(message["content"], talk.messages[i - 1]["content"]))
    return talk


def _generate(todo: list[int], request: SynthRequest, paths: SynthPaths, progress: Progress, started: float,
              work: Callable[[int], Conversation], decide: Callable[[Conversation], tuple[dict[str, Any], str | None]],
              stop: threading.Event, on_progress: Callable[[Progress], None] | None
              ) -> tuple[EndpointFailed | None, DataError | None, bool]:
    """Run ``todo`` through ``work`` at most ``request.concurrency`` at a time, appending each decided
    line as it finishes. Returns the endpoint failure that stopped it, the write that failed, and
    whether Ctrl+C came; any of them sets ``stop``, so that what is in flight settles first."""
    lost: EndpointFailed | None = None
    unwritable: DataError | None = None
    interrupted = False
    with open(paths.output, "a", encoding="utf-8") as kept_file, \
            open(paths.rejected, "a", encoding="utf-8") as rejected_file, \
            ThreadPoolExecutor(max_workers=request.concurrency, thread_name_prefix="synth") as pool:
        pending: set[Future] = set()
        queue = iter(todo)
        try:
            while True:
                # Submit only as many as run at once, so a stop leaves nothing queued.
                while not stop.is_set() and len(pending) < request.concurrency:
                    index = next(queue, None)
                    if index is None:
                        break
                    pending.add(pool.submit(work, index))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    try:
                        talk = future.result()
                    except Dropped:
                        continue
                    except EndpointFailed as exc:
                        lost = lost or exc
                        stop.set()
                        continue
                    line, reason = decide(talk)
                    try:
                        if reason is None:
                            _append(kept_file, line)
                            progress.kept += 1
                        else:
                            _append(rejected_file, {**line, "reason": reason})
                            progress.rejected += 1
                    except DataError as exc:  # a full disk: settle what is in flight, then say so
                        unwritable = unwritable or exc
                        stop.set()
                        continue
                    progress.done += 1
                    progress.requests += len(talk.replies)
                    progress.completion_tokens += sum(r.completion_tokens for r in talk.replies)
                    progress.elapsed_s = time.monotonic() - started
                    if on_progress is not None:
                        on_progress(progress)
        except KeyboardInterrupt:
            interrupted = True
            stop.set()
            wait(pending)  # each stops before its next request; what it had is dropped, not written
    return lost, unwritable, interrupted


def _raise_unless_complete(summary: dict[str, Any], request: SynthRequest, paths: SynthPaths,
                           lost: EndpointFailed | None, unwritable: DataError | None, interrupted: bool) -> None:
    """The reason a run stopped short, as the error the CLI reports; nothing when it did not."""
    if unwritable is not None:
        raise unwritable
    if interrupted:
        raise SynthInterrupted(f"synth interrupted: {summary['done']} of {request.dialogues} dialogues are in "
                               f"{paths.output} and {paths.rejected.name}; run the same command to continue")
    if lost is not None and lost.status in (401, 403, 404):
        raise EndpointLost(f"the endpoint refused the request ({lost}): check --model, the URL and the key "
                           f"variables ({', '.join(KEY_VARIABLES['socrates'])}); {summary['done']} of "
                           f"{request.dialogues} dialogues are on disk; the same command continues once fixed")
    if lost is not None:
        raise EndpointLost(f"the endpoint failed mid-run ({lost}); {summary['done']} of {request.dialogues} "
                           f"dialogues are on disk in {paths.output} and {paths.rejected.name}; run the same "
                           "command again to continue once the server answers")


def _distribution(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "mean": None, "p10": None, "p50": None, "p90": None}
    ordered = sorted(values)

    def quantile(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"n": len(values), "mean": round(sum(values) / len(values), 3), "p10": quantile(0.1),
            "p50": quantile(0.5), "p90": quantile(0.9)}


def summarize(paths: SynthPaths, planned: int | None = None, profile: SynthProfile | None = None) -> dict[str, Any]:
    """Counts, reasons, score distributions, token usage and cost, from what is on disk."""
    kept, rejected = read_lines(paths.output), read_lines(paths.rejected)
    reasons = Counter(line.get("reason", "?").split(":", 1)[0] for line in rejected)
    scored = [line for line in kept + rejected if line["meta"]["scores"]["style"]["overall"] is not None]
    usage = {key: sum(line["meta"]["usage"].get(key, 0) for line in kept + rejected)
             for key in ("prompt_tokens", "completion_tokens", "requests", "attempts")}
    summary: dict[str, Any] = {
        "output": str(paths.output), "rejected_file": str(paths.rejected), "planned": planned,
        "done": len(kept) + len(rejected), "kept": len(kept), "rejected": len(rejected),
        "rejected_by_reason": dict(reasons),
        "scores_kept": {k: _distribution([line["meta"]["scores"]["style"][k] for line in kept])
                        for k in AXES_AND_OVERALL},
        "scores_all": {k: _distribution([line["meta"]["scores"]["style"][k] for line in scored])
                       for k in AXES_AND_OVERALL},
        "usage": usage, "cost": None,
    }
    prices = profile.prices if profile is not None else None
    if prices is not None and prices.prompt_per_million is not None and prices.completion_per_million is not None:
        summary["cost"] = round(usage["prompt_tokens"] / 1e6 * prices.prompt_per_million
                                + usage["completion_tokens"] / 1e6 * prices.completion_per_million, 6)
    return summary


def synth_status(output: str | Path) -> dict[str, Any]:
    """Done / kept / rejected of a synth output, with the planned count from its run record."""
    paths = SynthPaths.for_output(output)
    if not paths.output.exists() and not paths.record.exists():
        raise DataError(f"{paths.output} is not a synth output: neither it nor {paths.record} exists")
    planned = None
    if paths.record.exists():
        try:
            planned = json.loads(paths.record.read_text(encoding="utf-8"))["arguments"]["dialogues"]
        except (OSError, ValueError, KeyError, TypeError):
            planned = None
    status = summarize(paths, planned)
    status["running"] = RunDir(paths.state).lock_holder() is not None
    return status
