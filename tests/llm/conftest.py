"""Fixtures of the LLM tests: the real SmolLM2-135M GGUF and an engine on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from voicepipe.models import ModelError, resolve
from voicepipe.testing import unavailable


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    try:
        return resolve("smollm2-135m-instruct-q4_1")
    except ModelError as exc:
        unavailable(str(exc))


@pytest.fixture(scope="session")
def smollm_engine(smollm_path: Path) -> Iterator[object]:
    from voicepipe.llm.engine import Engine

    torch.set_num_threads(2)
    # exact comparisons (with the contiguous fp32 reference): int8 and bf16 KV have their own tests
    yield Engine.load(str(smollm_path), dtype="float32", kv_dtype="float32")


