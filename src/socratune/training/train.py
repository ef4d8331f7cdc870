"""THE training recipe, read top to bottom: ``train(config)`` is the only place that wires the
components together. Its steps are numbered below; ``fit_and_save`` runs steps 4-8, each a named
function over a ``FitJob`` (what the run prepared) and a ``BuiltModel`` (both in jobs.py).

Nothing is written before the data has been validated and tokenized, so bad input leaves the
disk untouched. Progress goes to the ``socratune`` logger (the CLI shows it; ``train.log`` in
the run directory keeps it); nothing here prints or exits.

Every ``train.method`` runs this one recipe: run management (new / resume / finished, the lock,
``--overwrite`` undone when a start fails), selection of the final step, saving and checking the
bundle. Where methods must differ (their data, the adapter they start from, their Trainer, what
their summary adds) the recipe calls the ``Method`` steps that ``METHODS`` names for them:
supervised fine-tuning's from examples.py and here, preference tuning's from preference.py.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft.utils import SAFETENSORS_WEIGHTS_NAME
from transformers import Trainer, TrainerCallback, set_seed

from ..core.config import Config, dump_yaml
from ..core.errors import TrainingInterrupted
from ..core.rundir import (
    CONFIG_YAML,
    LOG,
    MANIFEST,
    METRICS,
    PLOTS,
    SUMMARY,
    TRAINING_CONFIG,
    RunDir,
    checkpoint_step,
    replace_dir_atomic,
    write_json_atomic,
    write_text_atomic,
)
from ..data.dialogues import dataset_fingerprint
from ..data.template import show_example
from ..generation.generate import GenParams, generate_replies
from ..model.memory import resource_usage
from ..model.modeling import (
    add_configured_lora,
    check_saved_adapter,
    detect_hardware,
    load_configured_base,
    load_for_inference,
    resolve_model_source,
)
from ..style import StyleScorer, load_profile
from .callbacks import (
    BestCheckpointCallback,
    CheckpointCallback,
    EarlyStopCallback,
    StopOnSignal,
    StyleCallback,
    TrainingMonitorCallback,
)
from .distributed import Ranks, sharding_engine
from .examples import (
    data_path_for,
    load_tokenizer_for,
    prepare_supervised,
    supervised_data,
    write_supervised_split,
)
from .hf_trainer import adapter_state_for_saving, build_trainer, summarize_run, training_record
from .jobs import BuiltModel, FitJob, Method
from .preference import (
    PreferenceMonitorCallback,
    make_preference_trainer,
    pairs_data,
    pairs_path_for,
    preference_summary,
    prepare_pairs,
    supervised_adapter,
    write_pairs_split,
)
from .progress import ProgressCallback
from .resume import StartPlan, move_aside, plan_start, prepare_resume, record_start, start_guard
from .selection import EarlyStop, Selected, early_stop, select_step

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("socratune")


@dataclass
class TrainResult:
    """What a ``train`` call did; the CLI turns it into the closing lines."""

    run_dir: Path
    already_finished: bool
    summary: dict[str, Any]
    sample_prompt: str | None = None
    sample_reply: str | None = None
    notes: list[str] = field(default_factory=list)
    main_process: bool = True  # False on the other processes of a distributed run: they print nothing


def make_supervised_trainer(job: FitJob, built: BuiltModel, callbacks: list[TrainerCallback]) -> Trainer:
    """socratune's Trainer over the dialogues' examples (next-token loss on the trained tokens)."""
    return build_trainer(job.config, built.hardware, built.model, job.tokenizer, job.run.checkpoints_dir,
                         job.data.train, job.data.eval, callbacks=callbacks, fresh=job.resume is None)


def configured_selection(config: Config) -> str:
    """A supervised run keeps the step ``train.select`` names (docs/selection.md)."""
    return config.train.select


def last_step(config: Config) -> str:
    """A preference run keeps its last step: its eval loss falls as the margin grows even while the
    model drifts from the supervised one, and its style score is the reward itself on a few
    replies, so neither can pick a step (docs/selection.md); β and the run's length are the limit."""
    return "last"


def nothing_to_add(config: Config, trainer: Trainer) -> dict[str, Any]:
    """A supervised run's summary is the shared one."""
    return {}


SUPERVISED = Method(data_path_for, prepare_supervised, write_supervised_split, supervised_data, add_configured_lora,
                    TrainingMonitorCallback, make_supervised_trainer, nothing_to_add, configured_selection)
