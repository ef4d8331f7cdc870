"""``socratune synth``: Socratic training dialogues by self-play between two chat models, filtered.

    socratune synth --output data.jsonl --url http://127.0.0.1:8000/v1 --model my-model --dialogues 500

``synth()`` follows these steps:

1. Profile: the synth profile (``assets/synth_socrates.yaml`` or ``--config FILE``) holds what
   varies between dialogues as data: opening questions, student personas, the Socrates system
   prompt, the student prompt template, per-role temperature and max_tokens, filter thresholds
   and prices.
2. Plan: dialogue ``i`` gets its question and persona from ``random.Random(f"{seed}:{i}")`` and
   its request seeds from ``(seed, i, step)``, so a resumed run regenerates the same plan and the
   same command makes the same choices.
3. Resume: the kept file (``OUT``) and the rejects (``OUT.rejected.jsonl``, beside it) each carry
   the dialogue index of every line; the indices found there are done, the rest are generated. A
   torn last line (a kill mid-write) is cut off first. ``OUT.synth/`` holds the run's lock (the
   run-directory lock of ``rundir.py``) and ``run.json``: every argument (never a key), the
   profile's hash, the endpoints, each start; a resume with a different seed, turn count,
   profile or model is refused.
4. Converse: ``concurrency`` dialogues at a time in a thread pool. The student opens with the
   planned question; Socrates (its system prompt + the conversation) answers; the student (its
   persona prompt + the transcript so far) speaks again; ``turns`` exchanges in all.
5. Filter: every Socrates reply is scored by the style scorer against the message it answers
   (and with ``--judge`` rated by the LLM judge); a dialogue whose mean scores reach the
   profile's thresholds is kept unless it is a near-duplicate (character-shingle Jaccard
   similarity, candidates found by MinHash) of a kept one or of a ``--dedupe-against`` file.
6. Write: each finished dialogue is appended to OUT or OUT.rejected.jsonl (with its reason),
   flushed and fsynced, one by one. Kept lines are socratune's data format (``messages`` with
   alternating user/assistant turns ending on the assistant, non-empty) plus ``meta``.

Failures: an endpoint that is down at the start raises ``EndpointUnreachable`` before anything
is written; one that stops answering mid-run (after the client's retries) ends the run with
``EndpointLost`` once the dialogues in flight are settled: all finished ones are on disk and the
same command resumes. Ctrl-C drops the dialogues in flight (nothing half-written) and raises
``SynthInterrupted``.

Tests: ``pytest tests/test_synth.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .client import ChatClient, ChatReply
from .data import jsonl_lines, load_dialogues
from .errors import (
    ConfigError,
    DataError,
    EndpointFailed,
    EndpointLost,
    SynthInterrupted,
)
from .rundir import RunDir, write_json_atomic

logger = logging.getLogger("socratune")

KEY_VARIABLES = {  # per role, then shared: the first one set is used
    "student": ("SOCRATUNE_SYNTH_STUDENT_API_KEY", "SOCRATUNE_SYNTH_API_KEY", "OPENAI_API_KEY"),
    "socrates": ("SOCRATUNE_SYNTH_SOCRATES_API_KEY", "SOCRATUNE_SYNTH_API_KEY", "OPENAI_API_KEY"),
}
AXES_AND_OVERALL = ("tone", "approach", "format", "logic", "overall")
RECORD_VERSION = 1
# A request that failed with one of these ends the run: the endpoint is gone or refuses us, and
# every later dialogue would fail the same way. Any other 4xx (a prompt too long, say) rejects
# only the dialogue it happened in.
_RUN_ENDING_STATUS = {401, 403, 404, 408, 409, 429}


# --- the synth profile ----------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoleSpec(_Strict):
    system_prompt: str = Field(min_length=1)
    temperature: float = Field(ge=0, le=2)
    max_tokens: int = Field(gt=0)


class StudentSpec(_Strict):
    system_prompt_template: str = Field(min_length=1)  # {name} {age} {occupation} {stance} {speech}
    temperature: float = Field(ge=0, le=2)
    max_tokens: int = Field(gt=0)


class Persona(_Strict):
    name: str
    age: int = Field(gt=0, lt=150)
    occupation: str
    stance: str
    speech: str


class FilterSpec(_Strict):
    min_overall: float = Field(ge=0, le=4)
    min_axis: dict[str, float] = Field(default_factory=dict)
    min_judge: float = Field(default=0.0, ge=0, le=4)
    near_duplicate: float = Field(gt=0, le=1)  # Jaccard similarity at or above which two dialogues are one
    shingle_chars: int = Field(default=5, gt=0)


class Prices(_Strict):
    prompt_per_million: float | None = Field(default=None, ge=0)
    completion_per_million: float | None = Field(default=None, ge=0)


class SynthProfile(_Strict):
    name: str
    socrates: RoleSpec
    student: StudentSpec
    personas: list[Persona] = Field(min_length=1)
    questions: list[str] = Field(min_length=1)
    filter: FilterSpec
    prices: Prices = Prices()


def load_synth_profile(path: str | Path | None = None) -> tuple[SynthProfile, str, str]:
    """``(profile, sha256 of its text, where it came from)``; the bundled one when ``path`` is None."""
    if path is None:
        text = resources.files("socratune").joinpath("assets/synth_socrates.yaml").read_text(encoding="utf-8")
        source = "bundled:synth_socrates.yaml"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read synth profile {path}: {exc}", key="--config") from None
        source = str(path)
    try:
        raw = yaml.safe_load(text)
        profile = SynthProfile.model_validate(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"synth profile {source} is not valid YAML: {str(exc)[:300]}", key="--config") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"synth profile {source}: {where}: {first['msg']}", key=where) from None
    unknown = set(profile.filter.min_axis) - set(AXES_AND_OVERALL[:-1])
    if unknown:
        raise ConfigError(f"synth profile {source}: filter.min_axis has unknown axis {sorted(unknown)}",
                          key="filter.min_axis", allowed=list(AXES_AND_OVERALL[:-1]))
    for persona in profile.personas:
        try:
            profile.student.system_prompt_template.format(**persona.model_dump())
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"synth profile {source}: student.system_prompt_template uses {exc}; the persona "
                              f"fields are {list(Persona.model_fields)}", key="student.system_prompt_template") from None
    return profile, hashlib.sha256(text.encode("utf-8")).hexdigest(), source


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


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a synth output file; a line that is not one is a DataError naming it."""
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    lines = []
    for number, record, error in jsonl_lines(text):
        if error is not None or not isinstance(record, dict) or not isinstance(record.get("meta"), dict) \
                or not isinstance(record["meta"].get("index"), int):
            raise DataError(f"{path}:{number} is not a synth line (a JSON object with meta.index); "
                            "fix or remove that line, then run the command again")
        lines.append(record)
    return lines


