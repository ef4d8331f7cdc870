"""Preference pairs: the file format, its validation, its persisted split, and making pairs from a
tuned run's own replies (``socratune prefs``).

A pairs file holds one JSON object per line::

    {"prompt": [{"role": "user", "content": "..."}, ...], "chosen": "...", "rejected": "...",
     "scores": {"chosen": {...}, "rejected": {...}, "margin": 0.8}}

``prompt`` is a conversation ending on a user turn (an optional system message first); ``scores``
is optional and only informative. Making pairs: every prompt (by default the user turns of the
run's *training* split, never its eval split) gets ``samples`` sampled replies from the tuned
model; each reply is scored per axis by the style scorer (or an LLM judge), ranked by a weighted
mean of the axes, and the best and the worst make a pair unless their ranking scores differ by
less than ``min_margin``.

Ranking weights live in the run config (``prefs.weights``), defaulting to the profile's
``overall_weights``: the profile describes a persona and is shared by scoring, judging and
evaluation, while which axis to favour when ranking one's own replies is a training choice, so it
belongs with the other training settings and is recorded in the run.

Nothing here imports torch at import time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.config import Config
from ..core.errors import ConfigError, DataError, RunDirError, quote_capped
from ..core.rundir import write_json_atomic
from ..core.scores import AXES
from ..data.dialogues import ROLE_ALIASES, jsonl_lines, refuse_bad_lines
from ..generation.generate import _messages_problem

logger = logging.getLogger("socratune")
PAIRS_SPLIT = "pairs_split.json"


@dataclass(frozen=True)
class Pair:
    line: int  # 1-based line in the pairs file: its id in the split and in error messages
    prompt: list[dict[str, str]]  # ends on a user turn; roles normalised (bot = "assistant")
    chosen: str
    rejected: str

    def prompt_key(self) -> str:
        """Pairs of one conversation stay on one side of the split."""
        return hashlib.sha256(json.dumps(self.prompt, ensure_ascii=False, sort_keys=True).encode()).hexdigest()

    def digest(self) -> str:
        text = json.dumps([self.prompt, self.chosen, self.rejected], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def _pair_problem(item: Any) -> str | None:
    if not isinstance(item, dict):
        return "expected a JSON object with 'prompt', 'chosen' and 'rejected'"
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in item]
    if missing:
        return f"missing {', '.join(repr(k) for k in missing)}"
    if problem := _messages_problem(item["prompt"]):
        return f"'prompt': {problem}"
    for key in ("chosen", "rejected"):
        if not isinstance(item[key], str) or not item[key].strip():
            return f"'{key}' must be a non-empty string"
    if item["chosen"].strip() == item["rejected"].strip():
        return "'chosen' and 'rejected' are the same reply: the pair teaches nothing"
    if "scores" in item and not isinstance(item["scores"], dict):
        return "'scores' must be an object when given"
    return None


def read_pairs(path: str | Path) -> list[Pair]:
    """Every pair of a JSONL file; any bad line makes it a DataError listing ``FILE:LINE: what``
    (all of them, up to ten shown), before a model is loaded or anything is written."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise DataError(f"pairs file {path} does not exist; "
                        f"make one with: socratune prefs RUN --output {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read pairs file {path}: {exc}") from exc
    pairs: list[Pair] = []
    problems: list[str] = []
    for number, value, problem in jsonl_lines(text):
        problem = problem or _pair_problem(value)
        if problem:
            problems.append(f"{path}:{number}: {problem}")
            continue
        prompt = [{"role": ROLE_ALIASES[m["role"]], "content": m["content"]} for m in value["prompt"]]
        pairs.append(Pair(number, prompt, value["chosen"].strip(), value["rejected"].strip()))
    refuse_bad_lines(problems, path, "nothing was trained")
    if not pairs:
        raise DataError(f"{path} holds no pair")
    return pairs


# --- the persisted split of the pairs -----------------------------------------------------------


