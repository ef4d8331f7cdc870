"""Preference tuning (DPO, ORPO) inside socratune's own Trainer.

The steps where a preference run differs from a supervised one (its data: pairs; its model: the
supervised adapter continued; its Trainer: the loss below) are here; ``train`` (train.py) runs
them inside the run management, selection of the final step and bundle check every method shares.

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

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.config import Config
from ..core.errors import ConfigError, DataError, RunDirError
from ..core.rundir import RunDir, write_json_atomic
from ..data.dialogues import dataset_fingerprint
from ..data.template import IGNORE_INDEX, bot_spans, chat_messages, supports_system_role
from .callbacks import METRIC_COLUMNS, TrainingMonitorCallback
from .distributed import Ranks
from .examples import TrainingData
from .hf_trainer import EpochSeededLengthSampler, SocratuneTrainer, training_arguments
from .prefs import (
    PAIRS_SPLIT,
    Pair,
    apply_pairs_split,
    decide_pairs_split,
    read_pairs,
    save_pairs_split,
)

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

    from .jobs import BuiltModel, FitJob

logger = logging.getLogger("socratune")
REFERENCE_LOGPS = "reference_logps.json"
PREF_METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
                "logps_rejected")
PREF_COLUMNS = [*PREF_METRICS, *(f"eval_{m}" for m in PREF_METRICS)]
PREF_PNG = "preference.png"


# --- encoding pairs -----------------------------------------------------------------------------


def encode_reply(tokenizer: Any, prompt: list[dict[str, str]], reply: str,
                 fold_system: bool) -> tuple[list[int], list[int]]:
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


def chosen_nll(chosen_sum: Any, chosen_count: Any) -> Any:
    """Token-mean negative log-likelihood of the chosen replies in a batch: the supervised loss
    that ORPO always carries and DPO adds at ``prefs.sft_weight``."""
    return -chosen_sum.sum() / chosen_count.sum().clamp(min=1)


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
    loss = chosen_nll(chosen_sum, chosen_count) - beta * F.logsigmoid(log_odds)
    return loss, beta * chosen_mean, beta * rejected_mean


def preference_loss(method: str, sums: Any, counts: Any, reference: Any, beta: float,
                    sft_weight: float = 0.0) -> tuple[Any, Any, Any]:
    """Per-pair loss and rewards of a batch whose first half holds the chosen replies' summed
    log-probs (and token counts) and second half the rejected ones'; ``reference`` is the
    reference policy's (chosen, rejected) log-probs per pair, for DPO."""
    half = sums.shape[0] // 2
    if method == "orpo":
        return orpo_loss(sums[:half], counts[:half], sums[half:], counts[half:], beta)
    losses, chosen, rejected = dpo_loss(sums[:half], sums[half:], reference[:, 0], reference[:, 1], beta)
    if sft_weight:
        losses = losses + sft_weight * chosen_nll(sums[:half], counts[:half])
    return losses, chosen, rejected


