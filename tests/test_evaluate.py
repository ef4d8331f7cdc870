"""``socratune evaluate``: statistics helpers, prompts and the scripted user, the LLM judge against
a local stub server, and the whole command on the tiny default run.

Run: ``SOCRATUNE_TEST_DEFAULT_RUN=/tmp/socratune_default_run python -m pytest -q tests/test_evaluate.py``
(without the variable the default run is trained first, about 80 s).
"""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

import pytest

from socratune.cli import main
from socratune.core.errors import ConfigError, DataError
from socratune.core.scores import SCORE_KEYS as KEYS
from socratune.evaluation.evaluate import (
    EVALUATION_DIR,
    EvalPrompt,
    followup,
    followup_script,
    load_prompts,
)
from socratune.evaluation.judge import Judge, chat_completions_url, parse_verdict, public_url
from socratune.evaluation.report import (
    AGREEMENT_PNG,
    DISTRIBUTIONS_PNG,
    EVALUATION_JSON,
    MEANS_PNG,
    PROGRESSION_PNG,
    REPORT_MD,
    bootstrap_ci,
    compute_statistics,
    paired_comparison,
    rank_biserial,
    render_report,
)
from socratune.style import AXES, load_profile

SECRET = "sk-test-SECRET-4242"

# --- statistics --------------------------------------------------------------------------------


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_data():
    rng = random.Random(1)
    small = [rng.uniform(0, 4) for _ in range(20)]
    large = [rng.uniform(0, 4) for _ in range(400)]
    for values in (small, large):
        low, high = bootstrap_ci(values)
        assert low < sum(values) / len(values) < high
    assert bootstrap_ci(large)[1] - bootstrap_ci(large)[0] < (bootstrap_ci(small)[1] - bootstrap_ci(small)[0]) / 2
    assert bootstrap_ci([2.5] * 5) == (2.5, 2.5)
    assert bootstrap_ci([]) is None
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)  # reproducible


def test_wilcoxon_on_known_cases():
    base = [1.0, 2.0, 0.5, 3.0, 1.5]
    better = [b + d for b, d in zip(base, [1, 2, 3, 4, 5])]
    result = paired_comparison(better, base)
    # Every one of 5 pairs favours tuned: the exact one-sided p is 1/2^5, W = 1+2+3+4+5.
    assert result["p_greater"] == pytest.approx(1 / 32)
    assert result["statistic"] == 15
    assert result["rank_biserial"] == 1.0
    assert result["tuned_beats_base"] is True
    worse = paired_comparison(base, better)
    assert worse["rank_biserial"] == -1.0 and worse["tuned_beats_base"] is False and worse["p_greater"] > 0.9
    same = paired_comparison(base, base)
    assert (same["p_greater"], same["rank_biserial"], same["tuned_beats_base"]) == (1.0, 0.0, False)


def test_rank_biserial_weighs_differences_by_rank():
    # Ranks of |d|: 1, 2, 3, 4, 5, 6; only the 4 is negative: (17 - 4) / 21; zeros are dropped.
    assert rank_biserial([1, 2, 3, -4, 5, 6, 0]) == pytest.approx(13 / 21)


def test_a_model_that_gives_one_reply_to_most_prompts_is_named_in_the_report():
    generic, prompts = "ふむ、君は何をするのかね？", [f"p{i:02d}" for i in range(20)]
    scores = {key: 2.0 for key in KEYS}

    def record(model: str, prompt_id: str, reply: str) -> dict:
        return {"model": model, "prompt_id": prompt_id, "turn": 0, "user": "問い", "reply": reply,
                "scores": scores, "explanations": []}

    records = [record("base", p, f"答え{i}") for i, p in enumerate(prompts)]
    records += [record("tuned", p, generic if i < 5 else f"問い{i}") for i, p in enumerate(prompts)]
    stats = compute_statistics(records, ["base", "tuned"], seed=0, judged=False)
    assert stats["variety"]["base"] == {"replies": 20, "distinct": 20, "most_common": "答え0", "most_common_count": 1,
                                        "most_common_share": 0.05}
    assert stats["variety"]["tuned"]["distinct"] == 16
    assert stats["variety"]["tuned"]["most_common_share"] == pytest.approx(0.25)
    data = {"run_dir": "runs/x", "created": "now", "prompts": {"count": 20, "source": "test"}, "turns": 0,
            "generation": {"max_new_tokens": 16}, "profile": "socrates", "bootstrap": {"resamples": 10},
            "models": [{"name": "base"}, {"name": "tuned"}], "statistics": stats, "judge": None,
            "skipped_checkpoints": [], "replies": records}
    warnings = [line for line in render_report(data).splitlines() if "Warning" in line]
    assert warnings == [f"- **Warning:** tuned gives the same reply to 5 of 20 prompts (25%): 「{generic}」; its "
                        "scores may come from one reply the scorer likes, not from answering the prompts."]


