"""The remote CLI (issue 17 item 4): the prompt change loop with `--url` against a real gateway
process on another port with its own data directory, next to the same loop run locally on a
store of its own, step by step: the same exit statuses, the same `--json` shapes (the same
values where nothing depends on time or random ids) and the same messages, a key lacking a
scope included."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner, Result

import gateway.cli.eval as eval_cli
from gateway.cli.main import app as cli
from gateway.config import load_config
from gateway.stores import open_store
from prompt_registry.keys import generate_key
from prompt_registry.loader import seed_store
from serving.protocol import ChatRequest
from testsupport.gateway_process import GatewayProcess

ROOT = Path(__file__).resolve().parents[2]
NAME = "listing-moderation"
SAMPLE = ROOT / "datasets" / "listings-sample.jsonl"
KEYS = {"ops": ["prompts:read", "prompts:publish", "labels:write", "labels:protected", "feedback"],
        "approver": ["prompts:read", "labels:write", "labels:protected"],
        "admin": ["admin"], "viewer": ["prompts:read"], "caller": ["moderate"]}
_TIME = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?(\+00:00)?")


def _config(tmp_path: Path, name: str) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(tmp_path / name / "data")
    config["registry"]["seed_dir"] = str(ROOT / "configs" / "prompts")
    path = tmp_path / name / "modgate.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(config))
    return path


def _seeded_with_keys(config: Path) -> dict[str, str]:
    """Seed the config's store as a gateway start would, and make the keys (same names on
    both sides, so the audit's actors agree)."""
    store = open_store(load_config(config))
    seed_store(store, ROOT / "configs" / "prompts")
    keys = {}
    for who, scopes in KEYS.items():
        keys[who], record = generate_key(who, scopes, created_by="test")
        store.put_key(record)
    store.close()
    return keys


@dataclass
class Side:
    """One way of running the CLI: on a local store (`--config`), or on a remote gateway
    (`--url`, the key from MODGATE_API_KEY or --key-file)."""

    config: Path                     # local: the store's; remote: the CLI machine's own
    keys: dict[str, str]
    url: str | None = None
    key_dir: Path | None = None
    served_from: Path | None = None  # remote: the gateway's own configuration (its data directory)
    results: list[Result] = field(default_factory=list)

    def argv(self, args: tuple[str, ...], key: str) -> list[str]:
        words = [self.keys[w[1:-1]] if re.fullmatch(r"\{\w+\}", w) else w for w in args]
        if self.url is None:
            return [*words, "--config", str(self.config)]
        assert self.key_dir is not None
        key_file = self.key_dir / f"{key}.key"
        key_file.write_text(self.keys[key] + "\n")
        return [*words, "--url", self.url, "--key-file", str(key_file)]

    def run(self, *args: str, key: str = "ops") -> Result:
        """The command as `key` (remote: the API key; local: MODGATE_ACTOR, `--key` values)."""
        result = CliRunner().invoke(cli, self.argv(args, key), env={"MODGATE_ACTOR": key},
                                    catch_exceptions=False)
        self.results.append(result)
        return result


@pytest.fixture
def sides(tmp_path: Path) -> Iterator[tuple[Side, Side]]:
    local_config = _config(tmp_path, "local")
    gateway_config = _config(tmp_path, "gateway")
    client_config = _config(tmp_path, "cli-machine")  # eval run's cache and reports, nothing else
    local = Side(local_config, _seeded_with_keys(local_config))
    remote_keys = _seeded_with_keys(gateway_config)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys").chmod(0o700)
    with GatewayProcess(gateway_config) as gw:
        assert load_config(gateway_config).data_path() != load_config(local_config).data_path()
        assert gw.port != load_config(gateway_config).gateway.port  # another port than configured
        yield local, Side(client_config, remote_keys, url=gw.url, key_dir=tmp_path / "keys",
                          served_from=gateway_config)


def both(local: Side, remote: Side, *args: str, key: str = "ops", code: int = 0) -> tuple[Result, Result]:
    """Run on both sides; both must exit with *code*."""
    a, b = local.run(*args, key=key), remote.run(*args, key=key)
    assert a.exit_code == code, f"local {args}: {a.output}"
    assert b.exit_code == code, f"remote {args}: {b.output}"
    return a, b


def _shape(x: Any) -> Any:
    """A JSON value's shape: its keys, recursively (lists by their first element; dicts keyed
    by version numbers or ids count as the same shape whatever their keys)."""
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_shape(x[0])] if x else []
    return None


