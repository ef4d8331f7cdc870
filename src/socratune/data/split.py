"""The train/eval split: seeded, deterministic, grouped by user prompt, persisted and verified.

Dialogues that share any user turn (after collapsing whitespace) form one group and go to the
same side, so the eval set never asks a question the model was trained to answer. Groups are
ordered by ``sha256(f"{seed}:{group key}")``, not by shuffling positions, so the assignment does
not depend on the file's order and appending dialogues moves as few as possible. The split is
saved in the run directory (ids plus content hashes) and reused, after verification, when the
run continues.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..core.errors import DataError, RunDirError
from ..core.rundir import write_json_atomic
from .dialogues import Dialogue


@dataclass(frozen=True)
class Split:
    seed: int
    train_frac: float
    eval_cap: int  # most dialogues evaluated during training: eval time grows with it
    train: list[str]  # dialogue ids, in the deterministic group order
    eval: list[str]
    held_out: list[str]  # beyond the eval cap: unused in training, kept for later evaluation
    hashes: dict[str, str]  # id -> content hash of every dialogue above


def _normalise(text: str) -> str:
    """Collapse whitespace (full-width spaces and newlines included) so re-wrapped copies match."""
    return " ".join(text.split())


def _groups(dialogues: list[Dialogue]) -> dict[str, list[Dialogue]]:
    """Union-find over shared user turns: group key (smallest normalised user text) -> members."""
    parent = list(range(len(dialogues)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, dialogue in enumerate(dialogues):
        for turn in dialogue.turns:
            if turn.role == "user":
                text = _normalise(turn.content)
                parent[find(i)] = find(owner.setdefault(text, i))
    members: dict[int, list[Dialogue]] = {}
    for i, dialogue in enumerate(dialogues):
        members.setdefault(find(i), []).append(dialogue)
    return {min(_normalise(t.content) for d in group for t in d.turns if t.role == "user"): group
            for group in members.values()}


def split_dialogues(dialogues: list[Dialogue], seed: int, train_frac: float = 0.8, eval_cap: int = 100) -> Split:
    """Assign whole prompt groups to train until it holds at least ``round(train_frac * n)``
    dialogues, then to eval while it stays within ``eval_cap``; the rest is held out.

    When ``train_frac < 1`` and there are at least two groups, the last group in order is never
    trained on, so eval gets at least one dialogue unless ``eval_cap`` is 0 (or smaller than every
    remaining group). Dialogues that all share one prompt form one group and all go to train.
    """
    if not 0 < train_frac <= 1:  # also refuses NaN
        raise ValueError(f"train_frac must be in (0, 1], got {train_frac}")
    if eval_cap < 0:
        raise ValueError(f"eval_cap must be >= 0, got {eval_cap}")
    if not dialogues:
        raise ValueError("no dialogues to split")

    hashes = {d.id: d.content_hash for d in dialogues}
    groups = _groups(dialogues)
    order = sorted(groups, key=lambda key: hashlib.sha256(f"{seed}:{key}".encode()).hexdigest())
    # Within a group, order by content so the lists do not depend on the file's order either.
    ordered = [sorted(groups[key], key=lambda d: hashes[d.id]) for key in order]

    total = len(dialogues)
    wanted_train = max(1, round(train_frac * total))
    if train_frac < 1 and len(ordered) >= 2:
        wanted_train = min(wanted_train, total - len(ordered[-1]))
    train: list[str] = []
    eval_ids: list[str] = []
    held_out: list[str] = []
    for group in ordered:
        ids = [d.id for d in group]
        if len(train) < wanted_train:
            train += ids
        elif len(eval_ids) + len(ids) <= eval_cap:
            eval_ids += ids
        else:
            held_out += ids
    return Split(seed, train_frac, eval_cap, train, eval_ids, held_out, hashes)


def save_split(split: Split, path: Path) -> None:
    """Write the split as JSON through a temporary file, so a crash never leaves half a split."""
    write_json_atomic(path, asdict(split))


def _split_problem(raw: object) -> str | None:
    """What makes ``raw`` (parsed split.json) unusable as a Split, or None when it is sound."""
    if not isinstance(raw, dict):
        return "expected a JSON object"
    names = [f.name for f in fields(Split)]
    missing = [n for n in names if n not in raw]
    unknown = [k for k in raw if k not in names]
    if missing or unknown:
        return f"missing keys {missing}, unknown keys {unknown}; expected {names}"
    if not (isinstance(raw["seed"], int) and isinstance(raw["eval_cap"], int)):
        return "seed and eval_cap must be integers"
    if not isinstance(raw["train_frac"], (int, float)) or math.isnan(raw["train_frac"]):
        return "train_frac must be a number"
    ids: list[str] = []
    for side in ("train", "eval", "held_out"):
        if not isinstance(raw[side], list) or not all(isinstance(i, str) for i in raw[side]):
            return f"{side} must be a list of dialogue ids (strings)"
        ids += raw[side]
    if len(set(ids)) != len(ids):
        return "a dialogue id appears more than once across train, eval and held_out"
    hashes = raw["hashes"]
    if not isinstance(hashes, dict) or not all(isinstance(h, str) for h in hashes.values()):
        return "hashes must map dialogue ids to content hashes"
    if set(hashes) != set(ids):
        return "hashes must cover exactly the ids in train, eval and held_out"
    return None


def load_split(path: Path) -> Split:
    """Read a split saved by ``save_split``; DataError naming the file when it is unreadable or unsound."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"split file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the split: {exc}") from exc
    problem = _split_problem(raw)
    if problem:
        raise DataError(f"{path}: not a valid split file: {problem}")
    return Split(**raw)


