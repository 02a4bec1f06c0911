"""Canary + shadow rollouts end to end, against SQLite and Redis: start from the CLI, send
traffic, watch the evidence, and see the rollout step, promote or abort by itself — all of it
in the audit log; a promotion the promotion gate refuses holds the rollout instead. Plus shadow
isolation and two gateways sharing one store."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from gateway.api.app import create_app
from gateway.cli.main import _local_keys, _open_store
from gateway.cli.main import app as cli
from gateway.config import load_config
from gateway.feedback import FeedbackLog
from serving import BackendUnavailable, ChatRequest, ChatResult
from serving.fake_backend import FakeBackend
from tests.scorecards import store_scorecard
from testsupport.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
PROMPT = ROOT / "configs" / "prompts" / "listing-moderation.yaml"


class MarkerBackend(FakeBackend):
    """Deterministic verdicts; a version whose system prompt holds BROKEN returns garbage, and
    shadow requests can be made to hang or fail."""

    def __init__(self) -> None:
        super().__init__()
        self.shadow_mode = "ok"  # ok | hang | error
        self.shadow_calls_ended = 0  # hang mode: shadow calls that stopped hanging (timed out, cancelled)

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult:
        if "-shadow-" in (request.request_id or ""):
            if self.shadow_mode == "hang":
                try:
                    await asyncio.sleep(3600)
                finally:
                    self.shadow_calls_ended += 1
            if self.shadow_mode == "error":
                raise BackendUnavailable("shadow engine down")
        # Verdicts depend on the listing (user message) only, so versions that merely reword
        # the policy agree with each other.
        result = await super().chat(dataclasses.replace(request, messages=request.messages[-1:]),
                                    timeout_s=timeout_s)
        if "BROKEN" in request.messages[0]["content"]:
            return ChatResult(text="not a verdict", finish_reason="stop", prompt_tokens=1,
                              completion_tokens=1, model=result.model, timings=result.timings)
        return result


@pytest.fixture(params=["sqlite", "redis"])
def config_path(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(tmp_path / "data")
    config["registry"]["seed_dir"] = str(ROOT / "configs" / "prompts")
    config["gateway"]["rollout_controller"] = False  # the tests tick the controller themselves
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


def _publish_variant(config_path: Path, tmp_path: Path, marker: str) -> int:
    data = yaml.safe_load(PROMPT.read_text())
    data["messages"][0]["content"] += f"\n{marker}\n"
    f = tmp_path / f"v-{marker}.yaml"
    f.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    return int(json.loads(run(config_path, "prompts", "publish", str(f), "--json"))["version"])


class Gateway:
    def __init__(self, config_path: Path, backend: FakeBackend) -> None:
        cfg = load_config(config_path)
        self.store = _open_store(cfg)
        keys = _local_keys(cfg, self.store)
        self.app = create_app(cfg.gateway, self.store, backend,
                              feedback_log=FeedbackLog(cfg.data_path() / "feedback"))
        self.client = TestClient(self.app, headers={"authorization": f"Bearer {keys['local-caller']}"})

    def __enter__(self) -> Gateway:
        self.client.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.__exit__(*exc)
        self.store.close()

    def moderate(self, i: int, seller: str | None = None) -> dict:
        r = self.client.post("/v1/moderate", json={"item_id": f"item-{i}", "seller_id": seller or f"seller-{i}",
                                                   "title": f"listing number {i}"})
        assert r.status_code == 200, r.text
        return r.json()

    def settle(self) -> None:
        """Wait for in-flight shadows, then flush the evidence to the store."""
        async def drain() -> None:
            deadline = time.monotonic() + 60  # only a guard against a hang: a loaded CI is slow
            while self.app.state.gateway.shadows.pending:
                assert time.monotonic() < deadline, "shadows still pending after 60 s"
                await asyncio.sleep(0.01)
            await self.app.state.gateway.recorder.flush()
        self.client.portal.call(drain)

    def tick(self) -> list:
        self.settle()
        return self.client.portal.call(self.app.state.gateway.controller.tick)


@pytest.fixture
def gateway(config_path: Path) -> Iterator[Gateway]:
    with Gateway(config_path, MarkerBackend()) as gw:
        yield gw


def test_canary_with_shadow_promotes_itself(config_path: Path, gateway: Gateway, tmp_path: Path) -> None:
    v2 = _publish_variant(config_path, tmp_path, "Version 2: same policy, clearer wording.")
    v3 = _publish_variant(config_path, tmp_path, "Version 3: experimental.")
    store_scorecard(gateway.store, "listing-moderation", 1)  # offline evidence: the promotion gate
    store_scorecard(gateway.store, "listing-moderation", v2)
    out = run(config_path, "rollouts", "start", "listing-moderation", "--canary", str(v2), "--steps", "5,50,100",
              "--shadow", f"{v2}:1.0", "--shadow", f"{v3}:0.2", "--hold", "0s", "--min-samples", "30",
              "--max-flag-rate-drift", "0.5", "--max-parse-failure-rate", "0.2", "--max-error-rate", "0.2")
    assert f"canary v{v2} at 5%" in out

    arms = [gateway.moderate(i)["arm"] for i in range(300)]
    assert 0 < arms.count("canary") < 40  # ~5 %
    assert gateway.tick() == []  # canary has too few samples for any decision yet
    status = json.loads(run(config_path, "rollouts", "status", "listing-moderation", "--json"))
    pair = status["stats"]["pairs"][str(v2)]
    assert pair["n"] > 250 and pair["agreement"] == 1.0
    assert status["stats"]["pairs"][str(v3)]["n"] > 20
    metrics = gateway.client.get("/metrics").text
    assert (f'modgate_shadow_comparisons_total{{agree="true",candidate_version="{v2}",prompt="listing-moderation",'
            f'stable_version="1"}} {float(pair["n"])}') in metrics

    # The canary needs 30 samples: ~600 requests at 5 %, more with an unlucky salt (the salt is
    # random per rollout; 600 fixed requests gave it 29 in one CI-like run, a binomial tail of ~1 %).
    i, taken = 300, []
    while not taken:
        assert i < 3000, run(config_path, "rollouts", "status", "listing-moderation")
        for _ in range(150):
            gateway.moderate(i)
            i += 1
        taken = gateway.tick()
    assert taken == [("listing-moderation", "step")], run(config_path, "rollouts", "status", "listing-moderation")
    for _ in range(100):
        gateway.moderate(i)
        i += 1
    assert gateway.tick() == [("listing-moderation", "step")]  # 50 % -> 100 %
    gateway.moderate(i)
    assert gateway.tick() == [("listing-moderation", "promote")]
    assert gateway.store.labels("listing-moderation")["production"] == v2

    human = run(config_path, "rollouts", "status", "listing-moderation")
    assert f"(promoted): promoted v{v2} to production at" in human and f"v{v2} serves all traffic" in human
    assert "WAIT" not in human and "gates at the last transition: error_rate PASS" in human
    # history: every rollout, by id, with its transitions (#16)
    rid = status["rollout"]["id"]
    listed = json.loads(run(config_path, "rollouts", "list", "listing-moderation", "--json"))["rollouts"]
    assert [(x["id"], x["state"], x["transitions"]) for x in listed] == [(rid, "promoted", 4)]
    shown = json.loads(run(config_path, "rollouts", "show", rid, "--json"))
    assert [t["action"] for t in shown["transitions"]] == ["start", "step", "step", "promote"]
    assert shown["transitions"][-1]["gate"]["verdict"] == "pass"
    assert "transitions:" in run(config_path, "rollouts", "show", rid)
    audit = json.loads(run(config_path, "prompts", "audit", "listing-moderation", "--json"))["entries"]
    rollout_notes = [json.loads(e["note"]) for e in audit if e["action"] == "rollout" and e["note"].startswith("{")]
    assert [n["action"] for n in rollout_notes] == ["start", "step", "step", "promote"]
    assert all(any(g["gate"] == "parse_failure_rate" for g in n["evidence"]) for n in rollout_notes[1:])
    assert [n["rollout"]["step_index"] for n in rollout_notes] == [0, 1, 2, 2]
    assert any(e["action"] == "label" and e["to_version"] == v2 and e["actor"] == "rollout-controller" for e in audit)
    assert rollout_notes[-1]["gate"]["verdict"] == "pass"
    assert audit[-2]["note"].startswith(
        f"promoted by rollout {status['rollout']['id']} | gate passed on dataset e08b6d315ed6 (8 checks)")
    # production rolled back: the status says so, and what serves now
    run(config_path, "prompts", "rollback", "listing-moderation", "production")
    after = json.loads(run(config_path, "rollouts", "status", "listing-moderation", "--json"))
    assert "production has since moved to v1" in after["outcome"] and "rollback" in after["outcome"]
    assert after["serving"] == [{"version": 1, "arm": "stable", "share": 100}]


def _admin_key(config_path: Path) -> str:
    return json.loads((load_config(config_path).data_path() / "local-keys.json").read_text())["local-admin"]


def _override(config_path: Path) -> list[str]:
    """Start a version without a scorecard (its gate fails) anyway: an admin's override."""
    return ["--override-gate", "--reason", "test: no scorecard", "--admin-key", _admin_key(config_path)]


