"""Shared fixtures: everything offline; the tiny tokenizer and the default run built once per session.

Run the suite with ``python -m pytest -q`` from the repository root; ``-m "not slow"`` runs the
fast tier only (no training, no subprocesses). A test is slow when it is marked
``@pytest.mark.slow`` or uses a fixture that trains or serves (``SLOW_FIXTURES``): marking by
fixture keeps new tests on a trained run out of the fast tier without anyone remembering to.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Fixtures that train a model (or load one trained in this session) or start a server.
SLOW_FIXTURES = {"default_run", "default_model", "default_run_copy", "reference_run", "ddp_run", "loaded",
                 "server", "browser", "exported"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from socratune.model.tiny import build_tokenizer, bundled_texts

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
    from socratune.model.modeling import load_for_inference

    return load_for_inference(default_run)
