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
    return inputs | _not_regular_files(folder, "a-directory", ".json")


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
    for label, _name in _config_inputs(probe).items():
        def inputs(folder: Path, label: str = label) -> str:
            (folder / "a-directory").mkdir()
            return _config_inputs(folder)[label]
        case(f"train: {label}", lambda n: ["train", "--config", n, "--output", "out"], lambda n: n, inputs)
        if label in ("alias bomb", "epochs .inf", "config not UTF-8"):
            case(f"validate: {label}", lambda n: ["validate", "data.json", "--config", n], lambda n: n,
                 lambda folder, inputs=inputs: (_write(folder, "data.json", json.dumps([GOOD_DIALOGUE])),
                                                inputs(folder))[1])
    for label, _name in _model_inputs(probe).items():
        def inputs(folder: Path, label: str = label) -> str:
            return _model_inputs(folder)[label]
        case(f"train: {label}", lambda n: ["train", "--model", n, "--output", "out"], lambda n: n, inputs)
        case(f"validate: {label}", lambda n: ["validate", "data.json", "--model", n], lambda n: n,
             lambda folder, inputs=inputs: (_write(folder, "data.json", json.dumps([GOOD_DIALOGUE])),
                                            inputs(folder))[1])

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
         lambda folder: (tiny_run(folder),
                         _write(folder, "p.jsonl", '{"prompt": ' + "[" * 50_000 + "]" * 50_000 + "}\n"))[1])
    case("score: missing", lambda n: ["score", n], lambda n: n, lambda folder: "missing.jsonl")
    return cases


def tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): (p.lstat().st_size if not p.is_dir() else -1) for p in folder.rglob("*")}


def failures_of(cases, before: dict[str, dict[str, int]], results: list[dict], max_lines: int | None) -> list[str]:
    """One line per case that did not exit 2 with a short message naming ``expected``, without a
    traceback and without changing its folder; ``max_lines`` also bounds the message's lines."""
    failures = []
    for (label, folder, _, expected), result in zip(cases, results):
        err = result["stderr"]
        problems = []
        if result["code"] != 2:
            problems.append(f"exit {result['code']}")
        if "Traceback" in err or not err.strip():
            problems.append("traceback or no message")
        if len(err) > 1500 or (max_lines is not None and len(err.strip().splitlines()) > max_lines):
            problems.append(f"{len(err)} characters of message")
        if expected.lower() not in err.lower():
            problems.append(f"message does not name {expected!r}")
        if tree(folder) != before[label]:
            problems.append(f"wrote {sorted(set(tree(folder)) ^ set(before[label]))}")
        if problems:
            failures.append(f"{label}: {', '.join(problems)}: {err[-300:]!r}")
    return failures


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
    failures = failures_of(cases, before, results, max_lines=None)
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


# Commands and inputs added in round 1: calibrate, config --set, synth, prefs, train --method dpo, style profiles.

FLOW_BOMB = "{" + ", ".join(line.replace("\n", "") for line in BOMB.splitlines()) + "}"  # BOMB on one line
DEAD_URL = "http://127.0.0.1:9/v1"  # nothing listens on the discard port: a request would fail, not hang


def _judged_line(i: int, **judge: object) -> str:
    ratings = judge or {"tone": i % 5, "approach": (i * 3) % 5, "format": 2, "logic": (i * 7) % 5}
    return json.dumps({"id": f"d{i % 7}#{i}", "prompt": "勇気とは？", "text": f"あなたは{i}をどう思いますか？",
                       "judge": ratings}, ensure_ascii=False) + "\n"


GOOD_JUDGED = "".join(_judged_line(i) for i in range(30))


