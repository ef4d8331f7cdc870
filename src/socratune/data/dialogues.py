"""Dialogue data: loading a JSON list or JSONL file, role normalisation, and validation that
never drops a row silently.

Every record becomes either a kept ``Dialogue`` or a ``Rejection`` naming the file, the record
index (0-based), the line where known (1-based) and the reason, so a user can find and fix the
row. Messages inside a dialogue are counted from 1 in rejection messages, as an editor would.
Structural checks happen here (layer 0, no model needed); the tokenizing stage adds
``too_long`` and ``no_trained_tokens`` through the same report.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ConfigError, DataError, SocratuneError, check_readable_file, os_error_message, quote_capped
from ..core.rundir import write_text_atomic

BOT = "assistant"
# Gemma-style data says "model", OpenAI-style data says "assistant": both are the bot.
ROLE_ALIASES = {"user": "user", "model": BOT, "assistant": BOT, "system": "system"}
REASONS = ("invalid_json", "not_an_object", "missing_messages", "bad_role", "empty_content", "invalid_text",
           "not_alternating", "not_ending_on_bot", "misplaced_system", "too_long", "no_trained_tokens")
_ALLOWED_ROLES = "user, model, assistant, system (first only)"
# Between the elements of a list that already parsed as JSON there is only whitespace and commas.
_BETWEEN_ELEMENTS = re.compile(r"[ \t\n\r,]*")
_SURROGATE_PROBLEM = "holds a lone surrogate"
_SURROGATE_HINT = ", which is not Unicode text (a broken \\uXXXX escape); fix or remove it"


@dataclass(frozen=True)
class Turn:
    role: str  # "system", "user" or "assistant" (bot roles are normalised on load)
    content: str  # as given: leading/trailing whitespace is kept, it is part of what is trained


@dataclass(frozen=True)
class Dialogue:
    id: str  # the record's 0-based index in its file: stable while the file is unchanged
    turns: tuple[Turn, ...]
    # Every key of the record except "messages" (source_file, extract_range, topic, ...). Left out of
    # equality and hashing: two dialogues are the same when their turns are.
    metadata: dict = field(default_factory=dict, hash=False, compare=False)

    def messages(self) -> list[dict[str, str]]:
        """The turns in the shape ``tokenizer.apply_chat_template`` takes."""
        return [{"role": t.role, "content": t.content} for t in self.turns]

    @property
    def content_hash(self) -> str:
        """sha256 of the turns as canonical JSON: a persisted split records it to notice edited data."""
        canonical = json.dumps(self.messages(), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def first_user(self) -> str:
        """The opening question: what the dialogue is about, used for grouping and sample prompts."""
        return next(t.content for t in self.turns if t.role == "user")


@dataclass(frozen=True)
class Rejection:
    source: str  # the data file path as given
    index: int  # 0-based record index in the file
    line: int | None  # 1-based line where the record starts, where known
    reason: str  # one of REASONS
    message: str  # what is wrong, in words

    def where(self) -> str:
        """``data.jsonl:12 (dialogue 11)``: the location an editor can jump to."""
        name = Path(self.source).name
        return f"{name}:{self.line} (dialogue {self.index})" if self.line else f"{name} (dialogue {self.index})"


@dataclass
class ValidationReport:
    source: str
    kept: list[Dialogue]
    rejections: list[Rejection]

    def counts(self) -> dict[str, int]:
        """``{"kept": n, "rejected": m}`` plus one count per reason present, in REASONS order."""
        by_reason = Counter(r.reason for r in self.rejections)
        return {"kept": len(self.kept), "rejected": len(self.rejections),
                **{reason: by_reason[reason] for reason in REASONS if by_reason[reason]}}

    def summary(self, shown: int = 10) -> str:
        """Kept and rejected counts by reason, then the first ``shown`` rejections with their location."""
        counts = self.counts()
        reasons = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("kept", "rejected"))
        lines = [f"{self.source}: {counts['kept']} dialogues kept, {counts['rejected']} rejected"
                 + (f" ({reasons})" if reasons else "")]
        lines += [f"  {r.where()}: {r.reason}: {r.message}" for r in self.rejections[:shown]]
        if len(self.rejections) > shown:
            lines.append(f"  ... and {len(self.rejections) - shown} more")
        return "\n".join(lines)

    def add_rejections(self, rejected: list[Rejection]) -> None:
        """Move dialogues rejected by a later stage (too long once templated, nothing to train on) from
        ``kept`` to ``rejections``, matched by record index, so one report accounts for every row."""
        gone = {r.index for r in rejected}
        self.kept = [d for d in self.kept if int(d.id) not in gone]
        self.rejections = sorted([*self.rejections, *rejected], key=lambda r: r.index)


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type: users read the file, not Python."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}[type(value)]


def _check(record: object) -> list[Turn] | tuple[str, str]:
    """The dialogue's turns, or ``(reason, message)`` for the first problem found."""
    if not isinstance(record, dict):
        return "not_an_object", f"expected an object with 'messages', got {_json_type(record)}"
    if "messages" not in record:
        keys = ", ".join(quote_capped(k, 40) for k in list(record)[:10]) or "none"
        keys += ", ..." if len(record) > 10 else ""
        return "missing_messages", f"no 'messages' key (keys present: {keys})"
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        found = "an empty list" if messages == [] else _json_type(messages)
        return "missing_messages", f"'messages' must be a non-empty list, got {found}"
    turns = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            return "bad_role", f"message {number} is {_json_type(message)}, not an object with role and content"
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLE_ALIASES:
            return "bad_role", f"message {number} has role {quote_capped(role)}; allowed: {_ALLOWED_ROLES}"
        content = message.get("content")
        if not isinstance(content, str):
            found = "missing" if "content" not in message else _json_type(content)
            return "empty_content", f"message {number} ({role}) content is {found}, not a string"
        if not content.strip():
            return "empty_content", f"message {number} ({role}) has empty content"
        turns.append(Turn(ROLE_ALIASES[role], content))

    expected = "user"
    for number, (turn, message) in enumerate(zip(turns, messages), start=1):
        if turn.role == "system":
            if number > 1:
                return "misplaced_system", f"message {number} is a system message; a system message may only come first"
            continue
        if turn.role != expected:
            return "not_alternating", (f"message {number} is {message['role']} where {expected} was expected; "
                                       "after an optional system message, turns go user, model, user, model, ...")
        expected = BOT if expected == "user" else "user"
    if turns[-1].role != BOT:
        return "not_ending_on_bot", (f"the last message ({len(turns)}) is {messages[-1]['role']}; "
                                     "a dialogue must end on a model/assistant turn")
    return turns