def test_a_gate_failing_version_starts_only_with_an_override_and_never_takes_all_traffic(
        config_path: Path, gateway: Gateway, tmp_path: Path) -> None:
    """#16: `rollouts start` printed "promotion gate: FAIL" and started anyway; the controller
    stepped to 100 %, the promotion was refused, and every request kept going to v2 while
    production still said v1. Now the start needs an admin override, the canary stays within
    50 % until the promotion itself, and a refused promotion falls back to the last safe step."""
    v2 = _publish_variant(config_path, tmp_path, "Version 2: same policy, clearer wording.")
    args = ["rollouts", "start", "--config", str(config_path), "listing-moderation", "--canary", str(v2),
            "--steps", "50,100", "--shadow", f"{v2}:1.0", "--hold", "0s", "--min-samples", "30",
            "--max-flag-rate-drift", "0.5", "--max-parse-failure-rate", "0.2", "--max-error-rate", "0.2"]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 3, refused.output
    assert f"rollout of listing-moderation v{v2} not started" in refused.output
    assert f"no stored scorecard of v{v2}" in refused.output and "--override-gate" in refused.output
    assert gateway.store.get_rollout("listing-moderation") is None
    over = ["--override-gate", "--reason", "legal sign-off", "--admin-key", _admin_key(config_path)]
    too_far = CliRunner().invoke(cli, [*args[:8], "25,75,100", *args[9:], *over])
    assert too_far.exit_code != 0 and "at most 50%" in too_far.output
    out = run(config_path, *args[:2], *args[4:], *over)
    assert f"canary v{v2} at 50%" in out
    audit = gateway.store.audit("listing-moderation")
    assert "GATE OVERRIDDEN by admin key local-admin: legal sign-off" in audit[-1].note

    for i in range(400):
        gateway.moderate(i)
    # every live gate passes; the next step (100 %) is the promotion, which the gate refuses
    assert gateway.tick() == [("listing-moderation", "hold")]
    assert gateway.store.labels("listing-moderation")["production"] == 1
    assert gateway.tick() == []  # paused: the controller leaves it to people
    status = json.loads(run(config_path, "rollouts", "status", "listing-moderation", "--json"))
    assert status["rollout"]["state"] == "paused" and status["weight"] == 50
    assert status["rollout"]["last_decision"].startswith(
        f"hold: promotion refused by the gate: gate failed on dataset e08b6d315ed6: no stored scorecard of v{v2}")
    assert status["rollout"]["last_decision"].endswith("canary back to 50%")
    assert status["promotion_gate"]["verdict"] == "fail"
    human = run(config_path, "rollouts", "status", "listing-moderation")
    assert "paused: hold: promotion refused by the gate" in human
    assert f"promotion gate (canary v{v2} -> production): FAIL" in human
    audit_json = json.loads(run(config_path, "prompts", "audit", "listing-moderation", "--json"))["entries"]
    hold = json.loads(audit_json[-1]["note"])
    assert audit_json[-1]["action"] == "rollout" and audit_json[-1]["label"] == "paused"
    assert hold["action"] == "hold" and hold["gate"]["verdict"] == "fail"
    assert any(g["gate"] == "parse_failure_rate" for g in hold["evidence"])
    arms = [gateway.moderate(i)["arm"] for i in range(1000, 1200)]
    assert 60 < arms.count("canary") < 140  # ~50 %, never all

    refused = CliRunner().invoke(cli, ["rollouts", "step", "--config", str(config_path), "listing-moderation"])
    assert refused.exit_code != 0 and "the promotion itself" in refused.output
    refused = CliRunner().invoke(cli, ["rollouts", "promote", "--config", str(config_path), "listing-moderation"])
    assert refused.exit_code == 3 and f"no stored scorecard of v{v2}" in refused.output
    store_scorecard(gateway.store, "listing-moderation", 1)
    store_scorecard(gateway.store, "listing-moderation", v2)
    out = run(config_path, "rollouts", "promote", "listing-moderation", "-m", "scored offline")
    assert "promoted" in out
    assert gateway.store.labels("listing-moderation")["production"] == v2