def _judged_inputs(folder: Path) -> dict[str, str]:
    """Judged JSONL files of every hostile kind (calibrate's input)."""
    deep = "[" * 50_000 + "]" * 50_000
    inputs = {
        "missing": "missing.jsonl",
        "directory": "a-directory",
        "not UTF-8": _write(folder, "latin1.jsonl", _judged_line(1).encode("utf-8") + b'{"text": "caf\xe9"}\n'),
        "lone surrogate": _write(folder, "surrogate.jsonl", GOOD_JUDGED + '{"id": "x", "text": "a\\ud800", '
                                                                          '"judge": {"tone": 1}}\n'),
        "deep nesting": _write(folder, "deep.jsonl", GOOD_JUDGED + '{"text": "a", "judge": ' + deep + "}\n"),
        "huge integer rating": _write(folder, "bigint.jsonl", GOOD_JUDGED + '{"text": "a", "judge": {"tone": '
                                      + "9" * 10_000 + "}}\n"),
        "huge integer id": _write(folder, "bigid.jsonl", GOOD_JUDGED + '{"id": ' + "9" * 10_000
                                  + ', "text": "a", "judge": {"tone": 1}}\n'),
        "NaN rating": _write(folder, "nan.jsonl", GOOD_JUDGED + '{"text": "a", "judge": {"tone": NaN}}\n'),
        "Infinity rating": _write(folder, "inf.jsonl", GOOD_JUDGED + '{"text": "a", "judge": {"logic": Infinity}}\n'),
        "-Infinity rating": _write(folder, "neginf.jsonl",
                                   GOOD_JUDGED + '{"text": "a", "judge": {"tone": -Infinity}}\n'),
        "rating above 4": _write(folder, "five.jsonl", GOOD_JUDGED + _judged_line(99, tone=5)),
        "rating below 0": _write(folder, "minus.jsonl", GOOD_JUDGED + _judged_line(99, approach=-1)),
        "rating a string": _write(folder, "string.jsonl", GOOD_JUDGED + _judged_line(99, tone="3")),
        "rating a boolean": _write(folder, "bool.jsonl", GOOD_JUDGED + _judged_line(99, tone=True)),
        "text a number": _write(folder, "textnum.jsonl", GOOD_JUDGED + '{"text": 3, "judge": {"tone": 1}}\n'),
        "huge axis name": _write(folder, "hugeaxis.jsonl", GOOD_JUDGED + _judged_line(99, **{"x" * 100_000: 1})),
        "a list line": _write(folder, "list.jsonl", GOOD_JUDGED + "[1, 2]\n"),
        "too few rows": _write(folder, "few.jsonl", "".join(_judged_line(i) for i in range(3))),
        "empty": _write(folder, "empty.jsonl", ""),
        "one dialogue": _write(folder, "onedialogue.jsonl", "".join(
            json.dumps({"id": f"same#{i}", "text": "何ですか？", "judge": {"tone": i % 5}}) + "\n" for i in range(25))),
    }
    return inputs | _not_regular_files(folder, "a-directory", ".jsonl")


def _shipped_profile_with(old: str, new: str) -> str:
    """The shipped socrates profile with its first ``old`` replaced by ``new``."""
    from importlib import resources

    text = (resources.files("socratune") / "profiles" / "socrates.yaml").read_text(encoding="utf-8")
    assert old in text
    return text.replace(old, new, 1)


def _not_regular_files(folder: Path, directory: str, suffix: str, label: str = "") -> dict[str, str]:
    """Make a directory named ``directory`` (its case is listed by the caller), a FIFO and a
    symlink loop in ``folder``; return the last two as cases, their keys prefixed by ``label``."""
    (folder / directory).mkdir()
    os.mkfifo(folder / f"fifo{suffix}")
    (folder / f"loop{suffix}").symlink_to(f"loop{suffix}")
    return {f"{label}fifo": f"fifo{suffix}", f"{label}symlink loop": f"loop{suffix}"}


