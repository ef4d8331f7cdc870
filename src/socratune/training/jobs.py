"""The records that the recipe (train.py) hands to a training method, shared by supervised and
preference training alike, so that neither imports the other: a ``Method`` (the steps where one
``train.method`` differs), a ``FitJob`` (what the run prepared) and a ``BuiltModel`` (what is
trained, and where). Pure records: nothing here imports torch or transformers when loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

    from ..core.config import Config
    from ..core.rundir import RunDir
    from ..model.modeling import Hardware
    from .callbacks import TrainingMonitorCallback
    from .distributed import Ranks
    from .examples import TrainingData


@dataclass
class FitJob:
    """What steps 1-3 prepared for the fit: the run, its validated data split for the Trainer, and
    the checkpoint it resumes from (None: a fresh start)."""

    config: Config
    method: Method
    run: RunDir
    ranks: Ranks
    tokenizer: PreTrainedTokenizerBase
    prepared: Any  # what the method's ``prepare`` step returned
    data: TrainingData
    fingerprint: str  # of the data file the run is bound to
    resume: Path | None
    started: float  # perf_counter() at the start of ``train``


@dataclass
class BuiltModel:
    """The model being trained and where it runs."""

    model: PeftModel
    source: str  # the base model's directory or hub id
    hardware: Hardware
    engine: str | None  # "fsdp", "deepspeed" or None (sharding_engine())
    sharded: bool  # its tensors are sharded over the processes (FSDP / ZeRO-3 on GPUs)


@dataclass(frozen=True)
class Method:
    """The steps where one ``train.method`` differs from another; ``train`` runs all the rest the
    same way for every method. Numbers are the recipe's steps."""

    data_path: Callable[[Config], Path]  # 0. the file the run is bound to; refuses a config it cannot run
    prepare: Callable[[Config, PreTrainedTokenizerBase], Any]  # 2. load, validate, tokenize: writes nothing
    write_split: Callable[[RunDir, Config, Any], None]  # 3. the split on disk (main process)
    read_split: Callable[[RunDir, Config, Any], TrainingData]  # 3. the persisted split applied (every process)
    adapter: Callable[[Config, PreTrainedModel, bool], PeftModel]  # 4. the trained adapter on the base
    monitor: type[TrainingMonitorCallback]  # 5. metrics.csv and plots
    make_trainer: Callable[[FitJob, BuiltModel, list[TrainerCallback]], Trainer]  # 5. data and loss
    summary: Callable[[Config, Trainer], dict[str, Any]]  # 7. what the method adds to the summary
    selection: Callable[[Config], str]  # 5, 7. the rule that picks the step whose weights are kept
