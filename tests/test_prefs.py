"""Preference tuning: the pairs file and its split, the DPO and ORPO losses against hand
computations, pair making, and (slow) a DPO run continuing the default supervised run: reference
log-probs untouched by training, exact resume after kill -9, the adapter loadable with plain PEFT,
``evaluate`` adding the supervised run as a subject.

Run with ``python -m pytest -q tests/test_prefs.py`` (``-m "not slow"`` for the fast part).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import signal
from pathlib import Path

import pytest

from socratune.cli import main
from socratune.core.errors import ConfigError, DataError
from socratune.training.prefs import best_and_worst, rank_score, read_pairs, split_pairs

GOOD = {"prompt": [{"role": "user", "content": "正義とは何か？"}], "chosen": "君はどう思うかね？",
        "rejected": "知らない。"}


def write_lines(path: Path, items: list) -> Path:
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i, ensure_ascii=False)) + "\n" for i in items),
                    encoding="utf-8")
    return path


# --- the collapse guard ---------------------------------------------------------------------------


def test_the_collapse_guard_warns_when_one_reply_answers_the_monitored_prompts(monkeypatch, caplog):
    """A model that gives most monitored prompts the same reply (what DPO found in issue 27) is
    named in a warning at a trained evaluation of a preference run when it varied its replies at
    the start; varied replies are not, nor a run that repeated itself from the start, nor a
    supervised run; the share is in the log history for resumes."""
    from types import SimpleNamespace

    from socratune.style import StyleScorer, load_profile
    from socratune.training import callbacks

    prompts = [[{"role": "user", "content": f"問い{i}ですか？"}] for i in range(8)]
    monitor = callbacks.StyleCallback(prompts, StyleScorer(load_profile("socrates")), max_new_tokens=8,
                                      collapse_guard=True)  # as train() builds it for a preference run
    alike = ["君はどう思うのかね？"] * 6 + ["では、正義とは何かね？", "なぜかね？"]
    varied = [f"{i}とは何かね？" for i in range(8)]

    def evaluate(replies: list[str], step: int, history: list[dict]) -> list[str]:
        monkeypatch.setattr(callbacks, "generate_replies", lambda *a, **k: replies)
        caplog.clear()
        history.append({"step": step, "eval_loss": 1.0})
        monitor.on_evaluate(None, SimpleNamespace(is_world_process_zero=True, global_step=step, log_history=history),
                            None, metrics={}, model=None, processing_class=None)
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    history: list[dict] = []
    assert evaluate(varied, 0, history) == [] and history[0]["eval_style_repeated_share"] == 0.125
    assert evaluate(varied, 20, history) == []
    assert evaluate(alike, 40, history) == [
        "step 40: one reply answers 6 of the 8 monitored prompts (75%): 「君はどう思うのかね？」; the model is "
        "collapsing onto a reply that fits any prompt (a preference run: fewer epochs, a lower learning rate or a "
        "larger prefs.beta)"]
    repeating_from_the_start: list[dict] = []
    assert evaluate(alike, 0, repeating_from_the_start) == []  # the base: never warned about
    assert evaluate(alike, 20, repeating_from_the_start) == []  # no worse than it started
    monitor.collapse_guard = False  # a supervised run: the share is logged, nothing is warned
    supervised: list[dict] = []
    assert evaluate(varied, 0, supervised) == [] and evaluate(alike, 20, supervised) == []
    assert supervised[-1]["eval_style_repeated_share"] == 0.75


# --- the pairs file -------------------------------------------------------------------------------


def test_bad_pair_lines_are_each_named_with_file_and_line(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [
        GOOD,
        "{not json",
        {**GOOD, "chosen": ""},
        {"prompt": [{"role": "assistant", "content": "やあ"}], "chosen": "a", "rejected": "b"},
        {**GOOD, "rejected": GOOD["chosen"]},
        {"prompt": GOOD["prompt"], "chosen": "a"},
    ])
    with pytest.raises(DataError) as caught:
        read_pairs(path)
    message = str(caught.value)
    assert "5 bad line(s)" in message
    for line, what in ((2, "JSON"), (3, "'chosen' must be a non-empty string"), (4, "'prompt'"),
                       (5, "the same reply"), (6, "missing 'rejected'")):
        assert f"{path}:{line}: " in message and what in message, (line, message)


def test_valid_pairs_keep_their_line_numbers_and_normalise_roles(tmp_path):
    conversation = [{"role": "user", "content": "a"}, {"role": "model", "content": "b"},
                    {"role": "user", "content": "c"}]
    path = write_lines(tmp_path / "pairs.jsonl", [GOOD, "", {**GOOD, "prompt": conversation}])
    pairs = read_pairs(path)
    assert [p.line for p in pairs] == [1, 3]
    assert pairs[1].prompt[1]["role"] == "assistant"


def test_missing_pairs_file_says_how_to_make_one(tmp_path):
    with pytest.raises(DataError, match="socratune prefs"):
        read_pairs(tmp_path / "nope.jsonl")


def test_split_keeps_a_prompts_pairs_together_and_ignores_file_order(tmp_path):
    items = [{**GOOD, "prompt": [{"role": "user", "content": f"問い{i % 10}"}], "chosen": f"c{i}"} for i in range(40)]
    pairs = read_pairs(write_lines(tmp_path / "a.jsonl", items))
    split = split_pairs(pairs, seed=1, eval_frac=0.2)
    by_line = {p.line: p.prompt_key() for p in pairs}
    assert {by_line[n] for n in split["train"]}.isdisjoint({by_line[n] for n in split["eval"]})
    assert len({by_line[n] for n in split["eval"]}) == 2  # 20% of 10 prompts
    reversed_pairs = read_pairs(write_lines(tmp_path / "b.jsonl", items[::-1]))
    again = split_pairs(reversed_pairs, seed=1, eval_frac=0.2)
    reversed_keys = {p.line: p.prompt_key() for p in reversed_pairs}
    assert {reversed_keys[n] for n in again["eval"]} == {by_line[n] for n in split["eval"]}


# --- ranking ----------------------------------------------------------------------------------------


def test_ranking_follows_the_weights_and_drops_close_pairs():
    prompt = GOOD["prompt"]
    axes = [{"tone": 4.0, "approach": 0.0, "format": 2.0, "logic": 2.0},
            {"tone": 0.0, "approach": 4.0, "format": 2.0, "logic": 2.0}]
    favour_approach = {"tone": 0.0, "approach": 1.0, "format": 0.0, "logic": 0.0}
    pair = best_and_worst(prompt, ["polite", "questioning"], axes, favour_approach, min_margin=0.5)
    assert (pair["chosen"], pair["rejected"], pair["scores"]["margin"]) == ("questioning", "polite", 4.0)
    favour_tone = {"tone": 1.0, "approach": 0.0, "format": 0.0, "logic": 0.0}
    assert best_and_worst(prompt, ["polite", "questioning"], axes, favour_tone, 0.5)["chosen"] == "polite"
    even = {"tone": 1.0, "approach": 1.0, "format": 0.0, "logic": 0.0}
    assert best_and_worst(prompt, ["polite", "questioning"], axes, even, min_margin=0.1) is None  # both rank 2.0
    assert rank_score({"tone": None, "approach": 1.0}, even) is None  # a judge that gave no tone score


def test_weights_flag_reads_axis_weights_and_names_what_is_wrong():
    from socratune.training.prefs import parse_weights

    assert parse_weights("approach=0.6, logic=0.2,tone=0.1,format=0.1") == {
        "approach": 0.6, "logic": 0.2, "tone": 0.1, "format": 0.1}
    assert parse_weights("approach=1") == {"approach": 1.0}  # axes left out weigh 0
    for text, named in [("empathy=1", "'empathy=1'"), ("approach", "'approach'"), ("tone=much", "'much'"),
                        ("tone=-1", "'-1'"), ("tone=nan", "'nan'"), ("tone=inf", "'inf'"), ("tone=0", "positive")]:
        with pytest.raises(ConfigError, match="--weights") as refused:
            parse_weights(text)
        assert named in str(refused.value)


def test_bad_weights_are_refused_before_any_reply_is_sampled(tmp_path, capsys):
    from socratune.core.config import dump_yaml, load_config

    run = tmp_path / "run"  # a finished run as prefs reads it: its config and a final adapter
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(load_config()), encoding="utf-8")
    (run / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    output = tmp_path / "pairs.jsonl"
    assert main(["prefs", str(run), "--output", str(output), "--weights", "approach=0.6,empathy=0.4"]) == 2
    err = capsys.readouterr().err
    assert "--weights 'empathy=0.4'" in err and "Traceback" not in err and not output.exists()


# --- the losses against hand computations ------------------------------------------------------------


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    total = math.log(sum(math.exp(x - top) for x in row)) + top
    return [x - total for x in row]


def _softmax(row: list[float]) -> list[float]:
    return [math.exp(x) for x in _log_softmax(row)]


def _tiny_batch():
    """Two rows (chosen, rejected) of 4 positions over 5 words; the reply is the last 2 tokens."""
    import torch

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, generator=generator, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 1, 3], [-100, -100, 4, 0]])
    return logits, labels


def _hand_logps(logits: list, labels: list) -> list[float]:
    """Sum over trained positions t of log softmax(logits[t-1])[labels[t]]."""
    return [sum(_log_softmax(row_logits[t - 1])[row_labels[t]] for t in range(1, len(row_labels))
                if row_labels[t] != -100) for row_logits, row_labels in zip(logits, labels)]


def _hand_grad_of_logp(logits: list, labels: list, row: int) -> list:
    """d logp(row) / d logits: (one-hot(target) - softmax) at each position preceding a trained token."""
    grad = [[[0.0] * len(logits[0][0]) for _ in logits[0]] for _ in logits]
    for t in range(1, len(labels[row])):
        if labels[row][t] == -100:
            continue
        probabilities = _softmax(logits[row][t - 1])
        for v, p in enumerate(probabilities):
            grad[row][t - 1][v] = (1.0 if v == labels[row][t] else 0.0) - p
    return grad


def test_dpo_loss_and_gradients_match_the_formula_by_hand():
    import torch

    from socratune.training.preference import dpo_loss, sequence_logps

    logits, labels = _tiny_batch()
    logits.requires_grad_(True)
    beta, ref_chosen, ref_rejected = 0.5, -6.0, -5.0
    sums, counts = sequence_logps(logits, labels)
    loss, chosen_reward, rejected_reward = dpo_loss(sums[:1], sums[1:], torch.tensor([ref_chosen], dtype=torch.float64),
                                                    torch.tensor([ref_rejected], dtype=torch.float64), beta)
    loss.sum().backward()

    plain, plain_labels = logits.detach().tolist(), labels.tolist()
    pc, pr = _hand_logps(plain, plain_labels)
    z = beta * ((pc - ref_chosen) - (pr - ref_rejected))
    sigma = 1 / (1 + math.exp(-z))
    assert counts.tolist() == [2, 2]
    assert float(loss) == pytest.approx(-math.log(sigma), rel=1e-10)
    assert float(chosen_reward) == pytest.approx(beta * (pc - ref_chosen), rel=1e-10)
    assert float(rejected_reward) == pytest.approx(beta * (pr - ref_rejected), rel=1e-10)
    # d(-log σ(z))/dz = -(1 - σ); dz/dpc = β, dz/dpr = -β
    dz = -(1 - sigma)
    grad_c, grad_r = _hand_grad_of_logp(plain, plain_labels, 0), _hand_grad_of_logp(plain, plain_labels, 1)
    expected = [[[dz * beta * (grad_c[r][t][v] - grad_r[r][t][v]) for v in range(5)] for t in range(4)]
                for r in range(2)]
    assert torch.allclose(logits.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_dpo_with_sft_weight_adds_the_chosen_replies_token_mean_nll():
    import torch

    from socratune.training.preference import preference_loss, sequence_logps

    logits, labels = _tiny_batch()
    logits.requires_grad_(True)
    beta, weight, ref_chosen, ref_rejected = 0.5, 0.7, -6.0, -5.0
    sums, counts = sequence_logps(logits, labels)
    reference = torch.tensor([[ref_chosen, ref_rejected]], dtype=torch.float64)
    loss, _, _ = preference_loss("dpo", sums, counts, reference, beta, sft_weight=weight)
    loss.sum().backward()

    plain, plain_labels = logits.detach().tolist(), labels.tolist()
    pc, pr = _hand_logps(plain, plain_labels)
    sigma = 1 / (1 + math.exp(-beta * ((pc - ref_chosen) - (pr - ref_rejected))))
    assert float(loss) == pytest.approx(-math.log(sigma) + weight * (-pc / 2), rel=1e-10)  # 2 labelled tokens
    # the NLL pulls only on the chosen row: d(w·(-pc/2))/dpc = -w/2
    grad_c, grad_r = _hand_grad_of_logp(plain, plain_labels, 0), _hand_grad_of_logp(plain, plain_labels, 1)
    dz = -(1 - sigma)
    expected = [[[(dz * beta - weight / 2) * grad_c[r][t][v] - dz * beta * grad_r[r][t][v] for v in range(5)]
                 for t in range(4)] for r in range(2)]
    assert torch.allclose(logits.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    without, _, _ = preference_loss("dpo", sums.detach(), counts, reference, beta)
    assert float(without) == pytest.approx(-math.log(sigma), rel=1e-10)


def test_orpo_loss_and_gradients_match_the_formula_by_hand():
    import torch

    from socratune.training.preference import orpo_loss

    beta = 0.3
    chosen_sum = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    rejected_sum = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    nc, nr = 3, 4
    loss, _, _ = orpo_loss(chosen_sum, torch.tensor([nc]), rejected_sum, torch.tensor([nr]), beta)
    loss.sum().backward()

    mc, mr = -3.0 / nc, -2.0 / nr
    log_odds = (mc - math.log(1 - math.exp(mc))) - (mr - math.log(1 - math.exp(mr)))
    sigma = 1 / (1 + math.exp(-log_odds))
    assert float(loss) == pytest.approx(3.0 / nc - beta * math.log(sigma), rel=1e-10)
    # d log_odds / d mc = 1 / (1 - e^mc); d log_odds / d mr = -1 / (1 - e^mr); d m / d sum = 1 / n
    assert float(chosen_sum.grad) == pytest.approx(-1 / nc - beta * (1 - sigma) / (1 - math.exp(mc)) / nc, rel=1e-10)
    assert float(rejected_sum.grad) == pytest.approx(beta * (1 - sigma) / (1 - math.exp(mr)) / nr, rel=1e-10)


def test_reply_labels_cover_only_the_final_reply(tiny_tokenizer):
    from socratune.training.preference import encode_reply

    prompt = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "前の答え"},
              {"role": "user", "content": "c"}]
    _ids, labels = encode_reply(tiny_tokenizer, prompt, "最後の答え", fold_system=False)
    trained = tiny_tokenizer.decode([t for t in labels if t != -100])
    assert "最後の答え" in trained.replace(" ", "") and "前の答え" not in trained.replace(" ", "")


def test_preference_method_without_pairs_or_from_is_refused_naming_the_key(tmp_path):
    from socratune.core.config import load_config
    from socratune.training.preference import check_preference_config

    config = load_config(overrides={"train.method": "dpo", "run.output_dir": str(tmp_path / "r")})
    with pytest.raises(ConfigError, match="--pairs"):
        check_preference_config(config)
    with pytest.raises(ConfigError, match="allowed|Input should be"):
        load_config(overrides={"train.method": "ppo"})


# --- a DPO run on the default supervised run (slow) ---------------------------------------------------

SMALL_DPO = """\
train:
  epochs: 2
  batch_size: 4
  learning_rate: 1.0e-3
  save_steps: 2
  eval_steps: 3
  logging_steps: 1