def _profile_inputs(folder: Path) -> dict[str, str]:
    """Style profile YAML files of every hostile kind."""
    inputs = {
        "profile missing": "missing.yaml",
        "profile directory": "profile-dir.yaml",
        "profile not UTF-8": _write(folder, "latin1.yaml", "name: caf\xe9\n".encode("latin-1")),
        "profile alias bomb": _write(folder, "bomb.yaml", BOMB),
        "profile harmless alias": _write(folder, "alias.yaml", "x: &x socrates\nname: *x\n"),
        "profile deep": _write(folder, "deep.yaml", "[" * 50_000 + "]" * 50_000),
        "profile huge integer": _write(folder, "bigint.yaml", "name: " + "9" * 10_000 + "\n"),
        "profile a list": _write(folder, "list.yaml", "- a\n- b\n"),
        "profile wrong types": _write(folder, "types.yaml", "name: [1, 2]\ncombine: 3\nendings: {a: b}\n"),
        "profile huge key": _write(folder, "hugekey.yaml", "k" * 100_000 + ": 1\n"),
        "profile not YAML": _write(folder, "broken.yaml", "name: [unclosed\n"),
        "profile empty": _write(folder, "empty.yaml", ""),
        "profile NaN weight": _write(folder, "nanweight.yaml", _shipped_profile_with("asks: 0.5", "asks: .nan")),
        "profile infinite overall weight": _write(folder, "infweight.yaml",
                                                  _shipped_profile_with("tone: 0.3", "tone: .inf")),
        "profile huge weight": _write(folder, "hugeweight.yaml", _shipped_profile_with("asks: 0.5", "asks: 1e999")),
        "profile unknown feature of thousands of characters": _write(
            folder, "hugefeature.yaml", _shipped_profile_with("asks: 0.5", "k" * 50_000 + ": 0.3")),
    }
    return inputs | _not_regular_files(folder, "profile-dir.yaml", ".yaml", label="profile ")


def _bundled_synth_profile() -> str:
    from importlib import resources

    text = (resources.files("socratune") / "assets" / "synth_socrates.yaml").read_text(encoding="utf-8")
    assert "temperature:" in text
    return text


def _synth_profile_inputs(folder: Path) -> dict[str, str]:
    return {
        "synth profile missing": "missing.yaml",
        "synth profile not UTF-8": _write(folder, "latin1.yaml", "questions: [caf\xe9]\n".encode("latin-1")),
        "synth profile alias bomb": _write(folder, "bomb.yaml", BOMB),
        "synth profile deep": _write(folder, "deep.yaml", "[" * 50_000 + "]" * 50_000),
        "synth profile huge integer": _write(folder, "bigint.yaml", "questions: " + "9" * 10_000 + "\n"),
        "synth profile wrong types": _write(folder, "types.yaml", "questions: 3\npersonas: x\n"),
        "synth profile empty question list": _write(folder, "noquestions.yaml", "questions: []\n"),
        "synth profile a list": _write(folder, "list.yaml", "- a\n"),
        "synth profile huge key": _write(folder, "hugekey.yaml", "k" * 100_000 + ": 1\n"),
        "synth profile NaN temperature": _write(folder, "nan.yaml", _bundled_synth_profile().replace(
            "temperature:", "temperature: .nan #", 1)),
        "synth profile directory": (folder / "d.yaml").mkdir() or "d.yaml",
        "synth profile FIFO": os.mkfifo(folder / "f.yaml") or "f.yaml",
    }


def _unfinished_run(folder: Path, name: str = "run") -> str:
    """A run directory with a config but no adapter: a run that never finished."""
    return _fake_run(folder, name, "preset: tiny\n")


def _finished_looking_run(folder: Path, name: str = "run") -> str:
    """A run directory with a config and an adapter config: far enough for the checks before loading."""
    _write(folder, f"{name}/adapter/adapter_config.json", "{}")
    return _fake_run(folder, name, "preset: tiny\n")


