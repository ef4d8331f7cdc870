"""End to end on the embedded default: ``socratune train`` trains the tiny model on the bundled
sample and leaves a complete run directory. The default run happens once per session (the
``default_run`` fixture in conftest) and the tests below inspect what it left.
"""

from __future__ import annotations

import csv
import json
import math

import pytest

from socratune.cli import main
from socratune.core.rundir import checkpoint_problem

RUN_FILES = ["config.yaml", "training_config.json", "split.json", "rejected.jsonl", "metrics.csv", "train.log",
             "training_summary.json", "plots/loss.png", "plots/learning_rate.png", "plots/style.png",
             "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json",
             "base/config.json"]


def test_default_run_leaves_every_file(default_run):
    missing = [name for name in RUN_FILES if not (default_run / name).is_file()]
    assert missing == []


def test_default_run_learns_loss_and_style(default_run):
    summary = json.loads((default_run / "training_summary.json").read_text())
    for key in ("duration_s", "eval_loss_initial", "eval_loss_final", "eval_loss_best", "style_score_initial",
                "style_score_final", "style_score_best", "style_score_best_step", "peak_rss_mb", "peak_gpu_mb",
                "hardware"):
        assert key in summary, key
    assert summary["finished"] and summary["global_step"] <= summary["total_steps"]
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]
    assert summary["style_score_final"] > summary["style_score_initial"]
    assert summary["peak_gpu_mb"] is None and summary["peak_rss_mb"] > 0
    assert summary["sample_reply"]["reply"]
    assert set(summary["style_final"]) == {"tone", "approach", "format", "logic", "overall"}


def test_default_run_stops_early_and_keeps_a_late_step(default_run):
    """The tiny preset's early stopping (patience 1 on best style): the run ends at the first
    evaluation that does not beat the best, before its planned last step, and the step it keeps is
    in the last third of what it trained, so little of the run's time buys nothing."""
    summary = json.loads((default_run / "training_summary.json").read_text())
    stopped = summary["stopped_early"]
    assert stopped is not None and stopped["by"] == "best_style" and stopped["patience"] == 1
    assert summary["global_step"] == stopped["step"] < summary["total_steps"]
    assert summary["selected"]["step"] == stopped["best_step"] >= 2 / 3 * summary["global_step"]
    with (default_run / "metrics.csv").open(encoding="utf-8") as handle:
        evals = [int(r["step"]) for r in csv.DictReader(handle) if r["eval_loss"]]
    assert evals[-2:] == [stopped["best_step"], stopped["step"]]  # one evaluation past the best, then the end


def test_evaluation_time_is_recorded_per_evaluation_and_summed(default_run):
    """What style monitoring costs is on record: seconds per evaluation in metrics.csv, their sum
    in the summary (benchmarks/style_eval_cost.py reads it)."""
    summary = json.loads((default_run / "training_summary.json").read_text())
    with (default_run / "metrics.csv").open(encoding="utf-8") as handle:
        eval_rows = [r for r in csv.DictReader(handle) if r["eval_loss"]]
    style_seconds = [float(r["eval_style_runtime"]) for r in eval_rows]
    assert all(s > 0 for s in style_seconds)
    assert math.isclose(summary["style_runtime_s"], sum(style_seconds), abs_tol=0.01 * len(style_seconds))
    assert math.isclose(summary["eval_loss_runtime_s"], sum(float(r["eval_runtime"]) for r in eval_rows),
                        abs_tol=0.01 * len(eval_rows))
    assert 0 < summary["style_runtime_s"] < summary["duration_s"]


