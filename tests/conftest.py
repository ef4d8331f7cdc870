"""Shared fixtures: everything offline; the tiny tokenizer and the default run built once per session.

Run the suite with ``python -m pytest -q`` from the repository root.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from socratune.tiny import build_tokenizer, bundled_texts

    return build_tokenizer(bundled_texts())


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> Path:
    """The run directory ``socratune train`` leaves on the embedded default (about 80 s on two cores).

    Shared by every test module that needs a trained run: treat it as read-only, and take
    ``default_run_copy`` to change anything.
    """
    from socratune.cli import main

    prepared = os.environ.get("SOCRATUNE_TEST_DEFAULT_RUN")  # developers: reuse one run across pytest calls
    if prepared:
        return Path(prepared)
    run = tmp_path_factory.mktemp("default") / "run"
    assert main(["train", "--output", str(run)]) == 0
    return run


@pytest.fixture
def default_run_copy(default_run, tmp_path) -> Path:
    """A private copy of the default run that a test may modify."""
    return Path(shutil.copytree(default_run, tmp_path / "run", symlinks=True))


@pytest.fixture(scope="session")
def default_model(default_run):
    """``(model, tokenizer)``: the default run's base with its final adapter, loaded once for every
    test that generates in-process. Read-only: a test must not train, merge or move it."""
    from socratune.modeling import load_for_inference

    return load_for_inference(default_run)
