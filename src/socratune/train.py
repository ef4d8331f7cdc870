"""THE training recipe, read top to bottom: ``train(config)`` is the only place that wires the
components together. Its steps are numbered below.

Nothing is written before the data has been validated and tokenized, so bad input leaves the
disk untouched. Progress goes to the ``socratune`` logger (the CLI shows it; ``train.log`` in
the run directory keeps it); nothing here prints or exits.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, dump_yaml
from .data import (
    Dialogue,
    ValidationReport,
    dataset_fingerprint,
    load_dialogues,
    require_usable,
    write_rejections,
)
from .distributed import Ranks, sharding_engine
from .errors import RunDirError, TrainingInterrupted
from .resume import (
    StartPlan,
    move_aside,
    plan_start,
    prepare_resume,
    record_start,
    start_guard,
)
from .rundir import (
    CONFIG_YAML,
    LOG,
    METRICS,
    PLOTS,
    REJECTED,
    SPLIT,
    SUMMARY,
    TRAINING_CONFIG,
    RunDir,
    replace_dir_atomic,
    write_json_atomic,
    write_text_atomic,
)
from .split import (
    Split,
    apply_split,
    load_split,
    require_eval_dialogues,
    save_split,
    split_dialogues,
    verify_split,
)
from .template import Example, encode_dialogues, show_example

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


def bundled_data_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("socratune") / "assets" / "sample_dialogues_ja.json"))


def reply_prompts(dialogues: list[Dialogue]) -> list[list[dict[str, str]]]:
    """Each dialogue cut before its last bot turn: the conversation a reply is generated for."""
    return [d.messages()[:-1] for d in dialogues]


def prepare_examples(config: Config, tokenizer: Any) -> tuple[ValidationReport, list[Example]]:
    """Load, validate and tokenize the data; raises DataError when nothing usable is left."""
    data_path = Path(config.data.path) if config.data.path else bundled_data_path()
    report = load_dialogues(data_path)
    require_usable(report)
    examples, rejections = encode_dialogues(
        tokenizer, report.kept, str(data_path), config.data.max_seq_len, config.data.loss_on
    )
    report.add_rejections(rejections)
    require_usable(report)
    require_eval_dialogues(report.kept, config.data.split_seed, config.data.train_frac, config.data.eval_cap,
                           report.source)
    return report, examples


def decide_split(run: RunDir, kept: list[Dialogue], config: Config) -> Split:
    """Reuse the persisted split when the run continues; a split that no longer matches the data
    is refused rather than silently re-drawn."""
    split_path = run / SPLIT
    if split_path.exists():
        split = load_split(split_path)
        differences = verify_split(split, kept)
        if differences:
            shown = "\n  ".join(differences[:10])
            raise RunDirError(f"the data no longer matches the split saved in {split_path}:\n  {shown}\n"
                              "use the original data, or --overwrite to start a new run")
        return split
    return split_dialogues(kept, config.data.split_seed, config.data.train_frac, config.data.eval_cap)


def load_tokenizer_for(config: Config) -> Any:
    """The training tokenizer; for ``tiny`` it is built in memory so nothing is written yet."""
    from .modeling import TINY, load_tokenizer
    from .tiny import build_tokenizer, bundled_texts

    if config.model.name_or_path == TINY:
        return build_tokenizer(bundled_texts())
    from .modeling import resolve_model_source

    return load_tokenizer(resolve_model_source(config.model.name_or_path, Path()), config.model.trust_remote_code)


def train(config: Config, *, resume_from: str | None = None, show_example_first: bool = False,
          overwrite: bool = False, delete_old: bool = False, allow_config_change: bool = False) -> TrainResult:
    """Run, resume, continue or recognise as finished the training described by ``config``.

    ``overwrite`` moves an existing run aside (``RUN.old-TIMESTAMP``) and starts over;
    ``delete_old`` removes that moved-aside run once the new one has finished.
    Raises RunDirError for a refused start (in use, guarded settings changed), DataError for
    unusable data and TrainingInterrupted after SIGTERM/SIGINT saved a checkpoint.
    """
    started = time.perf_counter()
    run = RunDir(config.run.output_dir)
    ranks = Ranks.from_env()  # under torchrun / accelerate launch: main decides and writes, all train
    ranks.start()
    data_path = Path(config.data.path) if config.data.path else bundled_data_path()
    fingerprint = dataset_fingerprint(data_path)

    # 1. New, resume or finished: decided from files on disk, before anything is written.
    plan = ranks.decide(lambda: StartPlan("new") if overwrite else plan_start(
        run, config.to_dict(), fingerprint, resume_from, allow_config_change, ranks.world_size))
    if plan.kind == "finished":
        return TrainResult(run.path, True, run.summary() or {}, main_process=ranks.is_main)
    for change in plan.guarded_changes:
        logger.warning("continuing with a changed setting (--allow-config-change): %s", change)

    # 2. Data: load, validate, template and tokenize, all before anything is written.
    tokenizer = load_tokenizer_for(config)
    report, examples = prepare_examples(config, tokenizer)
    logger.info(report.summary())
    moved_aside = ranks.decide(lambda: move_aside(run) if overwrite and run.exists() else None)

    with start_guard(run, moved_aside, enabled=ranks.is_main), contextlib.ExitStack() as held:
        # 3. The run directory (main process): lock, config, rejected rows and the split on disk
        #    before training; then every process reads the persisted split.
        ranks.decide(lambda: held.enter_context(run.lock()) and None)
        if ranks.is_main:
            held.callback(_detach_log_file, _attach_log_file(run / LOG))
        ranks.decide(lambda: _open_run(run, plan, config, report, data_path, fingerprint, ranks.world_size))
        split = load_split(run / SPLIT)
        train_dialogues, eval_dialogues = apply_split(split, report.kept)
        by_id = {e.dialogue_id: e for e in examples}
        train_examples = [by_id[d.id] for d in train_dialogues]
        eval_examples = [by_id[d.id] for d in eval_dialogues]
        if show_example_first and ranks.is_main:
            logger.info("example with trained tokens marked ⟦…⟧:\n%s", show_example(tokenizer, train_examples[0]))
        result = _fit(config, run, ranks, tokenizer, report, split, train_examples, eval_examples,
                      reply_prompts(eval_dialogues), plan.checkpoint, started)
    if moved_aside is not None and ranks.is_main and delete_old:
        shutil.rmtree(moved_aside)
        result.notes.append(f"deleted the previous run {moved_aside}")
    elif moved_aside is not None:
        result.notes.append(f"the previous run is kept in {moved_aside}")
    return result


def _open_run(run: RunDir, plan: StartPlan, config: Config, report: ValidationReport, data_path: Path,
              fingerprint: str, world_size: int) -> None:
    """Write what the run starts from (main process only), after tidying up for a resume."""
    prepare_resume(run, plan.checkpoint)
    record_start(run, plan, str(data_path), fingerprint, world_size)
    write_text_atomic(run / CONFIG_YAML, dump_yaml(config))
    write_rejections(report.rejections, run / REJECTED)
    split = decide_split(run, report.kept, config)
    save_split(split, run / SPLIT)
    logger.info("split: %d train, %d eval, %d held out (seed %d)",
                len(split.train), len(split.eval), len(split.held_out), split.seed)
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


def _fit(config: Config, run: RunDir, ranks: Ranks, tokenizer: Any, report: ValidationReport, split: Split,
         train_examples: list[Example], eval_examples: list[Example],
         eval_conversations: list[list[dict[str, str]]], resume: Path | None, started: float) -> TrainResult:
    from transformers import set_seed

    from .callbacks import (
        CheckpointCallback,
        StopOnSignal,
        StyleCallback,
        TrainingMonitorCallback,
        resource_usage,
    )
    from .modeling import add_lora, detect_hardware, load_base, resolve_model_source
    from .style import StyleScorer, load_profile
    from .trainer import adapter_state_for_saving, build_trainer, summarize_run

    # 4. Model: base (4-bit for QLoRA) plus a fresh LoRA adapter, its random init drawn from the
    #    run's seed so two runs of one config start from the same weights.
    #    Under FSDP / ZeRO-3 (GPUs only: on a CPU accelerate runs an FSDP config as plain DDP) the
    #    model is built so that every tensor can be sharded.
    set_seed(config.train.seed)
    hardware = detect_hardware()
    engine = sharding_engine()
    sharded = engine is not None and hardware.device == "cuda"
    if engine == "fsdp" and not sharded and ranks.is_main:
        logger.warning("FSDP config on a CPU: accelerate shards only on GPUs, so this run is plain data parallel "
                       "(every process holds the whole model)")
    source = ranks.main_first(lambda: resolve_model_source(config.model.name_or_path, run.base_dir))
    base = load_base(source, hardware=hardware, dtype=config.model.dtype, load_in_4bit=config.quant.load_in_4bit,
                     quant_type=config.quant.quant_type, double_quant=config.quant.double_quant,
                     compute_dtype=config.quant.compute_dtype, attn_implementation=config.model.attn_implementation,
                     trust_remote_code=config.model.trust_remote_code, sharded=sharded)
    model = add_lora(base, r=config.lora.r, alpha=config.lora.alpha, dropout=config.lora.dropout,
                     target_modules=config.lora.target_modules, bias=config.lora.bias,
                     quantized=config.quant.load_in_4bit, gradient_checkpointing=config.model.gradient_checkpointing,
                     sharded=sharded)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("model %s on %s: %d trainable of %d parameters (%.2f%%); memory before training: %s",
                source, hardware.name, trainable, total, 100 * trainable / total,
                {k: round(v, 1) for k, v in resource_usage().items() if v is not None})

    # 5. Trainer with the style and monitor callbacks; resume from the latest valid checkpoint.
    scorer = StyleScorer(load_profile(config.style.profile))
    style = StyleCallback(eval_conversations[: config.style.eval_samples], scorer, config.style.max_new_tokens,
                          config.train.eval_batch_size, sharded=sharded and ranks.distributed)
    monitor = TrainingMonitorCallback(run / METRICS, run / PLOTS)
    stop = StopOnSignal(ranks)
    trainer = build_trainer(config, hardware, model, tokenizer, run.checkpoints_dir, train_examples, eval_examples,
                            callbacks=[style, monitor, CheckpointCallback(config.train.save_total_limit, ranks), stop],
                            fresh=resume is None)

    # 6. Train; SIGTERM/SIGINT end it early with a checkpoint at the step reached.
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        stop.restore()
    if stop.received is not None:
        raise TrainingInterrupted(f"training stopped by {signal.Signals(stop.received).name} at step "
                                  f"{trainer.state.global_step} of {trainer.state.max_steps}; a checkpoint was saved",
                                  stop.received, str(run.path), trainer.state.global_step)

    adapter_state = adapter_state_for_saving(trainer)  # under FSDP / ZeRO-3 every process gathers
    if not ranks.is_main:
        return TrainResult(run.path, False, {}, main_process=False)

    # 7. Final adapter + tokenizer, staged then renamed into place; config and summary last.
    model.save_pretrained(run.staging_dir, state_dict=adapter_state)
    tokenizer.save_pretrained(run.staging_dir)
    replace_dir_atomic(run.staging_dir, run.adapter_dir)
    summary = summarize_run(trainer.state, run / METRICS, hardware, time.perf_counter() - started)
    summary["epochs"] = config.train.epochs
    write_json_atomic(run / TRAINING_CONFIG, _training_config(config, source, trainer, report, split, hardware))

    # 8. Reload the saved adapter from disk and answer one held-out prompt: a broken bundle fails here.
    #    A sharded run's base may not fit one GPU (the reason to shard), and this process still
    #    holds its share of training: there the saved files are compared with the trained weights.
    from .generate import GenParams, generate_replies
    from .modeling import check_saved_adapter, load_for_inference

    if sharded:
        check_saved_adapter(run.adapter_dir, model, adapter_state)
        summary["sample_reply"] = None
        write_json_atomic(run / SUMMARY, summary)
        note = f"the saved adapter matches the trained weights (no sample reply under {engine}: it needs the whole base)"
        return TrainResult(run.path, False, summary, notes=[note])
    reloaded, reloaded_tokenizer = load_for_inference(run.path)
    prompt = eval_conversations[0] if eval_conversations else [{"role": "user", "content": "幸福とは何だろうか？"}]
    reply = generate_replies(reloaded, reloaded_tokenizer, [prompt], GenParams(max_new_tokens=config.style.max_new_tokens))[0]
    summary["sample_reply"] = {"prompt": prompt[-1]["content"], "reply": reply}
    write_json_atomic(run / SUMMARY, summary)
    return TrainResult(run.path, False, summary, prompt[-1]["content"], reply)


def _training_config(config: Config, source: str, trainer: Any, report: ValidationReport, split: Split,
                     hardware: Any) -> dict[str, Any]:
    """Everything needed to understand or repeat the run; holds no token or secret."""
    from importlib.metadata import version

    args = {k: v for k, v in trainer.args.to_dict().items() if "token" not in k}
    return {
        "config": config.to_dict(),
        "base_model": source,
        "training_arguments": args,
        "data": {
            "path": report.source,
            "fingerprint": dataset_fingerprint(report.source),
            "counts": report.counts(),
            "split": {"seed": split.seed, "train": len(split.train), "eval": len(split.eval),
                      "held_out": len(split.held_out)},
        },
        "hardware": hardware.as_dict(),
        "versions": {p: version(p) for p in ("socratune", "torch", "transformers", "peft", "accelerate",
                                              "bitsandbytes")},
    }
