"""The Ollama Modelfile that ``export --gguf`` writes beside the GGUF: its TEMPLATE, executed by
Go's own text/template (as Ollama executes it; tests/gotemplate_driver.go), must give the prompt
the run's chat template gives, system prompt folding included. The export itself is checked in
tests/test_export.py. Run with ``python -m pytest -q tests/test_modelfile.py``; the Go check
needs ``go`` (Debian's golang-go, which .ci/run installs) and fails rather than skips under CI.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from socratune.core.errors import ConfigError
from socratune.generation.generate import prompt_texts
from socratune.model.modelfile import go_template, modelfile_text, ollama_parameters, stop_strings, turn_wrappers

DRIVER = Path(__file__).with_name("gotemplate_driver.go")
CONVERSATIONS = [
    [{"role": "user", "content": "幸せとは何でしょうか？"}],
    [{"role": "system", "content": "君はソクラテスだ。"}, {"role": "user", "content": "正義とは？"}],
    [{"role": "user", "content": "勇気とは？"}, {"role": "assistant", "content": "君はどう思うのかね？"},
     {"role": "user", "content": "恐れないこと。{{ .Content }}"}],  # content is data, not template
    [{"role": "system", "content": "簡潔に。"}, {"role": "user", "content": "一"},
     {"role": "assistant", "content": "二"}, {"role": "user", "content": "三"}],
]


def go_render(template: str, messages: list[dict[str, str]]) -> str:
    go = shutil.which("go")
    if go is None:
        if os.environ.get("CI") == "true":
            pytest.fail("go is missing: .ci/run installs Debian's golang-go for this test")
        pytest.skip("go is not installed (apt-get install golang-go)")
    done = subprocess.run([go, "run", str(DRIVER)], input=json.dumps({"template": template, "messages": messages}),
                          capture_output=True, text=True, check=False, timeout=300,
                          env={**os.environ, "GOCACHE": os.environ.get("GOCACHE", "/tmp/socratune-gocache"),
                               "GO111MODULE": "off"})  # one file, no module
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_wrappers_rebuild_socratunes_prompts(tiny_tokenizer):
    wrappers = turn_wrappers(tiny_tokenizer)
    assert wrappers.system is None  # Gemma's template: a system prompt is folded into the first user turn
    for conversation in CONVERSATIONS:
        assert wrappers.render(conversation) == prompt_texts(tiny_tokenizer, [conversation])[0]


def test_ollama_renders_the_template_as_the_run_prompts(tiny_tokenizer):
    template = go_template(turn_wrappers(tiny_tokenizer))
    for conversation in CONVERSATIONS:
        assert go_render(template, conversation) == prompt_texts(tiny_tokenizer, [conversation])[0]


def test_a_template_whose_turns_differ_by_position_is_refused(tiny_tokenizer):
    numbered = copy.deepcopy(tiny_tokenizer)  # the session's tokenizer stays as it is
    numbered.chat_template = tiny_tokenizer.chat_template.replace(
        "'<start_of_turn>' + role", "'<start_of_turn>' + role + loop.index|string")
    with pytest.raises(ConfigError, match="no Modelfile.*not wrapped the same way"):
        turn_wrappers(numbered)


def test_the_modelfile_names_the_gguf_stops_and_serves_defaults(tiny_tokenizer):
    from types import SimpleNamespace

    end_of_turn = tiny_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    stops = stop_strings(tiny_tokenizer, SimpleNamespace(eos_token_id=[end_of_turn, tiny_tokenizer.eos_token_id]))
    assert stops == ["<end_of_turn>", "<eos>"]
    defaults = ollama_parameters(max_new_tokens=128, temperature=0.0, top_p=1.0, repetition_penalty=1.0)
    text = modelfile_text(Path("exports/tiny.gguf"), turn_wrappers(tiny_tokenizer), stops, defaults, adds_bos=False)
    lines = text.splitlines()
    assert "FROM ./tiny.gguf" in lines
    assert 'PARAMETER stop "<end_of_turn>"' in lines and 'PARAMETER stop "<eos>"' in lines
    assert {"PARAMETER temperature 0", "PARAMETER top_p 1", "PARAMETER num_predict 128"} <= set(lines)
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == go_template(turn_wrappers(tiny_tokenizer)) and template.startswith("<bos>")
    dropped = modelfile_text(Path("t.gguf"), turn_wrappers(tiny_tokenizer), stops, defaults, adds_bos=True)
    assert 'TEMPLATE """<bos>' not in dropped  # llama.cpp adds BOS itself: not twice
