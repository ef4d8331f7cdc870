"""Dialogue data: loading JSON or JSONL, role normalisation, and validation that never drops a
row silently.

Every record becomes either a kept ``Dialogue`` or a ``Rejection`` naming the file, the record
index, the line where known and the reason. Structural checks happen here (layer 0, no model
needed); the tokenizing stage adds ``too_long`` and ``no_trained_tokens`` through the same
report.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

BOT = "assistant"
ROLE_ALIASES = {"user": "user", "model": BOT, "assistant": BOT, "system": "system"}
REASONS = ("invalid_json", "not_an_object", "missing_messages", "bad_role", "empty_content", "not_alternating",
           "not_ending_on_bot", "misplaced_system", "too_long", "no_trained_tokens")


@dataclass(frozen=True)
class Turn:
    role: str  # "system", "user" or "assistant"
    content: str


@dataclass(frozen=True)
class Dialogue:
    id: str  # the record's 0-based index in its file: stable while the file is unchanged
    turns: tuple[Turn, ...]
    metadata: dict = field(default_factory=dict, hash=False, compare=False)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": t.role, "content": t.content} for t in self.turns]

    @property
    def content_hash(self) -> str:
        canonical = json.dumps(self.messages(), ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def first_user(self) -> str:
        return next(t.content for t in self.turns if t.role == "user")


@dataclass(frozen=True)
class Rejection:
    source: str
    index: int  # 0-based record index
    line: int | None  # 1-based line number where known
    reason: str  # one of REASONS
    message: str

    def where(self) -> str:
        name = Path(self.source).name
        return f"{name}:{self.line} (dialogue {self.index})" if self.line else f"{name} dialogue {self.index}"


@dataclass
class ValidationReport:
    source: str
    kept: list[Dialogue]
    rejections: list[Rejection]

    def counts(self) -> dict[str, int]:
        by_reason = Counter(r.reason for r in self.rejections)
        return {"kept": len(self.kept), "rejected": len(self.rejections), **dict(sorted(by_reason.items()))}

    def summary(self, shown: int = 10) -> str:
        counts = self.counts()
        reasons = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("kept", "rejected"))
        lines = [f"{self.source}: {counts['kept']} dialogues kept, {counts['rejected']} rejected"
                 + (f" ({reasons})" if reasons else "")]
        lines += [f"  {r.where()}: {r.reason}: {r.message}" for r in self.rejections[:shown]]
        if len(self.rejections) > shown:
            lines.append(f"  ... and {len(self.rejections) - shown} more")
        return "\n".join(lines)

    def add_rejections(self, rejected: list[Rejection]) -> None:
        """Move dialogues rejected by a later stage (e.g. too long once templated) out of ``kept``."""
        gone = {r.index for r in rejected}
        self.kept = [d for d in self.kept if int(d.id) not in gone]
        self.rejections = sorted([*self.rejections, *rejected], key=lambda r: r.index)


def _check(record: object) -> tuple[str, str] | list[Turn]:
    """The dialogue's turns, or ``(reason, message)`` for the first problem found."""
    if not isinstance(record, dict):
        return "not_an_object", f"expected an object with 'messages', got {type(record).__name__}"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "missing_messages", "'messages' is missing or not a non-empty list"
    turns = []
    for position, message in enumerate(messages, start=1):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLE_ALIASES:
            return "bad_role", (f"message {position} has role {role!r}; allowed: user, model, assistant, "
                                "system (first only)")
        content = message.get("content")
        if not isinstance(content, str):
            return "empty_content", f"message {position} content is {type(content).__name__}, not text"
        if not content.strip():
            return "empty_content", f"message {position} ({role}) has empty content"
        turns.append(Turn(ROLE_ALIASES[role], content))
    if any(t.role == "system" for t in turns[1:]):
        return "misplaced_system", "a system message may only come first"
    body = turns[1:] if turns[0].role == "system" else turns
    for position, turn in enumerate(body):
        expected = "user" if position % 2 == 0 else BOT
        if turn.role != expected:
            return "not_alternating", f"turn {position + 1} is {turn.role}; turns must alternate user, bot, user, ..."
    if not body or body[-1].role != BOT:
        return "not_ending_on_bot", "the dialogue must end on a bot (model/assistant) turn"
    return turns


def _records(path: Path, text: str) -> list[tuple[int | None, object | Rejection]]:
    """``(line, record)`` pairs; a JSONL line that does not parse becomes a Rejection."""
    if text.lstrip().startswith("[") and path.suffix != ".jsonl":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
        return [(None, r) for r in records]
    out: list[tuple[int | None, object | Rejection]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            out.append((number, Rejection(str(path), len(out), number, "invalid_json",
                                          f"not valid JSON at line {number}: {exc.msg}")))
    return out


def load_dialogues(path: str | Path) -> ValidationReport:
    """Parse and validate a JSON list or JSONL file; bad rows become rejections, never exceptions."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"data file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {path}: {exc}") from exc
    kept, rejections = [], []
    for index, (line, record) in enumerate(_records(path, text)):
        if isinstance(record, Rejection):
            rejections.append(record)
            continue
        checked = _check(record)
        if isinstance(checked, tuple):
            rejections.append(Rejection(str(path), index, line, *checked))
        else:
            metadata = {k: v for k, v in record.items() if k != "messages"}
            kept.append(Dialogue(str(index), tuple(checked), metadata))
    return ValidationReport(str(path), kept, rejections)


def require_usable(report: ValidationReport) -> None:
    if not report.kept:
        raise DataError(f"no usable dialogue left in {report.source}:\n{report.summary()}", report.rejections)


def write_rejections(rejections: list[Rejection], path: Path) -> None:
    from .rundir import write_text_atomic

    lines = [json.dumps({"source": r.source, "index": r.index, "line": r.line, "reason": r.reason,
                         "message": r.message}, ensure_ascii=False) for r in rejections]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def dataset_fingerprint(path: str | Path) -> str:
    """sha256 of the data file's bytes: the run guard compares it when a run continues."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