def split_pairs(pairs: list[Pair], seed: int, eval_frac: float) -> dict[str, Any]:
    """Train / eval line numbers, by prompt (a prompt's pairs stay together), drawn from ``seed``
    through a hash so the split does not depend on the file's order; at least one eval pair when
    ``eval_frac`` > 0 and there are two prompts or more."""
    keys = sorted({p.prompt_key() for p in pairs}, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    n_eval = min(len(keys) - 1, max(1, round(eval_frac * len(keys)))) if eval_frac > 0 else 0
    eval_keys = set(keys[:n_eval])
    return {
        "seed": seed, "eval_frac": eval_frac,
        "train": [p.line for p in pairs if p.prompt_key() not in eval_keys],
        "eval": [p.line for p in pairs if p.prompt_key() in eval_keys],
        "hashes": {str(p.line): p.digest() for p in pairs},
    }


def decide_pairs_split(path: Path, pairs: list[Pair], seed: int, eval_frac: float) -> dict[str, Any]:
    """The split saved in ``path`` when the run continues (refused if the pairs changed), else a new one."""
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        current = {str(p.line): p.digest() for p in pairs}
        if saved.get("hashes") != current:
            changed = sorted(set(saved.get("hashes", {}).items()) ^ set(current.items()))
            lines = sorted({int(line) for line, _ in changed})[:10]
            raise RunDirError(f"the pairs no longer match the split saved in {path} (lines {lines}); "
                              "use the original pairs file, or --overwrite to start a new run")
        return saved
    return split_pairs(pairs, seed, eval_frac)


def save_pairs_split(split: dict[str, Any], path: Path) -> None:
    write_json_atomic(path, split)


def apply_pairs_split(split: dict[str, Any], pairs: list[Pair]) -> tuple[list[Pair], list[Pair]]:
    by_line = {p.line: p for p in pairs}
    return [by_line[n] for n in split["train"]], [by_line[n] for n in split["eval"]]


# --- making pairs ---------------------------------------------------------------------------------


def parse_weights(text: str) -> dict[str, float]:
    """``--weights approach=0.6,logic=0.2`` as a weight per axis (ConfigError naming the part
    that is wrong); axes left out weigh 0, as in ``prefs.weights``."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        axis, sep, value = (piece.strip() for piece in part.partition("="))
        if not sep or axis not in AXES:
            raise ConfigError(f"--weights {quote_capped(part.strip())}: expected AXIS=NUMBER with AXIS one of "
                              f"{', '.join(AXES)} (e.g. --weights approach=0.6,logic=0.2,tone=0.1,format=0.1)",
                              key="--weights")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not 0 <= weight < float("inf"):
            raise ConfigError(f"--weights {axis}: {quote_capped(value)} is not a non-negative number", key="--weights")
        weights[axis] = weight
    if not any(weights.values()):
        raise ConfigError("--weights: at least one axis needs a positive weight", key="--weights")
    return weights


def ranking_weights(weights: dict[str, float] | None, profile: Any) -> dict[str, float]:
    """``prefs.weights`` when set, else the profile's ``overall_weights``; axes left out weigh 0."""
    chosen = weights if weights is not None else profile.overall_weights.model_dump()
    full = {axis: float(chosen.get(axis, 0.0)) for axis in AXES}
    if sum(full.values()) <= 0 or any(v < 0 for v in full.values()):
        raise DataError(f"prefs.weights must be non-negative with a positive sum, got {full}")
    return full


def rank_score(axes: dict[str, float | None], weights: dict[str, float]) -> float | None:
    """Weighted mean of the axes (0-4); None when an axis with weight is missing (a judge gave no score)."""
    if any(axes.get(a) is None for a, w in weights.items() if w > 0):
        return None
    return sum(w * float(axes[a]) for a, w in weights.items() if w > 0) / sum(weights.values())


def best_and_worst(prompt: list[dict[str, str]], replies: list[str], axes: list[dict[str, float | None]],
                   weights: dict[str, float], min_margin: float) -> dict[str, Any] | None:
    """The pair line for one prompt's scored replies, or None when no two distinct replies are
    ranked at least ``min_margin`` apart. Ties keep the earlier sample (deterministic)."""
    ranked = [(rank_score(a, weights), i) for i, a in enumerate(axes)]
    ranked = [(s, i) for s, i in ranked if s is not None and replies[i].strip()]
    if len(ranked) < 2:
        return None
    best = max(ranked, key=lambda t: (t[0], -t[1]))
    worst = min(ranked, key=lambda t: (t[0], t[1]))
    margin = best[0] - worst[0]
    if margin < min_margin or replies[best[1]].strip() == replies[worst[1]].strip():
        return None
    return {"prompt": prompt, "chosen": replies[best[1]], "rejected": replies[worst[1]],
            "scores": {"chosen": {**axes[best[1]], "rank": round(best[0], 4)},
                       "rejected": {**axes[worst[1]], "rank": round(worst[0], 4)},
                       "margin": round(margin, 4)}}


@dataclass
class PairsResult:
    pairs: list[dict[str, Any]]
    prompts: int
    replies: int
    dropped_below_margin: int
    weights: dict[str, float]


def finished_run_config(run_path: str | Path) -> Config:
    """The recorded config of a finished run, read without loading (or building) its model.

    RunDirError unless ``run_path`` is a run directory with a final adapter: a missing path, a
    file, a directory that is not a run and an unfinished run are each named; a bad recorded
    config is a ConfigError naming it. Nothing is written."""
    from ..core.config import config_from_dict, read_yaml_file
    from ..core.rundir import CONFIG_YAML, RunDir

    run = RunDir(run_path)
    if not run.path.is_dir():
        what = "does not exist" if not run.path.exists() else "is not a directory"
        raise RunDirError(f"run directory {run.path} {what}")
    config_path = run / CONFIG_YAML
    if not config_path.is_file():
        raise RunDirError(f"{run.path} is not a run directory (no {CONFIG_YAML}); a run directory is what "
                          "`socratune train --output DIR` creates")
    config = config_from_dict(read_yaml_file(config_path, "the run's config"), str(config_path))
    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise RunDirError(f"{run.path} has no final adapter: its training has not finished "
                          f"(socratune status {run.path}; resume with socratune train --output {run.path})")
    return config


def training_prompts(run_path: str | Path) -> list[list[dict[str, str]]]:
    """The run's training split as reply prompts: each training dialogue cut before its last bot
    turn. The eval split is never used: pairs from it would leak into what evaluation measures."""
    from ..core.rundir import SPLIT, RunDir
    from ..data.dialogues import load_dialogues
    from ..data.split import apply_split, load_split
    from .examples import bundled_data_path, reply_prompts

    run = RunDir(run_path)
    config = finished_run_config(run.path)
    if not (run / SPLIT).exists():
        raise RunDirError(f"{run.path} has no {SPLIT}: not a supervised run directory")
    data_path = Path(config.data.path) if config.data.path else bundled_data_path()
    report = load_dialogues(data_path)
    train_dialogues, _ = apply_split(load_split(run / SPLIT), report.kept)
    return reply_prompts(train_dialogues)


def make_pairs(model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], *, samples: int, params: Any,
               seed: int, weights: dict[str, float], min_margin: float, scorer: Any = None, judge: Any = None,
               batch_size: int = 16) -> PairsResult:
    """Sample ``samples`` replies per prompt (seeded, batched), score them with ``judge`` when
    given (its per-axis ratings) else with ``scorer``, and keep best-vs-worst pairs."""
    import torch

    from ..generation.generate import generate_replies

    repeated = [p for p in prompts for _ in range(samples)]
    torch.manual_seed(seed)

    def progress(done: int, total: int) -> None:
        logger.info("prefs: sampled %d of %d replies", done, total)

    replies = generate_replies(model, tokenizer, repeated, params, batch_size, progress)
    users = [p[-1]["content"] for p in repeated]
    if judge is not None:
        verdicts = judge.rate_many(list(zip(replies, users)))
        axes = [{a: v.scores.get(a) for a in AXES} for v in verdicts]
    else:
        axes = [{a: s.axes()[a] for a in AXES} for s in (scorer.score(r, u) for r, u in zip(replies, users))]
    pairs, dropped = [], 0
    for index, prompt in enumerate(prompts):
        block = slice(index * samples, (index + 1) * samples)
        pair = best_and_worst(prompt, replies[block], axes[block], weights, min_margin)
        if pair is None:
            dropped += 1
        else:
            pairs.append(pair)
    return PairsResult(pairs, len(prompts), len(replies), dropped, weights)
