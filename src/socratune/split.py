"""The train/eval split: seeded, deterministic, grouped by user prompt, persisted and verified.

Dialogues that share any user turn are one group and go to the same side, so the eval set
never asks a question the model was trained to answer. Groups are ordered by a hash of the
seed and the group's text, not by shuffling positions, so the assignment does not depend on the
file's order and appending dialogues moves as few as possible. The split is saved in the run
directory (ids plus content hashes) and reused when the run continues.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .data import Dialogue
from .errors import DataError


@dataclass(frozen=True)
class Split:
    seed: int
    train_frac: float
    eval_cap: int
    train: list[str]
    eval: list[str]
    held_out: list[str]  # beyond the eval cap: unused in training, kept for later evaluation
    hashes: dict[str, str]  # id -> content hash of every dialogue above


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _groups(dialogues: list[Dialogue]) -> list[list[Dialogue]]:
    """Union-find over shared user turns."""
    parent = list(range(len(dialogues)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, dialogue in enumerate(dialogues):
        for turn in dialogue.turns:
            if turn.role != "user":
                continue
            key = _normalise(turn.content)
            if key in owner:
                parent[find(i)] = find(owner[key])
            else:
                owner[key] = i
    members: dict[int, list[Dialogue]] = {}
    for i, dialogue in enumerate(dialogues):
        members.setdefault(find(i), []).append(dialogue)
    return list(members.values())


def split_dialogues(dialogues: list[Dialogue], seed: int, train_frac: float = 0.8, eval_cap: int = 100) -> Split:
    if not 0 < train_frac <= 1:
        raise ValueError(f"train_frac must be in (0, 1], got {train_frac}")
    if eval_cap < 0:
        raise ValueError(f"eval_cap must be >= 0, got {eval_cap}")

    def order(group: list[Dialogue]) -> str:
        key = min(_normalise(t.content) for d in group for t in d.turns if t.role == "user")
        return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()

    groups = sorted(_groups(dialogues), key=order)
    wanted_train = max(1, round(train_frac * len(dialogues)))
    if train_frac < 1 and len(dialogues) >= 2 and len(groups) >= 2:
        wanted_train = min(wanted_train, len(dialogues) - len(groups[-1]))
    train: list[str] = []
    eval_ids: list[str] = []
    held_out: list[str] = []
    for group in groups:
        ids = [d.id for d in group]
        if len(train) < wanted_train:
            train += ids
        elif len(eval_ids) + len(ids) <= eval_cap:
            eval_ids += ids
        else:
            held_out += ids
    hashes = {d.id: d.content_hash for d in dialogues}
    return Split(seed, train_frac, eval_cap, train, eval_ids, held_out, hashes)


def save_split(split: Split, path: Path) -> None:
    from .rundir import write_json_atomic

    write_json_atomic(path, asdict(split))


def load_split(path: Path) -> Split:
    try:
        return Split(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a readable split file: {exc}") from exc


def verify_split(split: Split, dialogues: list[Dialogue]) -> list[str]:
    """Differences between a saved split and the data now; empty when they match."""
    current = {d.id: d.content_hash for d in dialogues}
    differences = [f"dialogue {i} is in the split but not in the data" for i in split.hashes if i not in current]
    differences += [f"dialogue {i} changed since the split was made" for i, h in split.hashes.items()
                    if i in current and current[i] != h]
    differences += [f"dialogue {i} is new since the split was made" for i in current if i not in split.hashes]
    return differences


def apply_split(split: Split, dialogues: list[Dialogue]) -> tuple[list[Dialogue], list[Dialogue]]:
    by_id = {d.id: d for d in dialogues}
    return [by_id[i] for i in split.train], [by_id[i] for i in split.eval]