PREFERENCE = Method(pairs_path_for, prepare_pairs, write_pairs_split, pairs_data, supervised_adapter,
                    PreferenceMonitorCallback, make_preference_trainer, preference_summary, last_step)
METHODS = {"sft": SUPERVISED, "dpo": PREFERENCE, "orpo": PREFERENCE}


def train(config: Config, *, resume_from: str | None = None, show_example_first: bool = False,
          overwrite: bool = False, delete_old: bool = False, allow_config_change: bool = False) -> TrainResult:
    """Run, resume, continue or recognise as finished the training described by ``config``.

    ``overwrite`` moves an existing run aside (``RUN.old-TIMESTAMP``) and starts over;
    ``delete_old`` removes that moved-aside run once the new one has finished.
    Raises RunDirError for a refused start (in use, guarded settings changed), ConfigError for a
    method's missing settings, DataError for unusable data and TrainingInterrupted after
    SIGTERM/SIGINT saved a checkpoint.
    """
    load_profile(config.style.profile)  # a bad style.profile fails here, not after the run directory is written
    started = time.perf_counter()
    method = METHODS[config.train.method]
    data_path = method.data_path(config)
    run = RunDir(config.run.output_dir)
    ranks = Ranks.from_env()  # under torchrun / accelerate launch: main decides and writes, all train
    ranks.start()
    fingerprint = dataset_fingerprint(data_path)

    # 1. New, resume or finished: decided from files on disk, before anything is written.
    plan = ranks.decide(partial(_plan_start, run, config, fingerprint, resume_from, overwrite,
                                allow_config_change, ranks.world_size))
    if plan.kind == "finished":
        return TrainResult(run.path, True, run.summary() or {}, main_process=ranks.is_main)
    for change in plan.guarded_changes:
        logger.warning("continuing with a changed setting (--allow-config-change): %s", change)

    # 2. Data: load, validate, template and tokenize, all before anything is written.
    tokenizer = load_tokenizer_for(config)
    prepared = method.prepare(config, tokenizer)
    moved_aside = ranks.decide(partial(_move_aside_for_overwrite, run, overwrite))

    with start_guard(run, moved_aside, enabled=ranks.is_main), contextlib.ExitStack() as held:
        # 3. The run directory (main process): lock, config and the split on disk before
        #    training; then every process reads the persisted split.
        ranks.decide(partial(_hold_lock, held, run))
        if ranks.is_main:
            held.callback(_detach_log_file, _attach_log_file(run / LOG))
        ranks.decide(partial(_open_run, run, method, plan, config, prepared, data_path, fingerprint,
                             ranks.world_size))
        data = method.read_split(run, config, prepared)
        if show_example_first and ranks.is_main and method is SUPERVISED:  # a templated dialogue, not a pair
            logger.info("example with trained tokens marked ⟦…⟧:\n%s", show_example(tokenizer, data.train[0]))
        job = FitJob(config, method, run, ranks, tokenizer, prepared, data, fingerprint, plan.checkpoint, started)
        result = fit_and_save(job)
    if moved_aside is not None and ranks.is_main and delete_old:
        shutil.rmtree(moved_aside)
        result.notes.append(f"deleted the previous run {moved_aside}")
    elif moved_aside is not None:
        result.notes.append(f"the previous run is kept in {moved_aside}")
    return result


def fit_and_save(job: FitJob) -> TrainResult:
    """Steps 4-8: build the model and the Trainer, train, save the bundle from the selected
    step, and check that it loads."""
    built = build_model(job)
    trainer, stop = make_trainer(job, built)
    fit(job, trainer, stop)
    adapter_state = adapter_state_for_saving(trainer)  # under FSDP / ZeRO-3 every process gathers
    if not job.ranks.is_main:
        return TrainResult(job.run.path, False, {}, main_process=False)
    summary, selected = save_bundle(job, built, trainer, adapter_state)
    return check_bundle(job, built, adapter_state, summary, selected)


# --- steps 1 and 3: the run directory (main process decides, every process gets the outcome) ---


def _plan_start(run: RunDir, config: Config, fingerprint: str, resume_from: str | None, overwrite: bool,
                allow_config_change: bool, world_size: int) -> StartPlan:
    """``--overwrite`` starts anew; otherwise new / resume / finished is read from the run."""
    if overwrite:
        return StartPlan("new")
    return plan_start(run, config.to_dict(), fingerprint, resume_from, allow_config_change, world_size)


def _move_aside_for_overwrite(run: RunDir, overwrite: bool) -> Path | None:
    """Under ``--overwrite``, rename an existing run to ``RUN.old-TIMESTAMP``; returns where."""
    return move_aside(run) if overwrite and run.exists() else None