def build_round1_cases(root: Path) -> list[tuple[str, Path, list[str], str]]:
    """``(label, folder, argv, expected text in the message)`` for the commands round 1 added."""
    cases = []

    def case(label: str, argv_for, expected_for, make_inputs) -> None:
        folder = root / f"case-{len(cases)}"
        folder.mkdir(parents=True)
        name = make_inputs(folder)
        cases.append((label, folder, argv_for(name), expected_for(name)))

    def probe(kind: str) -> Path:  # inputs made once to learn their names
        folder = root / f"probe-{kind}"
        folder.mkdir(parents=True)
        return folder

    # calibrate: the judged file.
    for label in _judged_inputs(probe("judged")):
        def inputs(folder: Path, label: str = label) -> str:
            return _judged_inputs(folder)[label]
        case(f"calibrate: {label}", lambda n: ["calibrate", n, "--output", "p.yaml"], lambda n: n, inputs)
    # calibrate: the output.
    for label, output in {"output under a file": "a-file/p.yaml", "output exists": "a-file",
                          "output is a directory": "a-dir", "output in a missing folder": "nowhere/p.yaml"}.items():
        def inputs(folder: Path) -> str:
            _write(folder, "a-file", "keep me")
            (folder / "a-dir").mkdir()
            return _write(folder, "judged.jsonl", GOOD_JUDGED)
        case(f"calibrate: {label}", lambda n, o=output: ["calibrate", n, "--output", o],
             lambda n, o=output: o.split("/")[0], inputs)
    for folds in ("0", "1", "-3"):
        case(f"calibrate: --folds {folds}", lambda n, f=folds: ["calibrate", n, "--output", "p.yaml", "--folds", f],
             lambda n: "--folds", lambda folder: _write(folder, "judged.jsonl", GOOD_JUDGED))

    # Style profiles, through every command that takes one.
    for label in _profile_inputs(probe("profile")):
        def inputs(folder: Path, label: str = label) -> str:
            _write(folder, "replies.jsonl", '{"id": 1, "text": "あなたはどう思いますか？"}\n')
            _write(folder, "judged.jsonl", GOOD_JUDGED)
            _finished_looking_run(folder)
            return _profile_inputs(folder)[label]
        case(f"score --profile: {label}", lambda n: ["score", "replies.jsonl", "--profile", n], lambda n: n, inputs)
        case(f"calibrate --profile: {label}", lambda n: ["calibrate", "judged.jsonl", "--output", "p.yaml",
                                                          "--profile", n], lambda n: n, inputs)
        case(f"evaluate --profile: {label}", lambda n: ["evaluate", "run", "--profile", n], lambda n: n, inputs)
        case(f"train style.profile: {label}", lambda n: ["train", "--set", f"style.profile={n}", "--output", "out"],
             lambda n: n, inputs)
        case(f"validate style.profile: {label}", lambda n: ["validate", "judged.jsonl", "--set", f"style.profile={n}"],
             lambda n: n, inputs)
    case("score --profile: unknown name", lambda n: ["score", n, "--profile", "plato"], lambda n: "plato",
         lambda folder: _write(folder, "replies.jsonl", '{"text": "a"}\n'))
    case("score --profile: huge name", lambda n: ["score", n, "--profile", "p" * 5000], lambda n: "ppppp",
         lambda folder: _write(folder, "replies.jsonl", '{"text": "a"}\n'))

    # score --output when every line is bad: nothing written, an existing OUT kept.
    for label, content in {"all lines bad": '{"nope": 1}\n[1]\n', "all lines deep": '{"text": ' + "[" * 50_000
                           + "]" * 50_000 + "}\n", "only blank lines": "\n\n"}.items():
        case(f"score --output: {label}", lambda n: ["score", n, "--output", "scores.jsonl"], lambda n: n,
             lambda folder, c=content: _write(folder, "replies.jsonl", c))
        case(f"score --output existing: {label}", lambda n: ["score", n, "--output", "old.jsonl"], lambda n: n,
             lambda folder, c=content: (_write(folder, "old.jsonl", '{"keep": 1}\n'),
                                        _write(folder, "replies.jsonl", c))[1])
    for output in ("replies.jsonl", "./replies.jsonl", "link.jsonl"):
        def inputs(folder: Path) -> str:
            (folder / "link.jsonl").symlink_to("replies.jsonl")
            return _write(folder, "replies.jsonl", '{"text": "あなたはどう思いますか？"}\n')
        case(f"score --output {output} (the input)", lambda n, o=output: ["score", n, "--output", o],
             lambda n: "--output", inputs)
    case("score --output a directory", lambda n: ["score", "replies.jsonl", "--output", n], lambda n: n,
         lambda folder: (_write(folder, "replies.jsonl", '{"text": "a"}\n'), (folder / "d").mkdir())[0] and "d")
    case("score --output under a file", lambda n: ["score", "replies.jsonl", "--output", f"{n}/s.jsonl"],
         lambda n: n,
         lambda folder: (_write(folder, "replies.jsonl", '{"text": "a"}\n'), _write(folder, "a-file", "x"))[1])

    # config and --set: values and keys.
    deep_value = "[" * 50_000 + "]" * 50_000
    for label, assignment, expected in (
            ("alias bomb value", "train.epochs=" + FLOW_BOMB, "train.epochs"),
            ("flow alias bomb", "lora.target_modules=[&a [x, x, x, x], *a, *a, *a, *a]", "lora.target_modules"),
            ("deep value", f"train.epochs={deep_value}", "train.epochs"),
            ("huge integer", "train.epochs=" + "9" * 10_000, "train.epochs"),
            ("huge integer batch", "train.batch_size=" + "9" * 5_000, "train.batch_size"),
            (".inf", "train.epochs=.inf", "train.epochs"),
            ("-.inf learning rate", "train.learning_rate=-.inf", "train.learning_rate"),
            (".nan", "train.learning_rate=.nan", "train.learning_rate"),
            ("unknown section", "nosuch.key=1", "nosuch"),
            ("unknown key", "train.epochz=1", "epochz"),
            ("key of thousands of characters", "train." + "k" * 10_000 + "=1", "kkkk"),
            ("section of thousands of characters", "s" * 10_000 + "=1", "ssss"),
            ("no equals sign", "train.epochs", "train.epochs"),
            ("empty key", "=1", "--set"),
            ("empty key part", "train..epochs=1", "train..epochs"),
            ("value of thousands of characters", "train.batch_size=" + "v" * 100_000, "train.batch_size"),
            ("not YAML", "train.epochs=[unclosed", "train.epochs"),
            ("mapping where a number goes", "train.epochs={a: 1}", "train.epochs"),
            ("section set to a number", "train=3", "train"),
            ("lone surrogate value", "model.name_or_path=\ud800", "model.name_or_path")):
        for command in (["config"], ["validate", "data.json"], ["train", "--output", "out"]):
            case(f"{command[0]} --set: {label}", lambda n, c=command, a=assignment: [*c, "--set", a],
                 lambda n, e=expected: e, lambda folder: _write(folder, "data.json", json.dumps([GOOD_DIALOGUE])))
    for label in _config_inputs(probe("config")):
        def inputs(folder: Path, label: str = label) -> str:
            (folder / "a-directory").mkdir()
            return _config_inputs(folder)[label]
        case(f"config --config: {label}", lambda n: ["config", "--config", n], lambda n: n, inputs)
    case("config --preset: unknown", lambda n: ["config", "--preset", n], lambda n: n[:20], lambda folder: "x" * 3000)

    # synth: everything fails before any request and writes nothing.
    def synth(*extra: str) -> list[str]:
        return synth_at("out.jsonl", *extra)

    def synth_at(output: str, *extra: str) -> list[str]:
        return ["synth", "--output", output, "--url", DEAD_URL, "--model", "m", *extra]
    for label in _synth_profile_inputs(probe("synth")):
        def inputs(folder: Path, label: str = label) -> str:
            return _synth_profile_inputs(folder)[label]
        case(f"synth --config: {label}", lambda n: synth("--config", n), lambda n: n, inputs)
    for label, name in _data_inputs(probe("data1")).items():
        if label in ("one dialogue", "one shared question", "an object", "deep line"):
            continue  # each holds a usable dialogue to deduplicate against
        def inputs(folder: Path, label: str = label) -> str:
            return _data_inputs(folder)[label]
        expected = "lone surrogate" if "surrogate" in label else name
        case(f"synth --dedupe-against: {label}", lambda n: synth("--dedupe-against", n), lambda n, e=expected: e,
             inputs)
    for label, flags, expected in (
            ("--dialogues 0", ["--dialogues", "0"], "--dialogues"),
            ("--dialogues -5", ["--dialogues", "-5"], "--dialogues"),
            ("--dialogues huge", ["--dialogues", "9" * 40], "--dialogues"),
            ("--turns 0", ["--turns", "0"], "--turns"),
            ("--turns -1", ["--turns", "-1"], "--turns"),
            ("--turns huge", ["--turns", "9" * 30], "--turns"),
            ("--concurrency 0", ["--concurrency", "0"], "--concurrency"),
            ("--concurrency huge", ["--concurrency", "9" * 30], "--concurrency"),
            ("--timeout 0", ["--timeout", "0"], "--timeout"),
            ("--timeout nan", ["--timeout", "nan"], "--timeout"),
            ("--retries -1", ["--retries", "-1"], "--retries"),
            ("--min-score 9", ["--min-score", "9"], "--min-score"),
            ("--min-score nan", ["--min-score", "nan"], "--min-score")):
        case(f"synth {label}", lambda n, f=flags: synth(*f), lambda n, e=expected: e, lambda folder: "")
    for url in ("ftp://127.0.0.1/v1", "http://[::1", "", "http://", "127.0.0.1:8000", "http://h:99999/v1",
                "http://h:port/v1", "file:///etc/passwd", "http://[zz::1]/v1", "http://a b/v1"):
        case(f"synth --url {url!r}", lambda n, u=url: ["synth", "--output", "out.jsonl", "--url", u, "--model", "m"],
             lambda n: "url", lambda folder: "")
        case(f"synth --judge {url!r}", lambda n, u=url: synth("--judge", u, "--judge-model", "j"),
             lambda n: "judge", lambda folder: "")
    for label, output in {"output under a file": "a-file/out.jsonl", "output is a directory": "a-dir",
                          "output in a missing folder": "nowhere/out.jsonl"}.items():
        def inputs(folder: Path, output: str = output) -> str:
            _write(folder, "a-file", "keep me")
            (folder / "a-dir").mkdir()
            return output
        case(f"synth: {label}", lambda n: ["synth", "--output", n, "--url", DEAD_URL, "--model", "m"],
             lambda n: n.split("/")[0], inputs)
    synth_line = {"messages": [], "meta": {"index": 0, "scores": {"style": dict.fromkeys(
        ("tone", "approach", "format", "logic", "overall"), 2.0)}, "usage": {"requests": 1}}}
    for label, content in {"no meta.scores": '{"meta": {"index": 0}}\n',
                           "usage a string": json.dumps({**synth_line, "meta": {**synth_line["meta"],
                                                                                 "usage": "x"}}) + "\n",
                           "index a string": json.dumps({**synth_line, "meta": {**synth_line["meta"],
                                                                                 "index": "0"}}) + "\n",
                           "a list line": json.dumps(synth_line) + "\n[1]\n",
                           "deep line": json.dumps(synth_line) + "\n" + "[" * 50_000 + "]" * 50_000 + "\n",
                           "huge index": '{"meta": {"index": ' + "9" * 10_000 + "}}\n",
                           "not UTF-8": b'{"meta": "caf\xe9"}\n'}.items():
        case(f"synth --status: {label}", lambda n: ["synth", "--status", n], lambda n: n,
             lambda folder, c=content: _write(folder, "out.jsonl", c))
        case(f"synth --output over: {label}", lambda n: synth_at(n), lambda n: n,
             lambda folder, c=content: _write(folder, "out.jsonl", c))
    case("synth --status: FIFO", lambda n: ["synth", "--status", n], lambda n: n,
         lambda folder: os.mkfifo(folder / "f.jsonl") or "f.jsonl")
    case("synth --output: symlink loop", lambda n: synth_at(n), lambda n: n,
         lambda folder: (folder / "loop.jsonl").symlink_to("loop.jsonl") or "loop.jsonl")
    case("synth --output: FIFO", lambda n: synth_at(n), lambda n: n,
         lambda folder: os.mkfifo(folder / "f.jsonl") or "f.jsonl")
    case("synth --status: missing", lambda n: ["synth", "--status", n], lambda n: n, lambda folder: "none.jsonl")
    case("synth --status: a directory", lambda n: ["synth", "--status", n], lambda n: n,
         lambda folder: (folder / "d").mkdir() or "d")

    # prefs RUN.
    for label, make in {
        "missing run": lambda folder: "no-run",
        "run is a file": lambda folder: _write(folder, "file-run", "x"),
        "not a run": lambda folder: (folder / "empty-run").mkdir() or "empty-run",
        "unfinished run": _unfinished_run,
        "run config alias bomb": lambda folder: _fake_run(folder, "bomb-run", BOMB),
        "run config not UTF-8": lambda folder: _fake_run(folder, "latin-run", "x: caf\xe9\n".encode("latin-1")),
    }.items():
        case(f"prefs: {label}", lambda n: ["prefs", n, "--output", "pairs.jsonl"], lambda n: n, make)
    for label, name in _data_inputs(probe("data2")).items():
        def inputs(folder: Path, label: str = label) -> str:
            _finished_looking_run(folder)
            return _data_inputs(folder)[label]
        expected = "lone surrogate" if "surrogate" in label else name
        case(f"prefs --prompts: {label}", lambda n: ["prefs", "run", "--prompts", n, "--output", "pairs.jsonl"],
             lambda n, e=expected: e, inputs)
    for samples in ("0", "1", "-2"):
        case(f"prefs --samples {samples}", lambda n, s=samples: ["prefs", n, "--samples", s, "--output", "p.jsonl"],
             lambda n: "--samples", _finished_looking_run)
    for flag, values in {"--temperature": ["0", "nan", "inf", "1e-300", "-1"], "--top-p": ["0", "1.5", "nan"],
                         "--max-new-tokens": ["0", "-3"], "--min-margin": ["-1", "nan", "9"],
                         "--batch-size": ["0"], "--limit": ["0", "-2"], "--samples": ["100000"]}.items():
        for value in values:
            case(f"prefs {flag} {value}", lambda n, f=flag, v=value: ["prefs", n, f, v, "--output", "p.jsonl"],
                 lambda n, f=flag: f, _finished_looking_run)
    for url in ("ftp://h/v1", "http://[::1", "http://h:99999/v1"):
        case(f"prefs --judge {url}", lambda n, u=url: ["prefs", n, "--judge", u, "--judge-model", "j", "--prompts",
                                                         "p.jsonl", "--output", "o.jsonl"], lambda n: "--judge",
             lambda folder: (_write(folder, "p.jsonl", '{"prompt": "勇気とは？"}\n'), _finished_looking_run(folder))[1])
    case("prefs --output under a file", lambda n: ["prefs", n, "--output", "a-file/p.jsonl"], lambda n: "a-file",
         lambda folder: (_write(folder, "a-file", "x"), _finished_looking_run(folder))[1])
    case("prefs --output existing", lambda n: ["prefs", n, "--output", "a-file"], lambda n: "a-file",
         lambda folder: (_write(folder, "a-file", "x"), _finished_looking_run(folder))[1])
    case("prefs --output a directory", lambda n: ["prefs", n, "--output", "a-dir", "--force"], lambda n: "a-dir",
         lambda folder: ((folder / "a-dir").mkdir(), _finished_looking_run(folder))[1])

    # train --method dpo: the pairs file and the --from run.
    for label, name in _data_inputs(probe("data3")).items():
        def inputs(folder: Path, label: str = label) -> str:
            _finished_looking_run(folder, "sft")
            return _data_inputs(folder)[label]
        expected = "lone surrogate" if "surrogate" in label else name
        case(f"train --method dpo --pairs: {label}", lambda n: ["train", "--method", "dpo", "--pairs", n, "--from",
                                                                "sft", "--output", "out"], lambda n, e=expected: e,
             inputs)
    for label, make in {"missing --from": lambda folder: "no-run",
                        "--from a file": lambda folder: _write(folder, "f", "x"),
                        "--from not a run": lambda folder: (folder / "empty").mkdir() or "empty",
                        "--from unfinished": lambda folder: _unfinished_run(folder, "sft"),
                        "--from config alias bomb": lambda folder: _fake_run(folder, "sft", BOMB),
                        "--from config not UTF-8": lambda folder: _fake_run(folder, "sft", b"x: caf\xe9\n"),
                        "--from config deep": lambda folder: _fake_run(folder, "sft", "[" * 50_000 + "]" * 50_000),
                        }.items():
        def inputs(folder: Path, make=make) -> str:
            pair = {"prompt": "勇気とは？", "chosen": "あなたは？", "rejected": "勇気です。"}
            _write(folder, "pairs.jsonl", json.dumps(pair, ensure_ascii=False) + "\n")
            return make(folder)
        case(f"train --method orpo {label}", lambda n: ["train", "--method", "orpo", "--pairs", "pairs.jsonl",
                                                         "--from", n, "--output", "out"], lambda n: n, inputs)
    return cases


