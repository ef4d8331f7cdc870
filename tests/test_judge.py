"""The LLM judge on the shared client: URL credentials, a judge that fails on every reply, a judge
that is down before evaluation starts (fake OpenAI-compatible server on loopback).

    python -m pytest -q tests/test_judge.py
"""

from __future__ import annotations

import json

import pytest

from fake_openai import FakeOpenAI, Fault
from socratune.core.errors import EndpointUnreachable, JudgeFailed
from socratune.evaluation.judge import Judge
from socratune.style import AXES, load_profile

GOOD = json.dumps({axis: {"score": 3, "reason": "ok"} for axis in AXES})


@pytest.fixture
def fake():
    servers = []

    def start(answer):
        servers.append(FakeOpenAI(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_url_credentials_are_sent_as_basic_auth_and_never_reported(fake, monkeypatch):
    monkeypatch.setenv("SOCRATUNE_JUDGE_API_KEY", "sk-judge-should-not-be-sent")
    server = fake(lambda n, body, headers: GOOD)
    judge = Judge(server.url.replace("http://", "http://bob:s3cret@"), "judge-model", load_profile(), retries=0)
    verdict = judge.rate("君はどう思うかね？", "勇気とは？")
    assert verdict.error is None and verdict.scores["tone"] == 3.0
    assert server.posts()[0]["headers"]["authorization"] == "Basic Ym9iOnMzY3JldA=="  # bob:s3cret
    described = json.dumps(judge.describe())
    assert "bob" not in described and "s3cret" not in described and judge.describe()["api_key_sent"] is True


def test_a_judge_that_scores_no_reply_is_an_error_not_an_empty_column(fake):
    junk = fake(lambda n, body, headers: "I cannot rate this.")
    with pytest.raises(JudgeFailed, match="scored none of the 3 replies"):
        Judge(junk.url, "m", load_profile(), retries=0).rate_many([("a", None), ("b", None), ("c", None)])
    denied = fake(lambda n, body, headers: Fault(401))
    with pytest.raises(JudgeFailed, match="HTTP 401"):
        Judge(denied.url, "m", load_profile(), retries=0).rate_many([("a", None), ("b", None)], workers=1)
    assert len(denied.posts()) == 1  # after a 401 no further request is made
    # One reply scored is a result (the rest are reported missing), not a failure.
    partly = fake(lambda n, body, headers: GOOD if n == 2 else "no")
    verdicts = Judge(partly.url, "m", load_profile(), retries=0).rate_many([("a", None), ("b", None)], workers=1)
    assert [v.error is None for v in verdicts] == [False, True]


def test_a_judge_that_is_down_or_refuses_the_key_fails_the_start_check(fake):
    server = fake(lambda n, body, headers: GOOD)
    port = server.port
    server.close()
    with pytest.raises(EndpointUnreachable, match=rf"judge endpoint http://127.0.0.1:{port}/v1 does not answer"):
        Judge(f"http://127.0.0.1:{port}", "m", load_profile()).check()


def test_evaluate_with_a_judge_that_is_down_stops_before_generating(fake, tmp_path, capsys):
    from socratune.cli import main

    server = fake(lambda n, body, headers: GOOD)
    port = server.port
    server.close()
    code = main(["evaluate", str(tmp_path / "no-run-needed"), "--judge", f"http://127.0.0.1:{port}/v1",
                 "--judge-model", "m"])
    assert code == 2 and "does not answer" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_evaluate_exits_non_zero_when_the_judge_scores_no_reply(fake, default_run_copy, capsys):
    from socratune.cli import main

    junk = fake(lambda n, body, headers: "I would rather not say.")
    code = main(["evaluate", str(default_run_copy), "--checkpoints", "none", "--limit", "2",
                 "--max-new-tokens", "8", "--judge", junk.url, "--judge-model", "m", "--judge-retries", "0"])
    assert code == 1 and "scored none of the 4 replies" in capsys.readouterr().err
    assert not (default_run_copy / "evaluation").exists()  # no report with an empty judge column
