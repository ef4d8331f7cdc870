"""``socratune synth`` and the endpoint client: fast cases against a fake OpenAI-compatible server
on loopback (``fake_openai.py``), and end-to-end cases (marked slow) where ``socratune serve`` of
the tiny default run plays both roles.

    python -m pytest -q tests/test_synth.py -m "not slow"
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import resources
from pathlib import Path

import pytest
import yaml

from fake_openai import FakeOpenAI, Fault
from socratune.cli import main
from socratune.core.errors import (
    ConfigError,
    EndpointFailed,
    EndpointLost,
    EndpointUnreachable,
    RunDirError,
    SynthInterrupted,
)
from socratune.core.rundir import RunDir
from socratune.data.dialogues import load_dialogues
from socratune.synth import (
    NearDuplicates,
    SynthPaths,
    SynthRequest,
    load_synth_profile,
    plan_dialogue,
    strip_speaker,
    synth,
    synth_status,
)
from socratune.synth.client import ChatClient, split_url

SECRET = "sk-synth-test-0123456789abcdef"
TOPICS = ["勇気", "正義", "幸福", "友情", "知恵", "自由", "美", "真実", "節度", "敬虔", "学び", "時間"]


def socratic(number: int, body: dict, headers: dict) -> str:
    """Socrates asks back about a topic picked by the request's seed; the student answers plainly."""
    topic = TOPICS[body.get("seed", number) % len(TOPICS)]
    other = TOPICS[(body.get("seed", number) // 7) % len(TOPICS)]
    if "ソクラテスです" in body["messages"][0]["content"]:
        return f"なるほど、君は{topic}が大切だと言うのだね。では{other}と{topic}はどう違うのだろうか？"
    return f"{topic}は{other}とは違って、毎日の暮らしの中で試されるものだと思います。"


def clients(url: str, concurrency: int = 2, retries: int = 2, timeout: float = 5.0) -> tuple[ChatClient, ChatClient]:
    return tuple(ChatClient(url, "fake", key_variables=("SOCRATUNE_SYNTH_API_KEY",), timeout=timeout,
                            max_retries=retries, concurrency=concurrency, role=role)
                 for role in ("student", "socrates"))


def request(out: Path, **kwargs) -> SynthRequest:
    return SynthRequest(**{"output": str(out), "dialogues": 6, "turns": 2, "concurrency": 2, "seed": 3,
                           "min_score": 0.0, **kwargs})


@pytest.fixture
def fake():
    servers = []

    def start(answer=socratic, port=0):
        servers.append(FakeOpenAI(answer, port))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def indices(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [json.loads(line)["meta"]["index"] for line in path.read_text(encoding="utf-8").splitlines()]


# --- the profile and the plan ----------------------------------------------------------------------


def test_bundled_profile_has_100_own_questions_and_full_personas():
    profile, digest, _ = load_synth_profile()
    assert len(profile.questions) >= 100 and len(set(profile.questions)) == len(profile.questions)
    assert len(profile.personas) >= 10 and len(digest) == 64
    assert all(p.age and p.occupation and p.stance and p.speech for p in profile.personas)
    sample = json.loads(resources.files("socratune").joinpath("assets/sample_dialogues_ja.json").read_text("utf-8"))
    known = {m["content"].strip() for d in sample for m in d["messages"]}
    assert not known & set(profile.questions)  # none copied from the shared set's sample


def test_plan_is_reproducible_per_index_and_varies(tmp_path):
    profile, _, _ = load_synth_profile()
    assert [plan_dialogue(profile, 7, i) for i in range(20)] == [plan_dialogue(profile, 7, i) for i in range(20)]
    assert len({plan_dialogue(profile, 7, i)[0] for i in range(20)}) > 10
    assert [plan_dialogue(profile, 7, i) for i in range(5)] != [plan_dialogue(profile, 8, i) for i in range(5)]
    bad = tmp_path / "bad.yaml"
    raw = yaml.safe_load(resources.files("socratune").joinpath("assets/synth_socrates.yaml").read_text("utf-8"))
    raw["socrates"]["temprature"] = 0.3
    bad.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError, match="socrates.temprature"):
        load_synth_profile(bad)


def test_base_urls_are_normalised_and_credentials_split_off():
    assert split_url("http://h:8000", "--url")[0] == "http://h:8000/v1"
    assert split_url("http://h:8000/v1/", "--url")[0] == "http://h:8000/v1"
    assert split_url("https://h/api/v1/chat/completions", "--url")[0] == "https://h/api/v1"
    assert split_url("https://u:p%40ss@h:9/v1?k=1", "--url") == ("https://h:9/v1", ("u", "p@ss"), {"k": "1"})
    with pytest.raises(ConfigError, match="--url"):
        split_url("localhost:8000", "--url")


def test_near_duplicates_found_by_jaccard_not_by_accident():
    index = NearDuplicates(0.6, 5)
    base = "君は勇気とは何だと思うかね？ 恐れを知らぬことと、恐れに耐えることは同じだろうか？" * 2
    index.add("a", base)
    assert index.find(base.replace("君", "あなた", 1))[0] == "a"  # one word changed: a near-duplicate
    assert index.find("正義とは強い者の利益だと君は言うのかね？ では弱い者の正義はどこにあるのだろう？") is None


# --- the client against faults --------------------------------------------------------------------


def test_client_retries_503_429_and_dropped_connections_then_answers(fake):
    faults = {1: Fault(503), 2: Fault(429, {"Retry-After": "0"}), 3: Fault(None)}
    server = fake(lambda n, body, headers: faults.get(n) or "そうかね？")
    student, _ = clients(server.url, retries=3)
    reply = student.chat([{"role": "user", "content": "問い"}], temperature=0.5, max_tokens=16)
    assert reply.text == "そうかね？" and reply.attempts == 4 and reply.completion_tokens == 6
    assert len(server.posts()) == 4


def test_client_gives_up_after_its_retries_and_down_at_start_is_its_own_error(fake):
    server = fake(lambda n, body, headers: Fault(500))
    student, _ = clients(server.url, retries=1)
    with pytest.raises(EndpointFailed, match="HTTP 500") as failed:
        student.chat([{"role": "user", "content": "問い"}], temperature=0.5, max_tokens=16)
    assert failed.value.attempts == 2 and len(server.posts()) == 2
    port = server.port
    server.close()
    student, _ = clients(f"http://127.0.0.1:{port}", retries=0)
    with pytest.raises(EndpointUnreachable, match=f"127.0.0.1:{port}/v1 does not answer"):
        student.check()


def test_key_is_sent_as_bearer_and_url_credentials_as_basic_auth(fake, monkeypatch):
    server = fake(lambda n, body, headers: "はい")
    monkeypatch.setenv("SOCRATUNE_SYNTH_API_KEY", SECRET)
    student, _ = clients(server.url)
    student.chat([{"role": "user", "content": "問い"}], temperature=0, max_tokens=8)
    assert server.posts()[-1]["headers"]["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in json.dumps(student.describe())
    with_user = server.url.replace("http://", "http://alice:pa%3Ass@")
    student = ChatClient(with_user, "fake", key_variables=("SOCRATUNE_SYNTH_API_KEY",), timeout=5)
    student.chat([{"role": "user", "content": "問い"}], temperature=0, max_tokens=8)
    assert server.posts()[-1]["headers"]["authorization"] == "Basic YWxpY2U6cGE6c3M="  # alice:pa:ss
    assert "alice" not in json.dumps(student.describe()) and student.describe()["auth"] == "basic"


def test_a_server_echoing_the_key_gets_it_redacted_from_the_error(fake, monkeypatch):
    monkeypatch.setenv("SOCRATUNE_SYNTH_API_KEY", SECRET)
    server = fake(lambda n, body, headers: Fault(400, message=f"bad key {headers['authorization']}"))
    student, _ = clients(server.url)
    with pytest.raises(EndpointFailed) as failed:
        student.chat([{"role": "user", "content": "問い"}], temperature=0, max_tokens=8)
    assert "HTTP 400: bad key Bearer ***" in str(failed.value) and SECRET not in str(failed.value)


# --- synth against the fake server -----------------------------------------------------------------


def test_synth_output_validates_carries_metadata_and_resumes_without_duplicates(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("SOCRATUNE_SYNTH_API_KEY", SECRET)
    server = fake()
    out = tmp_path / "data.jsonl"
    summary = synth(request(out), *clients(server.url))
    assert summary["done"] == 6 and summary["kept"] + summary["rejected"] == 6 and summary["kept"] >= 1
    assert len(server.posts()) == 6 * 3  # 2 exchanges: Socrates, student, Socrates
    report = load_dialogues(out)
    assert not report.rejections and len(report.kept) == summary["kept"]
    line = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert [m["role"] for m in line["messages"]] == ["user", "assistant", "user", "assistant"]
    meta = line["meta"]
    question, persona = plan_dialogue(load_synth_profile()[0], 3, meta["index"])
    assert meta["question"] == question == line["messages"][0]["content"] and meta["persona"]["name"] == persona.name
    assert meta["models"] == {"student": "fake", "socrates": "fake"} and meta["usage"]["requests"] == 3
    assert set(meta["scores"]["style"]) == {"tone", "approach", "format", "logic", "overall"}
    assert summary["usage"]["completion_tokens"] > 0 and summary["scores_all"]["overall"]["n"] == 6

    # The same command again does nothing; a larger --dialogues continues with the missing indices.
    synth(request(out), *clients(server.url))
    assert len(server.posts()) == 18
    synth(request(out, dialogues=9), *clients(server.url))
    done = indices(out) + indices(SynthPaths.for_output(out).rejected)
    assert sorted(done) == list(range(9)) and len(server.posts()) == 27
    record = json.loads(SynthPaths.for_output(out).record.read_text(encoding="utf-8"))
    assert len(record["starts"]) == 3 and record["arguments"]["dialogues"] == 9
    assert record["endpoints"]["student"]["url"] == server.url and record["summary"]["done"] == 9
    with pytest.raises(ConfigError, match="seed"):
        synth(request(out, seed=4), *clients(server.url))
    for path in tmp_path.rglob("*"):  # the key is never written anywhere
        assert path.is_dir() or SECRET not in path.read_text(encoding="utf-8")


def test_rejects_go_beside_the_output_with_reasons(fake, tmp_path):
    constant = fake(lambda n, body, headers: "君はどう思うかね？ それは本当に正しいのだろうか？")
    out = tmp_path / "dup.jsonl"
    summary = synth(request(out, dialogues=4, turns=1), *clients(constant.url))
    rejected = [json.loads(x) for x in (tmp_path / "dup.rejected.jsonl").read_text("utf-8").splitlines()]
    assert summary["kept"] + len(rejected) == 4
    assert all(r["reason"].startswith("near_duplicate: of dup.jsonl#") for r in rejected
               if r["messages"][0]["content"]
               == json.loads(out.read_text("utf-8").splitlines()[0])["messages"][0]["content"])
    # Against an existing data file: the kept dialogues above are near-duplicates of themselves.
    again = tmp_path / "again.jsonl"
    summary = synth(request(again, dialogues=4, turns=1, dedupe_against=(str(out),)), *clients(constant.url))
    assert summary["kept"] < 4 and any(k.startswith("near_duplicate") for k in summary["rejected_by_reason"])
    # Thresholds from the profile: a reply scoring low overall is rejected with its score.
    lecture = fake(lambda n, body, headers: "答えは簡単です。勇気とは恐れに打ち勝つことです。以上です。")
    low = tmp_path / "low.jsonl"
    synth(request(low, dialogues=2, turns=1, min_score=3.5), *clients(lecture.url))
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "low.rejected.jsonl").read_text("utf-8").splitlines()]
    assert len(reasons) == 2 and all(r.startswith("low_score: overall") and "< 3.5" in r for r in reasons)
    assert low.read_text(encoding="utf-8") == ""


def test_a_second_writer_is_kept_out_and_an_unwritable_output_is_a_clear_error(fake, tmp_path, capsys):
    server = fake()
    out = tmp_path / "data.jsonl"
    with RunDir(SynthPaths.for_output(out).state).lock(), pytest.raises(RunDirError):
        synth(request(out), *clients(server.url))
    assert not out.exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder", encoding="utf-8")
    assert main(["synth", "--output", str(a_file / "d.jsonl"), "--url", server.url, "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert "a file is in the way" in err and str(a_file) in err and a_file.read_text("utf-8") == "not a folder"


def test_speaker_labels_are_stripped_from_replies():
    assert strip_speaker(" ソクラテス： 君はどう思うかね？", "ソクラテス") == "君はどう思うかね？"
    assert strip_speaker("山本紗希: えっと、たぶん違います。", "山本紗希") == "えっと、たぶん違います。"
    assert strip_speaker("ソクラテスはそう言った。", "ソクラテス") == "ソクラテスはそう言った。"


def test_judge_scores_filter_dialogues_and_prices_give_the_cost(fake, tmp_path):
    from socratune.evaluation.judge import Judge
    from socratune.style import AXES, load_profile

    def answer(n, body, headers):
        if body["messages"][0]["content"].startswith("You rate replies"):  # the judge's rubric
            reply = body["messages"][-1]["content"].split("Reply to rate:")[-1]
            score = 3 if reply.split("君は")[1].split("が")[0] in TOPICS[:6] else 1  # about half the topics
            return json.dumps({axis: {"score": score, "reason": "seen"} for axis in AXES})
        return socratic(n, body, headers)

    server = fake(answer)
    raw = yaml.safe_load(resources.files("socratune").joinpath("assets/synth_socrates.yaml").read_text("utf-8"))
    raw["filter"].update(min_overall=0.5, min_axis={}, min_judge=2.0)
    raw["prices"] = {"prompt_per_million": 1.0, "completion_per_million": 4.0}
    config = tmp_path / "synth.yaml"
    config.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    out = tmp_path / "judged.jsonl"
    judge = Judge(server.url, "judge", load_profile(), retries=0)
    summary = synth(request(out, dialogues=8, turns=1, config=str(config), min_score=None), *clients(server.url),
                    judge)
    lines = [json.loads(x) for x in out.read_text("utf-8").splitlines()]
    rejected = [json.loads(x) for x in (tmp_path / "judged.rejected.jsonl").read_text("utf-8").splitlines()]
    assert all(line["meta"]["scores"]["judge"]["mean"] == 3.0 for line in lines)
    assert all(r["reason"] == "low_judge_score: 1.00 < 2" for r in rejected)
    assert lines and rejected and len(lines) + len(rejected) == 8
    usage = summary["usage"]
    assert summary["cost"] == pytest.approx(usage["prompt_tokens"] / 1e6 + usage["completion_tokens"] * 4 / 1e6)


def test_endpoint_down_at_start_writes_nothing(fake, tmp_path):
    server = fake()
    port = server.port
    server.close()
    out = tmp_path / "data.jsonl"
    with pytest.raises(EndpointUnreachable, match="does not answer"):
        synth(request(out), *clients(f"http://127.0.0.1:{port}/v1", retries=0))
    assert list(tmp_path.iterdir()) == []


def test_endpoint_dying_mid_run_keeps_finished_dialogues_and_the_rerun_completes(fake, tmp_path):
    alive = {"until": 7}
    server = fake(lambda n, body, headers: socratic(n, body, headers) if n <= alive["until"] else Fault(503))
    out = tmp_path / "data.jsonl"
    with pytest.raises(EndpointLost, match="run the same command again"):
        synth(request(out, dialogues=8), *clients(server.url, retries=1))
    paths = SynthPaths.for_output(out)
    first = indices(out) + indices(paths.rejected)
    assert 1 <= len(first) < 8 and len(set(first)) == len(first)
    alive["until"] = 10**6
    synth(request(out, dialogues=8), *clients(server.url, retries=1))
    done = indices(out) + indices(paths.rejected)
    assert sorted(done) == list(range(8))
    assert load_dialogues(out).rejections == []


def test_torn_last_line_is_cut_and_that_dialogue_redone(fake, tmp_path):
    server = fake()
    out = tmp_path / "data.jsonl"
    synth(request(out, dialogues=3, turns=1), *clients(server.url))
    paths = SynthPaths.for_output(out)
    victim = out if out.read_text("utf-8") else paths.rejected
    lines = victim.read_text("utf-8").splitlines(keepends=True)
    victim.write_text("".join(lines[:-1]) + lines[-1][:25], encoding="utf-8")  # kill -9 mid-write
    synth(request(out, dialogues=3, turns=1), *clients(server.url))
    assert sorted(indices(out) + indices(paths.rejected)) == [0, 1, 2]


def test_ctrl_c_drops_dialogues_in_flight_and_the_rerun_completes(fake, tmp_path):
    server = fake(lambda n, body, headers: time.sleep(0.05) or socratic(n, body, headers))
    out = tmp_path / "data.jsonl"

    def interrupt(progress):
        if progress.done == 2:
            raise KeyboardInterrupt

    with pytest.raises(SynthInterrupted, match="run the same command to continue"):
        synth(request(out, dialogues=10, concurrency=3), *clients(server.url, concurrency=3), on_progress=interrupt)
    paths = SynthPaths.for_output(out)
    assert len(indices(out) + indices(paths.rejected)) == 2 and load_dialogues(out).rejections == []
    synth(request(out, dialogues=10, concurrency=3), *clients(server.url, concurrency=3))
    assert sorted(indices(out) + indices(paths.rejected)) == list(range(10))


def test_cli_synth_summary_status_and_bad_input(fake, tmp_path, capsys):
    server = fake()
    out = tmp_path / "cli.jsonl"
    assert main(["synth", "--output", str(out), "--url", server.url, "--model", "fake", "--dialogues", "3",
                 "--turns", "1", "--min-score", "0"]) == 0
    printed = capsys.readouterr()
    assert "3 of 3 dialogues done" in printed.out and "tokens:" in printed.out and "synth: 3/3 done" in printed.err
    assert main(["synth", "--status", str(out)]) == 0
    assert "3 of 3 dialogues done" in capsys.readouterr().out
    assert synth_status(out)["running"] is False
    assert main(["synth", "--output", str(out), "--url", "localhost:1", "--model", "m"]) == 2
    assert "--student-url must be an http(s) URL" in capsys.readouterr().err
    assert main(["synth", "--output", str(tmp_path / "x.jsonl"), "--url", "http://127.0.0.1:9/v1",
                 "--model", "m", "--retries", "0"]) == 2
    assert "does not answer" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()


# --- end to end: `socratune serve` of the tiny default run plays both roles ------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "SOCRATUNE_SYNTH_API_KEY": SECRET}


class Served:
    """``socratune serve RUN`` in a subprocess on a fixed loopback port (so it can be restarted)."""

    def __init__(self, run: Path, port: int, extra: tuple[str, ...] = ()):
        self.run, self.port, self.url = run, port, f"http://127.0.0.1:{port}/v1"
        self.extra = extra  # more `socratune serve` flags
        self.process: subprocess.Popen | None = None

    def start(self) -> Served:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "socratune", "serve", str(self.run), "--port", str(self.port),
             "--max-new-tokens", "24", *self.extra], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return self
            except OSError:
                assert self.process.poll() is None, "socratune serve exited"
                time.sleep(0.5)
        raise AssertionError("socratune serve did not answer within 180 s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def one_server(default_run):
    """One server for the tests that do not kill it: each start costs seconds of model loading."""
    server = Served(default_run, _free_port()).start()
    yield server
    server.kill()


@pytest.fixture
def served(default_run):
    servers = []

    def start(port: int | None = None, extra: tuple[str, ...] = ()) -> Served:
        servers.append(Served(default_run, port or _free_port(), extra).start())
        return servers[-1]

    yield start
    for server in servers:
        server.kill()


def _synth_cli(out: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "socratune", "synth", "--output", str(out), "--url", url,
            "--model", "run", "--min-score", "0", *extra]


@pytest.mark.slow
def test_synth_over_socratune_serve_validates_trains_and_never_writes_the_key(one_server, tmp_path):
    server = one_server
    model = json.loads(urllib.request.urlopen(f"{server.url}/models", timeout=10).read())["data"][0]["id"]
    out = tmp_path / "dialogues.jsonl"
    done = subprocess.run([*_synth_cli(out, server.url, "--dialogues", "5", "--turns", "2"), "--model", model],
                          check=False, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "5 of 5 dialogues done" in done.stdout and SECRET not in done.stdout + done.stderr
    kept = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(kept) >= 3 and main(["validate", str(out)]) == 0
    run = tmp_path / "run"
    assert main(["train", "--data", str(out), "--output", str(run), "--epochs", "1"]) == 0
    assert (run / "adapter" / "adapter_config.json").exists()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(SECRET.encode() not in p.read_bytes() for p in written)


@pytest.mark.slow
def test_serve_killed_mid_run_then_restarted_resumes_to_the_full_count(served, tmp_path):
    server = served()
    model = json.loads(urllib.request.urlopen(f"{server.url}/models", timeout=10).read())["data"][0]["id"]
    out = tmp_path / "dialogues.jsonl"
    paths = SynthPaths.for_output(out)
    command = [*_synth_cli(out, server.url, "--dialogues", "10", "--turns", "2", "--retries", "1"), "--model", model]
    first = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(indices(out) + indices(paths.rejected)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    server.kill()
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 1 and "run the same command again" in stderr, stderr
    before = indices(out) + indices(paths.rejected)
    assert 3 <= len(before) < 10 and len(set(before)) == len(before)
    server.start()  # the same port again
    again = subprocess.run(command, check=False, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    after = indices(out) + indices(paths.rejected)
    assert sorted(after) == list(range(10))  # none lost, none twice
    assert load_dialogues(out).rejections == []


@pytest.mark.slow
def test_429s_from_the_servers_queue_limit_are_retried(served, tmp_path):
    server = served(extra=("--max-batch", "2"))
    model = json.loads(urllib.request.urlopen(f"{server.url}/models", timeout=10).read())["data"][0]["id"]
    student = ChatClient(server.url, model, key_variables=(), timeout=120, max_retries=10, concurrency=16)
    out = tmp_path / "burst.jsonl"
    # 16 dialogues at once against 2 generating + 2 waiting requests: the rest get 429 and retry.
    summary = synth(request(out, dialogues=16, turns=1, concurrency=16), student, student)
    assert summary["done"] == 16 and summary["usage"]["requests"] == 16
    assert summary["usage"]["attempts"] > 16  # some were answered 429 first