def _hold_lock(held: contextlib.ExitStack, run: RunDir) -> None:
    """Take the run's lock for as long as ``held`` is open (raises when another process has it)."""
    held.enter_context(run.lock())


def _open_run(run: RunDir, method: Method, plan: StartPlan, config: Config, prepared: Any, data_path: Path,
              fingerprint: str, world_size: int) -> None:
    """Write what the run starts from (main process only), after tidying up for a resume."""
    prepare_resume(run, plan.checkpoint)
    record_start(run, plan, str(data_path), fingerprint, world_size)
    write_text_atomic(run / CONFIG_YAML, dump_yaml(config))
    method.write_split(run, config, prepared)
    if plan.checkpoint:
        logger.info("%s from %s", "continuing the finished run for more epochs" if plan.more_epochs else "resuming",
                    plan.checkpoint)


def _attach_log_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("socratune").addHandler(handler)
    return handler


def _detach_log_file(handler: logging.Handler) -> None:
    logging.getLogger("socratune").removeHandler(handler)
    handler.close()


# --- steps 4-8 ---------------------------------------------------------------------------------


def build_model(job: FitJob) -> BuiltModel:
    """4. The base (4-bit for QLoRA) plus the method's adapter (a fresh LoRA, or the supervised
    one continued), its random parts drawn from the run's seed so two runs of one config start
    from the same weights.

    Under FSDP / ZeRO-3 (GPUs only: on a CPU accelerate runs an FSDP config as plain DDP) the
    model is built so that every tensor can be sharded."""
    config, ranks = job.config, job.ranks
    set_seed(config.train.seed)
    hardware = detect_hardware()
    engine = sharding_engine()
    sharded = engine is not None and hardware.device == "cuda"
    if engine == "fsdp" and not sharded and ranks.is_main:
        logger.warning("FSDP config on a CPU: accelerate shards only on GPUs, so this run is plain data parallel "
                       "(every process holds the whole model)")
    source = ranks.main_first(partial(resolve_model_source, config.model.name_or_path, job.run.base_dir))
    model = job.method.adapter(config, load_configured_base(config, source, hardware, sharded), sharded)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("model %s on %s: %d trainable of %d parameters (%.2f%%); memory before training: %s",
                source, hardware.name, trainable, total, 100 * trainable / total,
                {k: round(v, 1) for k, v in resource_usage().items() if v is not None})
    return BuiltModel(model, source, hardware, engine, sharded)


def make_trainer(job: FitJob, built: BuiltModel) -> tuple[Trainer, StopOnSignal]:
    """5. The method's Trainer over the job's data, with the style, monitor, best-step,
    checkpoint, early-stopping and signal callbacks every method shares."""
    config, run, ranks = job.config, job.run, job.ranks
    select = job.method.selection(config)
    scorer = StyleScorer(load_profile(config.style.profile))
    style = StyleCallback(job.data.eval_conversations[: config.style.eval_samples], scorer,
                          config.style.max_new_tokens, config.train.eval_batch_size,
                          sharded=built.sharded and ranks.distributed, collapse_guard=config.train.method != "sft")
    stop = StopOnSignal(ranks)
    # Order matters: the style numbers are added to an evaluation before the others read it.
    callbacks: list[TrainerCallback] = [
        style,
        job.method.monitor(run / METRICS, run / PLOTS, run.path.name, select),
        BestCheckpointCallback(select, ranks),
        CheckpointCallback(config.train.save_total_limit, ranks, select),
        stop,
        ProgressCallback(),
    ]
    patience = early_stopping_patience(job)
    if patience is not None:
        callbacks.insert(-2, EarlyStopCallback(select, patience, ranks))
    elif config.train.early_stopping_patience is not None and ranks.is_main:
        logger.info("train.early_stopping_patience is not used by %s: a preference run keeps its last step",
                    config.train.method)
    return job.method.make_trainer(job, built, callbacks), stop


def early_stopping_patience(job: FitJob) -> int | None:
    """``train.early_stopping_patience`` where the method selects by a metric; a preference run
    keeps its last step, so nothing can tell it when to stop (docs/selection.md)."""
    patience = job.config.train.early_stopping_patience
    return None if job.method.selection(job.config) == "last" else patience


def stopped_early(job: FitJob, trainer: Trainer) -> EarlyStop | None:
    """Why the run ended before its last planned step, read from the log history as
    ``EarlyStopCallback`` decided it (the same pure rule), else None."""
    state = trainer.state
    decision = early_stop(state.log_history, job.method.selection(job.config), early_stopping_patience(job))
    return decision if decision is not None and decision.step == state.global_step < state.max_steps else None