@pytest.mark.slow
def test_round1_commands_refuse_hostile_input_in_a_few_lines_without_traceback_or_writing(tmp_path):
    cases = build_round1_cases(tmp_path / "cases")
    assert len({label for label, _, _, _ in cases}) == len(cases)
    before = {label: tree(folder) for label, folder, _, _ in cases}
    results = run_cases(cases, tmp_path)
    failures = failures_of(cases, before, results, max_lines=6)
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)


# The same classes in process, fast tier: the library raises the typed error the CLI turns into one line.

@pytest.mark.parametrize("content", [BOMB, "name: caf\xe9\n".encode("latin-1"), "[" * 50_000 + "]" * 50_000,
                                     "name: " + "9" * 10_000 + "\n", "- a\n", "fifo", "directory"])
def test_a_style_profile_file_is_read_like_a_config_and_refused_naming_it(tmp_path, content):
    from socratune.core.errors import ConfigError
    from socratune.style import load_profile

    path = tmp_path / "p.yaml"
    if content == "fifo":
        os.mkfifo(path)
    elif content == "directory":
        path.mkdir()
    else:
        _write(tmp_path, "p.yaml", content)
    with pytest.raises(ConfigError) as caught:
        load_profile(str(path))
    assert str(path) in str(caught.value) and len(str(caught.value)) < 500 and caught.value.key == "style.profile"


def test_score_writes_nothing_and_keeps_an_old_output_when_no_line_scores(tmp_path):
    from socratune.core.errors import DataError
    from socratune.style import score_jsonl

    src, out = tmp_path / "replies.jsonl", tmp_path / "scores.jsonl"
    src.write_text('{"nope": 1}\n[1]\n' + '{"text": 3}\n' * 20, encoding="utf-8")
    with pytest.raises(DataError, match="no usable reply.*nothing was written"):
        score_jsonl(src, out)
    assert not out.exists()
    out.write_text("old\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        score_jsonl(src, out)
    assert out.read_text(encoding="utf-8") == "old\n" and "and 17 more" in str(caught.value)


@pytest.mark.parametrize("url", ["http://[::1", "http://[zz::1]/v1", "http://h:99999/v1", "http://h:port/v1",
                                 "ftp://h/v1", "", "http://", "http://a b/v1", "h" * 5000])
def test_a_url_that_cannot_be_parsed_is_a_config_error_naming_the_flag(url):
    from socratune.core.errors import ConfigError
    from socratune.synth.client import split_url

    with pytest.raises(ConfigError) as caught:
        split_url(url, "--url")
    assert "--url" in str(caught.value) and len(str(caught.value)) < 400