# --- prompts and the scripted user -------------------------------------------------------------


def test_bundled_prompts_are_held_out_from_the_training_sample():
    prompts = load_prompts()
    assert len(prompts) >= 30 and len({p.id for p in prompts}) == len(prompts)
    sample = json.loads((resources.files("socratune") / "assets" / "sample_dialogues_ja.json").read_text("utf-8"))
    trained = {m["content"].strip() for d in sample for m in d["messages"] if m["role"] == "user"}
    assert not {p.prompt for p in prompts} & trained


def test_bad_prompt_lines_are_named_by_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "幸福とは？"}\nnot json\n{"id": "b"}\n{"id": "a", "prompt": "x"}\n'
                    '{"prompt": "y", "followups": "z"}\n', encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_prompts(path)
    message = str(caught.value)
    for expected in (":2: invalid JSON", ":3: needs a non-empty string 'prompt'", "duplicate ids a", ":5: 'followups'"):
        assert expected in message


def test_scripted_user_uses_the_prompts_own_lines_then_the_bundled_script():
    script = followup_script()
    assert len(script) >= 3
    own = EvalPrompt("x", "問い", ("自分の言葉です。",))
    assert followup(own, 1, script) == "自分の言葉です。"
    assert followup(own, 2, script) == script[1]
    assert followup(EvalPrompt("y", "問い"), len(script) + 1, script) == script[0]  # cycles


# --- the judge against a stub server ------------------------------------------------------------


def _good(reply: str) -> dict:
    tone = 4 if "かね" in reply else 1
    return {a: {"score": tone if a == "tone" else 3, "reason": f"{a} ok"} for a in AXES}


