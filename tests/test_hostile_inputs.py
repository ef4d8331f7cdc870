"""Hostile and unlucky inputs to every command: each gets exit code 2, a short message on stderr
naming what is wrong and no traceback, and nothing is written.

The cases run through tests/hostile_driver.py, one subprocess for all of them (transformers is
imported once), plus a few through ``python -m socratune`` to cover the entry point itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).with_name("hostile_driver.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

GOOD_DIALOGUE = {"messages": [{"role": "user", "content": "勇気とは何でしょうか？"},
                              {"role": "assistant", "content": "あなたは勇気をどう考えますか？"}]}


def dialogue(question: str, reply: str = "あなたはどう思いますか？") -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "model", "content": reply}]}


def _write(folder: Path, name: str, content: str | bytes) -> str:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return name


def _data_inputs(folder: Path) -> dict[str, str]:
    """Data files of every hostile kind, by what is wrong with them; values are names in ``folder``."""
    deep = "[" * 50_000 + "]" * 50_000
    digits = "9" * 10_000
    inputs = {
        "missing": "missing.json",
        "directory": "a-directory",
        "deep list": _write(folder, "deep.json", deep),
        "deep line": _write(folder, "deep.jsonl", json.dumps(GOOD_DIALOGUE) + "\n" + '{"messages": ' + deep + "}\n"),
        "deep only line": _write(folder, "deeponly.jsonl", '{"messages": ' + deep + "}\n"),
        "huge integer in a list": _write(folder, "bigint.json", f'[{{"messages": [], "n": {digits}}}]'),
        "huge integer line": _write(folder, "bigint.jsonl", f'{{"messages": [], "n": {digits}}}\n'),
        "lone surrogate": _write(folder, "surrogate.json", json.dumps([dialogue("勇気\ud800とは？")])),
        "lone surrogate line": _write(folder, "surrogate.jsonl", json.dumps(dialogue("x", "y\udfff")) + "\n"),
        "surrogate in a key": _write(folder, "surrogatekey.jsonl", '{"messages": [], "\\ud800": 1}\n'),
        "not UTF-8": _write(folder, "latin1.json", '[{"messages": "caf\xe9"}]'.encode("latin-1")),
        "empty": _write(folder, "empty.json", ""),
        "an object": _write(folder, "object.json", json.dumps(GOOD_DIALOGUE)),
        "huge role": _write(folder, "hugerole.json", json.dumps([{"messages": [{"role": "x" * 100_000,
                                                                               "content": "a"}]}])),
        "one dialogue": _write(folder, "one.json", json.dumps([GOOD_DIALOGUE], ensure_ascii=False)),
        "one shared question": _write(folder, "shared.json", json.dumps(
            [dialogue("勇気とは？", f"答え{i}は何でしょう？") for i in range(6)], ensure_ascii=False)),
    }
    (folder / "a-directory").mkdir()
    os.mkfifo(folder / "fifo.json")
    inputs["fifo"] = "fifo.json"
    (folder / "loop.json").symlink_to("loop.json")
    inputs["symlink loop"] = "loop.json"
    return inputs


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


def _config_inputs(folder: Path) -> dict[str, str]:
    return {
        "config not UTF-8": _write(folder, "latin1.yaml", "train:\n  epochs: 1 # caf\xe9\n".encode("latin-1")),
        "epochs .inf": _write(folder, "inf.yaml", "train:\n  epochs: .inf\n"),
        "epochs .nan": _write(folder, "nan.yaml", "train:\n  epochs: .nan\n"),
        "learning rate -.inf": _write(folder, "neginf.yaml", "train:\n  learning_rate: -.inf\n"),
        "alias bomb": _write(folder, "bomb.yaml", BOMB),
        "harmless alias": _write(folder, "alias.yaml", "x: &x 1\ntrain:\n  epochs: *x\n"),
        "deep YAML": _write(folder, "deep.yaml", "[" * 50_000 + "]" * 50_000),
        "huge YAML integer": _write(folder, "bigint.yaml", "train:\n  epochs: " + "9" * 10_000 + "\n"),
        "huge unknown key": _write(folder, "hugekey.yaml", "train:\n  " + "k" * 100_000 + ": 1\n"),
        "huge bad value": _write(folder, "hugevalue.yaml", "train:\n  batch_size: " + "v" * 100_000 + "\n"),
        "a list": _write(folder, "list.yaml", "- train\n- data\n"),
        "not YAML": _write(folder, "broken.yaml", "train: [unclosed\n"),
        "config missing": "nothing.yaml",
        "config directory": "a-directory",
    }


def _model_inputs(folder: Path) -> dict[str, str]:
    llama = json.dumps({"model_type": "llama", "vocab_size": 32, "hidden_size": 8, "num_hidden_layers": 1,
                        "num_attention_heads": 1, "intermediate_size": 8})
    for name, files in {
        "garbage-config": {"config.json": "{not json at all"},
        "list-config": {"config.json": "[1, 2, 3]"},
        "deep-config": {"config.json": "[" * 50_000 + "]" * 50_000},
        "binary-config": {"config.json": b"\x00\xff\xfe garbage"},
        "garbage-tokenizer": {"config.json": llama, "tokenizer.json": "{garbage", "tokenizer_config.json": "{}"},
        "truncated-tokenizer": {"config.json": llama, "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"',
                                "tokenizer_config.json": '{"tokenizer_class": "PreTrainedTokenizerFast"}'},
        "no-config": {"readme.txt": "not a model"},
    }.items():
        for file, content in files.items():
            _write(folder, f"{name}/{file}", content)
    return {f"--model {name}": name for name in ("garbage-config", "list-config", "deep-config", "binary-config",
                                                 "garbage-tokenizer", "truncated-tokenizer", "no-config")}


def _fake_run(folder: Path, name: str, config: str | bytes) -> str:
    _write(folder, f"{name}/config.yaml", config)
    return name


def build_cases(root: Path) -> list[tuple[str, Path, list[str], str]]:
    """``(label, folder, argv, expected text in the message)`` for every hostile case; each case has a
    folder of its own holding its inputs, so "nothing written" is checked folder by folder."""
    cases = []

    def case(label: str, argv_for, expected_for, make_inputs) -> None:
        folder = root / f"case-{len(cases)}"
        folder.mkdir()
        name = make_inputs(folder)
        cases.append((label, folder, argv_for(name), expected_for(name)))

    probe = root / "probe"  # inputs made once to learn their names
    probe.mkdir(parents=True)
    for label, name in _data_inputs(probe).items():
        def inputs(folder: Path, label: str = label) -> str:
            return _data_inputs(folder)[label]
        expected = "lone surrogate" if "surrogate" in label else name
        case(f"validate: {label}", lambda n: ["validate", n], lambda n, e=expected: e, inputs)
        case(f"train: {label}", lambda n: ["train", "--data", n, "--output", "out"], lambda n, e=expected: e, inputs)
    for label, name in _config_inputs(probe).items():
        def inputs(folder: Path, label: str = label) -> str:
            (folder / "a-directory").mkdir()
            return _config_inputs(folder)[label]
        case(f"train: {label}", lambda n: ["train", "--config", n, "--output", "out"], lambda n: n, inputs)
        if label in ("alias bomb", "epochs .inf", "config not UTF-8"):
            case(f"validate: {label}", lambda n: ["validate", "data.json", "--config", n], lambda n: n,
                 lambda folder, inputs=inputs: (_write(folder, "data.json", json.dumps([GOOD_DIALOGUE])), inputs(folder))[1])
    for label, name in _model_inputs(probe).items():
        def inputs(folder: Path, label: str = label) -> str:
            return _model_inputs(folder)[label]
        case(f"train: {label}", lambda n: ["train", "--model", n, "--output", "out"], lambda n: n, inputs)
        case(f"validate: {label}", lambda n: ["validate", "data.json", "--model", n], lambda n: n,
             lambda folder, inputs=inputs: (_write(folder, "data.json", json.dumps([GOOD_DIALOGUE])), inputs(folder))[1])

    # Output directories that cannot be written.
    case("train: output under a file", lambda n: ["train", "--output", f"{n}/run"], lambda n: n,
         lambda folder: _write(folder, "a-file", "x"))
    case("train: output is a file", lambda n: ["train", "--output", n], lambda n: n,
         lambda folder: _write(folder, "a-file", "x"))

    # Run directories every run-reading command is pointed at.
    run_kinds = {
        "missing run": lambda folder: "no-run",
        "run is a file": lambda folder: _write(folder, "file-run", "x"),
        "run without config": lambda folder: (folder / "empty-run").mkdir() or "empty-run",
        "run config not UTF-8": lambda folder: _fake_run(folder, "latin-run", "train: caf\xe9\n".encode("latin-1")),
        "run config alias bomb": lambda folder: _fake_run(folder, "bomb-run", BOMB),
        "run config deep": lambda folder: _fake_run(folder, "deep-run", "[" * 50_000 + "]" * 50_000),
        "run config .inf": lambda folder: _fake_run(folder, "inf-run", "train:\n  epochs: .inf\n"),
    }
    for label, make in run_kinds.items():
        for command in (["generate", "{}", "こんにちは"], ["chat", "{}"], ["serve", "{}", "--port", "0"],
                        ["export", "{}", "--merged", "merged"], ["evaluate", "{}"], ["status", "{}"]):
            if command[0] == "status" and label not in ("missing run", "run is a file"):
                continue  # status reports a directory's state without reading its config
            case(f"{command[0]}: {label}", lambda n, c=command: [a.format(n) for a in c], lambda n: n, make)
    case("train --output over a run with a non-UTF-8 config", lambda n: ["train", "--output", n], lambda n: n,
         run_kinds["run config not UTF-8"])

    # Export targets that would land in the run, or a GGUF onto a directory.
    def tiny_run(folder: Path) -> str:
        return _fake_run(folder, "run", "preset: tiny\n")
    for argv in (["--merged", "run"], ["--merged", "run/merged"], ["--merged", "."], ["--gguf", "run/model.gguf"],
                 ["--merged", "run/adapter", "--force"], ["--merged", ".", "--force"], ["--gguf", "run", "--force"],
                 ["--gguf", "gguf-dir/"], ["--merged", "m", "--gguf", "m/model.gguf"], ["--merged", "a-file/m"]):
        def make(folder: Path) -> str:
            (folder / "gguf-dir").mkdir()
            _write(folder, "a-file", "x")
            return tiny_run(folder)
        case(f"export {' '.join(argv)}", lambda n, a=argv: ["export", n, *a], lambda n, a=argv: a[1].rstrip("/"), make)

    # Score inputs.
    for label, content in {"deep": '{"text": ' + "[" * 50_000 + "]" * 50_000 + "}\n",
                           "huge integer": '{"text": "a", "id": ' + "9" * 10_000 + "}\n",
                           "surrogate": '{"text": "a\\ud800"}\n'}.items():
        case(f"score: {label}", lambda n: ["score", n], lambda n: n,
             lambda folder, c=content: _write(folder, "replies.jsonl", c))
    case("score: directory", lambda n: ["score", n], lambda n: n, lambda folder: (folder / "d").mkdir() or "d")
    case("score: FIFO", lambda n: ["score", n], lambda n: n, lambda folder: os.mkfifo(folder / "f.jsonl") or "f.jsonl")
    case("generate --input FIFO", lambda n: ["generate", "run", "--input", n], lambda n: n,
         lambda folder: (tiny_run(folder), os.mkfifo(folder / "p.jsonl"))[0] and "p.jsonl")
    case("evaluate --prompts FIFO", lambda n: ["evaluate", "run", "--prompts", n], lambda n: n,
         lambda folder: (tiny_run(folder), os.mkfifo(folder / "p.jsonl"))[0] and "p.jsonl")
    case("generate --input deep", lambda n: ["generate", "run", "--input", n], lambda n: n,
         lambda folder: (tiny_run(folder), _write(folder, "p.jsonl", '{"prompt": ' + "[" * 50_000 + "]" * 50_000 + "}\n"))[1])
    case("score: missing", lambda n: ["score", n], lambda n: n, lambda folder: "missing.jsonl")
    return cases


def tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): (p.lstat().st_size if not p.is_dir() else -1) for p in folder.rglob("*")}


def run_cases(cases, tmp_path: Path) -> list[dict]:
    cases_file, results_file = tmp_path / "cases.json", tmp_path / "results.json"
    cases_file.write_text(json.dumps([{"cwd": str(folder), "argv": argv} for _, folder, argv, _ in cases]),
                          encoding="utf-8")
    done = subprocess.run([sys.executable, str(DRIVER), str(cases_file), str(results_file)], capture_output=True,
                          text=True, env=ENV, timeout=900, check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return json.loads(results_file.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_every_command_refuses_hostile_input_in_one_line_without_traceback_or_writing(tmp_path):
    cases = build_cases(tmp_path / "cases")
    before = {label: tree(folder) for label, folder, _, _ in cases}
    results = run_cases(cases, tmp_path)
    failures = []
    for (label, folder, argv, expected), result in zip(cases, results):
        err = result["stderr"]
        problems = []
        if result["code"] != 2:
            problems.append(f"exit {result['code']}")
        if "Traceback" in err or not err.strip():
            problems.append("traceback or no message")
        if len(err) > 1500:
            problems.append(f"{len(err)} characters of message")
        if expected not in err:
            problems.append(f"message does not name {expected!r}")
        if tree(folder) != before[label]:
            problems.append(f"wrote {sorted(set(tree(folder)) - set(before[label]))}")
        if problems:
            failures.append(f"{label}: {', '.join(problems)}: {err[-300:]!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["validate", "missing.json"], ["train", "--config", "bomb.yaml", "--output", "o"],
                                  ["status", "nowhere"]])
def test_the_entry_point_itself_answers_in_one_line(tmp_path, argv):
    (tmp_path / "bomb.yaml").write_text(BOMB, encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "socratune", *argv], cwd=tmp_path, capture_output=True, text=True,
                          env=ENV, timeout=300, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and argv[-1 if argv[0] != "train" else 2] in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]
