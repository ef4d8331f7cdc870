"""Continuous batching (``socratune.generation.batching``) on the built-in tiny model with a LoRA adapter,
in-process: batched replies equal one-by-one replies, per-request ``stop``/``max_tokens``/seed hold
inside a batch, a cancelled request frees its place for one waiting, and the 429 limit follows
``--max-batch``."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from socratune.cli import build_parser, main
from socratune.generation.batching import Batcher, Request, default_max_batch
from socratune.generation.generate import GenParams, generate_replies, prompt_texts
from socratune.serving.engine import Engine
from socratune.serving.schema import ApiError, ServeLimits

QUESTIONS = ["幸福とは何でしょうか？", "正義とは何か。", "勇気とは何でしょう？",
             "友情について教えてください。少し長めの質問にして、プロンプトの長さを変えます。"]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    """The tiny model (random weights) under a LoRA adapter whose weights are not zero, so the
    adapter changes every reply; byte-level vocabulary, so the whole-character guard is on."""
    import torch
    from peft import LoraConfig, get_peft_model

    from socratune.model.tiny import build_tiny

    model, tokenizer = build_tiny(0)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the adapter's weights, the same every run
    try:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    finally:
        torch.random.set_rng_state(state)
    return model.eval(), tokenizer


class Slow:
    """The model with a pause before each forward, so that requests sent one after another join a
    running batch at different steps (and rows of different lengths share it)."""

    def __init__(self, model: Any, pause_s: float = 0.01):
        self.model, self.pause_s = model, pause_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.pause_s)
        return self.model(*args, **kwargs)


def _ids(tokenizer: Any, question: str) -> list[int]:
    text = prompt_texts(tokenizer, [[{"role": "user", "content": question}]])[0]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _together(batcher: Batcher, jobs: list[dict[str, Any]], stagger_s: float = 0.02) -> list[tuple[str, str, int]]:
    """Each job's (text, finish, tokens), all generating at once, sent ``stagger_s`` apart."""
    results: list[Any] = [None] * len(jobs)

    def client(index: int, job: dict[str, Any]) -> None:
        pieces: list[str] = []
        finish, tokens = batcher.generate(emit=pieces.append, **job)
        results[index] = ("".join(pieces), finish, tokens)

    threads = [threading.Thread(target=client, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
        time.sleep(stagger_s)
    for thread in threads:
        thread.join(120)
    return results


@pytest.mark.slow
def test_batched_greedy_replies_equal_one_by_one_replies(tiny):
    model, tokenizer = tiny
    params = GenParams(max_new_tokens=24, repetition_penalty=1.1)
    alone = [generate_replies(model, tokenizer, [[{"role": "user", "content": q}]], params, batch_size=1)[0]
             for q in QUESTIONS]
    assert len(set(alone)) > 1  # different questions, different replies: a mix-up would show
    jobs = [{"input_ids": _ids(tokenizer, q), "params": params} for q in QUESTIONS]
    batcher = Batcher(Slow(model), tokenizer, max_batch=8)
    got = _together(batcher, jobs)  # one after another: each joins the running batch at a later step
    assert [text for text, _, _ in got] == alone
    pieces: list[list[str]] = [[] for _ in jobs]
    requests = [Request(job["input_ids"], params, pieces[i].append) for i, job in enumerate(jobs)]
    with batcher._wake:  # all four wait, then join at one step: prefilled together, left-padded
        for request in requests:
            batcher.submit(request)
    for request in requests:
        assert request.done.wait(120) and request.error is None
    assert ["".join(p) for p in pieces] == alone
    assert all("\ufffd" not in text for text in alone)  # the whole-character guard is on, batched too
    assert batcher.widest >= 2  # they really shared forward passes


@pytest.mark.slow
def test_stop_max_tokens_and_seed_hold_per_request_inside_a_batch(tiny):
    model, tokenizer = tiny
    batcher = Batcher(Slow(model), tokenizer, max_batch=8)
    greedy = GenParams(max_new_tokens=24)
    sampled = GenParams(max_new_tokens=24, temperature=0.9, top_p=0.9)
    ids = [_ids(tokenizer, q) for q in QUESTIONS]
    full, _, _ = _together(batcher, [{"input_ids": ids[0], "params": greedy}])[0]
    seeded_alone, _, _ = _together(batcher, [{"input_ids": ids[2], "params": sampled, "seed": 1234}])[0]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop and len(full) > 4

    got = _together(batcher, [
        {"input_ids": ids[0], "params": greedy, "stop": (stop,)},
        {"input_ids": ids[1], "params": GenParams(max_new_tokens=5)},
        {"input_ids": ids[2], "params": sampled, "seed": 1234},
        {"input_ids": ids[0], "params": greedy},
    ])
    assert got[0][0] == full[: full.index(stop)].rstrip() and got[0][1] == "stop"
    assert got[1][1:] == ("length", 5)
    assert got[2][0] == seeded_alone  # the same seed, alone or batched (equal logits on this CPU)
    assert got[3][0] == full
    assert batcher.widest >= 2


@pytest.mark.slow
def test_a_cancelled_request_frees_its_place_for_one_waiting(tiny):
    model, tokenizer = tiny
    engine = Engine(Slow(model, 0.02), tokenizer, "t", GenParams(max_new_tokens=8), max_batch=1)
    ids = _ids(tokenizer, QUESTIONS[0])
    long_reply = GenParams(max_new_tokens=1000)  # 20 s at 20 ms a token, if nothing stopped it
    from socratune.serving.schema import Completion

    cancel, first_piece = threading.Event(), threading.Event()
    done: dict[str, Any] = {}

    def streaming() -> None:
        with engine.turn():
            done["long"] = engine.generate(Completion(ids, long_reply, None, True, False),
                                           lambda _: first_piece.set(), cancel)

    def waiting() -> None:
        with engine.turn():  # blocks until the long reply gives its row back
            done["waiting_started"] = time.monotonic()
            done["short"] = engine.generate(Completion(ids, GenParams(max_new_tokens=3), None, False, False),
                                            lambda _: None)

    threads = [threading.Thread(target=streaming), threading.Thread(target=waiting)]
    threads[0].start()
    assert first_piece.wait(60)
    threads[1].start()
    time.sleep(0.3)
    assert "waiting_started" not in done  # max_batch 1: it waits behind the long reply
    hung_up = time.monotonic()
    cancel.set()  # the client hung up
    for thread in threads:
        thread.join(60)
    assert done["waiting_started"] - hung_up < 5  # its place came free at the next token, not after 1000
    assert done["long"][1] < 1000 and done["short"] == ("length", 3)


@pytest.mark.slow
def test_a_request_cancelled_while_it_waits_leaves_the_queue_at_once(tiny):
    model, tokenizer = tiny
    batcher = Batcher(Slow(model, 0.02), tokenizer, max_batch=1)
    ids = _ids(tokenizer, QUESTIONS[0])
    first_piece, cancel = threading.Event(), threading.Event()
    busy = threading.Thread(target=batcher.generate, args=(ids, GenParams(max_new_tokens=200),
                                                           lambda _: first_piece.set()))
    busy.start()
    assert first_piece.wait(60)
    result: list[Any] = []
    waiting = threading.Thread(target=lambda: result.append(
        batcher.generate(ids, GenParams(max_new_tokens=50), lambda _: None, cancel=cancel)))
    waiting.start()
    time.sleep(0.2)
    assert batcher.waiting() == 1
    cancel.set()
    waiting.join(2)
    assert result == [("length", 0)] and batcher.waiting() == 0
    assert busy.is_alive()  # the row generating was not disturbed
    busy.join(60)


def test_the_429_limit_follows_max_batch(tiny):
    model, tokenizer = tiny
    for max_batch in (1, 3):
        engine = Engine(model, tokenizer, "t", GenParams(), max_batch=max_batch)
        assert engine.max_waiting == max_batch  # as many may wait as are generating
        for _ in range(2 * max_batch):
            engine.reserve()
        with pytest.raises(ApiError) as refused:
            engine.reserve()
        assert refused.value.status == 429 and refused.value.code == "server_busy"
        assert f"{max_batch} requests are generating" in str(refused.value)
        engine.unreserve()
        engine.reserve()  # a place freed is a place taken
    engine = Engine(model, tokenizer, "t", GenParams(), ServeLimits(max_waiting=0), max_batch=2)
    engine.reserve(), engine.reserve()
    with pytest.raises(ApiError):
        engine.reserve()
    assert Engine(model, tokenizer, "t", GenParams()).max_batch == default_max_batch(model.device) == 8  # CPU


def test_serve_takes_max_batch(capsys):
    args = build_parser().parse_args(["serve", "runs/x", "--max-batch", "4"])
    assert args.max_batch == 4
    assert build_parser().parse_args(["serve", "runs/x"]).max_batch is None  # the device's default
    assert main(["serve", "runs/does-not-exist", "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err


def test_temperature_one_samples_and_the_seed_decides(tiny):
    # temperature 1.0 needs no warper: it must still sample, not fall back to greedy
    model, tokenizer = tiny
    batcher = Batcher(model, tokenizer, max_batch=2)
    ids = _ids(tokenizer, QUESTIONS[0])
    replies = {}
    for seed in (7, 7, 8, None):
        pieces: list[str] = []
        batcher.generate(ids, GenParams(max_new_tokens=16, temperature=1.0), pieces.append, seed=seed)
        replies.setdefault(seed, []).append("".join(pieces))
    greedy: list[str] = []
    batcher.generate(ids, GenParams(max_new_tokens=16), greedy.append)
    assert replies[7][0] == replies[7][1] != replies[8][0]
    assert "".join(greedy) not in (replies[7][0], replies[8][0])


@pytest.mark.slow
def test_a_client_hanging_up_mid_stream_frees_its_place_for_a_waiting_request(tiny):
    import http.client
    import json

    from socratune.serving.server import ChatServer

    model, tokenizer = tiny
    engine = Engine(Slow(model, 0.1), tokenizer, "t", GenParams(max_new_tokens=8), max_batch=1)
    server = ChatServer("127.0.0.1", 0)
    threading.Thread(target=server.serve, args=(engine,), daemon=True).start()
    host, port = server.server_address[:2]

    def post(payload: dict[str, Any]) -> http.client.HTTPConnection:
        connection = http.client.HTTPConnection(host, port, timeout=60)
        connection.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "t", "messages": [{"role": "user", "content": QUESTIONS[0]}], **payload}).encode(),
            {"Content-Type": "application/json"})
        return connection

    try:
        streaming = post({"stream": True, "max_tokens": 200})  # 20 s at 100 ms a token
        response = streaming.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        waiting = post({"max_tokens": 3})  # max_batch 1: it waits for the streaming row
        time.sleep(0.5)
        hung_up = time.monotonic()
        streaming.close()
        answer = waiting.getresponse()
        assert answer.status == 200 and json.loads(answer.read())["usage"]["completion_tokens"] == 3
        assert time.monotonic() - hung_up < 10  # not the 20 s the long reply would have taken
        waiting.close()
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
@pytest.mark.parametrize("window", [8, 200])
def test_a_sliding_window_model_is_batched_only_inside_its_window(tiny_tokenizer, window):
    # Gemma 2's layout (sliding and full attention layers) at toy size: beyond the window rows run
    # alone; inside it they share the batch; the replies are model.generate's either way.
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig

    from socratune.model.tiny import END_OF_TURN

    tokenizer = tiny_tokenizer
    eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=window,
                          max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                          pad_token_id=tokenizer.pad_token_id, attn_implementation="eager")
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = Gemma2ForCausalLM(config).eval()
    finally:
        torch.random.set_rng_state(state)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.bos_token_id)
    params = GenParams(max_new_tokens=20)
    alone = [generate_replies(model, tokenizer, [[{"role": "user", "content": q}]], params, batch_size=1)[0]
             for q in QUESTIONS]
    batcher = Batcher(model, tokenizer, max_batch=8)
    assert batcher.window == window
    got = _together(batcher, [{"input_ids": _ids(tokenizer, q), "params": params} for q in QUESTIONS], stagger_s=0)
    assert [text for text, _, _ in got] == alone
    assert (batcher.widest > 1) == (window == 200)  # the prompts alone are longer than 8 tokens


@pytest.mark.slow
def test_lora_on_a_4bit_base_batches_to_generates_replies(tmp_path):
    # QLoRA's layout (bitsandbytes nf4 base, bf16 compute, LoRA on top), on CPU here.
    pytest.importorskip("bitsandbytes")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from socratune.model.tiny import save_tiny

    directory = save_tiny(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map="cpu")
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    params = GenParams(max_new_tokens=16)
    alone = [generate_replies(model, tokenizer, [[{"role": "user", "content": q}]], params, batch_size=1)[0]
             for q in QUESTIONS]
    batcher = Batcher(model, tokenizer, max_batch=8)
    got = _together(batcher, [{"input_ids": _ids(tokenizer, q), "params": params} for q in QUESTIONS], stagger_s=0)
    assert [text for text, _, _ in got] == alone
    assert batcher.widest > 1