class PreferenceTrainer(SocratuneTrainer):
    """DPO / ORPO loss in socratune's Trainer; reward metrics averaged per log / evaluation.
    ``sft_weight`` adds the chosen replies' NLL to the DPO loss (RPO): without it DPO may widen
    the margin by making both replies unlikely, and the model drifts from what it was taught."""

    def __init__(self, *args: Any, method: str = "dpo", beta: float = 0.1, sft_weight: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.method, self.beta, self.sft_weight = method, beta, sft_weight
        self.loss_is_scaled_for_ga = False  # the loss is a mean over pairs: divide by accumulation steps
        self._stored: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        sums, counts = sequence_logps(logits, inputs["reply_labels"])
        half = sums.shape[0] // 2
        reference = inputs["reference_logps"].to(sums.device) if self.method == "dpo" else None
        losses, chosen, rejected = preference_loss(self.method, sums, counts, reference, self.beta, self.sft_weight)
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


def reference_logps(model: Any, features: list[dict[str, Any]], pad_token_id: int,
                    batch_size: int) -> dict[int, list[float]]:
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

    def __init__(self, metrics_path: Path, plots_dir: Path, run_name: str | None = None, select: str = "last"):
        super().__init__(metrics_path, plots_dir, run_name, select)
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

    from ..core.rundir import write_bytes_atomic
    from .plots import read_metrics

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


# --- the steps of a preference run (train.py runs them for train.method dpo / orpo) -------------


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


def pairs_path_for(config: Config) -> Path:
    """The pairs file the run is bound to, once the config can run: a preference run needs its
    pairs and its supervised run, and runs in one process."""
    path, _ = check_preference_config(config)
    if Ranks.from_env().distributed:
        raise ConfigError("preference tuning runs in one process; launch it without torchrun / accelerate")
    return path


@dataclass
class PreparedPairs:
    """The pairs file read and encoded (``prepare_pairs``); nothing written yet."""

    path: Path
    pairs: list[Pair]
    features: list[dict[str, Any]]  # in file order, the pairs that fit data.max_seq_len
    skipped: list[str]


def prepare_pairs(config: Config, tokenizer: PreTrainedTokenizerBase) -> PreparedPairs:
    """Read (FILE:LINE errors) and encode the pairs; DataError when none fits. Writes nothing."""
    path = Path(config.prefs.pairs)
    pairs = read_pairs(path)
    features, skipped = encode_pairs(tokenizer, pairs, config.data.max_seq_len)
    for line in skipped[:10]:
        logger.warning("pair left out (too long): %s:%s", path, line)
    if not features:
        raise DataError(f"every pair in {path} is longer than data.max_seq_len {config.data.max_seq_len}")
    return PreparedPairs(path, pairs, features, skipped)


def _kept(prepared: PreparedPairs) -> list[Pair]:
    lines = {f["line"] for f in prepared.features}
    return [p for p in prepared.pairs if p.line in lines]


def write_pairs_split(run: RunDir, config: Config, prepared: PreparedPairs) -> None:
    """The pairs' train/eval split by prompt (the saved one when the run continues, refused if
    the pairs changed) in the run directory. Main process only."""
    split = decide_pairs_split(run / PAIRS_SPLIT, _kept(prepared), config.prefs.split_seed, config.prefs.eval_frac)
    save_pairs_split(split, run / PAIRS_SPLIT)
    logger.info("pairs: %d train, %d eval (seed %d)%s", len(split["train"]), len(split["eval"]), split["seed"],
                f"; {len(prepared.skipped)} left out as too long" if prepared.skipped else "")


def pairs_data(run: RunDir, config: Config, prepared: PreparedPairs) -> TrainingData:
    """The persisted split applied to the encoded pairs; the style callback answers the eval
    pairs' prompts."""
    train_pairs, eval_pairs = apply_pairs_split(run.read_json(PAIRS_SPLIT), _kept(prepared))
    by_line = {f["line"]: f for f in prepared.features}
    record = {
        "from_adapter": str(RunDir(config.prefs.from_run).adapter_dir),
        "pairs": {"path": str(config.prefs.pairs), "fingerprint": dataset_fingerprint(prepared.path),
                  "total": len(prepared.pairs), "used": len(prepared.features), "train": len(train_pairs),
                  "eval": len(eval_pairs)},
        "reference": "supervised policy's log-probs, computed before step 1" if config.train.method == "dpo" else None,
    }
    return TrainingData([by_line[p.line] for p in train_pairs], [by_line[p.line] for p in eval_pairs],
                        [p.prompt for p in eval_pairs], (eval_pairs or train_pairs)[0].prompt, record)


def supervised_adapter(config: Config, base: PreTrainedModel, sharded: bool) -> PeftModel:
    """The supervised run's final adapter on the base, trainable: where preference tuning starts
    (and, for DPO, the reference policy). ``sharded`` is always False (one process)."""
    from peft import PeftModel

    if config.quant.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=config.model.gradient_checkpointing)
    model = PeftModel.from_pretrained(base, str(RunDir(config.prefs.from_run).adapter_dir), is_trainable=True)
    # PEFT copies the supervised adapter's record of its base (the supervised run's own tiny base);
    # the adapters this run saves name the base it really trained on, as a supervised run's do.
    model.peft_config[model.active_adapter].base_model_name_or_path = base.name_or_path
    return model


def make_preference_trainer(job: FitJob, built: BuiltModel, callbacks: list[TrainerCallback]) -> PreferenceTrainer:
    """The PreferenceTrainer over the pairs' features. For DPO the reference log-probs (stored,
    or computed now while the policy is still the supervised model) are added to the features."""
    from transformers import PrinterCallback

    config, prepared = job.config, job.prepared
    if config.train.method == "dpo":
        # Over every kept pair in file order: the batches, and so the numbers, of the first start.
        reference = load_or_compute_reference(job.run, built.model, prepared.features, job.tokenizer.pad_token_id,
                                              config.train.eval_batch_size, job.fingerprint)
        by_line = {f["line"]: f for f in prepared.features}
        for line, (chosen, rejected) in reference.items():
            if line in by_line:
                by_line[line].update(ref_chosen=chosen, ref_rejected=rejected)
    args = training_arguments(config, built.hardware, job.run.checkpoints_dir, fresh=job.resume is None)
    if not job.data.eval:
        args.eval_strategy = "no"
        args.eval_on_start = False
    trainer = PreferenceTrainer(model=built.model, args=args, data_collator=PairCollator(job.tokenizer.pad_token_id),
                                train_dataset=job.data.train, eval_dataset=job.data.eval or None,
                                processing_class=job.tokenizer, callbacks=callbacks, method=config.train.method,
                                beta=config.prefs.beta, sft_weight=config.prefs.sft_weight)
    trainer.remove_callback(PrinterCallback)
    return trainer


def preference_summary(config: Config, trainer: Trainer) -> dict[str, Any]:
    """What a preference run's summary adds: the method, the supervised run, and the last
    evaluation's reward and log-prob means."""
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    return {"method": config.train.method, "from_run": str(RunDir(config.prefs.from_run).path),
            **{f"{k}_final": evals[-1].get(f"eval_{k}") for k in PREF_METRICS if evals}}