style:
  eval_samples: 2
  max_new_tokens: 8
prefs:
  eval_frac: 0.2
"""


@pytest.fixture(scope="module")
def pairs_file(default_run, tmp_path_factory) -> Path:
    """Pairs sampled from the default run by ``socratune prefs`` (10 training prompts)."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    assert main(["prefs", str(default_run), "--output", str(path), "--limit", "10", "--samples", "3",
                 "--max-new-tokens", "16", "--min-margin", "0"]) == 0
    return path


@pytest.fixture(scope="module")
def dpo_inputs(tmp_path_factory) -> Path:
    config = tmp_path_factory.mktemp("dpo") / "dpo.yaml"
    config.write_text(SMALL_DPO, encoding="utf-8")
    return config


def dpo_args(default_run: Path, pairs: Path, config: Path, run: Path) -> list[str]:
    return ["train", "--config", str(config), "--method", "dpo", "--pairs", str(pairs), "--from", str(default_run),
            "--output", str(run)]


@pytest.fixture(scope="module")
def dpo_run(default_run, pairs_file, dpo_inputs, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("dpo-ref") / "run"
    assert main(dpo_args(default_run, pairs_file, dpo_inputs, run)) == 0
    return run


@pytest.mark.slow
def test_prefs_pairs_come_from_training_prompts_only(default_run, pairs_file):
    from socratune.core.rundir import RunDir
    from socratune.data.split import load_split
    from socratune.training.prefs import training_prompts

    pairs = read_pairs(pairs_file)
    training = {json.dumps(p, ensure_ascii=False) for p in training_prompts(default_run)}
    assert pairs and all(json.dumps(p.prompt, ensure_ascii=False) in training for p in pairs)
    split = load_split(RunDir(default_run) / "split.json")
    assert split.eval  # the default run has an eval split, and none of it was sampled
    for line in pairs_file.read_text(encoding="utf-8").splitlines():
        scores = json.loads(line)["scores"]
        assert scores["margin"] == pytest.approx(scores["chosen"]["rank"] - scores["rejected"]["rank"], abs=1e-3)


@pytest.mark.slow
def test_dpo_run_has_metrics_plots_summary_and_a_plain_peft_adapter(dpo_run, default_run, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary = json.loads((dpo_run / "training_summary.json").read_text(encoding="utf-8"))
    assert summary["finished"] and summary["method"] == "dpo"
    with (dpo_run / "metrics.csv").open(encoding="utf-8") as metrics:
        rows = list(csv.DictReader(metrics))
    assert {"reward_margin", "eval_reward_accuracy", "logps_chosen", "eval_logps_rejected"} <= set(rows[0])
    # at step 0 the policy is the reference: every pair's margin is 0, and the loss is log 2 plus
    # the chosen replies' NLL (prefs.sft_weight 1)
    first_eval = next(row for row in rows if row["eval_loss"])
    assert float(first_eval["eval_reward_margin"]) == 0 and summary["eval_loss_initial"] > math.log(2) + 0.1
    # the adapters name this run's base from the first save on, not the supervised run's
    assert "was moved" not in (dpo_run / "train.log").read_text(encoding="utf-8")
    assert (dpo_run / "plots" / "preference.png").stat().st_size > 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dpo_run / "base"), dpo_run / "adapter")
    assert model.active_adapter == "default"
    assert main(["train", "--config", str(dpo_run / "config.yaml"), "--output", str(dpo_run)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["status", str(dpo_run)]) == 0


@pytest.mark.slow
def test_reference_logps_are_the_supervised_policys_and_training_leaves_them(dpo_run, default_run):
    """The stored reference equals the supervised adapter's log-probs recomputed now, and differs
    from the trained policy's: training moved the policy, not the reference."""
    import yaml

    from socratune.core.config import config_from_dict
    from socratune.core.rundir import RunDir
    from socratune.model.modeling import detect_hardware, load_configured_base
    from socratune.training.examples import load_tokenizer_for
    from socratune.training.preference import encode_pairs, reference_logps, supervised_adapter
    from socratune.training.prefs import read_pairs

    run = RunDir(dpo_run)
    config = config_from_dict(yaml.safe_load((dpo_run / "config.yaml").read_text(encoding="utf-8")), "config")
    stored = {int(k): v for k, v in run.read_json("reference_logps.json")["logps"].items()}
    features, _ = encode_pairs(load_tokenizer_for(config), read_pairs(config.prefs.pairs), config.data.max_seq_len)

    def policy(adapter_run: Path):  # the preference run's base with ``adapter_run``'s adapter, as training loads it
        config.prefs.from_run = str(adapter_run)
        return supervised_adapter(config, load_configured_base(config, str(run.base_dir), detect_hardware()), False)

    supervised = policy(default_run)
    pad = load_tokenizer_for(config).pad_token_id
    again = reference_logps(supervised, features, pad, batch_size=8)
    assert stored.keys() == again.keys()
    assert max(abs(a - b) for k in stored for a, b in zip(stored[k], again[k])) < 1e-3
    trained = policy(dpo_run)
    moved = reference_logps(trained, features, pad, batch_size=8)
    assert max(abs(a - b) for k in stored for a, b in zip(stored[k], moved[k])) > 1e-2


@pytest.mark.slow
def test_dpo_run_killed_and_resumed_ends_like_the_uninterrupted_one(dpo_run, default_run, pairs_file, dpo_inputs,
                                                                    tmp_path):
    from test_runs import assert_same_adapter, run_with_fault

    run = tmp_path / "run"
    killed = run_with_fault("kill-after-step", 3, dpo_args(default_run, pairs_file, dpo_inputs, run))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / "adapter").exists() and (run / "checkpoints" / "checkpoint-2").is_dir()
    assert main(["train", "--output", str(run)]) == 0  # the recorded config carries method, pairs, from
    assert_same_adapter(run, dpo_run)