def test_metrics_csv_has_training_and_eval_rows(default_run):
    with (default_run / "metrics.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    train_rows = [r for r in rows if r["loss"]]
    eval_rows = [r for r in rows if r["eval_loss"]]
    assert len(train_rows) >= 3 and len(eval_rows) >= 2
    assert eval_rows[0]["step"] == "0"  # initial evaluation before the first optimizer step
    assert all(math.isfinite(float(r["loss"])) and float(r["learning_rate"]) >= 0 for r in train_rows)
    assert all(float(r["tokens_per_s"]) > 0 for r in train_rows[1:])
    assert all(0 <= float(r["eval_style_overall"]) <= 4 for r in eval_rows)
    assert all(float(r["rss_mb"]) > 0 for r in rows)


def test_checkpoints_are_intermediate_and_validated(default_run):
    checkpoints = sorted((default_run / "checkpoints").iterdir())
    assert len(checkpoints) >= 2
    assert all(checkpoint_problem(c) is None for c in checkpoints)


def test_final_adapter_is_the_selected_checkpoint(default_run):
    """train.select (the tiny preset: best_style): the trained step with the highest style score
    is chosen, its checkpoint is kept, and the final adapter holds exactly that checkpoint's
    tensors."""
    from safetensors.torch import load_file

    summary = json.loads((default_run / "training_summary.json").read_text())
    with (default_run / "metrics.csv").open(encoding="utf-8") as handle:
        evals = [r for r in csv.DictReader(handle) if r["eval_loss"] and r["step"] != "0"]
    best = max(evals, key=lambda r: (float(r["eval_style_overall"]), -int(r["step"])))
    selected = summary["selected"]
    assert set(selected) == {"step", "by", "eval_loss", "style_overall"}
    assert selected["by"] == "best_style" and selected["step"] == int(best["step"])
    assert math.isclose(selected["style_overall"], float(best["eval_style_overall"]), rel_tol=1e-6)
    assert math.isclose(selected["eval_loss"], float(best["eval_loss"]), rel_tol=1e-6)
    assert evals[-1]["step"] == str(summary["global_step"])  # the last step is evaluated too
    final = load_file(default_run / "adapter" / "adapter_model.safetensors")
    chosen = load_file(default_run / "checkpoints" / f"checkpoint-{selected['step']}" / "adapter_model.safetensors")
    assert final.keys() == chosen.keys() and all(bool((final[k] == chosen[k]).all()) for k in final)
    assert f"final adapter: the weights of step {selected['step']}" in (default_run / "train.log").read_text()


def test_adapter_loads_with_plain_peft_and_changes_the_model(default_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_run / "adapter")
    base = AutoModelForCausalLM.from_pretrained(default_run / "base")
    ids = tokenizer("君は幸福をどう考えるのかね？", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, default_run / "adapter")
        after = tuned(ids).logits
    assert not torch.allclose(before, after)


def test_training_config_records_the_run_without_secrets(default_run):
    record = json.loads((default_run / "training_config.json").read_text())
    assert record["config"]["lora"]["r"] == 16
    assert record["data"]["counts"]["kept"] >= 150
    assert len(record["data"]["fingerprint"]) == 64
    assert {"torch", "transformers", "peft"} <= set(record["versions"])
    assert "hub_token" not in json.dumps(record)


def test_finished_run_is_not_trained_again_and_files_stay_identical(default_run, capsys):
    before = {p: p.read_bytes() for p in default_run.rglob("*") if p.is_file()}
    assert main(["train", "--output", str(default_run)]) == 0
    after = {p: p.read_bytes() for p in default_run.rglob("*") if p.is_file()}
    assert before == after
    assert "already finished" in capsys.readouterr().out


def test_generate_prints_a_reply(default_run, capsys):
    assert main(["generate", str(default_run), "勇気とは何でしょうか？", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out.strip()


def test_no_usable_dialogue_exits_2_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "こんにちは"}]}\nnot json\n', encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(run)]) == 2
    assert not run.exists()
    err = capsys.readouterr().err
    assert "no usable dialogue" in err and "bad.jsonl" in err


@pytest.mark.slow
def test_qlora_run_trains_a_4bit_base(tmp_path):
    import bitsandbytes as bnb

    from socratune.core.config import load_config
    from socratune.model.modeling import load_for_inference
    from socratune.training.train import train

    config = load_config(overrides={"quant.load_in_4bit": True, "train.epochs": 1, "train.eval_steps": 10,
                                    "train.save_steps": 10, "style.eval_samples": 2,
                                    "run.output_dir": str(tmp_path / "qlora")})
    result = train(config)
    assert result.summary["finished"]
    model, _ = load_for_inference(result.run_dir)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_validate_reports_each_rejection_and_writes_the_rejected_file(tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "勇気とは何でしょうか？"},
                         {"role": "model", "content": "では、君は勇気をどこで見たことがあるのかね？"}]}
    long_reply = {"messages": [{"role": "user", "content": "長い話をしてください。"},
                               {"role": "model", "content": "問いとは何かね？" * 400}]}
    other = {"messages": [{"role": "user", "content": "正義とは？"},
                          {"role": "model", "content": "君はどう思うかね？"}]}
    lines = [json.dumps(good, ensure_ascii=False), '{"messages": [{"role": "teacher", "content": "x"}]}',
             "not json", json.dumps(long_reply, ensure_ascii=False), json.dumps(other, ensure_ascii=False)]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rejected = tmp_path / "rejected.jsonl"

    assert main(["validate", str(data), "--rejected", str(rejected)]) == 0

    out = capsys.readouterr().out
    assert "2 dialogues kept, 3 rejected" in out
    assert "bad_role 1" in out and "invalid_json 1" in out and "too_long 1" in out
    assert "mixed.jsonl:3" in out  # the unparsable row is named by file and line
    assert "2 dialogues ready to train" in out
    rows = [json.loads(line) for line in rejected.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["reason"] for r in rows) == ["bad_role", "invalid_json", "too_long"]


def test_config_errors_exit_2_naming_the_key(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  learning_rat: 1e-4\n", encoding="utf-8")
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rat" in err and "learning_rate" in err
    assert main(["train", "--preset", "gemma", "--output", str(tmp_path / "run")]) == 2
    assert "gemma2-2b-jpn-qlora" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_show_example_logs_the_trained_tokens_marked(tmp_path, capsys):
    from socratune.training.examples import bundled_data_path

    data = tmp_path / "few.json"
    data.write_text(json.dumps(json.loads(bundled_data_path().read_text(encoding="utf-8"))[:12],
                               ensure_ascii=False), encoding="utf-8")
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "run"), "--epochs", "1",
                 "--show-example"]) == 0
    err = capsys.readouterr().err
    shown = err.split("example with trained tokens marked ⟦…⟧:")[1]
    assert "⟦" in shown and "⟧" in shown
    assert "<start_of_turn>user" in shown.split("⟦")[0]  # the user turn comes before, unmarked


def test_every_train_method_runs_the_one_recipe_with_its_own_steps():
    """``train()`` looks a method's steps up in ``METHODS``: a method the config accepts but the
    recipe lacks would fail at the start of every such run."""
    from typing import get_args

    from socratune.core.config import TrainSection
    from socratune.training.train import METHODS

    assert set(METHODS) == set(get_args(TrainSection.model_fields["method"].annotation))
