"""Shared fixtures: everything offline, the tiny tokenizer built once per session.

Run the suite with ``python -m pytest -q`` from the repository root.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from socratune.tiny import build_tokenizer, bundled_texts

    return build_tokenizer(bundled_texts())