@pytest.mark.slow
def test_changed_pairs_are_refused_and_bad_pairs_exit_2(dpo_run, default_run, pairs_file, dpo_inputs, tmp_path, capsys):
    copy = Path(shutil.copytree(dpo_run, tmp_path / "run"))
    changed = tmp_path / "pairs.jsonl"
    lines = pairs_file.read_text(encoding="utf-8").splitlines()
    changed.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    assert main(dpo_args(default_run, changed, dpo_inputs, copy)) == 2
    assert "data content" in capsys.readouterr().err
    bad = write_lines(tmp_path / "bad.jsonl", [GOOD, {"chosen": "x"}])
    assert main(dpo_args(default_run, bad, dpo_inputs, tmp_path / "new")) == 2
    assert f"{bad}:2: missing 'prompt', 'rejected'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # nothing written for bad input


@pytest.mark.slow
def test_dpo_final_adapter_is_its_last_step_whatever_train_select_says(dpo_run):
    """A preference run keeps its last step (docs/selection.md: its eval loss and style score
    cannot pick one), even though it inherits the supervised run's train.select; the final adapter
    is the weights the run ended with."""
    import yaml

    inherited = yaml.safe_load((dpo_run / "config.yaml").read_text(encoding="utf-8"))["train"]["select"]
    summary = json.loads((dpo_run / "training_summary.json").read_text(encoding="utf-8"))
    selected = summary["selected"]
    assert inherited != "last"  # the tiny preset's best_style: the rule is the method's, not the config's
    assert selected["by"] == "last" and selected["step"] == summary["global_step"]
    assert f"final adapter: the weights of step {selected['step']} (selection: last)" in (
        dpo_run / "train.log").read_text()