def test_parse_failure_spike_aborts_the_canary(config_path: Path, gateway: Gateway, tmp_path: Path) -> None:
    v2 = _publish_variant(config_path, tmp_path, "BROKEN template that confuses the model")
    run(config_path, "rollouts", "start", "listing-moderation", "--canary", str(v2), "--steps", "50,100",
        "--hold", "0s", "--min-samples", "20", *_override(config_path))
    for i in range(15):
        gateway.moderate(i)
    assert gateway.tick() == []  # below min samples: no decision, even with failures
    for i in range(15, 120):
        body = gateway.moderate(i)
        assert body["decision"] != "allow" or body["arm"] == "stable"
    assert gateway.tick() == [("listing-moderation", "abort")]
    assert gateway.store.labels("listing-moderation")["production"] == 1
    status = json.loads(run(config_path, "rollouts", "status", "listing-moderation", "--json"))
    assert status["rollout"]["state"] == "aborted" and status["weight"] == 0
    assert status["gates"] == [] and status["would_decide"] is None  # finished: nothing to decide
    assert status["outcome"].startswith("aborted at") and status["outcome"].endswith(
        "production v1 serves all traffic")
    assert status["serving"] == [{"version": 1, "arm": "stable", "share": 100}]
    failing = [g for g in status["final_evidence"] if g["verdict"] == "fail"]
    assert failing and failing[0]["gate"] == "parse_failure_rate" and failing[0]["interval"][0] > 0.02
    assert all(gateway.moderate(i)["arm"] == "stable" for i in range(200, 230))


