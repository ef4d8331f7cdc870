"""Preference tuning (DPO, ORPO) inside socratune's own Trainer, with the run management of a
supervised run: ``train(config)`` hands a config whose ``train.method`` is ``dpo`` or ``orpo`` to
``train_preferences`` here.

The policy starts as the supervised run's final adapter (``prefs.from_run``), loaded trainable
on the same base. DPO's reference is that same supervised policy, and its log-probabilities are
computed **once, before the first step**, and stored in the run directory
(``reference_logps.json``): during training no second model, no second adapter and no extra
forward pass are needed (memory cost: two floats per pair), and a resumed run reads the very
numbers the interrupted one used, so resume stays exact. The price is one forward pass over the
pairs at the start (a tenth of an epoch's compute, as it needs no backward pass). ORPO needs no
reference.

Why the loss lives here rather than in TRL's ``DPOTrainer``: measured on the tiny model in
``benchmarks/prefs_trainers.py`` (see benchmarks/RESULTS.md), and this keeps the checkpoint,
resume, sampler and callback machinery the supervised run already proves exact.

Losses, for a pair with summed reply log-probs ``pc``, ``pr`` under the policy and ``rc``, ``rr``
under the reference::

    DPO:  -log σ(β·((pc − rc) − (pr − rr)))
    ORPO: NLL(chosen, per token) − β·log σ(log odds(p̄c) − log odds(p̄r)),  p̄ = mean token log-prob

Only the final reply's tokens are scored (the prompt's earlier bot turns are context).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from .callbacks import METRIC_COLUMNS, TrainingMonitorCallback
from .config import Config, dump_yaml
from .data import dataset_fingerprint
from .errors import ConfigError, DataError, RunDirError, TrainingInterrupted
from .hf_trainer import EpochSeededLengthSampler, SocratuneTrainer
from .prefs import (
    PAIRS_SPLIT,
    Pair,
    apply_pairs_split,
    decide_pairs_split,
    read_pairs,
    save_pairs_split,
)
from .rundir import (
    CONFIG_YAML,
    LOG,
    METRICS,
    PLOTS,
    SUMMARY,
    TRAINING_CONFIG,
    RunDir,
    replace_dir_atomic,
    write_json_atomic,
    write_text_atomic,
)
from .template import IGNORE_INDEX, bot_spans, chat_messages, supports_system_role

logger = logging.getLogger("socratune")
REFERENCE_LOGPS = "reference_logps.json"
PREF_METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
                "logps_rejected")
PREF_COLUMNS = [*PREF_METRICS, *(f"eval_{m}" for m in PREF_METRICS)]
PREF_PNG = "preference.png"


# --- encoding pairs -----------------------------------------------------------------------------


def encode_reply(tokenizer: Any, prompt: list[dict[str, str]], reply: str, fold_system: bool) -> tuple[list[int], list[int]]:
    """Token ids of prompt + reply in the chat template, labels on the reply's turn only."""
    messages = chat_messages([*prompt, {"role": "assistant", "content": reply}], fold_system)
    text, spans = bot_spans(tokenizer, messages)
    start, end = spans[-1]
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    labels = [t if start <= a < end else IGNORE_INDEX for t, (a, _) in zip(ids, encoding["offset_mapping"])]
    return ids, labels


def encode_pairs(tokenizer: Any, pairs: list[Pair], max_seq_len: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Features per pair; pairs longer than ``max_seq_len`` on either side are left out (listed)."""
    fold = not supports_system_role(tokenizer)
    features, skipped = [], []
    for pair in pairs:
        chosen_ids, chosen_labels = encode_reply(tokenizer, pair.prompt, pair.chosen, fold)
        rejected_ids, rejected_labels = encode_reply(tokenizer, pair.prompt, pair.rejected, fold)
        longest = max(len(chosen_ids), len(rejected_ids))
        if longest > max_seq_len:
            skipped.append(f"line {pair.line}: {longest} tokens; data.max_seq_len is {max_seq_len}")
            continue
        features.append({"line": pair.line, "chosen_input_ids": chosen_ids, "chosen_labels": chosen_labels,
                         "rejected_input_ids": rejected_ids, "rejected_labels": rejected_labels})
    return features, skipped


class PairCollator:
    """Chosen rows then rejected rows, padded together into one batch (one forward per step)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows = [(f["chosen_input_ids"], f["chosen_labels"]) for f in features]
        rows += [(f["rejected_input_ids"], f["rejected_labels"]) for f in features]
        longest = max(len(ids) for ids, _ in rows)
        ids = [i + [self.pad_token_id] * (longest - len(i)) for i, _ in rows]
        labels = [lab + [IGNORE_INDEX] * (longest - len(lab)) for _, lab in rows]
        mask = [[1] * len(i) + [0] * (longest - len(i)) for i, _ in rows]
        reference = [[f.get("ref_chosen", 0.0), f.get("ref_rejected", 0.0)] for f in features]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                "reply_labels": torch.tensor(labels), "reference_logps": torch.tensor(reference, dtype=torch.float32)}


