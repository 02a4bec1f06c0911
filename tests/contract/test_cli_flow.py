"""The prompt-ops flow from the CLI alone, against SQLite (default) and Redis (one setting):
publish v2 from a file, diff, move production, see a running gateway serve v2 within a
second, roll back, read the audit trail; and the promotion gate refusing a version that fails
its criteria, in one command, and an admin overriding it with a recorded reason."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner, Result

from gateway.api.app import create_app
from gateway.cli.main import app as cli
from gateway.config import load_config
from gateway.stores import open_store
from serving.fake_backend import FakeBackend
from tests.scorecards import store_scorecard
from testsupport.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
LISTING = {"item_id": "item-1", "seller_id": "seller-1", "title": "Wireless earbuds"}


@pytest.fixture(params=["sqlite", "redis"])
def config_path(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(tmp_path / "data")
    config["registry"]["seed_dir"] = str(ROOT / "configs" / "prompts")
    config["gateway"]["prompt_refresh_s"] = 3600  # visibility must come from change events
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        config["registry"].update(store="redis", redis_url=server.url,
                                  redis_key_prefix=request.getfixturevalue("redis_prefix"))
    path = tmp_path / "modgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(config_path: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, [*args[:2], "--config", str(config_path), *args[2:]],
                                env={"MODGATE_ACTOR": "maria"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def gateway(config_path: Path) -> Iterator[tuple[TestClient, str]]:
    from gateway.cli.main import _local_keys, _open_store

    cfg = load_config(config_path)
    store = _open_store(cfg)  # seeds v1 and production -> v1, as `modgate up` does
    keys = _local_keys(cfg, store)
    with TestClient(create_app(cfg.gateway, store, FakeBackend()),
                    headers={"authorization": f"Bearer {keys['local-caller']}"}) as client:
        yield client, keys["local-admin"]
    store.close()


def _served_version(client: TestClient) -> int:
    r = client.post("/v1/moderate", json=LISTING)
    assert r.status_code == 200, r.text
    return int(r.json()["prompt"]["version"])


def _wait_for_version(client: TestClient, version: int, within_s: float = 15.0) -> float:
    """Wait until the gateway serves *version*. With prompt_refresh_s at 3600 only a change event
    can bring it; *within_s* only guards against a hang (1 s was within reach of a loaded CI)."""
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if _served_version(client) == version:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"gateway did not serve v{version} within {within_s}s")


def test_prompt_ops_flow_from_the_cli(config_path: Path, gateway: tuple[TestClient, str], tmp_path: Path) -> None:
    client, _ = gateway
    assert _served_version(client) == 1

    v2 = yaml.safe_load((ROOT / "configs" / "prompts" / "listing-moderation.yaml").read_text())
    v2["messages"][0]["content"] += "\nPhone numbers written as words count as off_platform_payment.\n"
    v2_file = tmp_path / "listing-moderation.v2.yaml"
    v2_file.write_text(yaml.safe_dump(v2, allow_unicode=True, sort_keys=False))

    assert "published listing-moderation v2" in run(config_path, "prompts", "publish", str(v2_file), "-m", "phone words")
    assert "unchanged: identical to listing-moderation v2" in run(config_path, "prompts", "publish", str(v2_file))
    diff = run(config_path, "prompts", "diff", "listing-moderation", "1", "2")
    assert "+    Phone numbers written as words count as off_platform_payment." in diff

    store = open_store(load_config(config_path))  # what `modgate eval run` stores
    store_scorecard(store, "listing-moderation", 1)
    store_scorecard(store, "listing-moderation", 2)
    store.close()
    moved = run(config_path, "prompts", "label", "listing-moderation", "production", "2", "--expected", "1",
                "-m", "ship")
    assert "production: v1 -> v2" in moved and "promotion gate: PASS" in moved
    _wait_for_version(client, 2)

    out = json.loads(run(config_path, "prompts", "rollback", "listing-moderation", "production", "--json"))
    assert out == {"name": "listing-moderation", "label": "production", "from_version": 2, "to_version": 1}
    _wait_for_version(client, 1)

    audit = json.loads(run(config_path, "prompts", "audit", "listing-moderation", "--json"))["entries"]
    assert [(e["action"], e["from_version"], e["to_version"], e["actor"]) for e in audit] == [
        ("publish", None, 1, "seed"), ("label", None, 1, "seed"), ("publish", None, 2, "maria"),
        ("scorecard", None, 1, "test"), ("scorecard", None, 2, "test"),
        ("label", 1, 2, "maria"), ("label", 2, 1, "maria")]
    human = run(config_path, "prompts", "audit", "listing-moderation")
    assert "maria" in human and "maria  label production: v2 → v1 — rollback from v2" in human
    listing = run(config_path, "prompts", "list")
    assert "listing-moderation" in listing and "production=v1" in listing


def test_promotion_gate_from_the_cli(config_path: Path, gateway: tuple[TestClient, str], tmp_path: Path) -> None:
    client, admin_key = gateway
    keys = json.loads((load_config(config_path).data_path() / "local-keys.json").read_text())
    v2 = yaml.safe_load((ROOT / "configs" / "prompts" / "listing-moderation.yaml").read_text())
    v2["messages"][0]["content"] += "\nTreat 'original quality' with a brand name as counterfeit.\n"
    v2_file = tmp_path / "v2.yaml"
    v2_file.write_text(yaml.safe_dump(v2, allow_unicode=True, sort_keys=False))
    run(config_path, "prompts", "publish", str(v2_file))

    def cli_result(*args: str, env: dict[str, str] | None = None) -> Result:
        return CliRunner().invoke(cli, [*args[:2], "--config", str(config_path), *args[2:]],
                                  env={"MODGATE_ACTOR": "maria", **(env or {})}, catch_exceptions=False)

    promote = ("prompts", "label", "listing-moderation", "production", "2")
    refused = cli_result(*promote)
    assert refused.exit_code == 3, refused.output
    assert "listing-moderation v2 fails its promotion gate" in refused.output
    assert "no stored scorecard of v2 on dataset e08b6d315ed6" in refused.output
    assert ("to score it: modgate eval run --prompt listing-moderation --version 1 --version 2 "
            "--dataset datasets/listings-sample.jsonl") in refused.output

    store = open_store(load_config(config_path))
    store_scorecard(store, "listing-moderation", 1)
    # v2 flags 26 listings as counterfeit, 20 rightly, and misses 7 of 27
    store_scorecard(store, "listing-moderation", 2, counts={"counterfeit": (20, 6, 7)})
    store.close()
    refused = cli_result(*promote)
    assert refused.exit_code == 3 and "Traceback" not in refused.output
    assert "  - counterfeit precision lower bound 0.579 < 0.750 (n=26)" in refused.output
    assert ("  - counterfeit recall 0.741 is 0.259 below production v1's 1.000 (allowed drop 0.050)"
            in refused.output)
    assert "on dataset e08b6d315ed6 (datasets/listings-sample.jsonl, 194 items)" in refused.output
    assert "--override-gate" in refused.output
    assert _served_version(client) == 1

    listing = run(config_path, "prompts", "scorecards", "listing-moderation")
    assert "v1    dataset e08b6d315ed6   194 items  micro P 1.000 R 1.000" in listing
    assert "(production)" in listing
    shown = run(config_path, "prompts", "scorecards", "listing-moderation", "--version", "2")
    assert "counterfeit                 27  0.769 [0.579, 0.890]" in shown
    assert "promotion gate of v2 -> production: FAIL" in shown
    assert "  FAIL  counterfeit precision lower bound 0.579 < 0.750 (n=26)" in shown
    assert "  PASS  parse failure rate 0.000 <= 0.020 (n=194)" in shown
    as_json = json.loads(run(config_path, "prompts", "scorecards", "listing-moderation", "-v", "2", "--json"))
    assert as_json["gate"]["verdict"] == "fail" and as_json["scorecards"][0]["items"] == 194

    override = (*promote, "--override-gate")
    for args, env, needle in [
        (override, None, "--override-gate needs --reason"),
        ((*promote, "--reason", "x"), None, "--reason is only used with --override-gate"),
        ((*override, "--reason", "  "), None, "--override-gate needs --reason"),
        ((*override, "--reason", "ok"), None, "needs an API key with the admin scope"),
        ((*override, "--reason", "ok", "--admin-key", "mgk_nope"), None, "not a valid API key"),
        ((*override, "--reason", "ok"), {"MODGATE_ADMIN_KEY": keys["local-caller"]},
         "API key 'local-caller' lacks the 'admin' scope"),
    ]:
        result = cli_result(*args, env=env)
        assert result.exit_code == 2 and needle in result.output, (args, result.output)
    assert _served_version(client) == 1

    done = cli_result(*override, "--reason", "legal signed off; offline set predates the policy change",
                      "-m", "ship v2", env={"MODGATE_ADMIN_KEY": admin_key})
    assert done.exit_code == 0, done.output
    assert "production: v1 -> v2" in done.output and "promotion gate: OVERRIDDEN" in done.output
    _wait_for_version(client, 2)
    audit = json.loads(run(config_path, "prompts", "audit", "listing-moderation", "--json"))["entries"]
    assert audit[-1]["actor"] == "maria" and audit[-1]["to_version"] == 2
    assert audit[-1]["note"].startswith(
        "ship v2 | GATE OVERRIDDEN by admin key local-admin: legal signed off; offline set predates "
        "the policy change (gate failed on dataset e08b6d315ed6: counterfeit precision lower bound")
    human = run(config_path, "prompts", "audit", "listing-moderation")
    assert "scorecard of v2 stored — scorecard on dataset e08b6d315ed6 (194 items)" in human


def test_a_version_cannot_define_its_own_gate_from_the_cli(config_path: Path, gateway: tuple[TestClient, str],
                                                           tmp_path: Path) -> None:
    """Issue 16, finding 1: a v2 whose `evaluation:` block names a 20-item dataset and one lax
    criterion does not become production by passing it; changing the policy is its own
    protected, audited step."""
    client, admin_key = gateway
    keys = json.loads((load_config(config_path).data_path() / "local-keys.json").read_text())
    v2 = yaml.safe_load((ROOT / "configs" / "prompts" / "listing-moderation.yaml").read_text())
    v2["description"] = "brings its own gate"
    v2["evaluation"] = {"dataset": {"sha256": "1" * 64, "path": "datasets/tiny.jsonl"},
                        "criteria": [{"metric": "parse_failure_rate", "max": 0.02}]}
    v2_file = tmp_path / "v2.yaml"
    v2_file.write_text(yaml.safe_dump(v2, allow_unicode=True, sort_keys=False))
    run(config_path, "prompts", "publish", str(v2_file))
    store = open_store(load_config(config_path))
    store_scorecard(store, "listing-moderation", 2, items=20, sha="1" * 64)  # meets its own block
    store.close()

    def cli_result(*args: str, env: dict[str, str] | None = None) -> Result:
        return CliRunner().invoke(cli, [*args, "--config", str(config_path)],
                                  env={"MODGATE_ACTOR": "maria", **(env or {})}, catch_exceptions=False)

    def policy_cmd(*args: str) -> str:
        result = cli_result("prompts", "gate-policy", *args)
        assert result.exit_code == 0, result.output
        return result.output

    promote = ("prompts", "label", "listing-moderation", "production", "2")
    refused = cli_result(*promote)
    assert refused.exit_code == 3, refused.output
    assert "policy in force: production v1's evaluation block (policy " in refused.output
    assert "no stored scorecard of v2 on dataset e08b6d315ed6" in refused.output
    assert "v2's own evaluation block (dataset 111111111111, 1 criterion) is not at least as strict" \
        in refused.output
    assert _served_version(client) == 1

    shown = policy_cmd("show", "listing-moderation")
    assert "listing-moderation: gate policy in force: production v1's evaluation block (policy " in shown
    assert "  - counterfeit precision lower bound >= 0.750" in shown
    assert "v2: its own block is NOT at least as strict (not applied)" in shown
    diff = policy_cmd("diff", "listing-moderation", "--from-version", "2")
    assert "-  sha256: e08b6d315ed6" in diff and "+  path: datasets/tiny.jsonl" in diff

    adopt = ("prompts", "gate-policy", "set", "listing-moderation", "--from-version", "2")
    for args, env, needle in [
        (adopt, None, "needs --reason"),
        ((*adopt, "--reason", "new market"), None, "needs an API key with the 'gates:write' (or 'admin') scope"),
        ((*adopt, "--reason", "new market"), {"MODGATE_ADMIN_KEY": keys["local-caller"]},
         "API key 'local-caller' lacks the 'gates:write' (or 'admin') scope"),
        (("prompts", "gate-policy", "set", "listing-moderation", "--reason", "x"), None, "give exactly one of"),
    ]:
        result = cli_result(*args, env=env)
        assert result.exit_code == 2 and needle in result.output, (args, result.output)
    store = open_store(load_config(config_path))
    assert store.get_gate_policy("listing-moderation") is None
    store.close()

    done = cli_result(*adopt, "--reason", "the 20-item set is all we have for the new market",
                      "--expected-revision", "0", env={"MODGATE_ADMIN_KEY": admin_key})
    assert done.exit_code == 0, done.output
    assert "-  sha256: e08b6d315ed6" in done.output
    assert "listing-moderation: set registry gate policy r1 (policy " in done.output
    moved = run(config_path, *promote)
    assert "production: v1 -> v2" in moved and "promotion gate: PASS" in moved
    _wait_for_version(client, 2)
    audit = json.loads(run(config_path, "prompts", "audit", "listing-moderation", "--json"))["entries"]
    policy_entry = [e for e in audit if e["action"] == "gate_policy"][-1]
    assert policy_entry["actor"] == "maria"
    assert policy_entry["note"].endswith(
        "| the 20-item set is all we have for the new market (by key local-admin)")
    assert "[policy: registry gate policy r1 (policy " in audit[-1]["note"]
    assert "gate policy changed — r1 (policy " in run(config_path, "prompts", "audit", "listing-moderation")


def test_publishing_a_model_that_is_not_served_is_refused(config_path: Path, gateway: tuple[TestClient, str],
                                                          tmp_path: Path) -> None:
    """Issue 16, finding 5: the CLI checks `model:` against the configured serving models."""
    data = yaml.safe_load((ROOT / "configs" / "prompts" / "listing-moderation.yaml").read_text())
    data["model"] = "qwen-does-not-exist"
    path = tmp_path / "unserved.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    result = CliRunner().invoke(cli, ["prompts", "publish", "--config", str(config_path), str(path)])
    assert result.exit_code == 1, result.output
    assert ("listing-moderation names model 'qwen-does-not-exist', which the serving layer does not "
            "serve (served: tiny-llama)") in result.output
    store = open_store(load_config(config_path))
    assert store.versions("listing-moderation") == [1]
    store.close()


def test_no_label_moves_to_a_version_whose_model_is_not_served(config_path: Path,
                                                              gateway: tuple[TestClient, str]) -> None:
    """Any label is reachable by callers (a `moderate:pin` key pins it): `modgate prompts label`
    and `prompts rollback` refuse a version stored before its model left the configuration,
    whatever the label, and leave the labels as they were; `rollouts start` refuses it as
    canary or shadow."""
    store = open_store(load_config(config_path))
    spec = store.resolve("listing-moderation", "production").spec
    store.publish(spec.model_copy(update={"model": "qwen-gone"}), actor="test")  # when it was served
    store.set_label("listing-moderation", "staging", 2, actor="test")
    store.set_label("listing-moderation", "staging", 1, expected=2, actor="test")
    for args in (("prompts", "label", "listing-moderation", "canary", "2"),
                 ("prompts", "rollback", "listing-moderation", "staging"),
                 ("rollouts", "start", "listing-moderation", "--canary", "2", "--manual"),
                 ("rollouts", "start", "listing-moderation", "--shadow", "2:1.0")):
        result = CliRunner().invoke(cli, [*args[:2], "--config", str(config_path), *args[2:]],
                                    env={"MODGATE_ACTOR": "maria"})
        assert result.exit_code == 1, result.output
        assert ("listing-moderation v2 names model 'qwen-gone', which the serving layer does not "
                "serve (served: tiny-llama)") in result.output
    assert store.labels("listing-moderation") == {"production": 1, "staging": 1}
    assert store.get_rollout("listing-moderation") is None
    store.close()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("prompts", "show", "nope"), "unknown prompt 'nope'"),
        (("prompts", "label", "listing-moderation", "production", "9"), "has no version 9"),
        (("prompts", "label", "listing-moderation", "production", "1", "--expected", "5"), "points at 1, not 5"),
        (("prompts", "rollback", "listing-moderation", "production"), "no earlier version"),
        (("prompts", "publish", "/nonexistent.yaml"), "cannot read"),
        (("keys", "create", "x", "--scope", "root"), "unknown scope"),
    ],
)
def test_cli_errors_name_the_problem(config_path: Path, gateway: tuple[TestClient, str],
                                     args: tuple[str, ...], needle: str) -> None:
    result = CliRunner().invoke(cli, [*args[:2], "--config", str(config_path), *args[2:]])
    assert result.exit_code in (1, 2)
    assert needle in result.output
    assert "Traceback" not in result.output


def test_bad_prompt_file_is_rejected_with_file_and_field(config_path: Path, gateway: tuple[TestClient, str],
                                                         tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load((ROOT / "configs" / "prompts" / "listing-moderation.yaml").read_text())
    data["messages"][1]["content"] = "{{ title }} {{ seller_email }}"
    bad.write_text(yaml.safe_dump(data, allow_unicode=True))
    result = CliRunner().invoke(cli, ["prompts", "publish", "--config", str(config_path), str(bad)])
    assert result.exit_code == 1
    assert str(bad) in result.output and "seller_email" in result.output
    store = open_store(load_config(config_path))
    assert store.versions("listing-moderation") == [1]
    store.close()


def test_markdown_prompt_files(config_path: Path, gateway: tuple[TestClient, str], tmp_path: Path) -> None:
    md = tmp_path / "short.md"
    md.write_text("""---
name: short-check
variables: [title, description, locale]
model: tiny-llama
verdict: {decisions: [allow, block, needs_review], categories: [none, counterfeit]}
policy: {policy_id: p1, owner: ops}
---
## system
Decide if the listing is counterfeit.

## user
{{ title }}

## system [zh-CN]
判断商品是否为假冒。

## user [zh-CN]
{{ title }}
""")
    out = json.loads(run(config_path, "prompts", "publish", str(md), "--label", "production", "--json"))
    assert out["version"] == 1 and out["label"] == "production"
    shown = json.loads(run(config_path, "prompts", "show", "short-check", "--version", "1", "--json"))
    assert shown["spec"]["messages"][0] == {"role": "system", "content": "Decide if the listing is counterfeit.\n"}
    assert shown["spec"]["locales"]["zh-CN"]["messages"][1]["content"] == "{{ title }}\n"
