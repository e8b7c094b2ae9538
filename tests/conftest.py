"""Shared fixtures: tiny checkpoints made once per session, uvloop for async tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import uvloop


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
