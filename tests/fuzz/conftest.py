"""The `fuzz` marker (registered here, not in pyproject): schemathesis runs against the
gateway's own OpenAPI document. Run them alone with `pytest -m fuzz tests/fuzz`, or leave them
out of the fast step with `-m "not fuzz"`."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fuzz: schemathesis property-based API fuzzing of the gateway (its own CI step)")
