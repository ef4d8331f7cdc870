"""How Socratic is the tuned model? Base vs tuned vs checkpoints on held-out prompts: this module
runs the models; the statistics, plots and markdown of the report are pure functions in
``report.py``.

``socratune evaluate RUN`` follows these steps (``evaluate()``):

1. Prompts: the bundled 40 held-out questions (``assets/eval_prompts_ja.jsonl``, none from the
   training sample) or ``--prompts FILE`` (JSONL ``{"id", "prompt", "followups"?}``); the models:
   the untuned base, each selected checkpoint (oldest first) and the final adapter, one per
   distinct set of weights (a checkpoint identical to the final adapter, by a hash of the adapter
   tensors, is listed as its alias rather than evaluated twice).
2. Replies: the base is loaded once and answers first; then each adapter is loaded onto that same
   base with PEFT (``load_adapter``/``set_adapter``), answers, and is dropped again. Greedy
   decoding, batched, seeded: the same command gives the same replies.
3. ``--turns N`` continues every dialogue N more exchanges with a scripted user: at turn k the
   user says the prompt's own k-th ``followups`` line when it has one, else line k of the bundled
   script ``assets/eval_followups_ja.txt`` (cycling), so every model hears the same user.
4. Every reply is scored by the style scorer against the user message it answers, and, with
   ``--judge``, rated by an LLM judge (``judge.py``).
5. Statistics (report.py), with the dialogue as the unit (its score = the mean of its replies): per model
   and axis the mean with a 95% percentile-bootstrap interval; tuned vs base a paired Wilcoxon
   signed-rank test (one-sided: tuned higher) with the matched-pairs rank-biserial correlation as
   effect size; scorer-judge agreement as Spearman's rho per axis over all replies.
6. The report (``report.md``, ``evaluation.json`` with every number and reply, PNG plots) is
   written into a staging folder that replaces ``RUN/evaluation`` by renames; an earlier report
   is kept, renamed ``RUN/evaluation-<its creation time>``, never overwritten.

Tests: ``pytest tests/test_evaluate.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import ConfigError, DataError, RunDirError
from ..core.rundir import (
    CHECKPOINT_PREFIX,
    RunDir,
    checkpoint_problem,
    checkpoint_step,
    write_json_atomic,
    write_text_atomic,
)
from ..data.dialogues import jsonl_lines
from ..generation.generate import GenParams
from ..style import StyleProfile, StyleScorer, load_profile
from ..style.calibrate import JUDGED_JSONL, write_judged_jsonl
from .judge import Judge
from .report import (
    BOOTSTRAP_RESAMPLES,
    CONFIDENCE,
    EVALUATION_JSON,
    REPORT_MD,
    compute_statistics,
    plot_report,
    render_report,
)

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger("socratune")

EVALUATION_DIR = "evaluation"  # RUN/evaluation; the files inside are named in report.py
FORMAT_VERSION = 1
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# --- prompts and the scripted user ------------------------------------------------------------


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    prompt: str
    followups: tuple[str, ...] = ()


def load_prompts(path: str | Path | None = None) -> list[EvalPrompt]:
    """Prompts from a JSONL file (``{"id", "prompt", "followups"?}``), or the bundled set."""
    if path is None:
        source, text = "bundled eval_prompts_ja.jsonl", (
            resources.files("socratune") / "assets" / "eval_prompts_ja.jsonl").read_text(encoding="utf-8")
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read prompts {source}: {exc}") from exc
    prompts: list[EvalPrompt] = []
    problems: list[str] = []
    for number, item, problem in jsonl_lines(text):
        if problem:
            problems.append(f"{source}:{number}: {problem}")
            continue
        followups = item.get("followups", []) if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            problems.append(f"{source}:{number}: needs a non-empty string 'prompt'")
        elif not (isinstance(followups, list) and all(isinstance(f, str) and f.strip() for f in followups)):
            problems.append(f"{source}:{number}: 'followups' must be a list of non-empty strings")
        else:
            prompts.append(EvalPrompt(str(item.get("id", number)), item["prompt"].strip(),
                                      tuple(f.strip() for f in followups)))
    duplicates = sorted({p.id for p in prompts if [q.id for q in prompts].count(p.id) > 1})
    if duplicates:
        problems.append(f"{source}: duplicate ids {', '.join(duplicates)}")
    if problems:
        raise DataError("\n".join(problems))
    if not prompts:
        raise DataError(f"{source}: no prompts")
    return prompts


def followup_script() -> list[str]:
    """The scripted user's lines, in order (``assets/eval_followups_ja.txt``)."""
    text = (resources.files("socratune") / "assets" / "eval_followups_ja.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def followup(prompt: EvalPrompt, turn: int, script: list[str]) -> str:
    """What the user says at ``turn`` (1 = the first follow-up)."""
    if turn <= len(prompt.followups):
        return prompt.followups[turn - 1]
    return script[(turn - 1) % len(script)]


# --- the models compared ----------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """One model under evaluation: the base, a checkpoint or the final adapter."""

    name: str
    kind: str  # "base", "checkpoint", "supervised" (the run a preference run continued) or "tuned"
    step: int | None
    adapter: Path | None
    aliases: tuple[str, ...] = ()  # other models with exactly these weights (not evaluated again)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "step": self.step,
                "adapter": str(self.adapter) if self.adapter else None, "aliases": list(self.aliases)}