def fit(job: FitJob, trainer: Trainer, stop: StopOnSignal) -> None:
    """6. Train, from the resume checkpoint when there is one; SIGTERM/SIGINT end it early with a
    checkpoint at the step reached (raises TrainingInterrupted), unless early stopping ended the
    run at that very step: then it is finished."""
    try:
        trainer.train(resume_from_checkpoint=str(job.resume) if job.resume else None)
    finally:
        stop.restore()
    if stop.received is not None and stopped_early(job, trainer) is not None:
        logger.warning("received %s as early stopping ended the run: finishing it", signal.Signals(stop.received).name)
    elif stop.received is not None:
        raise TrainingInterrupted(f"training stopped by {signal.Signals(stop.received).name} at step "
                                  f"{trainer.state.global_step} of {trainer.state.max_steps}; a checkpoint was saved",
                                  stop.received, str(job.run.path), trainer.state.global_step)


def save_bundle(job: FitJob, built: BuiltModel, trainer: Trainer,
                adapter_state: dict[str, torch.Tensor] | None) -> tuple[dict[str, Any], Selected]:
    """7. The final adapter (the selected step's weights) and tokenizer, staged then renamed into
    place; the training config and the summary's numbers. Main process only."""
    config, run = job.config, job.run
    state = trainer.state
    # Closed checkpoints (manifest written) holding a whole adapter file can give the final weights.
    checkpoints = {checkpoint_step(p): p for p in run.checkpoints()
                   if (p / MANIFEST).is_file() and (p / SAFETENSORS_WEIGHTS_NAME).is_file()}
    select = job.method.selection(config)
    selected = select_step(state.log_history, select, state.global_step, checkpoints)
    built.model.save_pretrained(run.staging_dir, state_dict=adapter_state)
    if selected.step != state.global_step:
        # The checkpoint's adapter file holds exactly the weights of that step; copyfile keeps the
        # mode save_pretrained gave the staged file.
        shutil.copyfile(checkpoints[selected.step] / SAFETENSORS_WEIGHTS_NAME,
                        run.staging_dir / SAFETENSORS_WEIGHTS_NAME)
    job.tokenizer.save_pretrained(run.staging_dir)
    replace_dir_atomic(run.staging_dir, run.adapter_dir)
    logger.info("final adapter: the weights of step %d (selection: %s)", selected.step, select)
    summary = summarize_run(state, run / METRICS, built.hardware, time.perf_counter() - job.started)
    summary["epochs"] = config.train.epochs
    summary["selected"] = selected.as_dict()
    ended = stopped_early(job, trainer)
    summary["stopped_early"] = ended.as_dict() if ended else None
    summary["finished"] = summary["finished"] or ended is not None
    summary.update(job.method.summary(config, trainer))
    write_json_atomic(run / TRAINING_CONFIG, training_record(config, built.source, trainer, job.data.record,
                                                             built.hardware))
    return summary, selected


def check_bundle(job: FitJob, built: BuiltModel, adapter_state: dict[str, torch.Tensor] | None,
                 summary: dict[str, Any], selected: Selected) -> TrainResult:
    """8. Reload the saved adapter from disk and answer one held-out prompt: a broken bundle fails
    here. A sharded run's base may not fit one GPU (the reason to shard), and this process still
    holds its share of training: there the saved files are compared with the trained weights."""
    run = job.run
    if built.sharded:
        if selected.step == summary["global_step"]:
            check_saved_adapter(run.adapter_dir, built.model, adapter_state)
            note = (f"the saved adapter matches the trained weights (no sample reply under {built.engine}: "
                    "it needs the whole base)")
        else:
            note = (f"the saved adapter holds checkpoint-{selected.step}'s weights "
                    f"(no sample reply under {built.engine})")
        summary["sample_reply"] = None
        write_json_atomic(run / SUMMARY, summary)
        return TrainResult(run.path, False, summary, notes=[note])
    reloaded, reloaded_tokenizer = load_for_inference(run.path)
    prompt = job.data.sample_prompt
    reply = generate_replies(reloaded, reloaded_tokenizer, [prompt],
                             GenParams(max_new_tokens=job.config.style.max_new_tokens))[0]
    summary["sample_reply"] = {"prompt": prompt[-1]["content"], "reply": reply}
    write_json_atomic(run / SUMMARY, summary)
    return TrainResult(run.path, False, summary, prompt[-1]["content"], reply)