@pytest.mark.parametrize("mode", ["hang", "error"])
def test_shadow_never_touches_the_primary(config_path: Path, tmp_path: Path, mode: str) -> None:
    backend = MarkerBackend()
    with Gateway(config_path, backend) as gw:
        baseline = [gw.moderate(i) for i in range(60)]
        v2 = _publish_variant(config_path, tmp_path, "Version 2")
        run(config_path, "rollouts", "start", "listing-moderation", "--shadow", f"{v2}:1.0", "--manual")
        shadows = gw.app.state.gateway.shadows
        deadline = time.monotonic() + 15  # a guard only (a loaded CI is slow)
        while shadows.submitted == 0:  # the gateway hears of the rollout through a change event
            assert time.monotonic() < deadline
            gw.moderate(10_000)
            time.sleep(0.02)
        gw.settle()
        before = shadows.submitted + shadows.dropped
        submitted_before, completed_before, failed_before = shadows.submitted, shadows.completed, shadows.failed
        backend.shadow_mode = mode
        for i in range(60):
            body = gw.moderate(i)
            for key in ("decision", "category", "confidence", "fail_reason", "arm"):
                assert body[key] == baseline[i][key]
            assert body["prompt"]["version"] == 1
            # Each answer came with its shadow handed off (queued, running or dropped) ...
            assert shadows.submitted + shadows.dropped - before == i + 1
            if mode == "hang":
                # ... and while no hanging shadow call had ended: the answer did not wait for
                # one (waiting would end it, by the shadow's 10 s timeout, before the answer).
                # Counts, not the answers' latency: a p99 < 0.5 s bound failed at 8.2 s on a
                # loaded 2-core machine.
                assert backend.shadow_calls_ended == 0
        if mode == "hang":
            # hanging shadows are held (queued, running) or dropped at max_pending, never waited for
            assert shadows.completed == completed_before and shadows.failed == failed_before
            assert shadows.pending > 0
        else:
            gw.settle()  # every shadow failed and was counted; none reached a caller
            assert shadows.failed - failed_before == shadows.submitted - submitted_before > 0


