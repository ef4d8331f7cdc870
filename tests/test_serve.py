"""``socratune serve``, started for real on a loopback port with the default run's tiny model:
plain and streamed completions, bad requests, concurrent clients, the official ``openai``
client, ``stop``, the API key and CORS; hostile requests over raw sockets (bad lengths, bodies
over the limit, trickled heads and bodies, a burst of 50 connections); and the chat page in
headless Chromium (Debian's chromium + chromium-driver, driven by Selenium; skipped with the
reason when they are not installed, and failed instead where CI=true).

    SOCRATUNE_TEST_DEFAULT_RUN=/tmp/socratune_default_run python -m pytest -q tests/test_serve.py
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from socratune.cli import main
from socratune.core.errors import ConfigError
from socratune.generation.generate import GenParams, generate_replies
from socratune.serving.engine import Engine, model_id_for
from socratune.serving.schema import ServeLimits
from socratune.serving.server import ChatServer

QUESTION = "幸福とは何でしょうか？"
MAX_NEW_TOKENS = 48  # the test server's default reply length: enough to stream, quick on the tiny model


@pytest.fixture(scope="module")
def loaded(default_run: Path) -> tuple[Any, Any]:
    from socratune.model.modeling import load_for_inference

    return load_for_inference(default_run)


def _start(engine: Engine, **options: Any) -> ChatServer:
    server = ChatServer("127.0.0.1", 0, **options)
    threading.Thread(target=server.serve, args=(engine,), daemon=True).start()
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    connection.request("GET", "/health")  # waits in the listen backlog until uvicorn has started
    assert connection.getresponse().status == 200
    connection.close()
    return server


def _stop(server: ChatServer) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def server(loaded, default_run: Path) -> Iterator[ChatServer]:
    model, tokenizer = loaded
    server = _start(Engine(model, tokenizer, model_id_for(default_run), GenParams(max_new_tokens=MAX_NEW_TOKENS)))
    yield server
    _stop(server)


def request(server: ChatServer, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPResponse, bytes]:
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response, response.read()
    finally:
        connection.close()


def chat(server: ChatServer, payload: dict[str, Any]) -> tuple[int, http.client.HTTPResponse, bytes]:
    return request(server, "POST", "/v1/chat/completions", json.dumps(payload).encode(),
                   {"Content-Type": "application/json"})


def ask(server: ChatServer, messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    payload = {"model": server.engine.model_id, "messages": messages, **extra}
    status, _, body = chat(server, payload)
    assert status == 200, body
    return json.loads(body)


def events(body: bytes) -> list[Any]:
    """The ``data:`` payloads of a server-sent event stream; ``[DONE]`` stays a string."""
    found = []
    for block in body.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block.removeprefix("data: ")
            found.append(data if data == "[DONE]" else json.loads(data))
    return found


def streamed_text(chunks: list[Any]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                   if isinstance(c, dict) and c.get("choices"))


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_health_models_and_chat_page(server, default_run):
    status, _, body = request(server, "GET", "/health")
    assert status == 200 and json.loads(body) == {"status": "ok", "model": default_run.name}
    status, _, body = request(server, "GET", "/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == [default_run.name]
    status, response, body = request(server, "GET", "/")
    assert status == 200 and response.getheader("Content-Type").startswith("text/html")
    assert b'<textarea id="input"' in body and b"/v1/chat/completions" in body


def test_plain_completion_is_the_greedy_reply_of_generate(server, loaded):
    model, tokenizer = loaded
    expected = generate_replies(model, tokenizer, [user(QUESTION)], GenParams(max_new_tokens=MAX_NEW_TOKENS))[0]
    reply = ask(server, user(QUESTION))
    assert reply["object"] == "chat.completion" and reply["model"] == server.engine.model_id
    choice = reply["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected} and expected
    assert choice["finish_reason"] in ("stop", "length")
    usage = reply["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > usage["prompt_tokens"] > 0

    sampled = [ask(server, user(QUESTION), temperature=1.0, seed=seed)["choices"][0]["message"]["content"]
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]  # a request's seed makes its sampled reply reproducible

    cut = ask(server, user(QUESTION), max_tokens=3)
    assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 3
    # A system message and earlier turns reach the model (the tiny template folds the system text in).
    conversation = [{"role": "system", "content": "短く答えよ。"}, *user(QUESTION),
                    {"role": "assistant", "content": expected}, *user("では、正義とは？")]
    longer = ask(server, conversation)
    assert longer["usage"]["prompt_tokens"] > usage["prompt_tokens"] + usage["completion_tokens"]


def test_streamed_pieces_add_up_to_the_plain_reply(server):
    plain = ask(server, user(QUESTION))["choices"][0]["message"]["content"]
    status, response, body = chat(server, {"model": server.engine.model_id, "messages": user(QUESTION),
                                           "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    chunks = events(body)
    assert chunks[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c for c in chunks[1:-2] if c["choices"][0]["delta"].get("content")]
    assert len(pieces) > 3, "the reply came in one piece, not streamed"
    assert streamed_text(chunks) == plain
    assert {c["object"] for c in chunks[:-1]} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks[:-1]}) == 1
    assert chunks[-3]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] > 0


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def _bad_requests(model: str) -> list[tuple[str, dict[str, Any], int, str | None, str | None]]:
    """(what, request, status, param, code) — every one must come back in OpenAI's error shape."""
    ok = {"model": model, "messages": user(QUESTION)}
    return [
        ("no messages key", {"model": model}, 400, "messages", None),
        ("empty messages", {**ok, "messages": []}, 400, "messages", None),
        ("unknown role", {**ok, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", None),
        ("content not text", {**ok, "messages": [{"role": "user", "content": 42}]}, 400, "messages.0.content", None),
        ("unsupported parameter", {**ok, "logprobs": True}, 400, "logprobs", None),
        ("five stop strings", {**ok, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
        ("empty stop string", {**ok, "stop": ""}, 400, "stop", None),
        ("temperature that divides into inf", {**ok, "temperature": 1e-320}, 400, "temperature", None),
        ("temperature overflowing to inf", {**ok, "temperature": 1e400}, 400, "temperature", None),
        ("repetition penalty near zero", {**ok, "repetition_penalty": 1e-300}, 400, "repetition_penalty", None),
        ("max_tokens beyond any int", {**ok, "max_tokens": 10**30}, 400, "max_tokens", None),
        ("seed beyond 64 bits", {**ok, "seed": -(10**25)}, 400, "seed", None),
        ("lone surrogate in content", {**ok, "messages": user("幸福\ud800とは")}, 400, "messages.0.content", None),
        ("lone surrogate in model", {**ok, "model": "\udfff"}, 400, "model", None),
        ("deeply nested content", {**ok, "messages": [{"role": "user", "content": _nested(40)}]}, 400,
         "messages.0.content" + ".0" * 13, None),
        ("temperature as text", {**ok, "temperature": "0.5"}, 400, "temperature", None),
        ("temperature too high", {**ok, "temperature": 3}, 400, "temperature", None),
        ("n > 1", {**ok, "n": 2}, 400, "n", None),
        ("max_tokens 0", {**ok, "max_tokens": 0}, 400, "max_tokens", None),
        ("max_tokens above the ceiling", {**ok, "max_tokens": 5000}, 400, "max_tokens", None),
        ("max_tokens beyond the context", {**ok, "max_tokens": 1024}, 400, "messages", "context_length_exceeded"),
        ("too many messages", {**ok, "messages": user("a") * 65}, 400, "messages", "too_many_messages"),
        ("message too long", {**ok, "messages": user("問" * 8001)}, 400, "messages.0.content", None),
        ("messages too long together", {**ok, "messages": (user("問" * 7000) + [
            {"role": "assistant", "content": "答" * 7000}]) * 2 + user("問" * 7000)}, 400, "messages",
         "messages_too_long"),
        ("turns out of order", {**ok, "messages": user("a") + user("b")}, 400, "messages.1.role", None),
        ("system message later", {**ok, "messages": user("a") + [{"role": "system", "content": "s"}]}, 400,
         "messages.1.role", None),
        ("ends on the bot", {**ok, "messages": user("a") + [{"role": "assistant", "content": "b"}]}, 400,
         "messages", None),
        ("unknown model", {**ok, "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ]


def test_bad_requests_get_4xx_in_openai_error_shape(server):
    def check(status: int, body: bytes, expected_status: int, param: str | None = None,
              code: str | None = None) -> None:
        assert status == expected_status, body
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["type"] == "invalid_request_error"
        assert (error["param"], error["code"]) == (param, code), error

    for _what, payload, status, param, code in _bad_requests(server.engine.model_id):
        got_status, _, body = chat(server, payload)
        check(got_status, body, status, param, code)

    json_headers = {"Content-Type": "application/json"}
    status, _, body = request(server, "POST", "/v1/chat/completions", b'{"model": ', json_headers)
    check(status, body, 400)
    status, _, body = request(server, "POST", "/v1/chat/completions", b"[1, 2]", json_headers)
    check(status, body, 400)
    status, _, body = request(server, "POST", "/v1/chat/completions", json.dumps(
        {"model": server.engine.model_id, "messages": user(QUESTION)}).encode(), {"Content-Type": "text/plain"})
    check(status, body, 415)
    status, _, body = request(server, "GET", "/v1/nothing-here")
    check(status, body, 404, code="not_found")
    status, response, body = request(server, "GET", "/v1/chat/completions")
    check(status, body, 405, code="method_not_allowed")
    assert response.getheader("Allow") == "POST"
    status, _, body = request(server, "DELETE", "/health")
    check(status, body, 405, code="method_not_allowed")
    status, _, body = request(server, "GET", "/health", headers={"Host": "attacker.example:8000"})
    check(status, body, 403)  # DNS rebinding: a loopback server answers to local names only

    # A body announced too large is refused before it is read; one without a length is refused too.
    for headers, expected in ((("Content-Length", str(10**7)),), 413), ((), 411):
        connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        connection.putrequest("POST", "/v1/chat/completions")
        connection.putheader("Content-Type", "application/json")
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        check(response.status, response.read(), expected)
        connection.close()

    # Numbers and nesting the JSON parser itself would choke on still name where they were.
    prefix = f'{{"model": "{server.engine.model_id}", "messages": [{{"role": "user", "content": "q"}}], '
    for raw, param in ((prefix + '"max_tokens": ' + "9" * 5000 + "}", "max_tokens"),
                       (prefix + '"temperature": NaN}', "temperature"), (prefix + '"seed": -Infinity}', "seed")):
        status, _, body = request(server, "POST", "/v1/chat/completions", raw.encode(), json_headers)
        check(status, body, 400, param)
    status, _, body = request(server, "POST", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, json_headers)
    check(status, body, 400)
    assert "nests deeper" in json.loads(body)["error"]["message"]

    assert ask(server, user(QUESTION))["choices"][0]["message"]["content"]  # and the server still answers


class GenerationSpy:
    """The model, recording each forward pass the server's batcher makes (when, and over how many
    rows), each slowed by ``pause_s`` so that other clients' requests arrive meanwhile."""

    def __init__(self, model: Any, pause_s: float = 0.05):
        self.model, self.pause_s = model, pause_s
        self.forwards: list[tuple[float, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.pause_s)
        self.forwards.append((time.monotonic(), kwargs["input_ids"].shape[0]))
        return self.model(*args, **kwargs)


def test_concurrent_clients_get_the_replies_they_would_get_alone_one_at_a_time(loaded):
    model, tokenizer = loaded
    spy = GenerationSpy(model, pause_s=0.01)
    server = _start(Engine(spy, tokenizer, "socrates", GenParams(max_new_tokens=MAX_NEW_TOKENS), max_batch=8))
    try:
        questions = [QUESTION, "正義とは何か。", "勇気とは何でしょう？", "友情について教えてください。"]
        alone = {q: ask(server, user(q))["choices"][0]["message"]["content"] for q in questions}
        assert len(set(alone.values())) > 1  # different questions, different replies: a mix-up would show
        spy.forwards.clear()

        # Eight at once, half of them streamed: decoded together in one batch (max_batch 8).
        jobs = [(q, stream) for q in questions for stream in (False, True)]
        barrier = threading.Barrier(len(jobs))
        results: dict[int, str | bytes] = {}
        sent: list[float] = []

        def client(index: int, question: str, stream: bool) -> None:
            barrier.wait()
            sent.append(time.monotonic())
            status, _, body = chat(server, {"model": "socrates", "messages": user(question), "stream": stream})
            if status != 200:
                results[index] = body
            elif stream:
                results[index] = streamed_text(events(body))
            else:
                results[index] = json.loads(body)["choices"][0]["message"]["content"]

        threads = [threading.Thread(target=client, args=(i, q, s)) for i, (q, s) in enumerate(jobs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        _stop(server)
    assert {i: results.get(i) for i in range(len(jobs))} == {i: alone[q] for i, (q, _) in enumerate(jobs)}
    rows = [size for _, size in spy.forwards]
    assert max(rows) >= 2  # the replies really were decoded together...
    # ...in fewer forwards than one after another (a prefill and MAX_NEW_TOKENS - 1 decodes each)
    assert len(rows) < len(jobs) * MAX_NEW_TOKENS


def test_a_client_hanging_up_mid_stream_frees_the_model_and_is_logged_in_one_line(server, caplog):
    with caplog.at_level(logging.INFO, logger="socratune.serve"):
        connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        connection.request("POST", "/v1/chat/completions", json.dumps(
            {"model": server.engine.model_id, "messages": user(QUESTION), "stream": True, "max_tokens": 200}).encode(),
            {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.readline().startswith(b"data: ")
        connection.close()
        assert ask(server, user(QUESTION), max_tokens=5)["usage"]["completion_tokens"] == 5
    gone = [r for r in caplog.records if "hung up mid-stream" in r.getMessage()]
    assert len(gone) == 1 and gone[0].exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_waiting_requests_are_bounded_429_then_503(loaded):
    model, tokenizer = loaded
    params = GenParams(max_new_tokens=8)
    for limits, status, kind in ((ServeLimits(max_waiting=0), 429, "rate_limit_error"),
                                 (ServeLimits(max_waiting=1, max_queue_wait_s=0.3), 503, "server_error")):
        engine = Engine(model, tokenizer, "busy", params, limits, max_batch=1)
        server = _start(engine)
        try:
            with engine.turn():  # the batch's one row is busy with someone else's reply
                got, _, body = chat(server, {"model": "busy", "messages": user(QUESTION)})
            assert got == status, body
            error = json.loads(body)["error"]
            assert (error["type"], error["code"]) == (kind, "server_busy")
            assert chat(server, {"model": "busy", "messages": user(QUESTION)})[0] == 200  # free again
        finally:
            _stop(server)


def _openai_client(openai: Any, server: Any, key: str = "unused") -> Any:
    """The official client on the test server: no retries, so a failure shows at once."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_official_openai_client_plain_and_streaming(server):
    openai = pytest.importorskip("openai")
    client = _openai_client(openai, server)
    model = server.engine.model_id
    assert [m.id for m in client.models.list()] == [model]
    expected = ask(server, user(QUESTION))["choices"][0]["message"]["content"]

    completion = client.chat.completions.create(model=model, messages=user(QUESTION))
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.usage.completion_tokens > 0

    stream = client.chat.completions.create(model=model, messages=user(QUESTION), stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model, messages=user(QUESTION), max_tokens=5000)
    assert bad.value.param == "max_tokens" and "at most 1024" in bad.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=user(QUESTION))
    assert missing.value.code == "model_not_found"


@pytest.mark.slow  # starts a subprocess
def test_serve_command_serves_until_interrupted(default_run):
    process = subprocess.Popen(
        [sys.executable, "-m", "socratune", "serve", str(default_run), "--port", "0", "--max-new-tokens", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"Serving {default_run.name}: chat page http://127.0.0.1:"), process.stderr.read()
        url = line.split("chat page ")[1].split("/ ,")[0]
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request("POST", "/v1/chat/completions", json.dumps(
            {"model": default_run.name, "messages": user(QUESTION)}).encode(), {"Content-Type": "application/json"})
        reply = json.loads(connection.getresponse().read())
        assert reply["usage"]["completion_tokens"] <= 5  # --max-new-tokens is the requests' default
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
    assert "stopped" in process.stderr.read()


def test_serve_wants_a_key_off_loopback_and_reports_a_busy_port(server, default_run, capsys, monkeypatch):
    port = server.server_address[1]
    monkeypatch.delenv("SOCRATUNE_API_KEY", raising=False)
    assert main(["serve", str(default_run), "--host", "0.0.0.0", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "serving on 0.0.0.0 would let anyone" in err and "--insecure-no-auth" in err
    assert "cannot listen" not in err  # refused before binding
    assert main(["serve", str(default_run), "--host", "0.0.0.0", "--port", str(port), "--insecure-no-auth"]) == 2
    err = capsys.readouterr().err
    assert "warning: serving on 0.0.0.0" in err and "no authentication" in err
    assert f"cannot listen on 0.0.0.0:{port}" in err
    monkeypatch.setenv("SOCRATUNE_API_KEY", "from-the-environment")  # a key: no refusal, no warning
    assert main(["serve", str(default_run), "--host", "0.0.0.0", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "warning" not in err and f"cannot listen on 0.0.0.0:{port}" in err


# --- the chat page in headless Chromium -------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        missing = ("headless browser test needs Debian's chromium and chromium-driver: "
                   "apt-get install -y chromium chromium-driver fonts-noto-cjk")
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(missing + " (CI must run it: .ci/run installs them)")  # never a silent skip in CI
        pytest.skip(missing)
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with both paths given, Selenium Manager downloads nothing
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--lang=ja"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _messages(driver) -> list[tuple[str, str]]:
    return [tuple(m) for m in driver.execute_script(
        "return [...document.querySelectorAll('#log .msg')].map(e => [e.className, e.textContent])")]


def _wait_idle(driver) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return document.body.dataset.busy === 'false' && !document.getElementById('send').disabled"))


@pytest.mark.slow  # starts a subprocess
def test_chat_page_failed_send_leaves_one_copy_in_the_box_and_says_why_in_japanese(server, browser):
    from selenium.webdriver.common.keys import Keys

    browser.get(server.url + "/")
    _wait_idle(browser)
    browser.find_element("id", "reset").click()
    box = browser.find_element("id", "input")
    too_long = "問" * 8001  # the server refuses it (400, in English): the page must say so in Japanese
    browser.execute_script("arguments[0].value = arguments[1]", box, too_long)
    box.send_keys(Keys.END, Keys.ENTER)
    _wait_idle(browser)
    assert _messages(browser) == [("msg error", "メッセージが長すぎます。短くして、もう一度送信してください。")]
    assert box.get_attribute("value") == too_long  # one copy, back in the box; no orphan bubble
    assert browser.execute_script("return sessionStorage.getItem('socratune-chat')") == "[]"
    assert "8001 characters" in browser.find_element("css selector", "#log .error").get_attribute("title")

    # Once the server cannot be reached at all, the message is still Japanese and the text stays.
    browser.execute_script("window.fetch = () => Promise.reject(new TypeError('Failed to fetch'))")
    browser.execute_script("arguments[0].value = ''", box)
    box.send_keys(QUESTION + Keys.ENTER)
    _wait_idle(browser)
    assert _messages(browser)[-1] == ("msg error",
                                      "サーバーに接続できませんでした。サーバーが動いているか確かめてください。")
    assert [kind for kind, _ in _messages(browser)] == ["msg error", "msg error"]
    assert box.get_attribute("value") == QUESTION
    icon = browser.execute_script("return document.querySelector('link[rel=icon]').href")
    assert icon.endswith("/favicon.ico")
    browser.refresh()  # leaves the page clean for the next test
    _wait_idle(browser)


@pytest.mark.slow  # starts a subprocess
def test_chat_page_asks_once_for_the_key_of_a_server_that_wants_one(loaded, browser):
    from selenium.webdriver.common.keys import Keys

    model, tokenizer = loaded
    keyed = _start(Engine(model, tokenizer, "keyed", GenParams(max_new_tokens=8)), api_key="page-key")
    answer = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        window.prompt = (question) => { window.asked = [...(window.asked || []), question]; return 'page-key'; };
    """})  # the user types the key into the page's question
    try:
        browser.get(keyed.url + "/")
        _wait_idle(browser)
        browser.find_element("id", "input").send_keys(QUESTION + Keys.ENTER)
        _wait_idle(browser)
        assert [kind for kind, _ in _messages(browser)] == ["msg user", "msg assistant"]
        assert browser.execute_script("return window.asked") == [
            "このサーバーには APIキーが必要です。キーを入力してください。"]
        browser.refresh()  # the key is kept for the tab: not asked again
        _wait_idle(browser)
        assert browser.execute_script("return window.asked") is None
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", answer)
        _stop(keyed)


@pytest.mark.slow  # starts a subprocess
def test_chat_page_streams_replies_to_japanese_typed_through_an_ime(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    browser.get(server.url + "/")
    _wait_idle(browser)  # the page asked /v1/models for the model's name
    box = browser.find_element("id", "input")
    box.click()
    # Record every state of the reply bubble, to see it grow piece by piece.
    browser.execute_script("""
        window.replyStates = [];
        new MutationObserver(() => {
          const reply = document.querySelector('#log .assistant:last-of-type');
          if (reply && reply.textContent) window.replyStates.push(reply.textContent);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    """)

    # A real IME composition (Chromium's own, driven over DevTools): Enter confirms the
    # conversion, and must not send the half-typed question.
    browser.execute_cdp_cmd("Input.imeSetComposition", {"text": "こうふく", "selectionStart": 4, "selectionEnd": 4})
    browser.execute_cdp_cmd("Input.imeSetComposition", {"text": "幸福", "selectionStart": 2, "selectionEnd": 2})
    for kind in ("rawKeyDown", "keyUp"):
        browser.execute_cdp_cmd("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                           "windowsVirtualKeyCode": 13})
    assert _messages(browser) == []
    browser.execute_cdp_cmd("Input.insertText", {"text": "幸福"})  # the conversion is committed
    box.send_keys("とは何でしょうか？")
    # Safari's order: compositionend first, then the confirming Enter with keyCode 229.
    browser.execute_script("""
        const event = new KeyboardEvent('keydown', {key: 'Enter', bubbles: true, cancelable: true});
        Object.defineProperty(event, 'keyCode', {value: 229});
        document.getElementById('input').dispatchEvent(event);
    """)
    ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
    assert box.get_attribute("value") == QUESTION + "\n"  # Shift+Enter: a newline, not a send
    assert _messages(browser) == []

    box.send_keys(Keys.ENTER)
    _wait_idle(browser)
    expected = ask(server, user(QUESTION))["choices"][0]["message"]["content"]
    assert _messages(browser) == [("msg user", QUESTION), ("msg assistant", expected)]
    states = browser.execute_script("return window.replyStates")
    assert len(set(states)) > 1 and states[-1] == expected, "the reply did not appear piece by piece"
    assert box.get_attribute("value") == ""

    # The second question goes with the first exchange: the page keeps the history.
    box.send_keys("では、正義とは？" + Keys.ENTER)
    _wait_idle(browser)
    history = [*user(QUESTION), {"role": "assistant", "content": expected}, *user("では、正義とは？")]
    second = ask(server, history)["choices"][0]["message"]["content"]
    assert _messages(browser)[-1] == ("msg assistant", second)

    browser.refresh()  # the conversation survives a reload
    _wait_idle(browser)
    assert [text for _, text in _messages(browser)] == [QUESTION, expected, "では、正義とは？", second]

    browser.find_element("id", "reset").click()
    assert _messages(browser) == []
    assert browser.execute_script("return sessionStorage.getItem('socratune-chat')") == "[]"
    browser.find_element("id", "input").send_keys("では、正義とは？" + Keys.ENTER)
    _wait_idle(browser)  # after reset the question stands alone again
    assert _messages(browser)[-1] == ("msg assistant", ask(server, user("では、正義とは？"))["choices"][0]["message"]
                                      ["content"])



# --- a server that holds: hostile requests over real sockets -----------------------------------

@pytest.fixture
def small_server(loaded) -> Iterator[ChatServer]:
    """The tiny model behind small limits (4 KB bodies, 1 s to send one), short replies."""
    model, tokenizer = loaded
    limits = ServeLimits(max_body_bytes=4096, request_deadline_s=1.0)
    server = _start(Engine(model, tokenizer, "small", GenParams(max_new_tokens=8), limits))
    yield server
    _stop(server)


def _raw(server: ChatServer, head: str, body_parts: list[bytes] = (), pause_s: float = 0.0) -> tuple[int, bytes]:
    """Sends a hand-written request (head lines, then body parts with a pause between) and reads the
    answer: (status, body). A reset instead of an answer fails the test."""
    with socket.create_connection(server.server_address[:2], timeout=20) as sock:
        if head:
            sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        for part in body_parts:
            time.sleep(pause_s)
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and closed: read what it said
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and answer.split(b"\r\n\r\n", 1)[0].lower().count(b"content-length") and (
                    len(answer.split(b"\r\n\r\n", 1)[1]) >= int(re.search(rb"(?i)content-length: *(\d+)", answer)[1])):
                break
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


def _post_head(length: str | None = None, chunked: bool = False) -> str:
    lines = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return "\n".join(lines) + "\n"


def test_bad_content_lengths_are_400_and_bodies_are_counted_as_read(small_server):
    for length in ("-5", "abc", "1e3", "0x10", "5, 6"):
        assert _raw(small_server, _post_head(length))[0] == 400, length

    # A chunked body past the limit is cut as soon as it passes it: 413 without the rest (the
    # final chunk never comes) and without the Content-Length that the old check trusted.
    piece = b"x" * 1000
    status, body = _raw(small_server, _post_head(chunked=True), [b"3e8\r\n" + piece + b"\r\n"] * 5)
    assert status == 413 and json.loads(body)["error"]["message"].startswith("the request body exceeds 4096")
    # A body under the limit, chunked, is read and parsed like any other.
    payload = json.dumps({"model": "small", "messages": user(QUESTION), "max_tokens": 2}).encode()
    status, body = _raw(small_server, _post_head(chunked=True),
                        [f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"])
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2


def test_a_body_that_trickles_in_meets_one_deadline_for_the_whole_request(small_server):
    payload = json.dumps({"model": "small", "messages": user(QUESTION)}).encode()
    started = time.monotonic()
    # One byte every 0.25 s: each read is quick, the whole would take many seconds.
    status, body = _raw(small_server, _post_head(str(len(payload))), [bytes([b]) for b in payload], pause_s=0.25)
    assert status == 408, body
    assert time.monotonic() - started < 5
    assert json.loads(body)["error"]["message"] == "the request body did not arrive within 1 s"

    # The same for the headers, which uvicorn itself would wait for as long as they take.
    started = time.monotonic()
    head = _post_head(str(len(payload))).replace("\n", "\r\n").encode()
    status, body = _raw(small_server, "", [bytes([b]) for b in head], pause_s=0.25)
    assert status == 408 and json.loads(body)["error"]["message"] == "the request headers did not arrive within 1 s"
    assert time.monotonic() - started < 5
    assert _raw(small_server, "GET /health HTTP/1.1\nHost: localhost\nConnection: close\n")[0] == 200
    # A connection that sends nothing at all is closed (without an answer nobody asked for).
    with socket.create_connection(small_server.server_address[:2], timeout=10) as silent:
        started = time.monotonic()
        assert silent.recv(100) == b"" and time.monotonic() - started < 5


def test_a_burst_of_50_connections_gets_200_or_429_every_one(loaded):
    model, tokenizer = loaded
    spy = GenerationSpy(model)  # 50 ms a token: the burst finds the batch full
    server = _start(Engine(spy, tokenizer, "burst", GenParams(max_new_tokens=4)))
    statuses: list[int | str] = []
    barrier = threading.Barrier(50)

    def client() -> None:
        barrier.wait()
        try:
            statuses.append(chat(server, {"model": "burst", "messages": user(QUESTION)})[0])
        except OSError as exc:  # a reset or refused connection
            statuses.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(50)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        _stop(server)
    assert len(statuses) == 50 and set(statuses) <= {200, 429}, statuses
    assert 1 <= statuses.count(200) and 1 <= statuses.count(429)


class BrokenModel:
    """A model whose generate() fails with text that must stay inside the server."""

    def __init__(self, model: Any):
        self.model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail /home/user/.cache/weights")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # the forward pass the server's batcher makes
        raise RuntimeError("secret internal detail /home/user/.cache/weights")


def test_a_failure_answers_500_without_its_internal_text(loaded, caplog):
    model, tokenizer = loaded
    server = _start(Engine(BrokenModel(model), tokenizer, "broken", GenParams(max_new_tokens=4)))
    try:
        with caplog.at_level(logging.INFO, logger="socratune.serve"):
            status, _, body = chat(server, {"model": "broken", "messages": user(QUESTION)})
            assert status == 500 and b"secret" not in body
            assert json.loads(body)["error"]["type"] == "server_error"
            status, _, body = chat(server, {"model": "broken", "messages": user(QUESTION), "stream": True})
            assert status == 200 and b"secret" not in body
            chunks = events(body)
            assert chunks[-1] == "[DONE]" and chunks[-2]["error"]["type"] == "server_error"
    finally:
        _stop(server)
    failures = [r for r in caplog.records if "secret internal detail" in r.getMessage()]
    assert failures and not any(r.exc_info for r in failures)  # the log has it, in one line each


def test_head_works_where_get_does_and_the_page_has_an_icon(server):
    for path in ("/", "/health", "/v1/models", "/favicon.ico"):
        got_status, got, got_body = request(server, "GET", path)
        status, response, body = request(server, "HEAD", path)
        assert (status, body) == (200, b"") and got_status == 200, path
        assert response.getheader("Content-Length") == got.getheader("Content-Length") == str(len(got_body))
    status, response, body = request(server, "GET", "/favicon.ico")
    assert response.getheader("Content-Type") == "image/svg+xml" and body.startswith(b"<svg")
    assert b'rel="icon"' in request(server, "GET", "/")[2]


def test_api_key_is_checked_as_a_bearer_token(loaded):
    openai = pytest.importorskip("openai")
    model, tokenizer = loaded
    server = _start(Engine(model, tokenizer, "keyed", GenParams(max_new_tokens=4)), api_key="s3cret-key")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                        {"Authorization": "Basic s3cret-key"}):
            status, response, body = request(server, "GET", "/v1/models", headers=headers)
            assert status == 401, headers
            assert json.loads(body)["error"]["code"] == "invalid_api_key"
            assert response.getheader("WWW-Authenticate") == "Bearer"
        assert request(server, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret-key"})[0] == 200
        assert request(server, "GET", "/health")[0] == 200  # health checks and the page need no key
        assert request(server, "GET", "/")[0] == 200

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = _openai_client(openai, server, key="s3cret-key")
        assert client.chat.completions.create(model="keyed", messages=user(QUESTION)).usage.completion_tokens > 0
    finally:
        _stop(server)


def test_stop_strings_cut_plain_and_streamed_replies(server):
    openai = pytest.importorskip("openai")
    client = _openai_client(openai, server)
    model = server.engine.model_id
    full = ask(server, user(QUESTION))["choices"][0]["message"]["content"]
    assert len(full) > 12
    stop = full[8:11]
    expected = full[: full.index(stop)].rstrip()
    for stops in (stop, ["never in the reply", stop], [full[8:9] + "\x00never"]):
        completion = client.chat.completions.create(model=model, messages=user(QUESTION), stop=stops)
        chunks = list(client.chat.completions.create(model=model, messages=user(QUESTION), stop=stops, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        if stops[-1].endswith("never"):  # only a partial match: held back, then given out whole
            assert completion.choices[0].message.content == streamed == full
            continue
        assert completion.choices[0].message.content == expected == streamed, stops
        assert completion.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "stop"
        assert stop not in streamed


def test_cors_origins_are_allowed_only_when_named(loaded, server):
    model, tokenizer = loaded
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    # None by default: no preflight answered, no CORS header on an answer.
    assert request(server, "OPTIONS", "/v1/chat/completions", headers=preflight)[0] == 405
    assert request(server, "GET", "/v1/models", headers={"Origin": "https://app.example"})[1].getheader(
        "Access-Control-Allow-Origin") is None

    for bad in ("https://app.example/", "app.example", "https://app.example/path", "ftp://app.example"):
        with pytest.raises(ConfigError, match="is not an origin"):
            ChatServer("127.0.0.1", 0, cors_origins=(bad,))
    cors = _start(Engine(model, tokenizer, "cors", GenParams(max_new_tokens=4)), cors_origins=("https://app.example",))
    try:
        status, response, _ = request(cors, "OPTIONS", "/v1/chat/completions", headers=preflight)
        assert status == 200 and response.getheader("Access-Control-Allow-Origin") == "https://app.example"
        assert "POST" in response.getheader("Access-Control-Allow-Methods")
        status, response, _ = request(cors, "OPTIONS", "/v1/chat/completions",
                                      headers={**preflight, "Origin": "https://evil.example"})
        assert status == 400 and response.getheader("Access-Control-Allow-Origin") is None
        status, response, _ = request(cors, "GET", "/v1/models", headers={"Origin": "https://app.example"})
        assert status == 200 and response.getheader("Access-Control-Allow-Origin") == "https://app.example"
        # A refusal reaches the allowed page readable too (with its CORS headers), not as a network error.
        status, response, _ = request(cors, "POST", "/v1/chat/completions", b"{}",
                                      {"Origin": "https://app.example", "Content-Type": "text/plain"})
        assert status == 415 and response.getheader("Access-Control-Allow-Origin") == "https://app.example"
    finally:
        _stop(cors)
