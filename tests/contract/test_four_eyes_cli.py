"""Issue 16, item 9 from the command line, on SQLite and Redis: `prompts four-eyes on`, a
production move held as a request (exit status 4), `prompts approvals list|approve|deny`, and
a key that cannot approve its own request."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient
from typer.testing import CliRunner, Result

from gateway.cli.main import app as cli
from gateway.config import load_config
from gateway.stores import open_store
from tests.contract.test_cli_flow import config_path, gateway  # noqa: F401  (fixtures)
from tests.scorecards import store_scorecard

NAME = "listing-moderation"


def invoke(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, [*args, "--config", str(config)], env={"MODGATE_ACTOR": "maria"},
                              catch_exceptions=False)


def ok(config: Path, *args: str) -> str:
    result = invoke(config, *args)
    assert result.exit_code == 0, result.output
    return result.output


def test_four_eyes_from_the_cli(config_path: Path, gateway: tuple[TestClient, str]) -> None:  # noqa: F811
    _, admin_key = gateway
    store = open_store(load_config(config_path))
    spec = store.get_version(NAME, 1).spec
    v2 = store.publish(spec.model_copy(update={"description": "v2"}), actor="t").version.version
    store_scorecard(store, NAME, 1)
    store_scorecard(store, NAME, v2)
    store.close()
    alice, bob = (json.loads(ok(config_path, "keys", "create", who, "--scope", "labels:protected",
                                "--json"))["key"] for who in ("alice", "bob"))

    refused = invoke(config_path, "prompts", "four-eyes", "on", NAME, "--reason", "SOX",
                     "--admin-key", alice)
    assert refused.exit_code == 2 and "'admin'" in refused.output
    assert "four eyes on" in ok(config_path, "prompts", "four-eyes", "on", NAME, "--reason", "SOX",
                                "--admin-key", admin_key)

    held = invoke(config_path, "prompts", "label", NAME, "production", str(v2), "--key", alice)
    assert held.exit_code == 4, held.output
    assert "needs the approval of a second key holder" in held.output
    listed = json.loads(ok(config_path, "prompts", "approvals", "list", NAME, "--json"))
    (request,) = listed["requests"]
    assert (request["requested_by"], request["state"], request["version"]) == ("alice", "pending", v2)
    assert f"{request['id']}  pending" in ok(config_path, "prompts", "approvals", "list", NAME)

    own = invoke(config_path, "prompts", "approvals", "approve", NAME, request["id"], "--key", alice)
    # a refusal of the key (the API's 403), so the status of every key refusal: 2, here and remotely
    assert own.exit_code == 2 and "second key holder" in own.output
    nokey = invoke(config_path, "prompts", "approvals", "approve", NAME, request["id"])
    assert nokey.exit_code == 2 and "needs an API key" in nokey.output
    out = ok(config_path, "prompts", "approvals", "approve", NAME, request["id"], "--key", bob)
    assert f"production: v1 -> v{v2} (approval {request['id']} of alice's request)" in out

    held = invoke(config_path, "prompts", "label", NAME, "production", "1", "--key", bob)
    assert held.exit_code == 4
    pending = json.loads(ok(config_path, "prompts", "approvals", "list", NAME, "--json"))["requests"][0]
    ok(config_path, "prompts", "approvals", "deny", NAME, pending["id"], "--key", alice,
       "--reason", "no")
    store = open_store(load_config(config_path))
    try:
        assert store.labels(NAME)["production"] == v2
        assert [e.action for e in store.audit(NAME)][-6:] == [
            "four_eyes", "approval_requested", "approval_approved", "label",
            "approval_requested", "approval_denied"]
    finally:
        store.close()
    assert "four eyes off" in ok(config_path, "prompts", "four-eyes", "off", NAME, "--reason",
                                 "done", "--admin-key", admin_key)