def _lone_surrogate(text: str) -> str | None:
    """``\\ud800 at character 12`` for the first lone surrogate in ``text`` (JSON's ``"\\ud800"``
    escape decodes to one; it cannot be encoded, tokenized or written), else None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return f"\\u{ord(text[exc.start]):04x} at character {exc.start + 1}"


def _surrogate_in(value: object) -> str | None:
    """The first lone surrogate anywhere in a parsed JSON value (keys included), walked without
    recursion so that depth is no problem."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if (found := _lone_surrogate(item)) is not None:
                return found
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def parse_json(text: str) -> object:
    """``json.loads`` whose every failure is a ValueError with a short message: nesting deeper than
    Python's recursion limit and integers beyond its digit limit included (the decoder raises
    RecursionError, or a ValueError quoting the whole number, for those)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise ValueError("nested too deeply (arrays or objects inside each other thousands of levels deep)") from None
    except ValueError as exc:
        if "digits" in str(exc):  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
            raise ValueError("a number has too many digits to read (more than 4300)") from None
        raise ValueError(f"cannot be read: {str(exc)[:80]}") from None


def _json_list_lines(text: str) -> list[int]:
    """1-based line on which each top-level element of ``text`` starts; ``text`` must be a valid JSON list.

    Re-decodes element by element (C speed), which keeps rejections in JSON list files as easy to
    locate as in JSONL files.
    """
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    line, counted_to, lines = 1, 0, []
    while True:
        position = _BETWEEN_ELEMENTS.match(text, position).end()
        if text[position] == "]":
            return lines
        line += text.count("\n", counted_to, position)
        counted_to = position
        lines.append(line)
        _, position = decoder.raw_decode(text, position)


def _parse_json_list(path: Path, text: str) -> list[tuple[int | None, object]]:
    try:
        records = parse_json(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except ValueError as exc:
        raise DataError(f"{path}: not usable JSON: {exc}") from exc
    if not isinstance(records, list):
        raise DataError(f"{path} holds {_json_type(records)}; expected a JSON list of dialogues ([{{...}}, ...])")
    return list(zip(_json_list_lines(text), records))


def refuse_bad_lines(problems: list[str], path: Path, consequence: str) -> None:
    """Raise one DataError listing ``FILE:LINE: what`` problems (ten shown, then a count), so every
    line-checked JSONL input (prompts, pairs) reports bad lines alike; nothing when all lines are good."""
    if not problems:
        return
    shown = "\n".join(f"  {p}" for p in problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise DataError(f"{len(problems)} bad line(s) in {path}; {consequence}:\n{shown}{more}")


def jsonl_lines(text: str) -> Iterator[tuple[int, object, str | None]]:
    """``(line number, value, problem)`` for each non-blank line of JSON Lines text: the parsed
    value and None, or None and why the line is not JSON. The one reader behind every JSONL
    input (dialogues, prompts, replies to score), so they all count lines and word errors alike."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = parse_json(line)
        except json.JSONDecodeError as exc:
            yield number, None, f"invalid JSON: {exc.msg} (column {exc.colno})"
            continue
        except ValueError as exc:
            yield number, None, f"invalid JSON: {exc}"
            continue
        if (surrogate := _surrogate_in(value)) is not None:
            yield number, None, f"invalid JSON: {_SURROGATE_PROBLEM} {surrogate}{_SURROGATE_HINT}"
            continue
        yield number, value, None


