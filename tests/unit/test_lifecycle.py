"""Version lifecycle (issue 21): a version published by mistake can be deprecated (no new
pointers, `latest` skips it, what points at it keeps working) or blocked (refused everywhere),
audited and reversible; the same rules from the registry operations, the admin API, the CLI and
the serving path."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from gateway.api.app import create_app
from gateway.cli.main import app as cli
from gateway.config import GatewaySettings
from gateway.rollouts.ops import start_rollout
from prompt_registry import VersionBlocked, VersionRetired
from prompt_registry.keys import generate_key
from prompt_registry.loader import load_prompt_file, seed_store
from prompt_registry.ops import rollback, set_label, set_version_state, summarize
from prompt_registry.rollouts import GateConfig, ShadowSpec
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend

ROOT = Path(__file__).resolve().parents[2]
PROMPT = ROOT / "configs" / "prompts" / "listing-moderation.yaml"
NAME = "listing-moderation"
LISTING = {"item_id": "item-1", "seller_id": "seller-1", "title": "Wireless earbuds"}


def _publish_variants(store: SqlitePromptStore, n: int) -> list[int]:
    spec = load_prompt_file(PROMPT)
    return [store.publish(spec.model_copy(update={"description": f"variant {i}"}), actor="author")
            .version.version for i in range(n)]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[SqlitePromptStore]:
    s = SqlitePromptStore(tmp_path / "r.db")
    seed_store(s, ROOT / "configs" / "prompts")  # production -> v1
    _publish_variants(s, 2)  # v2, v3
    yield s
    s.close()


def _start(store: SqlitePromptStore, *, canary: int | None = None, shadow: int | None = None) -> None:
    start_rollout(store, NAME, canary_version=canary, steps=[5, 100],
                  shadows=[ShadowSpec(version=shadow, sample_rate=0.5)] if shadow else [],
                  step_hold_s=0, gates=GateConfig(), auto=False, subject_key="seller_id",
                  actor="lead")


def test_deprecated_version_takes_no_new_pointer_but_existing_ones_keep_working(
        registry: SqlitePromptStore) -> None:
    set_label(registry, NAME, "staging", 3, actor="lead")
    assert summarize(registry, NAME).latest == 3
    assert set_version_state(registry, NAME, 3, "deprecated", actor="lead", reason="names a model we do not serve")
    summary = summarize(registry, NAME)
    assert summary.latest == 2  # latest skips it
    assert summary.as_dict()["states"] == {"3": "deprecated"}
    assert summary.warnings() == ["label 'staging' points at v3, which is deprecated"]
    assert registry.resolve(NAME, "staging").version == 3  # the existing pointer keeps working
    with pytest.raises(VersionRetired, match=r"v3 is deprecated \(names a model we do not serve\)"):
        set_label(registry, NAME, "canary", 3, actor="lead")
    with pytest.raises(VersionRetired, match="new rollout"):
        _start(registry, canary=3)
    with pytest.raises(VersionRetired, match="new rollout"):
        _start(registry, shadow=3)
    # the same label set to the same version again is not a new pointer
    set_label(registry, NAME, "staging", 3, actor="lead")
    # nothing changes twice: a repeated deprecation writes nothing
    assert not set_version_state(registry, NAME, 3, "deprecated", actor="lead", reason="again")
    # reversible
    assert set_version_state(registry, NAME, 3, "active", actor="lead", reason="model now served")
    set_label(registry, NAME, "canary", 3, actor="lead")
    assert summarize(registry, NAME).latest == 3
    notes = [(e.action, e.to_version, e.note) for e in registry.audit(NAME) if e.action == "lifecycle"]
    assert notes == [("lifecycle", 3, "active -> deprecated: names a model we do not serve"),
                     ("lifecycle", 3, "deprecated -> active: model now served")]


def test_block_is_refused_while_anything_points_at_the_version(registry: SqlitePromptStore) -> None:
    set_label(registry, NAME, "canary", 2, actor="lead")
    with pytest.raises(VersionRetired, match="label.*canary.*point at it"):
        set_version_state(registry, NAME, 2, "blocked", actor="lead", reason="leaks the policy")
    with pytest.raises(VersionRetired, match="label.*production"):
        set_version_state(registry, NAME, 1, "blocked", actor="lead", reason="production cannot be blocked")
    _start(registry, shadow=3)
    with pytest.raises(VersionRetired, match="rollout .* serves it"):
        set_version_state(registry, NAME, 3, "blocked", actor="lead", reason="x")
    assert registry.get_lifecycle(NAME) is None  # nothing was written by the refusals


def test_blocked_version_is_refused_everywhere(registry: SqlitePromptStore) -> None:
    set_label(registry, NAME, "canary", 2, actor="lead")
    set_label(registry, NAME, "canary", 3, actor="lead")  # canary: v2 -> v3
    assert set_version_state(registry, NAME, 2, "blocked", actor="lead", reason="leaks the policy")
    for label in ("production", "canary", "new-label"):
        with pytest.raises(VersionRetired, match="v2 is blocked"):
            set_label(registry, NAME, label, 2, actor="lead")
    with pytest.raises(VersionBlocked, match="cannot roll back to v2"):
        rollback(registry, NAME, "canary", actor="lead")  # the incident path refuses it too
    with pytest.raises(VersionRetired):
        _start(registry, canary=2)
    with pytest.raises(Exception, match="reason is required"):
        set_version_state(registry, NAME, 2, "active", actor="lead", reason="  ")


def test_rollback_to_a_deprecated_version_is_allowed(registry: SqlitePromptStore) -> None:
    """Rollback is the incident path: deprecated (not blocked) targets stay reachable."""
    set_label(registry, NAME, "canary", 2, actor="lead")
    set_label(registry, NAME, "canary", 3, actor="lead")
    set_version_state(registry, NAME, 2, "deprecated", actor="lead", reason="superseded")
    assert rollback(registry, NAME, "canary", actor="lead") == (3, 2)


# -- admin API and serving ----------------------------------------------------------------------

@pytest.fixture
def api(registry: SqlitePromptStore) -> Iterator[tuple[TestClient, dict[str, dict[str, str]]]]:
    keys = {}
    for name, scopes in {"author": ["prompts:read", "labels:write"], "admin": ["admin"],
                         "caller": ["moderate"], "pinner": ["moderate", "moderate:pin"]}.items():
        key, record = generate_key(name, scopes, created_by="test")
        registry.put_key(record)
        keys[name] = {"authorization": f"Bearer {key}"}
    with TestClient(create_app(GatewaySettings(), registry, FakeBackend()),
                    raise_server_exceptions=False) as client:
        yield client, keys


def test_api_scopes_and_serving(api: tuple[TestClient, dict[str, dict[str, str]]]) -> None:
    client, keys = api
    url = f"/v1/prompts/{NAME}/versions/3/state"
    r = client.put(url, json={"state": "deprecated", "reason": "wrong model"}, headers=keys["caller"])
    assert r.status_code == 403
    r = client.put(url, json={"state": "deprecated"}, headers=keys["author"])
    assert r.status_code == 422 and "reason" in r.text
    r = client.put(url, json={"state": "retired", "reason": "x"}, headers=keys["author"])
    assert r.status_code == 422  # an unknown state names the field
    r = client.put(url, json={"state": "deprecated", "reason": "wrong model"}, headers=keys["author"])
    assert r.status_code == 200, r.text
    assert r.json()["changed"] is True and r.json()["prompt"]["latest"] == 2
    # a pinned request to the deprecated version is answered, flagged
    r = client.post("/v1/moderate", json={**LISTING, "prompt_version": 3}, headers=keys["pinner"])
    assert r.status_code == 200, r.text
    assert r.json()["prompt"]["version"] == 3 and r.json()["prompt"]["deprecated"] is True
    # blocking needs admin, not labels:write
    r = client.put(url, json={"state": "blocked", "reason": "leaks the policy"}, headers=keys["author"])
    assert r.status_code == 403
    r = client.put(url, json={"state": "blocked", "reason": "leaks the policy"}, headers=keys["admin"])
    assert r.status_code == 200, r.text
    # the change reaches the hot path at once: the pin is refused, never answered
    r = client.post("/v1/moderate", json={**LISTING, "prompt_version": 3}, headers=keys["pinner"])
    assert r.status_code == 410, r.text
    assert r.json()["error"]["type"] == "version_blocked" and r.json()["request_id"]
    # a label move to it is refused with a 409 naming the state
    r = client.put(f"/v1/prompts/{NAME}/labels/canary", json={"version": 3}, headers=keys["author"])
    assert r.status_code == 409 and r.json()["error"]["type"] == "version_retired"
    assert "v3 is blocked" in r.json()["error"]["message"]
    # and undoing a block needs admin too
    r = client.put(url, json={"state": "active", "reason": "fixed"}, headers=keys["author"])
    assert r.status_code == 403
    r = client.put(url, json={"state": "active", "reason": "fixed"}, headers=keys["admin"])
    assert r.status_code == 200
    r = client.post("/v1/moderate", json={**LISTING, "prompt_version": 3}, headers=keys["pinner"])
    assert r.status_code == 200 and "deprecated" not in r.json()["prompt"]  # flagged only when true
    # blocking production's version is a 409 naming the label
    r = client.put(f"/v1/prompts/{NAME}/versions/1/state", json={"state": "blocked", "reason": "x"},
                   headers=keys["admin"])
    assert r.status_code == 409 and "production" in r.json()["error"]["message"]
    listed = client.get("/v1/prompts", headers=keys["author"]).json()
    (lm,) = listed["prompts"] if isinstance(listed, dict) else listed
    assert lm["latest"] == 3 and lm["states"] == {}


# -- CLI ----------------------------------------------------------------------------------------

def test_cli_deprecate_block_reinstate(tmp_path: Path, registry: SqlitePromptStore) -> None:
    config = tmp_path / "modgate.yaml"
    cfg = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    cfg.setdefault("registry", {})["path"] = str(tmp_path / "r.db")
    config.write_text(yaml.safe_dump(cfg))
    admin_key, record = generate_key("ops-admin", ["admin"], created_by="test")
    registry.put_key(record)

    def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
        result = CliRunner().invoke(cli, [*args, "--config", str(config)], env=env)
        return result.exit_code, result.output

    code, out = run("prompts", "deprecate", NAME, "3")
    assert code == 2 and "needs --reason" in out
    code, out = run("prompts", "deprecate", NAME, "3", "--reason", "wrong model")
    assert code == 0, out
    assert "v3: deprecated; latest is v2" in out
    code, out = run("prompts", "list")
    assert "latest v2" in out and "v3 deprecated" in out
    code, out = run("prompts", "label", NAME, "canary", "3")
    assert code == 1 and "v3 is deprecated" in out
    code, out = run("prompts", "block", NAME, "3", "--reason", "leaks the policy")
    assert code == 2 and "admin" in out  # blocking needs an admin key
    code, out = run("prompts", "block", NAME, "3", "--reason", "leaks the policy",
                    env={"MODGATE_ADMIN_KEY": admin_key})
    assert code == 0, out
    code, out = run("prompts", "show", NAME, "--json")
    assert json.loads(out)["states"] == {"3": "blocked"}
    code, out = run("prompts", "reinstate", NAME, "3", "--reason", "fixed",
                    env={"MODGATE_ADMIN_KEY": admin_key})
    assert code == 0 and "v3: active" in out
    code, out = run("prompts", "audit", NAME)
    assert code == 0 and "v3 active → deprecated — wrong model" in out