def test_two_gateways_sharing_a_store_agree(config_path: Path, tmp_path: Path) -> None:
    with Gateway(config_path, MarkerBackend()) as a, Gateway(config_path, MarkerBackend()) as b:
        v2 = _publish_variant(config_path, tmp_path, "Version 2")
        run(config_path, "rollouts", "start", "listing-moderation", "--canary", str(v2), "--steps", "30,100",
            "--manual", *_override(config_path))
        deadline = time.monotonic() + 15  # a guard only (a loaded CI is slow)
        while time.monotonic() < deadline:  # both see the rollout (change events)
            if a.moderate(0, "probe")["arm"] != "pinned" and any(
                    a.moderate(i, f"s{i}")["arm"] == "canary" for i in range(20)) and any(
                    b.moderate(i, f"s{i}")["arm"] == "canary" for i in range(20)):
                break
            time.sleep(0.05)
        arms_a = [a.moderate(i, f"seller-{i}")["arm"] for i in range(200)]
        arms_b = [b.moderate(i, f"seller-{i}")["arm"] for i in range(200)]
        assert arms_a == arms_b and 30 < arms_a.count("canary") < 90
        run(config_path, "rollouts", "abort", "listing-moderation")
        deadline = time.monotonic() + 15  # a guard only (a loaded CI is slow)
        while any(gw.moderate(i, f"seller-{i}")["arm"] == "canary" for gw in (a, b) for i in range(40)):
            assert time.monotonic() < deadline, "a gateway kept serving the canary after abort"
            time.sleep(0.05)


def test_rollout_errors_are_clear(config_path: Path, gateway: Gateway) -> None:
    for args, needle in [
        (("rollouts", "start", "listing-moderation", "--canary", "9"), "has no version 9"),
        (("rollouts", "start", "listing-moderation"), "needs a canary version, shadow versions, or both"),
        (("rollouts", "status", "listing-moderation"), "has no rollout"),
        (("rollouts", "start", "listing-moderation", "--canary", "1"), "canary version is the stable version"),
    ]:
        result = CliRunner().invoke(cli, [*args[:2], "--config", str(config_path), *args[2:]])
        assert result.exit_code != 0 and needle in result.output, (args, result.output)