def adapter_fingerprint(adapter: Path) -> str | None:
    """A hash of an adapter's tensors (names, dtypes, shapes and bytes) read from its safetensors
    file, independent of the file's metadata; None when the file is missing or unreadable."""
    path = adapter / ADAPTER_WEIGHTS
    try:
        with path.open("rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size))
            data_start = 8 + header_size
            digest = hashlib.sha256()
            for name in sorted(k for k in header if k != "__metadata__"):
                entry = header[name]
                begin, end = entry["data_offsets"]
                handle.seek(data_start + begin)
                digest.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
                digest.update(handle.read(end - begin))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return digest.hexdigest()


def merge_identical(subjects: list[Subject]) -> list[Subject]:
    """One subject per distinct adapter: a model whose weights equal another's becomes that one's
    alias instead of a second row. The final adapter (last in ``subjects``) stays, since the
    comparisons are against it, and takes the step of the checkpoint it equals; among
    checkpoints the earliest stays."""
    *others, tuned = subjects
    fingerprints = {s.name: adapter_fingerprint(s.adapter) for s in subjects if s.adapter is not None}
    tuned_fingerprint = fingerprints.get(tuned.name)
    tuned_aliases, tuned_step = [], tuned.step
    kept: list[Subject] = []
    position: dict[str, int] = {}  # fingerprint -> index in kept
    for subject in others:
        fingerprint = fingerprints.get(subject.name)
        if fingerprint is not None and fingerprint == tuned_fingerprint:
            tuned_aliases.append(subject.name)
            tuned_step = subject.step
        elif fingerprint is not None and fingerprint in position:
            keeper = kept[position[fingerprint]]
            kept[position[fingerprint]] = replace(keeper, aliases=(*keeper.aliases, subject.name))
        else:
            if fingerprint is not None:
                position[fingerprint] = len(kept)
            kept.append(subject)
    return [*kept, replace(tuned, step=tuned_step, aliases=tuple(tuned_aliases))]


def select_subjects(run: RunDir, checkpoints: str = "all") -> tuple[list[Subject], list[dict[str, str]]]:
    """Base, the chosen checkpoints and the tuned model, plus checkpoints skipped and why.

    ``checkpoints`` is ``all``, ``none`` or names separated by commas (``checkpoint-80`` or
    ``80``). With ``all`` an incomplete checkpoint is skipped with its reason; one named
    explicitly must be complete.
    """
    if not (run.adapter_dir / "adapter_config.json").exists():
        raise RunDirError(f"{run.path} has no final adapter: the run is not finished "
                          f"(socratune status {run.path} tells where it stands)")
    present = {p.name: p for p in run.checkpoints()}
    spec = checkpoints.strip()
    chosen: list[Path] = []
    if spec == "all":
        chosen = list(present.values())
    elif spec != "none":
        for raw in (s.strip() for s in spec.split(",")):
            name = raw if raw.startswith(CHECKPOINT_PREFIX) else f"{CHECKPOINT_PREFIX}{raw}"
            if name not in present:
                raise ConfigError(f"--checkpoints: {run.checkpoints_dir} has no {raw or '(empty name)'}; "
                                  f"allowed: all, none, {', '.join(present) or '(no checkpoints)'}",
                                  key="--checkpoints", allowed=["all", "none", *present])
            chosen.append(present[name])
    subjects, skipped = [Subject("base", "base", 0, None)], []
    for path in sorted(dict.fromkeys(chosen), key=lambda p: checkpoint_step(p) or 0):
        problem = checkpoint_problem(path)
        if problem and spec != "all":
            raise RunDirError(f"{path} cannot be evaluated: {problem}")
        if problem:
            skipped.append({"name": path.name, "reason": problem})
            logger.warning("skipping %s: %s", path.name, problem)
        else:
            subjects.append(Subject(path.name, "checkpoint", checkpoint_step(path), path))
    summary = run.summary() or {}
    selected_step = (summary.get("selected") or {}).get("step", summary.get("global_step"))
    supervised = supervised_subject(run)
    if supervised is not None:
        subjects.append(supervised)
    subjects.append(Subject("tuned", "tuned", selected_step, run.adapter_dir))
    return merge_identical(subjects), skipped


def supervised_subject(run: RunDir) -> Subject | None:
    """A preference-tuned run (DPO / ORPO) is compared with the supervised run it continued
    (``prefs.from_run``) as well as with the base; None for a supervised run."""
    from ..training.resume import read_recorded_config

    prefs = (read_recorded_config(run) or {}).get("prefs") or {}
    if not prefs.get("from_run"):
        return None
    source = RunDir(prefs["from_run"])
    if not (source.adapter_dir / "adapter_config.json").exists():
        raise RunDirError(f"{run.path} continued the supervised run {source.path}, whose final adapter is gone; "
                          "restore it to compare, or evaluate the supervised run on its own")
    return Subject("supervised", "supervised", (source.summary() or {}).get("global_step"), source.adapter_dir)


# --- generation -------------------------------------------------------------------------------


def converse(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, prompts: list[EvalPrompt],
             turns: int, script: list[str], params: GenParams, batch_size: int) -> list[list[dict[str, str]]]:
    """Each prompt's dialogue: the model's reply, then ``turns`` more scripted exchanges."""
    from ..data.dialogues import BOT
    from ..generation.generate import generate_replies

    dialogues = [[{"role": "user", "content": p.prompt}] for p in prompts]
    for turn in range(turns + 1):
        if turn:
            for dialogue, prompt in zip(dialogues, prompts):
                dialogue.append({"role": "user", "content": followup(prompt, turn, script)})
        replies = generate_replies(model, tokenizer, dialogues, params, batch_size)
        for dialogue, reply in zip(dialogues, replies):
            dialogue.append({"role": BOT, "content": reply})
    return dialogues


def generate_dialogues(run: RunDir, subjects: list[Subject], prompts: list[EvalPrompt], turns: int,
                       script: list[str], params: GenParams, batch_size: int,
                       seed: int) -> dict[str, list[list[dict]]]:
    """Dialogues of every subject; the base is loaded once and adapters are swapped on it."""
    import torch

    from ..model.memory import release_memory
    from ..model.modeling import load_adapter_for_inference, load_for_inference

    base, tokenizer = load_for_inference(run.path, base_only=True)
    model, loaded = base, None
    dialogues: dict[str, list[list[dict]]] = {}
    for number, subject in enumerate(subjects, 1):
        logger.info("evaluate: replies of %s (%d of %d models, %d prompts, %d turn(s))",
                    subject.name, number, len(subjects), len(prompts), turns + 1)
        if subject.adapter is not None:
            # Adapters are swapped on the one base: PeftModel wraps it on the first, later ones
            # are loaded beside it, activated, and the previous one deleted (memory stays flat).
            if loaded is None:
                model = load_adapter_for_inference(base, subject.adapter)
                loaded = "default"
            else:
                model.load_adapter(str(subject.adapter), adapter_name=subject.name)
                model.set_adapter(subject.name)
                model.delete_adapter(loaded)
                loaded = subject.name
        torch.manual_seed(seed)
        dialogues[subject.name] = converse(model, tokenizer, prompts, turns, script, params, batch_size)
    del model, base
    release_memory()
    return dialogues


# --- scoring and the numbers of the report ----------------------------------------------------


def score_dialogues(dialogues: dict[str, list[list[dict]]], prompts: list[EvalPrompt],
                    scorer: StyleScorer) -> list[dict[str, Any]]:
    """One record per reply: model, prompt id, turn, the user line it answers, reply, scores."""
    records = []
    for model, model_dialogues in dialogues.items():
        for prompt, dialogue in zip(prompts, model_dialogues):
            for turn, index in enumerate(range(1, len(dialogue), 2)):
                user, reply = dialogue[index - 1]["content"], dialogue[index]["content"]
                score = scorer.score(reply, user)
                records.append({"model": model, "prompt_id": prompt.id, "turn": turn, "user": user,
                                "reply": reply, "scores": score.axes(), "explanations": score.explanations})
    return records


# --- the command ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationResult:
    folder: Path  # RUN/evaluation
    previous: Path | None  # where an earlier report was moved, if there was one
    data: dict[str, Any]  # the content of evaluation.json


def _publish(staged: Path, final: Path) -> Path | None:
    """Move ``staged`` to ``final``; an existing report is first renamed after its creation time."""
    previous = None
    if final.exists():
        try:
            created = json.loads((final / EVALUATION_JSON).read_text(encoding="utf-8"))["created"]
            stamp = datetime.fromisoformat(created).strftime("%Y%m%dT%H%M%S")
        except (OSError, ValueError, KeyError, TypeError):
            stamp = datetime.fromtimestamp(final.stat().st_mtime).strftime("%Y%m%dT%H%M%S")
        previous = final.with_name(f"{final.name}-{stamp}")
        suffix = 1
        while previous.exists():
            suffix += 1
            previous = final.with_name(f"{final.name}-{stamp}-{suffix}")
        os.replace(final, previous)
    os.replace(staged, final)
    return previous


def evaluate(run_dir: str | Path, *, prompts_path: str | Path | None = None, limit: int | None = None,
             checkpoints: str = "all", turns: int = 0, max_new_tokens: int = 128, batch_size: int = 8,
             seed: int = 0, profile: StyleProfile | str | Path | None = None, judge: Judge | None = None,
             judge_workers: int = 4) -> EvaluationResult:
    """Run the whole evaluation of one run directory and write its report (see the module doc).

    ``judge`` also rates every reply when given. Holds the run's lock, so it never runs beside
    training or another evaluation of the same run.
    """
    run = RunDir(run_dir)
    if not run.exists():
        raise RunDirError(f"{run.path} does not exist")
    for flag, value, least in (("--turns", turns, 0), ("--max-new-tokens", max_new_tokens, 1),
                               ("--batch-size", batch_size, 1), ("--limit", limit or 1, 1)):
        if value < least:
            raise ConfigError(f"{flag} must be at least {least}, got {value}", key=flag)
    style_profile = profile if isinstance(profile, StyleProfile) else load_profile(profile or "socrates")
    prompts = load_prompts(prompts_path)[:limit]
    script = followup_script()
    params = GenParams(max_new_tokens=max_new_tokens)
    with run.lock():
        subjects, skipped = select_subjects(run, checkpoints)
        dialogues = generate_dialogues(run, subjects, prompts, turns, script, params, batch_size, seed)
        records = score_dialogues(dialogues, prompts, StyleScorer(style_profile))
        if judge is not None:
            logger.info("evaluate: the LLM judge rates %d replies", len(records))
            verdicts = judge.rate_many([(r["reply"], r["user"]) for r in records], workers=judge_workers)
            for record, verdict in zip(records, verdicts):
                record["judge"] = verdict.as_dict()
        data = {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_dir": str(run.path),
            "prompts": {"source": str(prompts_path) if prompts_path else "bundled eval_prompts_ja.jsonl",
                        "count": len(prompts)},
            "turns": turns,
            "followup_script": script,
            "generation": {**asdict(params), "batch_size": batch_size, "seed": seed},
            "profile": style_profile.name,
            "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "level": CONFIDENCE, "seed": seed},
            "unit": "dialogue: the mean of its replies",
            "models": [s.as_dict() for s in subjects],
            "skipped_checkpoints": skipped,
            "judge": None if judge is None else {
                **judge.describe(), "replies": len(records),
                "missing_replies": sum(r["judge"]["error"] is not None for r in records)},
            "statistics": compute_statistics(records, [s.name for s in subjects], seed, judge is not None),
            "replies": records,
        }
        final = run / EVALUATION_DIR
        staged = run / f".{EVALUATION_DIR}.staging"  # under the lock: ours alone; a crash leaves it
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir()
        try:
            plot_report(records, data["models"], data["statistics"], staged, run.path.name,
                        next(s.step for s in subjects if s.kind == "tuned"))
            write_json_atomic(staged / EVALUATION_JSON, data)
            if judge is not None:  # judge once, then calibrate and score offline (docs/style.md)
                write_judged_jsonl(records, staged / JUDGED_JSONL)
            write_text_atomic(staged / REPORT_MD, render_report(data))
            previous = _publish(staged, final)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    if previous:
        logger.info("evaluate: the previous report was kept as %s", previous)
    return EvaluationResult(final, previous, data)
