"""Fixtures of the service tests: a worker environment on the test's own prefix and queue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service_support import Stack
from worker.mockllm import MockLLM


@pytest.fixture
def stack(
    tmp_path: Path, redis_url: str, key_prefix: str, mock: MockLLM, redis_client
) -> Iterator[Stack]:
    s = Stack(tmp_path, redis_url, key_prefix, mock)
    yield s
    s.client.close()
