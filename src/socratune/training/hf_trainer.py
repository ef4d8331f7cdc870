"""The Hugging Face (transformers) ``Trainer`` as socratune uses it: arguments from the config,
one thin subclass (trained-positions-only output head, resumable length-grouped order, memory
released after evaluation), an on-device metric, and the end-of-run summary and record.

Named for what it holds: ``train.py`` is the recipe that calls it.

Plain ``Trainer`` rather than TRL's ``SFTTrainer``: ``data/template.py`` already owns tokenization and
exact label masks, and SFTTrainer would re-prepare the dataset and adds nothing else we use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PrinterCallback, Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..core.config import Config
from ..core.scores import OVERALL, SCORE_KEYS, style_metric
from ..data.packing import make_collator
from ..data.template import IGNORE_INDEX, Example
from ..model.memory import release_memory
from .callbacks import STYLE_RUNTIME
from .plots import read_metrics

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import EvalPrediction, PreTrainedModel, PreTrainedTokenizerBase

    from ..model.modeling import Hardware

SCHEDULER_KWARGS = {"cosine_with_restarts": {"num_cycles": 1}}


class EpochSeededLengthSampler(LengthGroupedSampler):
    """Length-grouped order drawn from ``(seed, epoch)`` alone.

    transformers' sampler draws from the global torch RNG, so a run resumed in the middle of an
    epoch (RNG restored to the checkpoint's state, not the epoch's start) would see a different
    order than the run it continues. The Trainer calls ``set_epoch`` before every epoch.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


@contextlib.contextmanager
def head_on_trained_positions(head: torch.nn.Module, labels: torch.Tensor) -> Iterator[torch.Tensor]:
    """While open, the output head sees only the positions whose next token is trained; yields
    those next tokens (the loss's targets, in the same order).

    A causal LM's loss needs logits only where a label follows, yet the model computes them for
    every position: with Gemma's 256,000-word vocabulary that is the largest tensor of a step and
    a fifth of its compute, and user turns, template markers and padding make up about half of
    the positions. A forward pre-hook on the head (a PyTorch API, nothing patched) hands it the
    hidden states of the trained positions only; whatever the model does after the head
    (Gemma-2's final soft-cap) is element-wise and applies unchanged, and the model's own loss
    function takes the matching targets as ``shift_labels``.
    """
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][:, :-1][trained], *args[1:]))
    try:
        yield targets[trained]
    finally:
        handle.remove()


def head_fits_trained_positions(model: PreTrainedModel | PeftModel) -> bool:
    """Whether this model's loss is unchanged when its head sees trained positions only.

    Checked on two short rows rather than assumed: remote model code may reshape logits after the
    head or ignore ``shift_labels``; such a model keeps full logits.
    """
    import torch

    vocab = model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    input_ids = torch.tensor([[(3 + 7 * i) % vocab for i in range(9)], [(11 + 5 * i) % vocab for i in range(9)]],
                             device=device)
    labels = input_ids.clone()
    labels[0, :4] = labels[1, 6:] = IGNORE_INDEX
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=input_ids, labels=labels).loss
            with head_on_trained_positions(model.get_output_embeddings(), labels) as targets:
                trained = model(input_ids=input_ids, labels=labels, shift_labels=targets).loss
    except (RuntimeError, TypeError, ValueError, IndexError):
        return False
    finally:
        model.train(was_training)
    return bool(torch.allclose(full.float(), trained.float(), rtol=1e-4, atol=1e-5))


class SocratuneTrainer(Trainer):
    """Releases accelerator memory after every evaluation (the eval pass leaves its activations and
    logits cached, which on a 16 GB GPU is the difference between fitting and not), groups by
    length with an order that survives resuming, and in training computes logits only where a
    trained token follows (``head_on_trained_positions``; evaluation keeps full logits for its
    metrics)."""

    trained_logits_only = False  # set by build_trainer once the model passed the check

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        # nn.DataParallel (several GPUs in one process) splits the batch after the hook's mask was made.
        if not self.trained_logits_only or return_outputs or not model.training or self.args.n_gpu > 1:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        with head_on_trained_positions(head, inputs["labels"]) as targets:
            return super().compute_loss(model, {**inputs, "shift_labels": targets}, return_outputs,
                                        num_items_in_batch)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        # Grouped by the *global* batch, so N processes see the same order as one process with
        # an N times larger batch (accelerate then deals each global batch out to the processes).
        global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return EpochSeededLengthSampler(global_batch, [len(feature["input_ids"]) for feature in dataset],
                                        self.args.data_seed)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            release_memory()


