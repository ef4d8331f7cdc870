"""Training examples from a config: the dialogue file it names (or the bundled sample), loaded,
validated, templated and tokenized with the tokenizer the config names; and the reply prompts
(each dialogue cut before its last bot turn) that generation is scored on.

The data/template layer's entry point for ``train``, ``validate`` and the benchmarks. Importing
it loads no torch or transformers: the tokenizer is loaded when asked for.

Also the data steps of supervised training (``prepare_supervised``, ``write_supervised_split``,
``supervised_data``) and ``TrainingData``, what any method's data step hands the recipe: the
recipe (train.py) runs them for ``train.method: sft``; preference.py has the pairs' counterparts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.config import Config
from ..core.rundir import REJECTED, SPLIT, RunDir
from ..data.dialogues import (
    Dialogue,
    ValidationReport,
    dataset_fingerprint,
    load_dialogues,
    require_usable,
    write_rejections,
)
from ..data.split import apply_split, load_split, require_eval_dialogues, save_split, split_for_run
from ..data.template import Example, encode_dialogues

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("socratune")
# The prompt a bundle is checked on when the data holds no eval prompt to answer.
FALLBACK_PROMPT = [{"role": "user", "content": "幸福とは何だろうか？"}]


@dataclass
class TrainingData:
    """What a training method's data step hands the recipe once the split is on disk. The
    recipe passes ``train`` and ``eval`` to the method's Trainer without looking inside, so
    dialogues' examples and preference pairs' features travel the same way."""

    train: list[Any]
    eval: list[Any]
    eval_conversations: list[list[dict[str, str]]]  # held-out prompts the style callback answers
    sample_prompt: list[dict[str, str]]  # the conversation the saved bundle answers as its check
    record: dict[str, Any]  # how training_config.json describes the data (merged into it)


def bundled_data_path() -> Path:
    """The sample dialogues shipped with the package (``assets/sample_dialogues_ja.json``)."""
    from importlib import resources

    return Path(str(resources.files("socratune") / "assets" / "sample_dialogues_ja.json"))


def data_path_for(config: Config) -> Path:
    """The dialogue file a config trains on: ``data.path``, or the bundled sample when unset."""
    return Path(config.data.path) if config.data.path else bundled_data_path()


def load_tokenizer_for(config: Config) -> PreTrainedTokenizerBase:
    """The training tokenizer; for ``tiny`` it is built in memory so nothing is written yet."""
    from ..model.modeling import TINY, load_tokenizer, resolve_model_source
    from ..model.tiny import build_tokenizer, bundled_texts

    if config.model.name_or_path == TINY:
        return build_tokenizer(bundled_texts())
    return load_tokenizer(resolve_model_source(config.model.name_or_path, Path()), config.model.trust_remote_code)


def prepare_examples(config: Config, tokenizer: PreTrainedTokenizerBase) -> tuple[ValidationReport, list[Example]]:
    """Load, validate and tokenize the data; raises DataError when nothing usable is left."""
    data_path = data_path_for(config)
    report = load_dialogues(data_path)
    require_usable(report)
    examples, rejections = encode_dialogues(
        tokenizer, report.kept, str(data_path), config.data.max_seq_len, config.data.loss_on
    )
    report.add_rejections(rejections)
    require_usable(report)
    # validate and train both come here, so a file that validates trains: refuse, before anything
    # is written, data whose split would leave nothing to evaluate on (split.require_eval_dialogues).
    require_eval_dialogues(report.kept, config.data.split_seed, config.data.train_frac, config.data.eval_cap,
                           report.source)
    return report, examples


def reply_prompts(dialogues: list[Dialogue]) -> list[list[dict[str, str]]]:
    """Each dialogue cut before its last bot turn: the conversation a reply is generated for."""
    return [d.messages()[:-1] for d in dialogues]


# --- the data steps of supervised training (train.method: sft) ---------------------------------


def prepare_supervised(config: Config, tokenizer: PreTrainedTokenizerBase) -> tuple[ValidationReport, list[Example]]:
    """``prepare_examples``, its report logged; writes nothing."""
    report, examples = prepare_examples(config, tokenizer)
    logger.info(report.summary())
    return report, examples


def write_supervised_split(run: RunDir, config: Config, prepared: tuple[ValidationReport, list[Example]]) -> None:
    """The rejected rows and the dialogues' train/eval split (the saved one when the run
    continues) in the run directory. Main process only."""
    report, _ = prepared
    write_rejections(report.rejections, run / REJECTED)
    split = split_for_run(run / SPLIT, report.kept, config.data.split_seed, config.data.train_frac,
                          config.data.eval_cap)
    save_split(split, run / SPLIT)
    logger.info("split: %d train, %d eval, %d held out (seed %d)",
                len(split.train), len(split.eval), len(split.held_out), split.seed)


def supervised_data(run: RunDir, config: Config, prepared: tuple[ValidationReport, list[Example]]) -> TrainingData:
    """The persisted split applied to the examples (every process reads the same file)."""
    report, examples = prepared
    split = load_split(run / SPLIT)
    train_dialogues, eval_dialogues = apply_split(split, report.kept)
    by_id = {e.dialogue_id: e for e in examples}
    conversations = reply_prompts(eval_dialogues)
    record = {"data": {
        "path": report.source,
        "fingerprint": dataset_fingerprint(report.source),
        "counts": report.counts(),
        "split": {"seed": split.seed, "train": len(split.train), "eval": len(split.eval),
                  "held_out": len(split.held_out)},
    }}
    return TrainingData([by_id[d.id] for d in train_dialogues], [by_id[d.id] for d in eval_dialogues],
                        conversations, conversations[0] if conversations else FALLBACK_PROMPT, record)