def test_reviewer_feedback_drives_precision_gate(config_path: Path, tmp_path: Path) -> None:
    """Reviewers say the canary's flags are wrong: its precision gate fails and the rollout
    aborts. Every label is kept in the feedback log, matched or not."""
    backend = MarkerBackend()
    with Gateway(config_path, backend) as gw:
        admin = json.loads((load_config(config_path).data_path() / "local-keys.json").read_text())["local-admin"]
        v2 = _publish_variant(config_path, tmp_path, "Version 2")
        run(config_path, "rollouts", "start", "listing-moderation", "--canary", str(v2), "--steps", "50,100",
            "--hold", "0s", "--min-samples", "1000", "--max-flag-rate-drift", "1.0", *_override(config_path))
        status = json.loads(run(config_path, "rollouts", "status", "listing-moderation", "--json"))
        rollout_id = status["rollout"]["id"]
        # tighten the gate through the store: precision of canary flags must be at least 90 %
        store = gw.store
        r = store.get_rollout("listing-moderation")
        store.put_rollout(r.changed(gates=r.gates.model_copy(update={"min_precision": 0.9, "min_feedback": 5})),
                          expected_revision=r.revision, actor="test")
        deadline = time.monotonic() + 15  # a guard only (a loaded CI is slow)
        canary: list[dict] = []
        i = 0
        while len(canary) < 60:
            assert time.monotonic() < deadline or canary, "no canary traffic"
            body = gw.moderate(i)
            i += 1
            if body["arm"] == "canary" and body["decision"] != "allow":
                canary.append(body)
        gw.settle()  # memos reach the store
        for body in canary:  # reviewers: none of these listings violates anything
            r = gw.client.post("/v1/feedback", json={"request_id": body["request_id"], "decision": "allow",
                                                      "category": "none", "reviewer": "ana"},
                               headers={"authorization": f"Bearer {admin}"})
            assert r.status_code == 202 and r.json()["matched_rollout"] is True
        r = gw.client.post("/v1/feedback", json={"request_id": "never-seen", "decision": "allow"},
                           headers={"authorization": f"Bearer {admin}"})
        assert r.status_code == 202 and r.json()["matched_rollout"] is False
        r = gw.client.post("/v1/feedback", json={"request_id": "x", "decision": "allow"})  # caller key: no scope
        assert r.status_code == 403
        assert gw.tick() == [("listing-moderation", "abort")]
        status = json.loads(run(config_path, "rollouts", "status", "listing-moderation", "--json"))
        assert status["rollout"]["id"] == rollout_id
        failing = [g for g in status["final_evidence"] if g["verdict"] == "fail"]
        assert failing and failing[0]["gate"].startswith("imprecision[")
        lines = [json.loads(x) for f in (load_config(config_path).data_path() / "feedback").glob("*.jsonl")
                 for x in f.read_text().splitlines()]
        assert len(lines) == len(canary) + 1 and {x["reviewer"] for x in lines} == {"local-admin"}
        assert {x.get("display_name") for x in lines} == {"ana", None}  # the key is the reviewer


def test_a_canary_without_a_shadow_steps_and_promotes_itself(config_path: Path, gateway: Gateway,
                                                             tmp_path: Path) -> None:
    """#16: the agreement gate waited at n = 0 forever for a canary that is not shadowed (the
    example in `modgate rollouts --help`), and the CLI could not switch a gate off."""
    v2 = _publish_variant(config_path, tmp_path, "Version 2: same policy, clearer wording.")
    store_scorecard(gateway.store, "listing-moderation", 1)
    store_scorecard(gateway.store, "listing-moderation", v2)
    run(config_path, "rollouts", "start", "listing-moderation", "--canary", str(v2), "--steps", "20,50,100",
        "--hold", "0s", "--gate", "min_samples=30", "--gate", "error_rate=0.2",
        "--gate", "parse_failure_rate=0.2", "--gate", "flag_drift=off", "--gate", "p95_ms=60000")
    status = json.loads(run(config_path, "rollouts", "status", "listing-moderation", "--json"))
    gates = {g["gate"]: g for g in status["gates"]}
    assert set(gates) == {"error_rate", "parse_failure_rate", "p95_latency_ms", "disagreement_rate"}
    assert gates["disagreement_rate"]["verdict"] == "skip"
    assert gates["error_rate"]["needs"] == 30 and gates["error_rate"]["more"] == 30
    human = run(config_path, "rollouts", "status", "listing-moderation")
    assert "SKIP" in human and "not shadowed" in human and "needs 30 more" in human
    taken: list = []
    i = 0
    while ("listing-moderation", "promote") not in taken:
        assert i < 3000, taken
        for _ in range(150):
            gateway.moderate(i)
            i += 1
        taken += gateway.tick()
    assert [a for _, a in taken] == ["step", "step", "promote"]
    assert gateway.store.labels("listing-moderation")["production"] == v2


def test_gate_options_are_checked(config_path: Path, gateway: Gateway, tmp_path: Path) -> None:
    v2 = _publish_variant(config_path, tmp_path, "Version 2")
    for args, needle in [(("--gate", "bogus=1"), "NAME one of"), (("--gate", "min_samples=off"), "cannot be switched off"),
                         (("--gate", "error_rate=2"), "less than or equal to 1")]:
        result = CliRunner().invoke(cli, ["rollouts", "start", "--config", str(config_path), "listing-moderation",
                                          "--canary", str(v2), *args])
        assert result.exit_code == 2 and needle in result.output, result.output