def _append(handle: Any, line: dict[str, Any]) -> None:
    """One line on disk before the next dialogue counts as done; a failed write names the file."""
    try:
        handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as exc:
        raise DataError(f"{exc.strerror or exc} writing {handle.name}; the dialogues before it are on disk and "
                        "the same command continues once this is fixed") from None


# --- plan and conversation ---------------------------------------------------------------------------


def plan_dialogue(profile: SynthProfile, seed: int, index: int) -> tuple[str, Persona]:
    """The opening question and student persona of dialogue ``index``: the same for the same seed."""
    rng = random.Random(f"{seed}:{index}")
    return rng.choice(profile.questions), rng.choice(profile.personas)


def request_seed(seed: int, index: int, step: int) -> int:
    """A sampling seed per request, so a seeded server repeats a dialogue on a rerun."""
    digest = hashlib.sha256(f"{seed}:{index}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


STUDENT_TURN = ("これまでの対話:\n{transcript}\n\n"
                "ソクラテスの最後の言葉に、あなた（{name}）として次の発言だけを書いてください。")


def _student_view(persona: Persona, messages: list[dict[str, str]]) -> str:
    """The transcript as one user message: every chat template accepts it, whatever its role rules."""
    speakers = {"user": f"{persona.name}", "assistant": "ソクラテス"}
    transcript = "\n".join(f"{speakers[m['role']]}: {m['content']}" for m in messages)
    return STUDENT_TURN.format(transcript=transcript, name=persona.name)


def strip_speaker(text: str, speaker: str) -> str:
    """The reply without a leading "name:" label: models continuing a transcript often add one."""
    text = text.strip()
    for colon in (":", "："):
        if text.startswith(speaker + colon):
            return text[len(speaker) + 1:].strip()
    return text


class _Dropped(Exception):
    """Ctrl-C or a failed run: a dialogue in flight stops before its next request."""


@dataclass
class Conversation:
    index: int
    question: str
    persona: Persona
    messages: list[dict[str, str]] = field(default_factory=list)
    replies: list[ChatReply] = field(default_factory=list)
    judge: list[Any] = field(default_factory=list)  # Verdicts, one per Socrates reply
    failure: str | None = None  # a request refused for this dialogue only


def converse(index: int, question: str, persona: Persona, profile: SynthProfile, turns: int, seed: int,
             student: ChatClient, socrates: ChatClient, stop: threading.Event) -> Conversation:
    """One dialogue of ``turns`` exchanges; raises EndpointFailed for a run-ending failure."""
    talk = Conversation(index, question, persona, [{"role": "user", "content": question}])
    student_system = profile.student.system_prompt_template.format(**persona.model_dump())
    for turn in range(turns):
        for role in ("socrates", "student") if turn < turns - 1 else ("socrates",):
            if stop.is_set():
                raise _Dropped
            step = 2 * turn + (role == "student")
            if role == "socrates":
                client, spec = socrates, profile.socrates
                request = [{"role": "system", "content": spec.system_prompt}, *talk.messages]
            else:
                client, spec = student, profile.student
                request = [{"role": "system", "content": student_system},
                           {"role": "user", "content": _student_view(persona, talk.messages)}]
            try:
                reply = client.chat(request, temperature=spec.temperature, max_tokens=spec.max_tokens,
                                    seed=request_seed(seed, index, step))
            except EndpointFailed as exc:
                if exc.status is None or exc.status >= 500 or exc.status in _RUN_ENDING_STATUS:
                    raise
                talk.failure = f"request_failed: {role}: {exc}"
                return talk
            talk.replies.append(reply)
            speaker = "ソクラテス" if role == "socrates" else persona.name
            talk.messages.append({"role": "assistant" if role == "socrates" else "user",
                                  "content": strip_speaker(reply.text, speaker)})
    return talk


# --- quality filter ------------------------------------------------------------------------------------


class NearDuplicates:
    """Near-duplicate search by Jaccard similarity of character shingle sets.

    MinHash (63 permutations in 21 bands of 3) finds candidates; every candidate's exact Jaccard
    similarity decides, so there are no false positives. A pair at the 0.6 threshold becomes a
    candidate with probability 1 - (1 - 0.6^3)^21 = 99.4 %, one at 0.8 with > 99.99 %.
    """

    BANDS, ROWS = 21, 3
    _PRIME = (1 << 31) - 1

    def __init__(self, threshold: float, shingle_chars: int):
        import numpy as np

        self.threshold, self.n = threshold, shingle_chars
        rng = np.random.default_rng(20240611)  # fixed: signatures must agree across runs and resumes
        size = self.BANDS * self.ROWS
        self._a = rng.integers(1, self._PRIME, size, dtype=np.uint64)
        self._b = rng.integers(0, self._PRIME, size, dtype=np.uint64)
        self._buckets: dict[tuple[int, bytes], list[str]] = {}
        self._shingles: dict[str, frozenset[str]] = {}

    def shingles(self, text: str) -> frozenset[str]:
        text = "".join(text.split())  # spacing and line breaks do not make a dialogue new
        return frozenset(text[i:i + self.n] for i in range(max(1, len(text) - self.n + 1)))

    def _bands(self, shingles: frozenset[str]) -> list[tuple[int, bytes]]:
        import numpy as np

        hashes = np.array([zlib.crc32(s.encode("utf-8")) for s in shingles], dtype=np.uint64) % self._PRIME
        signature = ((self._a[:, None] * hashes[None, :] + self._b[:, None]) % self._PRIME).min(axis=1)
        rows = signature.reshape(self.BANDS, self.ROWS)
        return [(band, rows[band].tobytes()) for band in range(self.BANDS)]

    def find(self, text: str) -> tuple[str, float] | None:
        """The most similar indexed key at or above the threshold, with its similarity."""
        shingles = self.shingles(text)
        candidates = {key for band in self._bands(shingles) for key in self._buckets.get(band, [])}
        best = None
        for key in candidates:
            other = self._shingles[key]
            similarity = len(shingles & other) / len(shingles | other)
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = (key, similarity)
        return best

    def add(self, key: str, text: str) -> None:
        shingles = self.shingles(text)
        self._shingles[key] = shingles
        for band in self._bands(shingles):
            self._buckets.setdefault(band, []).append(key)


def dialogue_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] != "system")


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


