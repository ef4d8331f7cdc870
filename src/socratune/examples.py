"""Training examples from a config: the dialogue file it names (or the bundled sample), loaded,
validated, templated and tokenized with the tokenizer the config names; and the reply prompts
(each dialogue cut before its last bot turn) that generation is scored on.

The data/template layer's entry point for ``train``, ``validate`` and the benchmarks. Importing
it loads no torch or transformers: the tokenizer is loaded when asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config
from .data import Dialogue, ValidationReport, load_dialogues, require_usable
from .split import require_eval_dialogues
from .template import Example, encode_dialogues

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def bundled_data_path() -> Path:
    """The sample dialogues shipped with the package (``assets/sample_dialogues_ja.json``)."""
    from importlib import resources

    return Path(str(resources.files("socratune") / "assets" / "sample_dialogues_ja.json"))


def data_path_for(config: Config) -> Path:
    """The dialogue file a config trains on: ``data.path``, or the bundled sample when unset."""
    return Path(config.data.path) if config.data.path else bundled_data_path()


def load_tokenizer_for(config: Config) -> PreTrainedTokenizerBase:
    """The training tokenizer; for ``tiny`` it is built in memory so nothing is written yet."""
    from .modeling import TINY, load_tokenizer, resolve_model_source
    from .tiny import build_tokenizer, bundled_texts

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
