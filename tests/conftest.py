"""Shared fixtures. The expensive stack (Ray Serve + vLLM + gateway) lives in
tests/integration/conftest.py and starts once per session, only when integration tests run."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from prompt_registry.loader import load_prompt_file
from prompt_registry.models import PromptSpec
from prompt_registry.redis_store import RedisPromptStore
from testsupport.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PROMPT = ROOT / "configs" / "prompts" / "listing-moderation.yaml"


@pytest.fixture(scope="session")
def example_spec() -> PromptSpec:
    return load_prompt_file(EXAMPLE_PROMPT)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Fast unit tests first, then the shared stack; tests that break the stack (kill the engine)
    # run after everything else.
    # Integration tests are grouped by stack transport (each stack starts once), with the
    # destructive test last within its group.
    def rank(item: pytest.Item) -> tuple[int, int, int]:
        if "integration" not in item.nodeid.split("/"):
            return (0, 0, 0)
        transport = 1 if "[handle" in item.nodeid or "-handle" in item.nodeid else 0
        return (1, transport, 1 if item.get_closest_marker("destructive") is not None else 0)

    items.sort(key=rank)


@pytest.fixture(scope="session", autouse=True)
def patient_registry_redis() -> Iterator[None]:
    """The registry's Redis client gives up after `timeout_s` (1 s by default: a gateway serves
    from its cache rather than wait). On a loaded 2-core CI machine the tests' local redis-server
    can take longer than that to answer, and contract tests failed at random on it. In tests
    the default is only a guard against a hang, so it is 10 s here; the outage and kill tests
    that are about timeouts pass `timeout_s` themselves."""
    defaults = RedisPromptStore.__init__.__kwdefaults__
    assert defaults is not None and "timeout_s" in defaults
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(defaults, "timeout_s", 10.0)
        yield


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A fresh key prefix per test, so tests sharing the server never see each other's keys."""
    return f"t{uuid.uuid4().hex[:12]}"
