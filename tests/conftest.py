"""Fixtures shared by every test module."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

#: Fixtures for tests that need a private redis-server (see tests/support/redis_server.py).
pytest_plugins = ("support.redis_server",)


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio (the backend the services use)."""
    return "asyncio"


# CI runs every property test on the same examples (no new random draws per run) and without
# per-example deadlines, which a loaded machine would turn into spurious failures; locally
# Hypothesis keeps exploring.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