# --- the losses ---------------------------------------------------------------------------------


def sequence_logps(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Summed log-probability of each row's labelled tokens, and how many there are."""
    import torch

    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    shifted = logits[:, :-1]
    if shifted.dtype in (torch.float16, torch.bfloat16):  # log-softmax over a large vocabulary needs float32
        shifted = shifted.float()
    logp = torch.log_softmax(shifted, dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def dpo_loss(policy_chosen: Any, policy_rejected: Any, reference_chosen: Any, reference_rejected: Any,
             beta: float) -> tuple[Any, Any, Any]:
    """Per-pair DPO loss and the implicit rewards β·(policy − reference) of chosen and rejected."""
    import torch.nn.functional as F

    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def orpo_loss(chosen_sum: Any, chosen_count: Any, rejected_sum: Any, rejected_count: Any,
              beta: float) -> tuple[Any, Any, Any]:
    """ORPO (Hong et al. 2024): the chosen reply's token-mean NLL minus β·log σ(log odds ratio),
    the odds taken of the mean token probability; rewards are β·mean log-prob as TRL reports them."""
    import torch
    import torch.nn.functional as F

    chosen_mean = chosen_sum / chosen_count.clamp(min=1)
    rejected_mean = rejected_sum / rejected_count.clamp(min=1)
    log_odds = (chosen_mean - rejected_mean) - (torch.log1p(-torch.exp(chosen_mean)) -
                                                torch.log1p(-torch.exp(rejected_mean)))
    nll = -chosen_sum.sum() / chosen_count.sum().clamp(min=1)
    return nll - beta * F.logsigmoid(log_odds), beta * chosen_mean, beta * rejected_mean


class PreferenceTrainer(SocratuneTrainer):
    """DPO / ORPO loss in socratune's Trainer; reward metrics averaged per log / evaluation."""

    def __init__(self, *args: Any, method: str = "dpo", beta: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.method, self.beta = method, beta
        self.loss_is_scaled_for_ga = False  # the loss is a mean over pairs: divide by accumulation steps
        self._stored: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        sums, counts = sequence_logps(logits, inputs["reply_labels"])
        half = sums.shape[0] // 2
        if self.method == "dpo":
            reference = inputs["reference_logps"].to(sums.device)
            losses, chosen, rejected = dpo_loss(sums[:half], sums[half:], reference[:, 0], reference[:, 1], self.beta)
        else:
            losses, chosen, rejected = orpo_loss(sums[:half], counts[:half], sums[half:], counts[half:], self.beta)
        self._store("train" if model.training else "eval", chosen, rejected, sums[:half], sums[half:])
        loss = losses.mean()
        return (loss, {"logits": logits}) if return_outputs else loss

    def _store(self, split: str, chosen: Any, rejected: Any, logps_chosen: Any, logps_rejected: Any) -> None:
        values = {"reward_chosen": chosen, "reward_rejected": rejected, "reward_margin": chosen - rejected,
                  "reward_accuracy": (chosen > rejected).float(), "logps_chosen": logps_chosen,
                  "logps_rejected": logps_rejected}
        for key, tensor in values.items():
            self._stored[split].setdefault(key, []).extend(tensor.detach().float().cpu().tolist())

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Any, None, None]:
        import torch

        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # In place: the Trainer hands this same dict to the callbacks' on_evaluate.
        split = "eval" if "eval_loss" in logs else "train"
        prefix = "eval_" if split == "eval" else ""
        for key, values in self._stored[split].items():
            if values:
                logs[f"{prefix}{key}"] = round(sum(values) / len(values), 6)
        self._stored[split] = {}
        super().log(logs, *args, **kwargs)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        lengths = [max(len(f["chosen_input_ids"]), len(f["rejected_input_ids"])) for f in dataset]
        return EpochSeededLengthSampler(global_batch, lengths, self.args.data_seed)

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        from torch.utils.data import SequentialSampler

        return SequentialSampler(eval_dataset)  # order does not change an evaluation's means


# --- the reference policy's log-probs -------------------------------------------------------------


def reference_logps(model: Any, features: list[dict[str, Any]], pad_token_id: int, batch_size: int) -> dict[int, list[float]]:
    """``{pair line: [chosen, rejected]}`` summed reply log-probs under ``model`` as it is now."""
    import torch

    collate = PairCollator(pad_token_id)
    was_training = model.training
    model.eval()
    result: dict[int, list[float]] = {}
    try:
        with torch.no_grad():
            for start in range(0, len(features), batch_size):
                part = features[start : start + batch_size]
                batch = collate(part)
                device = next(model.parameters()).device
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
                sums, _ = sequence_logps(logits, batch["reply_labels"].to(device))
                for i, feature in enumerate(part):
                    result[feature["line"]] = [float(sums[i]), float(sums[len(part) + i])]
    finally:
        model.train(was_training)
    return result


def load_or_compute_reference(run: RunDir, model: Any, features: list[dict[str, Any]], pad_token_id: int,
                              batch_size: int, fingerprint: str) -> dict[int, list[float]]:
    """The stored reference log-probs of this run, or computed now (before any step) and stored."""
    path = run / REFERENCE_LOGPS
    stored = run.read_json(REFERENCE_LOGPS)
    if stored is not None and stored.get("pairs_fingerprint") == fingerprint:
        return {int(k): v for k, v in stored["logps"].items()}
    if stored is not None:
        raise RunDirError(f"{path} was computed for other pairs; use the original pairs file or --overwrite")
    started = time.perf_counter()
    values = reference_logps(model, features, pad_token_id, batch_size)
    write_json_atomic(path, {"pairs_fingerprint": fingerprint, "logps": {str(k): v for k, v in values.items()}})
    logger.info("reference log-probs of %d pairs computed in %.1f s and stored in %s", len(values),
                time.perf_counter() - started, path)
    return values


# --- metrics and plots --------------------------------------------------------------------------


class PreferenceMonitorCallback(TrainingMonitorCallback):
    """The supervised monitor, with the reward and log-prob columns and their plot."""

    def __init__(self, metrics_path: Path, plots_dir: Path):
        super().__init__(metrics_path, plots_dir)
        if not metrics_path.exists():
            self._columns = [*METRIC_COLUMNS, *PREF_COLUMNS]

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        super().on_evaluate(args, state, control, metrics=metrics, **kwargs)
        if state.is_world_process_zero and metrics:
            plot_preference_metrics(self.metrics_path, self.plots_dir / PREF_PNG)


def plot_preference_metrics(metrics_path: Path, path: Path) -> None:
    """Reward margin and accuracy, chosen / rejected log-probs, train and eval, over steps."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import read_metrics
    from .rundir import write_bytes_atomic

    rows = read_metrics(metrics_path)
    figure, panels = plt.subplots(1, 3, figsize=(14, 4))
    for panel, keys, title in ((panels[0], ("reward_margin",), "reward margin"),
                               (panels[1], ("reward_accuracy",), "reward accuracy"),
                               (panels[2], ("logps_chosen", "logps_rejected"), "reply log-prob")):
        for key in keys:
            for prefix in ("", "eval_"):
                points = [(int(r["step"]), float(r[prefix + key])) for r in rows if r.get(prefix + key)]
                if points:
                    panel.plot(*zip(*points), marker="o" if prefix else None, markersize=3, label=prefix + key)
        panel.set_title(title)
        panel.set_xlabel("step")
        panel.grid(alpha=0.3)
        if panel.lines:
            panel.legend(fontsize=7)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buffer.getvalue())


# --- the run --------------------------------------------------------------------------------------


def check_preference_config(config: Config) -> tuple[Path, RunDir]:
    """The pairs file and the supervised run a preference run needs; ConfigError naming the key."""
    if not config.prefs.pairs:
        raise ConfigError(f"train.method {config.train.method} needs a pairs file: --pairs FILE (prefs.pairs)",
                          key="prefs.pairs")
    if not config.prefs.from_run:
        raise ConfigError(f"train.method {config.train.method} continues a supervised run: --from RUN (prefs.from_run)",
                          key="prefs.from_run")
    source = RunDir(config.prefs.from_run)
    if not (source.adapter_dir / "adapter_config.json").exists():
        raise RunDirError(f"{source.path} has no final adapter to start from; finish it first "
                          f"(socratune status {source.path})")
    if Path(config.prefs.from_run).resolve() == Path(config.run.output_dir).resolve():
        raise ConfigError("--output must be a new run directory, not the supervised run (prefs.from_run)",
                          key="run.output_dir")
    return Path(config.prefs.pairs), source


def train_preferences(config: Config, *, resume_from: str | None = None, overwrite: bool = False,
                      delete_old: bool = False, allow_config_change: bool = False) -> Any:
    """``train`` for ``train.method`` dpo / orpo: the same decisions on the run directory
    (resume.plan_start, the lock, run.json, checkpoints, summary), on pairs instead of dialogues."""
    import shutil

    from .distributed import Ranks
    from .examples import load_tokenizer_for
    from .resume import StartPlan, move_aside, plan_start, prepare_resume, record_start
    from .train import TrainResult, _attach_log_file, _detach_log_file

    started = time.perf_counter()
    pairs_path, source_run = check_preference_config(config)
    run = RunDir(config.run.output_dir)
    ranks = Ranks.from_env()
    if ranks.distributed:
        raise ConfigError("preference tuning runs in one process; launch it without torchrun / accelerate")
    fingerprint = dataset_fingerprint(pairs_path)

    plan = StartPlan("new") if overwrite else plan_start(run, config.to_dict(), fingerprint, resume_from,
                                                         allow_config_change)
    if plan.kind == "finished":
        return TrainResult(run.path, True, run.summary() or {})
    for change in plan.guarded_changes:
        logger.warning("continuing with a changed setting (--allow-config-change): %s", change)

    pairs = read_pairs(pairs_path)  # FILE:LINE errors before anything is written
    tokenizer = load_tokenizer_for(config)
    features, skipped = encode_pairs(tokenizer, pairs, config.data.max_seq_len)
    for line in skipped[:10]:
        logger.warning("pair left out (too long): %s:%s", pairs_path, line)
    if not features:
        raise DataError(f"every pair in {pairs_path} is longer than data.max_seq_len {config.data.max_seq_len}")
    moved_aside = move_aside(run) if overwrite and run.exists() else None

    with contextlib.ExitStack() as held:
        held.enter_context(run.lock())
        held.callback(_detach_log_file, _attach_log_file(run / LOG))
        prepare_resume(run, plan.checkpoint)
        record_start(run, plan, str(pairs_path), fingerprint)
        write_text_atomic(run / CONFIG_YAML, dump_yaml(config))
        kept = [p for p in pairs if p.line in {f["line"] for f in features}]
        split = decide_pairs_split(run / PAIRS_SPLIT, kept, config.prefs.split_seed, config.prefs.eval_frac)
        save_pairs_split(split, run / PAIRS_SPLIT)
        logger.info("pairs: %d train, %d eval (seed %d)%s", len(split["train"]), len(split["eval"]), split["seed"],
                    f"; {len(skipped)} left out as too long" if skipped else "")
        result = _fit_preferences(config, run, source_run, tokenizer, pairs, features, split, plan.checkpoint,
                                  fingerprint, started)
    if moved_aside is not None and delete_old:
        shutil.rmtree(moved_aside)
        result.notes.append(f"deleted the previous run {moved_aside}")
    elif moved_aside is not None:
        result.notes.append(f"the previous run is kept in {moved_aside}")
    return result


def load_policy(config: Config, run: RunDir, source_run: RunDir) -> tuple[Any, str, Any]:
    """The base of the run and the supervised adapter on it, trainable: ``(model, source, hardware)``."""
    from peft import PeftModel

    from .modeling import detect_hardware, load_base, resolve_model_source

    hardware = detect_hardware()
    source = resolve_model_source(config.model.name_or_path, run.base_dir)
    base = load_base(source, hardware=hardware, dtype=config.model.dtype, load_in_4bit=config.quant.load_in_4bit,
                     quant_type=config.quant.quant_type, double_quant=config.quant.double_quant,
                     compute_dtype=config.quant.compute_dtype, attn_implementation=config.model.attn_implementation,
                     trust_remote_code=config.model.trust_remote_code)
    if config.quant.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=config.model.gradient_checkpointing)
    model = PeftModel.from_pretrained(base, str(source_run.adapter_dir), is_trainable=True)
    return model, source, hardware


def _fit_preferences(config: Config, run: RunDir, source_run: RunDir, tokenizer: Any, pairs: list[Pair],
                     features: list[dict[str, Any]], split: dict[str, Any], resume: Path | None, fingerprint: str,
                     started: float) -> Any:
    import signal

    from transformers import PrinterCallback, set_seed

    from .callbacks import CheckpointCallback, StopOnSignal, StyleCallback
    from .hf_trainer import summarize_run, training_arguments
    from .style import StyleScorer, load_profile
    from .train import TrainResult

    set_seed(config.train.seed)
    model, source, hardware = load_policy(config, run, source_run)
    by_line = {f["line"]: f for f in features}
    if config.train.method == "dpo":
        # Before any step the policy *is* the supervised model: its log-probs are the reference.
        reference = load_or_compute_reference(run, model, features, tokenizer.pad_token_id,
                                              config.train.eval_batch_size, fingerprint)
        for line, (chosen, rejected) in reference.items():
            if line in by_line:
                by_line[line].update(ref_chosen=chosen, ref_rejected=rejected)
    train_pairs, eval_pairs = apply_pairs_split(split, [p for p in pairs if p.line in by_line])
    train_features = [by_line[p.line] for p in train_pairs]
    eval_features = [by_line[p.line] for p in eval_pairs]

    scorer = StyleScorer(load_profile(config.style.profile))
    style = StyleCallback([p.prompt for p in eval_pairs][: config.style.eval_samples], scorer,
                          config.style.max_new_tokens, config.train.eval_batch_size)
    monitor = PreferenceMonitorCallback(run / METRICS, run / PLOTS)
    stop = StopOnSignal()
    args = training_arguments(config, hardware, run.checkpoints_dir, fresh=resume is None)
    if not eval_features:
        args.eval_strategy = "no"
        args.eval_on_start = False
    trainer = PreferenceTrainer(model=model, args=args, data_collator=PairCollator(tokenizer.pad_token_id),
                            train_dataset=train_features, eval_dataset=eval_features or None,
                            processing_class=tokenizer,
                            callbacks=[style, monitor, CheckpointCallback(config.train.save_total_limit), stop],
                            method=config.train.method, beta=config.prefs.beta)
    trainer.remove_callback(PrinterCallback)
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        stop.restore()
    if stop.received is not None:
        raise TrainingInterrupted(f"training stopped by {signal.Signals(stop.received).name} at step "
                                  f"{trainer.state.global_step} of {trainer.state.max_steps}; a checkpoint was saved",
                                  stop.received, str(run.path), trainer.state.global_step)

    model.save_pretrained(run.staging_dir)
    tokenizer.save_pretrained(run.staging_dir)
    replace_dir_atomic(run.staging_dir, run.adapter_dir)
    summary = summarize_run(trainer.state, run / METRICS, hardware, time.perf_counter() - started)
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    summary.update(epochs=config.train.epochs, method=config.train.method, from_run=str(source_run.path),
                   **{f"{k}_final": evals[-1].get(f"eval_{k}") for k in PREF_METRICS if evals})
    write_json_atomic(run / TRAINING_CONFIG, {
        "config": config.to_dict(), "base_model": source, "from_adapter": str(source_run.adapter_dir),
        "training_arguments": {k: v for k, v in trainer.args.to_dict().items() if "token" not in k},
        "pairs": {"path": str(config.prefs.pairs), "fingerprint": fingerprint, "total": len(pairs),
                  "used": len(features), "train": len(train_features), "eval": len(eval_features)},
        "reference": "supervised policy's log-probs, computed before step 1" if config.train.method == "dpo" else None,
        "hardware": hardware.as_dict(),
    })

    # The saved adapter must load with plain PEFT and answer: a broken bundle fails here.
    from .generate import GenParams, generate_replies
    from .modeling import load_for_inference

    reloaded, reloaded_tokenizer = load_for_inference(run.path)
    prompt = eval_pairs[0].prompt if eval_pairs else train_pairs[0].prompt
    reply = generate_replies(reloaded, reloaded_tokenizer, [prompt], GenParams(max_new_tokens=config.style.max_new_tokens))[0]
    summary["sample_reply"] = {"prompt": prompt[-1]["content"], "reply": reply}
    write_json_atomic(run / SUMMARY, summary)
    return TrainResult(run.path, False, summary, prompt[-1]["content"], reply)

