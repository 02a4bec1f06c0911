"""Small CLI items a new user tripped on (#21)."""

from __future__ import annotations

import pytest
import typer

from gateway.cli.registry import _actor
from gateway.cli.rollouts import _shadow


def test_a_shadow_rate_out_of_range_says_so_not_that_the_shape_is_wrong() -> None:
    with pytest.raises(typer.BadParameter, match=r"the rate 1.5 is a share of traffic, in \(0, 1\]"):
        _shadow("2:1.5")
    with pytest.raises(typer.BadParameter, match="is not VERSION:RATE"):
        _shadow("two:0.5")
    assert _shadow("3:0.2").sample_rate == 0.2


def test_an_empty_user_is_never_recorded_as_a_bare_root(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MODGATE_ACTOR", "LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.setenv(var, "")
    who = _actor(None)
    assert who != "root" and who.startswith("uid ")
    monkeypatch.setenv("MODGATE_ACTOR", "ana")
    assert _actor(None) == "ana" and _actor("bo") == "bo"