@pytest.mark.slow
def test_a_failed_dpo_overwrite_puts_the_finished_run_back_and_a_failed_new_run_leaves_nothing(
        dpo_run, default_run, pairs_file, tmp_path, capsys, monkeypatch):
    """A bad style profile is refused before anything moves; a failure injected where the model is
    built, after ``--overwrite`` moved the finished run aside, moves it back untouched."""
    import socratune.training.train as recipe
    from socratune.core.errors import ModelError
    from test_runs import tree_digest

    bad = tmp_path / "bad.yaml"
    bad.write_text(SMALL_DPO.replace("style:\n", "style:\n  profile: no_such_profile\n"), encoding="utf-8")
    good = tmp_path / "good.yaml"
    good.write_text(SMALL_DPO, encoding="utf-8")
    run = Path(shutil.copytree(dpo_run, tmp_path / "run"))
    before = tree_digest(run)
    capsys.readouterr()
    assert main([*dpo_args(default_run, pairs_file, bad, run), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "no_such_profile" in err and "Traceback" not in err

    moved_aside_when_built = []

    def model_that_cannot_be_built(job):
        moved_aside_when_built.append(tree_digest(run) != before)
        raise ModelError("injected: the model could not be built")

    monkeypatch.setattr(recipe, "build_model", model_that_cannot_be_built)
    assert main([*dpo_args(default_run, pairs_file, good, run), "--overwrite"]) == 2
    assert "injected" in capsys.readouterr().err
    assert moved_aside_when_built == [True] and tree_digest(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "good.yaml", "run"]
    assert main(dpo_args(default_run, pairs_file, good, tmp_path / "new")) == 2
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_evaluate_adds_the_supervised_run_as_a_subject(dpo_run, default_run):
    from socratune.core.rundir import RunDir
    from socratune.evaluation.evaluate import select_subjects

    subjects, _ = select_subjects(RunDir(dpo_run), "none")
    assert [s.name for s in subjects] == ["base", "supervised", "tuned"]
    assert subjects[1].adapter.resolve() == RunDir(default_run).adapter_dir.resolve()


def test_runs_recorded_before_the_preference_keys_existed_still_continue():
    """A run recorded without ``train.method`` and ``prefs`` is not "changed" by their defaults."""
    from socratune.core.config import load_config
    from socratune.training.resume import config_changes

    current = load_config().to_dict()
    recorded = json.loads(json.dumps(current))
    del recorded["train"]["method"], recorded["prefs"]
    assert config_changes(recorded, current) == ([], [])
    current["train"]["method"] = "dpo"
    assert config_changes(recorded, current)[0] == ["train.method: None -> 'dpo'"]


@pytest.mark.slow
def test_orpo_run_needs_no_reference_and_finishes(default_run, pairs_file, dpo_inputs, tmp_path):
    run = tmp_path / "orpo"
    args = dpo_args(default_run, pairs_file, dpo_inputs, run)
    args[args.index("dpo")] = "orpo"
    assert main(args) == 0
    summary = json.loads((run / "training_summary.json").read_text(encoding="utf-8"))
    assert summary["finished"] and summary["method"] == "orpo"
    assert not (run / "reference_logps.json").exists()
    assert (run / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_judge_ranks_pairs_and_replies_it_could_not_score_are_left_out(default_model):
    """``--judge``: the judge's per-axis ratings rank the replies instead of the scorer's."""
    from socratune.evaluation.judge import Verdict
    from socratune.generation.generate import GenParams
    from socratune.training.prefs import make_pairs

    class LengthJudge:  # rates longer replies higher; gives up on the first reply of each prompt
        def __init__(self) -> None:
            self.calls = 0

        def rate_many(self, items):
            verdicts = []
            for index, (reply, _user) in enumerate(items):
                value = None if index % 3 == 0 else len(reply) / 100
                verdicts.append(Verdict({a: value for a in ("tone", "approach", "format", "logic")}))
            self.calls += 1
            return verdicts

    model, tokenizer = default_model
    prompts = [[{"role": "user", "content": "正義とは何か？"}], [{"role": "user", "content": "勇気とは？"}]]
    judge = LengthJudge()
    result = make_pairs(model, tokenizer, prompts, samples=3, params=GenParams(max_new_tokens=24, temperature=1.0),
                        seed=0, weights={"tone": 1, "approach": 1, "format": 1, "logic": 1}, min_margin=0.0,
                        judge=judge)
    assert judge.calls == 1 and result.replies == 6
    for pair in result.pairs:
        assert len(pair["chosen"]) >= len(pair["rejected"])
        assert pair["scores"]["chosen"]["tone"] is not None and pair["scores"]["rejected"]["tone"] is not None


def test_pair_making_settings_do_not_guard_a_preference_run():
    from socratune.core.config import load_config
    from socratune.training.resume import config_changes

    recorded = load_config(overrides={"train.method": "dpo"}).to_dict()
    current = load_config(overrides={"train.method": "dpo", "prefs.samples": 9, "prefs.beta": 0.5}).to_dict()
    guarded, harmless = config_changes(recorded, current)
    assert guarded == ["prefs.beta: 0.3 -> 0.5"] and harmless == ["prefs.samples: 6 -> 9"]  # 0.3: the DPO default


def test_pairs_without_a_preference_method_are_refused(tmp_path, capsys):
    assert main(["train", "--pairs", str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "run")]) == 2
    assert "--method dpo or orpo" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
