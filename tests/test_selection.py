"""Best-model selection (``train.select``) and one row per distinct model in ``evaluate``: the pure
rules, on hand-written log histories and adapter files, and early stopping on the same metric.
The end-to-end checks on a trained run are in tests/test_train.py
(``test_final_adapter_is_the_selected_checkpoint``, ``test_default_run_stops_early_and_keeps_a_late_step``)
and tests/test_runs.py (an early-stopped run killed and resumed)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

from socratune.evaluation.evaluate import Subject, adapter_fingerprint, merge_identical
from socratune.training.selection import (
    best_evaluation,
    describe_end,
    describe_selection,
    early_stop,
    is_new_best,
    last_is_clearly_worse,
    select_step,
)

HISTORY = [
    {"step": 0, "eval_loss": 4.0, "eval_style_overall": 0.1},  # the untuned base: never selected
    {"step": 10, "loss": 6.0},
    {"step": 20, "eval_loss": 5.0, "eval_style_overall": 1.0},
    {"step": 40, "eval_loss": 4.5, "eval_style_overall": 2.5},
    {"step": 60, "eval_loss": 4.5, "eval_style_overall": 1.5},  # ties 40 on loss: the earlier wins
    {"step": 80, "eval_loss": 5.2, "eval_style_overall": 2.0},
]


def test_best_step_by_loss_or_style_skips_the_base_and_takes_the_earliest_tie():
    assert best_evaluation(HISTORY, "best_eval_loss")["step"] == 40
    assert best_evaluation(HISTORY, "best_style")["step"] == 40
    assert best_evaluation(HISTORY, "best_style", allowed_steps={20, 60, 80})["step"] == 80
    assert best_evaluation(HISTORY, "last") is None
    assert is_new_best(HISTORY[:4], "best_eval_loss", 40) and not is_new_best(HISTORY[:5], "best_eval_loss", 60)


def test_selected_step_needs_its_weights_else_falls_back_to_the_last_step():
    chosen = select_step(HISTORY, "best_eval_loss", 80, checkpoint_steps=[40, 80])
    assert chosen.as_dict() == {"step": 40, "by": "best_eval_loss", "eval_loss": 4.5, "style_overall": 2.5}
    assert select_step(HISTORY, "best_eval_loss", 80, checkpoint_steps=[80]).step == 80  # 40 was rotated away
    assert select_step(HISTORY, "last", 80, [40, 80]).as_dict() == {
        "step": 80, "by": "last", "eval_loss": 5.2, "style_overall": 2.0}
    no_style = [{k: v for k, v in e.items() if k != "eval_style_overall"} for e in HISTORY]
    fallback = select_step(no_style, "best_style", 80, [40, 80])
    assert (fallback.step, fallback.by) == (80, "last")  # no style numbers: nothing to choose by


def test_closing_lines_name_the_step_and_warn_when_it_is_clearly_worse_than_the_best():
    summary = {"global_step": 80, "eval_loss_best": 4.5, "eval_loss_best_step": 40, "eval_loss_final": 5.2,
               "selected": select_step(HISTORY, "last", 80, [80]).as_dict()}
    assert last_is_clearly_worse(summary)
    lines = describe_selection(summary)
    assert "step 80 of 80" in lines[0] and lines[1].startswith("warning:") and "16% above" in lines[1]
    assert "best_eval_loss keeps the best step" in lines[1]
    summary["selected"] = select_step(HISTORY, "best_eval_loss", 80, [40, 80]).as_dict()
    lines = describe_selection(summary)
    assert "step 40 of 80" in lines[0] and lines[1].startswith("note:") and "step 40's" in lines[1]
    summary["selected"] = {"step": 80, "by": "best_style", "eval_loss": 5.2, "style_overall": 2.0}
    assert "chosen for its style score" in describe_selection(summary)[1]
    preference = {**summary, "method": "dpo", "selected": select_step(HISTORY, "last", 80, [80]).as_dict()}
    advice = describe_selection(preference)[1]  # train.select does not apply to a preference run
    assert "keeps its last step" in advice and "train.select" not in advice
    summary["eval_loss_final"] = 4.6  # within 5% of the best: nothing to warn about
    summary["selected"] = select_step(HISTORY, "best_eval_loss", 80, [40, 80]).as_dict()
    assert len(describe_selection(summary)) == 1 and not last_is_clearly_worse(summary)


def _write_adapter(folder: Path, tensors: dict[str, bytes], metadata: dict[str, str]) -> Path:
    """A minimal safetensors file: F32 vectors, in the order given, with the metadata given."""
    folder.mkdir(parents=True)
    header, offset = {"__metadata__": metadata}, 0
    for name, data in tensors.items():
        header[name] = {"dtype": "F32", "shape": [len(data) // 4], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded
                                                       + b"".join(tensors.values()))
    return folder


def test_identical_adapters_are_one_row_whatever_the_file_metadata(tmp_path):
    one, two = struct.pack("<2f", 1.0, 2.0), struct.pack("<2f", 3.0, 4.0)
    first = _write_adapter(tmp_path / "checkpoint-40", {"a": one, "b": two}, {"format": "pt"})
    other = _write_adapter(tmp_path / "checkpoint-80", {"a": two, "b": one}, {"format": "pt"})
    final = _write_adapter(tmp_path / "adapter", {"b": two, "a": one}, {"format": "pt", "saved_by": "peft"})
    assert adapter_fingerprint(first) == adapter_fingerprint(final) != adapter_fingerprint(other)
    assert adapter_fingerprint(tmp_path / "missing") is None
    subjects = [Subject("base", "base", 0, None), Subject("checkpoint-40", "checkpoint", 40, first),
                Subject("checkpoint-80", "checkpoint", 80, other), Subject("tuned", "tuned", 80, final)]
    merged = merge_identical(subjects)
    assert [(s.name, s.step, s.aliases) for s in merged] == [
        ("base", 0, ()), ("checkpoint-80", 80, ()), ("tuned", 40, ("checkpoint-40",))]


def test_rotation_keeps_the_best_checkpoint_beside_the_newest(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from socratune.core.rundir import MANIFEST
    from socratune.training.callbacks import CheckpointCallback

    for step in (20, 40, 60, 80):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"weights")
    state = TrainerState(global_step=80, log_history=HISTORY)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    for step in (20, 40, 60):  # closed earlier
        CheckpointCallback(keep=100).on_save(args, TrainerState(global_step=step, log_history=HISTORY),
                                             TrainerControl())
    CheckpointCallback(keep=2, select="best_eval_loss").on_save(args, state, TrainerControl())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-40", "checkpoint-60", "checkpoint-80"]
    assert all((tmp_path / name / MANIFEST).is_file() for name in ("checkpoint-40", "checkpoint-80"))
    CheckpointCallback(keep=2, select="last").on_save(args, state, TrainerControl())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-60", "checkpoint-80"]


def test_a_new_best_evaluation_is_saved_and_the_last_step_is_evaluated():
    from transformers import TrainerControl, TrainerState

    from socratune.training.callbacks import BestCheckpointCallback

    best = BestCheckpointCallback("best_eval_loss")
    for step, saved in ((0, False), (20, True), (40, True), (60, False), (80, False)):
        control = TrainerControl()
        state = TrainerState(global_step=step, max_steps=80,
                             log_history=[e for e in HISTORY if e["step"] <= step])
        best.on_evaluate(None, state, control)
        assert control.should_save is saved, step
    control = TrainerControl()
    best.on_step_end(SimpleNamespace(eval_strategy="steps"), TrainerState(global_step=80, max_steps=80), control)
    assert control.should_evaluate
    control = TrainerControl()  # a preference run with prefs.eval_frac 0 has nothing to evaluate on
    best.on_step_end(SimpleNamespace(eval_strategy="no"), TrainerState(global_step=80, max_steps=80), control)
    assert not control.should_evaluate
    control = TrainerControl()
    BestCheckpointCallback("last").on_evaluate(None, TrainerState(global_step=20, log_history=HISTORY[:3]), control)
    assert not control.should_save


def history_until(step: int) -> list[dict]:
    return [e for e in HISTORY if e["step"] <= step]


def test_early_stop_counts_evaluations_without_a_new_best_on_the_selection_metric():
    # by style the best is step 40 (2.5): 60 and 80 do not beat it
    assert early_stop(history_until(40), "best_style", 1) is None
    assert early_stop(history_until(60), "best_style", 1).as_dict() == {
        "step": 60, "best_step": 40, "patience": 1, "by": "best_style"}
    assert early_stop(history_until(60), "best_style", 2) is None
    assert early_stop(history_until(80), "best_style", 2).step == 80
    # by loss a tie is no improvement: 60 equals 40's 4.5, so it counts against the patience
    assert early_stop(history_until(60), "best_eval_loss", 1).best_step == 40
    # the base at step 0 is never the best, so a first evaluation below it does not stop the run
    assert early_stop(history_until(20), "best_eval_loss", 1) is None
    assert early_stop(HISTORY, "last", 1) is None and early_stop(HISTORY, "best_style", None) is None
    no_style = [{k: v for k, v in e.items() if k != "eval_style_overall"} for e in HISTORY]
    assert early_stop(no_style, "best_style", 1) is None  # nothing measured: nothing to stop on


def test_early_stop_callback_ends_training_without_a_checkpoint_at_the_stop():
    """The stopping step is not saved: a crash before the summary then resumes from an earlier
    checkpoint and stops at the same step again (tests/test_runs.py runs that)."""
    from transformers import TrainerControl, TrainerState

    from socratune.training.callbacks import EarlyStopCallback

    callback = EarlyStopCallback("best_style", patience=2)
    for step, stops in ((20, False), (40, False), (60, False), (80, True)):
        control = TrainerControl(should_save=True)  # as save_steps would have asked
        callback.on_evaluate(None, TrainerState(global_step=step, max_steps=100, log_history=history_until(step)),
                             control)
        assert control.should_training_stop is stops, step
        assert control.should_save is not stops, step
    assert callback.stopped.as_dict() == {"step": 80, "best_step": 40, "patience": 2, "by": "best_style"}
    control = TrainerControl()  # the planned last step is an end, not an early stop
    EarlyStopCallback("best_style", 2).on_evaluate(None, TrainerState(global_step=80, max_steps=80,
                                                                      log_history=HISTORY), control)
    assert not control.should_training_stop


def test_the_closing_line_says_why_the_run_ended():
    summary = {"total_steps": 320, "stopped_early": {"step": 240, "best_step": 180, "patience": 1,
                                                     "by": "best_style"}}
    assert describe_end(summary) == ("stopped early at step 240 of 320: the style score had not improved on "
                                     "step 180's for 1 evaluation (train.early_stopping_patience: 1)")
    assert describe_end({"total_steps": 320, "stopped_early": None}) is None