def synth(request: SynthRequest, student: ChatClient, socrates: ChatClient, judge: Any = None,
          on_progress: Callable[[Progress], None] | None = None) -> dict[str, Any]:
    """Generate, filter and append dialogues until ``request.dialogues`` are done; the summary."""
    if request.dialogues < 1 or request.turns < 1 or request.concurrency < 1:
        raise ConfigError("--dialogues, --turns and --concurrency must be at least 1", key="--dialogues")
    profile, profile_hash, source = load_synth_profile(request.config)
    thresholds = profile.filter
    min_overall = thresholds.min_overall if request.min_score is None else request.min_score
    if not 0 <= min_overall <= 4:
        raise ConfigError(f"--min-score must be between 0 and 4, got {min_overall}", key="--min-score")
    paths = SynthPaths.for_output(request.output)
    if paths.output.is_dir():
        raise ConfigError(f"--output {paths.output} is a directory; give a file name such as data.jsonl",
                          key="--output")
    duplicates = NearDuplicates(thresholds.near_duplicate, thresholds.shingle_chars)
    for other in request.dedupe_against:
        report = load_dialogues(other)
        for dialogue in report.kept:
            duplicates.add(f"{other}#{dialogue.id}", dialogue_text(dialogue.messages()))
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
    from .style import AXES, StyleScorer, load_profile

    thresholds = profile.filter
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

        def decide(talk: Conversation) -> tuple[dict[str, Any], str | None]:
            """The line to write and the reason to reject it (None: keep)."""
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
            if judged is not None and min_overall > 0 and (judged["mean"] is None or judged["mean"] < thresholds.min_judge):
                shown = "no score" if judged["mean"] is None else f"{judged['mean']:.2f}"
                return line, f"low_judge_score: {shown} < {thresholds.min_judge:g}"
            twin = duplicates.find(dialogue_text(talk.messages))
            if twin is not None:
                return line, f"near_duplicate: of {twin[0]} (Jaccard {twin[1]:.2f} >= {thresholds.near_duplicate:g})"
            duplicates.add(f"{paths.output.name}#{talk.index}", dialogue_text(talk.messages))
            return line, None

        def work(index: int) -> Conversation:
            question, persona = plan_dialogue(profile, request.seed, index)
            talk = converse(index, question, persona, profile, request.turns, request.seed, student, socrates, stop)
            if judge is not None and talk.failure is None:
                for i, message in enumerate(talk.messages):
                    if message["role"] == "assistant":
                        if stop.is_set():
                            raise _Dropped
                        talk.judge.append(judge.rate(message["content"], talk.messages[i - 1]["content"]))
            return talk

        stop = threading.Event()
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
                        except _Dropped:
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
        summary = summarize(paths, request.dialogues, profile)
        summary["this_run"] = {"elapsed_s": round(time.monotonic() - started, 2), "requests": progress.requests,
                               "completion_tokens": progress.completion_tokens,
                               "requests_per_s": round(progress.requests_per_s, 3),
                               "tokens_per_s": round(progress.tokens_per_s, 2)}
        record = json.loads(paths.record.read_text(encoding="utf-8"))
        record["summary"] = summary
        write_json_atomic(paths.record, record)
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
    return summary


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