def argmax_on_device(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reduce ``(batch, seq, vocab)`` logits to predicted ids before the Trainer gathers them, so
    evaluation never holds full-vocabulary logits for the whole eval set in memory."""
    return logits.argmax(dim=-1)


def bot_token_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """Share of trained (bot) tokens predicted exactly under teacher forcing; a sanity metric,
    not a style metric."""
    predicted, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]
    mask = labels != IGNORE_INDEX
    total = int(mask.sum())
    return {"bot_token_accuracy": float(((predicted == labels) & mask).sum() / total) if total else 0.0}


def training_arguments(config: Config, hardware: Hardware, output_dir: Path, fresh: bool) -> TrainingArguments:
    from ..model.modeling import resolve_precision

    t = config.train
    precision = resolve_precision(t.precision, hardware)
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type=t.scheduler,
        lr_scheduler_kwargs=SCHEDULER_KWARGS.get(t.scheduler, {}),
        max_grad_norm=t.max_grad_norm,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        eval_on_start=fresh,  # "initial" eval loss and style, before the first optimizer step
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # CheckpointCallback rotates, after the new checkpoint's manifest is written
        logging_steps=t.logging_steps,
        train_sampling_strategy=t.sampling,
        include_num_input_tokens_seen="non_padding",
        torch_empty_cache_steps=t.empty_cache_steps,
        remove_unused_columns=False,
        label_names=["labels"],
        seed=t.seed,
        data_seed=t.seed,
        use_cpu=hardware.device != "cuda",
        dataloader_num_workers=0,
        disable_tqdm=True,
        report_to="none",
    )


def as_features(examples: list[Example]) -> list[dict[str, list[int]]]:
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


def build_trainer(config: Config, hardware: Hardware, model: PreTrainedModel | PeftModel,
                  tokenizer: PreTrainedTokenizerBase, output_dir: Path, train_examples: list[Example],
                  eval_examples: list[Example], callbacks: list[TrainerCallback], fresh: bool) -> SocratuneTrainer:
    trainer = SocratuneTrainer(
        model=model,
        args=training_arguments(config, hardware, output_dir, fresh),
        data_collator=make_collator(config.data.batching, model, tokenizer.pad_token_id),
        train_dataset=as_features(train_examples),
        eval_dataset=as_features(eval_examples),
        processing_class=tokenizer,
        compute_metrics=bot_token_accuracy,
        preprocess_logits_for_metrics=argmax_on_device,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # the monitor logs progress through the socratune logger
    trainer.trained_logits_only = config.train.trained_logits_only and head_fits_trained_positions(model)
    return trainer


def adapter_state_for_saving(trainer: Trainer) -> dict[str, torch.Tensor] | None:
    """The adapter's weights for the final save when the launch shards them, else None (then
    the model's own state dict is whole). Every process must call this; the main one saves.

    FSDP2 holds each adapter weight as per-process slices, gathered here (adapter only, not the
    frozen base); FSDP1 and DeepSpeed ZeRO-3 go through accelerate's gathering, which for
    ZeRO-3 needs ``zero3_save_16bit_model: true`` (set in examples/accelerate/deepspeed_zero3.yaml).
    """
    from .distributed import gather_trainable_shards

    accelerator = trainer.accelerator
    zero3 = trainer.is_deepspeed_enabled and accelerator.state.deepspeed_plugin.zero_stage == 3
    if zero3 or (trainer.is_fsdp_enabled and not accelerator.is_fsdp2):
        return accelerator.get_state_dict(trainer.model_wrapped)
    return gather_trainable_shards(trainer.model)


def _best(entries: list[dict[str, Any]], key: str, lower_is_better: bool) -> tuple[float | None, int | None]:
    scored = [(e[key], e["step"]) for e in entries if e.get(key) is not None]
    if not scored:
        return None, None
    value, step = (min if lower_is_better else max)(scored, key=lambda pair: pair[0])
    return value, step


def summarize_run(state: TrainerState, metrics_path: Path, hardware: Hardware, duration_s: float) -> dict[str, Any]:
    """``training_summary.json``: initial (before step 1), final and best eval loss and style score,
    seconds spent in evaluation (loss pass and style generation, over the whole run), peak memory,
    hardware. Built from the trainer state's history, which survives resumes."""
    evals = [e for e in state.log_history if "eval_loss" in e]
    rows = read_metrics(metrics_path)
    rss = [float(r["rss_mb"]) for r in rows if r.get("rss_mb")]
    gpu = [float(r["gpu_reserved_mb"]) for r in rows if r.get("gpu_reserved_mb")]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    loss_best, loss_best_step = _best(evals, "eval_loss", lower_is_better=True)
    style_best, style_best_step = _best(evals, style_metric(OVERALL), lower_is_better=False)
    return {
        "finished": state.global_step >= state.max_steps,
        "global_step": state.global_step,
        "total_steps": state.max_steps,
        "duration_s": round(duration_s, 2),
        "eval_loss_initial": first.get("eval_loss") if first.get("step") == 0 else None,
        "eval_loss_final": last.get("eval_loss"),
        "eval_loss_best": loss_best,
        "eval_loss_best_step": loss_best_step,
        "style_score_initial": first.get(style_metric(OVERALL)) if first.get("step") == 0 else None,
        "style_score_final": last.get(style_metric(OVERALL)),
        "style_score_best": style_best,
        "style_score_best_step": style_best_step,
        "style_initial": {k: first[style_metric(k)] for k in SCORE_KEYS if style_metric(k) in first},
        "style_final": {k: last[style_metric(k)] for k in SCORE_KEYS if style_metric(k) in last},
        "eval_loss_runtime_s": round(sum(e.get("eval_runtime", 0.0) for e in evals), 2),
        "style_runtime_s": round(sum(e.get(STYLE_RUNTIME, 0.0) for e in evals), 2),
        "tokens_seen": state.num_input_tokens_seen,
        "peak_rss_mb": round(max(rss), 1) if rss else None,
        "peak_gpu_mb": round(max(gpu), 1) if gpu else None,
        "hardware": hardware.as_dict(),
    }


def training_record(config: Config, source: str, trainer: Trainer, data_record: dict[str, Any],
                    hardware: Hardware) -> dict[str, Any]:
    """``training_config.json``: everything needed to understand or repeat the run (config, base,
    the Trainer's arguments, the data as the method describes it, hardware, versions); holds no
    token or secret."""
    from importlib.metadata import version

    args = {k: v for k, v in trainer.args.to_dict().items() if "token" not in k}
    return {
        "config": config.to_dict(),
        "base_model": source,
        "training_arguments": args,
        **data_record,
        "hardware": hardware.as_dict(),
        "versions": {p: version(p) for p in ("socratune", "torch", "transformers", "peft", "accelerate",
                                              "bitsandbytes")},
    }