def _id_order(dialogue_id: str) -> tuple[int, str]:
    """Numeric order for the numeric ids load_dialogues gives, without failing on other ids."""
    return len(dialogue_id), dialogue_id


def verify_split(split: Split, dialogues: list[Dialogue]) -> list[str]:
    """Differences between a saved split and the data now, in id order; empty when they match.

    Ids are record positions, so an edited, removed, inserted or reordered record shows up here
    and the run refuses to continue on a split that no longer describes its data.
    """
    current = {d.id: d.content_hash for d in dialogues}
    saved = split.hashes
    differences = [f"dialogue {i} is in the split but not in the data"
                   for i in sorted(saved.keys() - current.keys(), key=_id_order)]
    differences += [f"dialogue {i} changed since the split was made"
                    for i in sorted(saved.keys() & current.keys(), key=_id_order) if saved[i] != current[i]]
    differences += [f"dialogue {i} is new since the split was made"
                    for i in sorted(current.keys() - saved.keys(), key=_id_order)]
    return differences


def apply_split(split: Split, dialogues: list[Dialogue]) -> tuple[list[Dialogue], list[Dialogue]]:
    """``(train, eval)`` dialogues in split order; the split must match the data (``verify_split``)."""
    by_id = {d.id: d for d in dialogues}
    return [by_id[i] for i in split.train], [by_id[i] for i in split.eval]


def split_for_run(split_path: Path, dialogues: list[Dialogue], seed: int, train_frac: float,
                  eval_cap: int) -> Split:
    """The run's split: the one saved at ``split_path`` when the run continues, else a new one.

    A saved split that no longer matches the data is refused (RunDirError) rather than silently
    re-drawn."""
    if split_path.exists():
        split = load_split(split_path)
        differences = verify_split(split, dialogues)
        if differences:
            shown = "\n  ".join(differences[:10])
            raise RunDirError(f"the data no longer matches the split saved in {split_path}:\n  {shown}\n"
                              "use the original data, or --overwrite to start a new run")
        return split
    return split_dialogues(dialogues, seed, train_frac, eval_cap)


def require_eval_dialogues(dialogues: list[Dialogue], seed: int, train_frac: float, eval_cap: int,
                           source: str) -> None:
    """Refuse data whose split leaves nothing to evaluate on: training selects the best model by
    eval loss and scores eval replies for style, so it needs at least one eval dialogue.

    ``validate`` and ``train`` both call this (through ``prepare_examples``), so a file that
    validates trains, and a file that cannot train is refused before anything is written.
    """
    split = split_dialogues(dialogues, seed, train_frac, eval_cap)
    if split.eval:
        return
    if train_frac >= 1:
        why = "data.train_frac is 1.0, so every dialogue goes to training; set it below 1 (e.g. 0.8)"
    elif eval_cap == 0:
        why = "data.eval_cap is 0; set it to 1 or more"
    elif len(_groups(dialogues)) < 2:
        why = (f"all {len(dialogues)} usable dialogue(s) share their questions (dialogues that share a user turn "
               "stay on one side of the split, so an eval question is never trained on); add dialogues that "
               "ask other questions")
    else:
        why = f"data.eval_cap {eval_cap} is smaller than every group of dialogues left for evaluation; raise it"
    raise DataError(f"{source}: the train/eval split leaves no dialogue to evaluate on: {why}")