def _same_shape(a: Result, b: Result, *, traffic: bool = False) -> tuple[Any, Any]:
    """Both answers' JSON, asserted to have the same shape. *traffic*: a rollout's status, whose
    per-arm counters only exist where requests were served (the remote gateway served some)."""
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    sa, sb = _shape(ja), _shape(jb)
    if traffic:
        sa.pop("stats"), sb.pop("stats")
    assert sa == sb, (ja, jb)
    return ja, jb


def _masked(text: str) -> str:
    return re.sub(r"\b[0-9a-f]{12}\b", "<id>", _TIME.sub("<time>", text))


def _gold(request: ChatRequest) -> str:
    """The dataset's gold verdict for the listing in the request (a model that is always right)."""
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    user = request.messages[-1]["content"]
    row = next(r for r in rows if json.dumps(r["title"], ensure_ascii=False) in user
               and json.dumps(r["description"], ensure_ascii=False) in user)
    return json.dumps({"decision": row["gold_decision"], "category": row["gold_category"],
                       "confidence": 0.9}, separators=(",", ":"))


def test_the_prompt_change_loop_from_a_remote_cli(sides: tuple[Side, Side], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    local, remote = sides
    a, b = both(local, remote, "prompts", "list", "--json")
    assert json.loads(a.stdout) == json.loads(b.stdout)
    assert json.loads(b.stdout)["prompts"][0]["labels"] == {"production": 1}

    v2 = yaml.safe_load((ROOT / "configs" / "prompts" / f"{NAME}.yaml").read_text())
    v2["messages"][0]["content"] += "\nPhone numbers written as words count as off_platform_payment.\n"
    v2_file = tmp_path / "v2.yaml"
    v2_file.write_text(yaml.safe_dump(v2, allow_unicode=True, sort_keys=False))
    a, b = both(local, remote, "prompts", "publish", str(v2_file), "-m", "phone words", "--json")
    assert json.loads(a.stdout) == json.loads(b.stdout)
    assert json.loads(b.stdout)["version"] == 2 and json.loads(b.stdout)["created"] is True
    a, b = both(local, remote, "prompts", "publish", str(v2_file))
    assert a.output == b.output == f"unchanged: identical to {NAME} v2\n"

    a, b = both(local, remote, "prompts", "diff", NAME, "1", "2")
    assert a.output == b.output
    assert "+    Phone numbers written as words count as off_platform_payment." in b.output
    a, b = both(local, remote, "prompts", "show", NAME, "--label", "production")
    assert _masked(a.output) == _masked(b.output)

    # production: the gate refuses (no scorecard), the same refusal on both sides
    a, b = both(local, remote, "prompts", "label", NAME, "production", "2", code=3)
    assert a.output == b.output and "fails its promotion gate" in b.output
    # an override by a key without the admin scope, and a policy change by a read-only key
    a, b = both(local, remote, "prompts", "label", NAME, "production", "2", "--override-gate",
                "--reason", "hotfix", "--admin-key", "{ops}", code=2)
    assert a.output == b.output == ("modgate: error: API key 'ops' lacks the 'admin' scope needed "
                                    "to override a promotion gate\n")
    a, b = both(local, remote, "prompts", "gate-policy", "set", NAME, "--from-version", "1",
                "--reason", "tighten", "--admin-key", "{viewer}", code=2)
    assert a.output == b.output == ("modgate: error: API key 'viewer' lacks the 'gates:write' (or "
                                    "'admin') scope needed for changing a gate policy\n")
    # remotely every call needs its scope (locally the store's credentials are the authority)
    refused = remote.run("prompts", "publish", str(v2_file), key="viewer")
    assert refused.exit_code == 2
    assert refused.output == "modgate: error: API key 'viewer' lacks the 'prompts:publish' (or 'admin') scope\n"

    # evaluation where the CLI runs; the remote side stores its scorecards through the admin API
    monkeypatch.setattr(eval_cli, "make_backend", lambda cfg: __import__(
        "serving.fake_backend", fromlist=["FakeBackend"]).FakeBackend(responder=_gold))
    evals = []
    for side in (local, remote):
        r = side.run("eval", "run", "--prompt", NAME, "-v", "1", "-v", "2", "--dataset", str(SAMPLE),
                     "--no-progress", *(("--config", str(side.config)) if side.url else ()))
        assert r.exit_code == 0, r.output
        evals.append([line for line in r.stdout.splitlines()
                      if line.startswith(("registry:", "promotion gate", "  PASS", "  FAIL"))])
    assert evals[0] == evals[1]
    assert f"registry: scorecard of {NAME} v2 on dataset e08b6d315ed6 stored" in evals[1]
    assert "promotion gate of v2 -> production: PASS on dataset e08b6d315ed6 (datasets/listings-sample.jsonl, 194 items)" in evals[1]
    assert not (load_config(remote.config).data_path() / "registry.db").exists()  # nothing local
    a, b = both(local, remote, "prompts", "scorecards", NAME, "--version", "2", "--json")
    ja, jb = _same_shape(a, b)
    assert ja["gate"] == jb["gate"] and jb["gate"]["verdict"] == "pass"
    assert [s["created_by"] for s in jb["scorecards"]] == ["ops"]
    a, b = both(local, remote, "prompts", "scorecards", NAME, "--version", "2")
    assert _masked(a.output) == _masked(b.output)

    # a canary with its gates, stepped and aborted; a label from a reviewer on a canary answer
    a, b = both(local, remote, "rollouts", "start", NAME, "--canary", "2", "--steps", "20,50",
                "--manual", "--json")
    _same_shape(a, b)
    a, b = both(local, remote, "rollouts", "status", NAME)
    assert _masked(a.output) == _masked(b.output)
    caller = {"authorization": f"Bearer {remote.keys['caller']}"}
    assert remote.url is not None
    ids = []
    for i in range(60):  # sticky by seller at 20 %: no canary answer among 60 has p < 1e-5
        r = httpx.post(f"{remote.url}/v1/moderate", headers=caller, timeout=30, json={
            "item_id": f"item-{i}", "seller_id": f"seller-{i}", "title": "Wireless earbuds"})
        assert r.status_code == 200, r.text
        ids.append((r.json()["request_id"], r.json()["arm"]))
    canary_id = next(rid for rid, arm in ids if arm == "canary")
    labels = tmp_path / "labels.csv"
    labels.write_text(f"request_id,decision,category,reviewer\n{canary_id},allow,,Ana\n")
    fb = remote.run("feedback", "import", str(labels), "--config", str(remote.config))
    assert fb.exit_code == 0, fb.output
    assert "1 label(s) recorded" in fb.output
    assert remote.served_from is not None
    gateway_data = load_config(remote.served_from).data_path()
    logged = [json.loads(x) for f in (gateway_data / "feedback").glob("*.jsonl")
              for x in f.read_text().splitlines()]
    assert [(x["request_id"], x["reviewer"], x["arm"]) for x in logged] == [(canary_id, "ops", "canary")]

    a, b = both(local, remote, "rollouts", "step", NAME, "--json")
    ja, jb = _same_shape(a, b, traffic=True)
    assert ja["weight"] == jb["weight"] == 50
    a, b = both(local, remote, "rollouts", "abort", NAME, "-m", "enough", "--json")
    ja, jb = _same_shape(a, b, traffic=True)
    assert ja["rollout"]["state"] == jb["rollout"]["state"] == "aborted"
    a, b = both(local, remote, "rollouts", "list", "--json")
    ja, jb = _same_shape(a, b)
    rollout_id = jb["rollouts"][0]["id"]
    shown = remote.run("rollouts", "show", rollout_id, "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["rollout"]["id"] == rollout_id

    # production moves through the gate, and back
    a, b = both(local, remote, "prompts", "label", NAME, "production", "2", "--expected", "1", "--json")
    assert json.loads(a.stdout) == json.loads(b.stdout)
    a, b = both(local, remote, "prompts", "rollback", NAME, "--json")
    assert json.loads(a.stdout) == json.loads(b.stdout) == {
        "name": NAME, "label": "production", "from_version": 2, "to_version": 1}

    # four eyes: a hold (status 4), the requester cannot approve (2), a second key holder can
    a, b = both(local, remote, "prompts", "four-eyes", "on", NAME, "--reason", "SOX",
                "--admin-key", "{admin}", key="admin")
    assert a.output == b.output
    a, b = both(local, remote, "prompts", "label", NAME, "production", "2", "--key", "{ops}", code=4)
    assert _masked(a.output) == _masked(b.output) and "needs the approval of a second key holder" in b.output
    requests = []
    for side in (local, remote):
        listed = side.run("prompts", "approvals", "list", NAME, "--json")
        requests.append(json.loads(listed.stdout)["requests"][0]["id"])
    own = [side.run("prompts", "approvals", "approve", NAME, rid, "--key", "{ops}")
           for side, rid in zip((local, remote), requests, strict=True)]
    assert [r.exit_code for r in own] == [2, 2] and _masked(own[0].output) == _masked(own[1].output)
    approved = [side.run("prompts", "approvals", "approve", NAME, rid, "--key", "{approver}", "--json",
                         key="approver") for side, rid in zip((local, remote), requests, strict=True)]
    assert [r.exit_code for r in approved] == [0, 0], [r.output for r in approved]
    ja, jb = _same_shape(*approved)
    assert (ja["from_version"], ja["to_version"]) == (jb["from_version"], jb["to_version"]) == (1, 2)

    # version lifecycle: deprecate as the key, and blocking refused to a key without admin
    a, b = both(local, remote, "prompts", "deprecate", NAME, "1", "--reason", "superseded", "--json")
    assert json.loads(a.stdout) == json.loads(b.stdout)
    a, b = both(local, remote, "prompts", "block", NAME, "1", "--reason", "leaks",
                "--admin-key", "{ops}", code=2)
    assert a.output == b.output == ("modgate: error: API key 'ops' lacks the 'admin' scope needed "
                                    "for blocking a version\n")

    # keys: listed alike (never a secret); remotely only an admin key manages them
    a, b = both(local, remote, "keys", "list", "--json", key="admin")
    ja, jb = _same_shape(a, b)
    assert sorted((k["name"], k["scopes"]) for k in ja["keys"]) == sorted((k["name"], k["scopes"]) for k in jb["keys"])
    assert all("secret_sha256" not in k for k in jb["keys"])
    assert remote.run("keys", "list", key="ops").output == (
        "modgate: error: API key 'ops' lacks the 'admin' scope needed for listing API keys\n")
    made = remote.run("keys", "create", "pipeline", "--scope", "moderate", "--json", key="admin")
    assert made.exit_code == 0
    new = json.loads(made.stdout)
    assert set(new) == {"key", "key_id", "name", "scopes"} and new["key"].startswith("mgk_")
    assert httpx.post(f"{remote.url}/v1/moderate", headers={"authorization": f"Bearer {new['key']}"},
                      json={"item_id": "x", "title": "Wireless earbuds"}, timeout=30).status_code == 200
    a, b = both(local, remote, "keys", "revoke", "000000000000", code=1, key="admin")
    assert a.output == b.output == "modgate: error: no API key with id '000000000000'\n"
    revoked = remote.run("keys", "revoke", new["key_id"], key="admin")
    assert revoked.output == f"revoked {new['key_id']} (pipeline)\n"

    # the audit trail: the same actions by the same actors (remotely: the keys' names)
    a, b = both(local, remote, "prompts", "audit", NAME, "--json")
    ja, jb = _same_shape(a, b)
    assert [(e["action"], e["actor"]) for e in ja["entries"]] == [(e["action"], e["actor"]) for e in jb["entries"]]
    assert ("label", "approver") in [(e["action"], e["actor"]) for e in jb["entries"]]

    # errors: an unknown prompt, an unreachable gateway, no key
    a, b = both(local, remote, "prompts", "show", "nope", code=1)
    assert a.output == b.output == "modgate: error: unknown prompt 'nope'\n"
    down = CliRunner().invoke(cli, ["prompts", "list", "--url", "http://127.0.0.1:9"],
                              env={"MODGATE_API_KEY": "mgk_x"})
    assert down.exit_code == 1 and "cannot reach the gateway at http://127.0.0.1:9" in down.output
    nokey = CliRunner().invoke(cli, ["prompts", "list", "--url", remote.url], env={"MODGATE_API_KEY": ""})
    assert nokey.exit_code == 2 and "needs an API key: set MODGATE_API_KEY or pass --key-file" in nokey.output


def test_the_installed_command_with_modgate_url_and_a_key_file(sides: tuple[Side, Side]) -> None:
    """`modgate` as a user runs it: MODGATE_URL and MODGATE_KEY_FILE in the environment, no key
    on the command line."""
    _, remote = sides
    assert remote.url is not None and remote.key_dir is not None
    key_file = remote.key_dir / "viewer.key"
    key_file.write_text(remote.keys["viewer"])
    env = {"MODGATE_URL": remote.url, "MODGATE_KEY_FILE": str(key_file), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "gateway.cli.main", "prompts", "list"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(NAME) and "production=v1" in done.stdout