def _parse_jsonl(path: Path, text: str) -> list[tuple[int | None, object]]:
    """``(line, record)`` per non-blank line; a line that does not parse becomes a Rejection record."""
    out: list[tuple[int | None, object]] = []
    for number, value, problem in jsonl_lines(text):
        if problem is None:
            out.append((number, value))
        else:
            reason = "invalid_text" if _SURROGATE_PROBLEM in problem else "invalid_json"
            out.append((number, Rejection(str(path), len(out), number, reason,
                                          f"not valid JSON at line {number}: "
                                          f"{problem.removeprefix('invalid JSON: ')}")))
    if out and all(isinstance(record, Rejection) and record.reason == "invalid_json" for _, record in out):
        # Not one line parsed: this is not JSONL with a few bad rows but a file of another kind.
        try:
            whole = parse_json(text)
        except ValueError:
            first = out[0][1]
            raise DataError(f"{path} is neither a JSON list nor JSON Lines: {first.message}") from None
        raise DataError(f"{path} holds {_json_type(whole)}; expected a JSON list of dialogues ([{{...}}, ...]) "
                        "or one dialogue object per line (JSONL)")
    return out


def load_dialogues(path: str | Path) -> ValidationReport:
    """Parse and validate a JSON list or JSONL file; bad rows become rejections, never exceptions.

    The format is chosen by content (a file starting with ``[`` is a JSON list) unless the name
    ends in ``.jsonl``, where a line may itself be a list (and is rejected as not an object).
    Raises DataError only when the file as a whole cannot be used: missing, unreadable, not
    UTF-8, a JSON list that does not parse, or not JSON at all.
    """
    path = Path(path)
    text = read_text_file(path, "data file")
    is_list = text.lstrip().startswith("[") and path.suffix != ".jsonl"
    records = _parse_json_list(path, text) if is_list else _parse_jsonl(path, text)

    kept, rejections = [], []
    for index, (line, record) in enumerate(records):
        if isinstance(record, Rejection):
            rejections.append(record)
            continue
        if (surrogate := _surrogate_in(record)) is not None:
            rejections.append(Rejection(str(path), index, line, "invalid_text",
                                        f"{_SURROGATE_PROBLEM} {surrogate}{_SURROGATE_HINT}"))
            continue
        checked = _check(record)
        if isinstance(checked, tuple):
            rejections.append(Rejection(str(path), index, line, *checked))
        else:
            metadata = {k: v for k, v in record.items() if k != "messages"}
            kept.append(Dialogue(str(index), tuple(checked), metadata))
    return ValidationReport(str(path), kept, rejections)


def check_output_file(path: Path, flag: str, error: type[SocratuneError] = ConfigError) -> None:
    """Raise ``error`` naming ``flag`` and the path unless ``path`` can be created or replaced as a
    file: not a directory, pipe or device, and in a folder that exists. Called before any slow or
    remote work, so such an output fails first and nothing is written."""
    if path.is_dir():
        raise error(f"{flag} {path} is a directory; give a file name")
    if path.exists() and not path.is_file():
        raise error(f"{flag} {path} is not a regular file (a pipe, socket or device); give a file name")
    if path.is_symlink() and not path.exists():
        raise error(f"{flag} {path} is a symlink that leads nowhere (broken or a loop); remove it or give another path")
    folder = path.parent
    if not folder.is_dir():
        what = ("a file is in the way (part of the path is a file, not a directory)" if folder.exists()
                else f"its folder {folder} does not exist")
        raise error(f"{flag} {path}: {what}; choose another path")


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of an input file (a byte-order mark is dropped), or a DataError in one line
    naming ``what`` and the path: missing, not a regular file, unreadable, or not UTF-8."""
    path = Path(path)
    check_readable_file(path, what)
    try:
        # utf-8-sig: files saved by Windows editors start with a byte-order mark.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {path} is not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
                        "save it as UTF-8") from None
    except OSError as exc:
        raise DataError(os_error_message(exc, path, f"reading {what}")) from exc


def require_usable(report: ValidationReport) -> None:
    """Refuse to go on with nothing to train on, showing why every row was rejected."""
    if not report.kept:
        raise DataError(f"no usable dialogue left in {report.source}:\n{report.summary()}", report.rejections)


def write_rejections(rejections: list[Rejection], path: Path) -> None:
    """One JSON object per rejection (source, index, line, reason, message), written atomically so
    an interrupted run never leaves half a file next to the weights."""
    lines = [json.dumps({"source": r.source, "index": r.index, "line": r.line, "reason": r.reason,
                         "message": r.message}, ensure_ascii=False) for r in rejections]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def dataset_fingerprint(path: str | Path) -> str:
    """sha256 of the data file's bytes: the run guard compares it when a run continues. A path
    that is not a readable file is a DataError, the same one ``load_dialogues`` raises."""
    path = Path(path)
    check_readable_file(path, "data file")
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise DataError(os_error_message(exc, path, "reading data file")) from exc
    return digest.hexdigest()