class _Stub:
    """An OpenAI-compatible endpoint on loopback; ``behaviour(n, reply)`` picks each answer."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    number = len(stub.requests)
                reply = body["messages"][-1]["content"].split("Reply to rate:\n", 1)[-1]
                status, content = stub.behaviour(number, reply)
                if status == "sleep":
                    time.sleep(content)
                    status, content = 200, json.dumps(_good(reply))
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(payload.encode())
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def start(behaviour):
        servers.append(_Stub(behaviour))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _judge(url: str, **kwargs) -> Judge:
    return Judge(url, "stub-model", load_profile(), **{"timeout": 5, "retries": 2, **kwargs})


def test_judge_sends_the_rubric_and_key_and_reads_scores(stub, monkeypatch):
    monkeypatch.setenv("SOCRATUNE_JUDGE_API_KEY", SECRET)
    server = stub(lambda n, reply: (200, "```json\n" + json.dumps(_good(reply)) + "\n```"))
    verdict = _judge(server.url).rate("幸福とは何かね？", "幸せとは？")
    assert verdict.scores == {"tone": 4.0, "approach": 3.0, "format": 3.0, "logic": 3.0}
    assert verdict.reasons["tone"] == "tone ok" and verdict.error is None and verdict.attempts == 1
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == f"Bearer {SECRET}"
    assert request["body"]["model"] == "stub-model"
    system = request["body"]["messages"][0]["content"]
    assert all(load_profile().rubric[a][4] in system for a in AXES)  # the profile's rubric text
    assert "幸せとは？" in request["body"]["messages"][1]["content"]


@pytest.mark.parametrize("content, missing", [
    ("I think it is good.", set(AXES)),
    (json.dumps({"tone": {"score": 7}, "approach": 2, "format": "3", "logic": {"score": "high"}}), {"tone", "logic"}),
    (json.dumps({"tone": 2, "approach": 2}), {"format", "logic"}),
])
def test_malformed_judge_answers_become_missing_scores(stub, content, missing):
    server = stub(lambda n, reply: (200, content))
    verdict = _judge(server.url).rate("君はどう思うかね？")
    assert {a for a, s in verdict.scores.items() if s is None} == missing
    assert verdict.error and len(server.requests) == 1  # deterministic junk is not asked again


def test_judge_timeouts_are_retried_then_missing(stub):
    server = stub(lambda n, reply: ("sleep", 1.0))
    start = time.perf_counter()
    verdict = _judge(server.url, timeout=0.2, retries=2).rate("君はどう思うかね？")
    assert verdict.scores == {a: None for a in AXES} and "timed out" in verdict.error
    assert len(server.requests) == 3 and verdict.attempts == 3
    assert time.perf_counter() - start < 3


def test_judge_retries_server_errors_and_stops_after_auth_failure(stub):
    flaky = stub(lambda n, reply: (503, "busy") if n == 1 else (200, json.dumps(_good(reply))))
    verdict = _judge(flaky.url).rate("君はどう思うかね？")
    assert verdict.attempts == 2 and verdict.scores["approach"] == 3.0
    denied = stub(lambda n, reply: (401, "no"))
    judge = _judge(denied.url)
    assert "401" in judge.rate("一つ目").error
    assert "401" in judge.rate("二つ目").error and len(denied.requests) == 1


def test_judge_urls_and_settings():
    assert chat_completions_url("http://h:8080") == "http://h:8080/v1/chat/completions"
    assert chat_completions_url("http://h:8080/v1/") == "http://h:8080/v1/chat/completions"
    assert chat_completions_url("https://h/api/v1/chat/completions") == "https://h/api/v1/chat/completions"
    assert public_url("https://user:pw@h:9/v1/chat/completions?key=x") == "https://h:9/v1/chat/completions"
    with pytest.raises(ConfigError, match="--judge-model"):
        Judge("http://h", "", load_profile())
    with pytest.raises(ConfigError, match="http"):
        Judge("localhost:8080", "m", load_profile())
    assert parse_verdict('{"tone": 4, "approach": 4, "format": 4, "logic": 4} and more').error is None


# --- the command on the tiny default run --------------------------------------------------------


def _dialogue_means(replies: list[dict], model: str, key: str) -> list[float]:
    by_prompt: dict[str, list[float]] = {}
    for r in replies:
        if r["model"] == model:
            by_prompt.setdefault(r["prompt_id"], []).append(r["scores"][key])
    return [sum(v) / len(v) for v in by_prompt.values()]


def test_evaluate_writes_a_consistent_report_and_keeps_the_previous_one(default_run_copy, tmp_path, stub,
                                                                         monkeypatch, capsys, caplog):
    import matplotlib.pyplot as plt

    run = default_run_copy
    selected = json.loads((run / "training_summary.json").read_text())["selected"]["step"]
    first_checkpoint = min((p for p in (run / "checkpoints").iterdir() if p.name != f"checkpoint-{selected}"),
                           key=lambda p: int(p.name.split("-")[1])).name  # its own row: not the final weights
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in [
        {"id": "q1", "prompt": "幸福とは何でしょうか。", "followups": ["お金があれば幸福です。"]},
        {"id": "q2", "prompt": "勇気とは何ですか。"},
        {"id": "q3", "prompt": "友達は多い方がいいですか。"},
    ]), encoding="utf-8")
    args = ["evaluate", str(run), "--prompts", str(prompts), "--max-new-tokens", "8"]
    assert main([*args, "--checkpoints", first_checkpoint, "--turns", "1"]) == 0
    folder = run / EVALUATION_DIR
    assert {p.name for p in folder.iterdir()} == {REPORT_MD, EVALUATION_JSON, MEANS_PNG, PROGRESSION_PNG,
                                                  DISTRIBUTIONS_PNG}
    for png in (MEANS_PNG, PROGRESSION_PNG, DISTRIBUTIONS_PNG):
        assert plt.imread(folder / png).shape[0] > 100
    data = json.loads((folder / EVALUATION_JSON).read_text(encoding="utf-8"))
    models = [m["name"] for m in data["models"]]
    assert models == ["base", first_checkpoint, "tuned"]
    replies = data["replies"]
    assert len(replies) == 3 * 3 * 2  # models x prompts x (1 + turns)
    assert {r["user"] for r in replies if r["prompt_id"] == "q1" and r["turn"] == 1} == {"お金があれば幸福です。"}
    assert {r["user"] for r in replies if r["prompt_id"] == "q2" and r["turn"] == 1} == {followup_script()[0]}
    stats = data["statistics"]
    for model in models:
        for key in KEYS:
            units = _dialogue_means(replies, model, key)
            entry = stats["summary"][model][key]
            assert entry["n"] == 3 and entry["mean"] == pytest.approx(sum(units) / 3)
            assert entry["ci_low"] - 1e-9 <= entry["mean"] <= entry["ci_high"] + 1e-9
    for key in KEYS:
        expected = paired_comparison(_dialogue_means(replies, "tuned", key), _dialogue_means(replies, "base", key))
        assert stats["tuned_vs_base"][key]["p_greater"] == pytest.approx(expected["p_greater"])
        assert stats["tuned_vs_base"][key]["rank_biserial"] == pytest.approx(expected["rank_biserial"])
    report = (folder / REPORT_MD).read_text(encoding="utf-8")
    assert "## Tuned vs base" in report and first_checkpoint in report and "![means](means.png)" in report
    assert "Report:" in capsys.readouterr().out

    # Second evaluation, with the judge: the first report is kept, renamed after its time.
    monkeypatch.setenv("SOCRATUNE_JUDGE_API_KEY", SECRET)
    server = stub(lambda n, reply: (200, "no scores today") if n % 3 == 0 else (200, json.dumps(_good(reply))))
    assert main([*args, "--checkpoints", "none", "--judge", server.url, "--judge-model", "stub-model",
                 "--judge-retries", "0"]) == 0
    kept = [p for p in run.iterdir() if p.name.startswith(f"{EVALUATION_DIR}-")]
    assert len(kept) == 1 and json.loads((kept[0] / EVALUATION_JSON).read_text(encoding="utf-8")) == data
    assert not [p for p in run.iterdir() if p.name.startswith(f".{EVALUATION_DIR}")]  # no staging left
    judged = json.loads((folder / EVALUATION_JSON).read_text(encoding="utf-8"))
    assert len(server.requests) == 6 and all(r["auth"] == f"Bearer {SECRET}" for r in server.requests)
    assert judged["judge"]["missing_replies"] == 2 and judged["judge"]["api_key_sent"] is True
    assert sum(r["judge"]["scores"]["tone"] is None for r in judged["replies"]) == 2
    assert set(judged["statistics"]["agreement"]) == set(AXES)
    assert judged["statistics"]["judge_summary"]["tuned"]["tone"]["n"] + \
        judged["statistics"]["judge_summary"]["base"]["tone"]["n"] == 4
    assert (folder / AGREEMENT_PNG).exists() and "## LLM judge" in (folder / REPORT_MD).read_text("utf-8")
    # The judged replies, in `socratune calibrate`'s input form (the two the judge missed left out).
    lines = [json.loads(line) for line in (folder / "judged.jsonl").read_text("utf-8").splitlines()]
    assert len(lines) == 4 and all(set(line) == {"id", "prompt", "text", "judge"} for line in lines)
    output = capsys.readouterr()
    for text in (output.out, output.err, caplog.text,
                 *(p.read_text(encoding="utf-8") for p in folder.iterdir() if p.suffix in (".json", ".md"))):
        assert SECRET not in text


def test_evaluate_refuses_unknown_checkpoints_and_unfinished_runs(default_run_copy, capsys):
    assert main(["evaluate", str(default_run_copy), "--checkpoints", "checkpoint-999999"]) == 2
    assert "allowed: all, none, checkpoint-" in capsys.readouterr().err
    (default_run_copy / "adapter" / "adapter_config.json").unlink()
    assert main(["evaluate", str(default_run_copy)]) == 2
    assert "not finished" in capsys.readouterr().err
    assert not (default_run_copy / EVALUATION_DIR).exists()


def test_a_checkpoint_with_the_final_adapters_weights_is_one_row_listed_as_its_alias(default_run_copy):
    from socratune.evaluation.evaluate import evaluate

    selected = json.loads((default_run_copy / "training_summary.json").read_text())["selected"]["step"]
    name = f"checkpoint-{selected}"
    data = evaluate(default_run_copy, limit=2, max_new_tokens=4, checkpoints=name).data
    assert [(m["name"], m["step"], m["aliases"]) for m in data["models"]] == [
        ("base", 0, []), ("tuned", selected, [name])]
    assert {r["model"] for r in data["replies"]} == {"base", "tuned"}
    assert f"| tuned (= {name}) |" in (default_run_copy / EVALUATION_DIR / REPORT_MD).read_text(encoding="utf-8")
