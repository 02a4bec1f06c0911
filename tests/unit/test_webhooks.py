"""Signed webhooks from the registry's audit log, and the rollout gauges (gateway/webhooks.py).

A real SQLite registry seeded like `modgate up` seeds it, written to with the registry's own
operations (`prompt_registry.ops`, `gateway.rollouts.ops`), and a real HTTP receiver (aiohttp
on 127.0.0.1) that verifies every signature with the documented recipe. Back-off sleeps are
injected: no test waits for a real back-off."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.rollouts.ops import apply_action, start_rollout
from gateway.webhooks import (
    ATTEMPT_HEADER,
    EVENT_ID_HEADER,
    EVENT_TYPE_HEADER,
    EVENT_TYPES,
    SIGNATURE_HEADER,
    RolloutMetrics,
    WebhookConfigError,
    WebhookDispatcher,
    WebhookSettings,
    WebhookSubscriber,
    events_from_audit,
    sign,
    verify_signature,
)
from prompt_registry import ApprovalRequired, GateOverride, ops
from prompt_registry.rollouts import GateConfig, Rollout, ShadowSpec, new_rollout
from prompt_registry.sqlite_store import SqlitePromptStore

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "listing-moderation"
SECRET = "whsec-test-0123456789abcdef"
ENV = {"HOOK_SECRET": SECRET, "OTHER_SECRET": "another-secret-0123456789"}


# -- a receiver ----------------------------------------------------------------------------------

@dataclass
class Received:
    id: str
    type: str
    attempt: int
    body: dict[str, Any]


@dataclass
class Receiver:
    """Verifies each request the way a subscriber should (the module docstring's recipe,
    written out here rather than calling verify_signature, which is tested against it)."""

    secret: str = SECRET
    statuses: list[int] = field(default_factory=list)  # answers for the first requests, then 200
    got: list[Received] = field(default_factory=list)
    bad_signatures: int = 0
    requests: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        raw = await request.read()
        t, v1 = _parse(request.headers[SIGNATURE_HEADER])
        expected = hmac.new(self.secret.encode(), f"{t}.".encode() + raw, hashlib.sha256).hexdigest()
        if abs(time.time() - t) > 300 or not hmac.compare_digest(expected, v1):
            self.bad_signatures += 1
            return web.Response(status=401)
        if self.statuses:
            return web.Response(status=self.statuses.pop(0))
        body = orjson.loads(raw)
        assert body["id"] == request.headers[EVENT_ID_HEADER]
        assert body["type"] == request.headers[EVENT_TYPE_HEADER]
        self.got.append(Received(body["id"], body["type"], int(request.headers[ATTEMPT_HEADER]), body))
        return web.Response(status=204)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.got]

    @property
    def types(self) -> list[str]:
        return [r.type for r in self.got]


def _parse(header: str) -> tuple[int, str]:
    parts = dict(p.split("=", 1) for p in header.split(","))
    return int(parts["t"]), parts["v1"]


@asynccontextmanager
async def receiving(receiver: Receiver, path: str = "/hooks/modgate?token=url-token-1234"
                    ) -> AsyncIterator[Receiver]:
    app = web.Application()
    app.router.add_post(path.split("?")[0], receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    receiver.url = f"http://{host}:{port}{path}"
    try:
        yield receiver
    finally:
        await runner.cleanup()


# -- helpers -------------------------------------------------------------------------------------

class Sleeps:
    """Injected back-off sleep: records the delays, waits for nothing."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def settings(*subscribers: WebhookSubscriber, **kw: Any) -> WebhookSettings:
    return WebhookSettings(subscribers=list(subscribers), **{"poll_interval_s": 0.05, "min_tick_s": 0.0,
                                                            **kw})


def subscriber(url: str, **kw: Any) -> WebhookSubscriber:
    return WebhookSubscriber(**{"name": "ops-hook", "url": url, "secret_env": "HOOK_SECRET", **kw})


def dispatcher(cfg: WebhookSettings, store: SqlitePromptStore, data_dir: Path, **kw: Any) -> WebhookDispatcher:
    return WebhookDispatcher(cfg, store, data_dir, environ=ENV, **{"retry_sleep": Sleeps(), **kw})


def prompt_file(tmp_path: Path, change: str) -> Path:
    """A new version of the shipped prompt (a changed description)."""
    spec = yaml.safe_load((ROOT / "configs" / "prompts" / f"{PROMPT}.yaml").read_text())
    spec["description"] = f"{spec['description']} ({change})"
    spec["policy"]["change_note"] = change
    path = tmp_path / f"{PROMPT}-{abs(hash(change))}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def publish(store: SqlitePromptStore, tmp_path: Path, change: str) -> int:
    result, _ = ops.publish_file(store, prompt_file(tmp_path, change), actor="alice", note=change)
    return result.version.version


def score(store: SqlitePromptStore, version: int, *, good: bool = True) -> None:
    """Store a scorecard of *version* on the prompt's gate dataset that passes its promotion
    gate (every criterion, also against a production scored the same way), or fails it."""
    from datetime import UTC, datetime

    from prompt_registry import ScorecardRecord
    from prompt_registry.gates import MetricCounts, RateCount

    pv = store.get_version(PROMPT, version)
    assert pv.spec.evaluation is not None
    counts = MetricCounts(tp=200, fp=0 if good else 150, fn=0)
    store.put_scorecard(ScorecardRecord(
        prompt=PROMPT, version=version, version_hash=pv.content_hash,
        dataset_sha256=pv.spec.evaluation.dataset.sha256, items=400, correct=400 if good else 250,
        categories={"counterfeit": counts}, micro=counts, flagged=counts,
        parse_failures=RateCount(count=0, n=400), created_at=datetime.now(UTC)), actor="eval")


def put_rollout(store: SqlitePromptStore, canary: int | None, steps: list[int], shadows: list[int],
                gates: GateConfig) -> Rollout:
    """A running rollout stored directly (no start-time gate check): for the gauges."""
    r = new_rollout(PROMPT, stable_version=store.labels(PROMPT)["production"], canary_version=canary,
                    steps=steps, shadows=[ShadowSpec(version=v, sample_rate=0.5) for v in shadows],
                    step_hold_s=0, gates=gates, auto=False, subject_key="seller_id", started_by="alice")
    store.put_rollout(r, expected_revision=None, actor="alice")
    return r


def log_lines(data_dir: Path) -> list[dict[str, Any]]:
    path = data_dir / "webhooks" / "deliveries.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


# Waits in this file (wait_for, drain) are guards against a hang only, so they are generous:
# 5 s was within reach of a loaded 2-core CI machine.
GUARD_S = 30.0


async def wait_for(predicate: Callable[[], bool], timeout_s: float = GUARD_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


# -- signatures ----------------------------------------------------------------------------------

def test_signature_recipe_round_trip_and_rejections() -> None:
    body = b'{"id":"evt_1","type":"label.moved"}'
    now = 1_760_000_000
    header = sign(SECRET, body, now)
    t, v1 = _parse(header)
    assert t == now
    assert v1 == hmac.new(SECRET.encode(), f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    assert verify_signature(SECRET, body, header, now=now + 299)
    assert not verify_signature(SECRET, body, header, now=now + 301), "a replayed old request"
    assert not verify_signature(SECRET, body + b" ", header, now=now), "a changed body"
    assert not verify_signature("another-secret-0123456789", body, header, now=now)
    # the timestamp is signed: moving it invalidates the signature
    assert not verify_signature(SECRET, body, header.replace(f"t={now}", f"t={now + 5}"), now=now)
    for broken in ("", "v1=abc", f"t=x,v1={v1}", f"t={now}", f"t={now},t={now},v1={v1}"):
        assert not verify_signature(SECRET, body, broken, now=now)
    # a receiver accepting two secrets during a rotation: one v1 per secret may be sent
    assert verify_signature(SECRET, body, f"t={now},v1=00,v1={v1}", now=now)


# -- audit entries -> events ---------------------------------------------------------------------

def test_every_registry_write_maps_to_its_event(store: SqlitePromptStore, tmp_path: Path) -> None:
    before = len(store.audit(PROMPT))
    v2 = publish(store, tmp_path, "catch obfuscated ids")
    v3 = publish(store, tmp_path, "stricter payment rule")
    ops.set_label(store, PROMPT, "canary", v2, actor="alice")
    ops.set_label(store, PROMPT, "canary", v3, actor="alice", expected=v2)
    for v in (1, v2, v3):
        score(store, v)  # passing scorecards: the rollout may start and take every step
    scored = len(store.audit(PROMPT))
    gates = GateConfig(min_samples=1)
    start_rollout(store, PROMPT, canary_version=v2, steps=[5, 50, 100], shadows=[ShadowSpec(version=v3, sample_rate=0.5)],
                  step_hold_s=0, gates=gates, auto=True, subject_key="seller_id", actor="alice")
    for action in ("step", "pause", "resume", "step"):
        apply_action(store, PROMPT, action, actor="bob")
    score(store, v2, good=False)  # re-evaluated: v2 now fails its gate
    # the gate refuses the promotion; the controller's way holds the rollout instead
    apply_action(store, PROMPT, "promote", actor="rollout-controller", hold_on_gate=True)
    apply_action(store, PROMPT, "abort", actor="bob", note="enough")
    start_rollout(store, PROMPT, canary_version=v3, steps=[5], shadows=[], step_hold_s=0, gates=gates,
                  auto=False, subject_key="seller_id", actor="alice")
    score(store, v3, good=False)
    apply_action(store, PROMPT, "promote", actor="admin",
                 override=GateOverride(reason="legal sign-off", by="admin"))

    entries = store.audit(PROMPT)[before:]
    events = [e for i, entry in enumerate(entries, start=before) for e in events_from_audit(PROMPT, i, entry)]
    assert [e.type for e in events] == [
        "prompt.published", "prompt.published", "label.moved", "label.moved",
        *["scorecard.stored"] * 3,
        "rollout.started", "rollout.stepped", "rollout.paused", "rollout.resumed", "rollout.stepped",
        "scorecard.stored",
        "rollout.paused", "gate.refused",  # the held promotion: paused, and why
        "rollout.aborted", "rollout.started", "scorecard.stored", "label.moved", "rollout.promoted"]
    assert scored == before + 7
    by_type: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        body = orjson.loads(e.body)
        assert body["id"] == e.id and body["type"] == e.type and body["prompt"] == PROMPT
        assert e.type in EVENT_TYPES
        by_type.setdefault(e.type, []).append(body)
    assert [b["data"]["version"] for b in by_type["prompt.published"]] == [v2, v3]
    assert [b["data"]["version"] for b in by_type["scorecard.stored"]] == [1, v2, v3, v2, v3]
    assert all("salt" not in e.body.decode() for e in events), "the rollout's salt stays inside"
    first_move = by_type["label.moved"][0]["data"]
    assert first_move == {"label": "canary", "from_version": None, "to_version": v2,
                          "gate_overridden": False}
    started = by_type["rollout.started"][0]["data"]
    assert (started["state"], started["stable_version"], started["canary_version"]) == ("running", 1, v2)
    assert [b["data"]["weight"] for b in by_type["rollout.stepped"]] == [50, 100]
    held, refused = by_type["rollout.paused"][1], by_type["gate.refused"][0]
    assert held["data"]["reason"] == "gate_refused" and refused["data"]["source"] == "rollout_promotion"
    assert refused["data"]["gate"]["verdict"] == "fail" and held["id"] != refused["id"]
    assert refused["id"].startswith(held["id"]), "both events of one entry share its id's stem"
    assert by_type["rollout.aborted"][0]["data"]["note"] == "enough"
    assert by_type["label.moved"][-1]["data"]["gate_overridden"] is True
    # ids: unique, and the same entry always gives the same id
    assert len({e.id for e in events}) == len(events)
    again = [e.id for i, entry in enumerate(store.audit(PROMPT)[before:], start=before)
             for e in events_from_audit(PROMPT, i, entry)]
    assert again == [e.id for e in events]


def test_lifecycle_and_four_eyes_writes_are_events(store: SqlitePromptStore, tmp_path: Path) -> None:
    """Every registry write that changes what may serve is announced: retiring a version and the
    four-eyes setting with its approval requests (they produced no event before)."""
    before = len(store.audit(PROMPT))
    v2 = publish(store, tmp_path, "catch obfuscated ids")
    ops.set_version_state(store, PROMPT, v2, "deprecated", actor="alice", reason="wrong model")
    ops.set_version_state(store, PROMPT, v2, "blocked", actor="alice", reason="leaks the policy")
    ops.set_version_state(store, PROMPT, v2, "active", actor="alice", reason="fixed")
    ops.set_four_eyes(store, PROMPT, True, actor="admin", reason="audit asked")
    score(store, 1)
    score(store, v2)
    with pytest.raises(ApprovalRequired) as held:
        ops.set_label(store, PROMPT, "production", v2, actor="alice")
    ops.deny_request(store, PROMPT, held.value.request.id, actor="bob", reason="not today")
    entries = store.audit(PROMPT)[before:]
    events = [e for i, entry in enumerate(entries, start=before) for e in events_from_audit(PROMPT, i, entry)]
    assert [e.type for e in events] == [
        "prompt.published", "version.deprecated", "version.blocked", "version.reinstated",
        "four_eyes.changed", "scorecard.stored", "scorecard.stored", "approval.requested",
        "approval.denied"]
    assert all(e.type in EVENT_TYPES for e in events)
    blocked = orjson.loads(events[2].body)["data"]
    assert blocked == {"version": v2, "from_state": "deprecated", "to_state": "blocked",
                       "reason": "leaks the policy"}
    requested = orjson.loads(events[7].body)["data"]
    assert requested == {"label": "production", "from_version": 1, "version": v2}


def test_a_future_gate_refusal_audit_action_is_an_event(store: SqlitePromptStore) -> None:
    from datetime import UTC, datetime

    from prompt_registry import AuditEntry

    entry = AuditEntry(at=datetime.now(UTC), actor="alice", action="gate_refused", prompt=PROMPT,
                       label="production", from_version=1, to_version=2, note="gate failed on ...")
    (event,) = events_from_audit(PROMPT, 7, entry)
    body = orjson.loads(event.body)
    assert event.type == "gate.refused"
    assert body["data"] == {"label": "production", "production_version": 1, "version": 2,
                            "source": "label_move"}
    policy = entry.model_copy(update={"action": "gate_policy", "label": "gate-policy",
                                      "from_version": None, "to_version": None})
    assert [e.type for e in events_from_audit(PROMPT, 8, policy)] == ["gate.policy_changed"]
    unknown = entry.model_copy(update={"action": "something-new"})
    assert events_from_audit(PROMPT, 8, unknown) == []


# -- delivery ------------------------------------------------------------------------------------

def test_each_event_is_delivered_once_signed_by_the_background_loop(
        store: SqlitePromptStore, tmp_path: Path) -> None:
    async def run() -> None:
        async with receiving(Receiver()) as rx:
            d = dispatcher(settings(subscriber(rx.url)), store, tmp_path / "data")
            d.start()
            try:
                await wait_for(lambda: (tmp_path / "data" / "webhooks" / "cursor.json").exists())
                v2 = publish(store, tmp_path, "catch obfuscated ids")
                ops.set_label(store, PROMPT, "canary", v2, actor="alice")
                # no drain(): the loop notices the store's change announcement by itself
                await wait_for(lambda: len(rx.got) == 2)
                await asyncio.sleep(0.3)  # several more scans: nothing is sent twice
                await d.drain(GUARD_S)
            finally:
                await d.aclose()
        assert rx.types == ["prompt.published", "label.moved"], "not the seed's history"
        assert len(set(rx.ids)) == 2 and rx.bad_signatures == 0 and rx.requests == 2
        assert all(r.attempt == 1 for r in rx.got)
        assert rx.got[1].body["data"]["to_version"] == v2 and rx.got[1].body["actor"] == "alice"

    asyncio.run(run())


def test_filters_send_each_subscriber_only_what_it_asked_for(
        store: SqlitePromptStore, tmp_path: Path) -> None:
    async def run() -> None:
        async with receiving(Receiver()) as all_rx, receiving(Receiver(secret=ENV["OTHER_SECRET"])) as labels_rx:
            cfg = settings(subscriber(all_rx.url),
                           subscriber(labels_rx.url, name="labels-only", secret_env="OTHER_SECRET",
                                      events=["label.moved"], prompts=[PROMPT]))
            d = dispatcher(cfg, store, tmp_path / "data")
            d.start()
            try:
                await d.drain(GUARD_S)
                v2 = publish(store, tmp_path, "v2")
                ops.set_label(store, PROMPT, "canary", v2, actor="alice")
                await d.drain(GUARD_S)
            finally:
                await d.aclose()
        assert all_rx.types == ["prompt.published", "label.moved"]
        assert labels_rx.types == ["label.moved"] and labels_rx.bad_signatures == 0
        assert labels_rx.ids == all_rx.ids[1:], "one event, one id, whoever receives it"

    asyncio.run(run())


def test_retries_after_a_500_with_exponential_jittered_backoff(
        store: SqlitePromptStore, tmp_path: Path) -> None:
    sleeps = Sleeps()

    async def run() -> None:
        async with receiving(Receiver(statuses=[500, 503, 500])) as rx:
            d = dispatcher(settings(subscriber(rx.url), backoff_base_s=2.0, backoff_max_s=5.0),
                           store, tmp_path / "data", retry_sleep=sleeps)
            d.start()
            try:
                await d.drain(GUARD_S)
                v2 = publish(store, tmp_path, "v2")
                await d.drain(GUARD_S)
            finally:
                await d.aclose()
        assert rx.types == ["prompt.published"] and rx.got[0].attempt == 4
        assert rx.got[0].body["data"]["version"] == v2
        assert rx.requests == 4, "three failures, then the delivery"

    asyncio.run(run())
    # 2 s, 4 s, then capped at 5 s; equal jitter: between half the step and the step
    assert len(sleeps.delays) == 3
    for delay, ceiling in zip(sleeps.delays, (2.0, 4.0, 5.0), strict=True):
        assert ceiling / 2 <= delay <= ceiling
    lines = log_lines(tmp_path / "data")
    assert [(x["attempt"], x["status"], x["outcome"]) for x in lines] == [
        (1, 500, "retry"), (2, 503, "retry"), (3, 500, "retry"), (4, 204, "delivered")]
    assert len({x["event_id"] for x in lines}) == 1


def test_a_final_answer_is_not_retried_and_attempts_run_out(
        store: SqlitePromptStore, tmp_path: Path) -> None:
    sleeps = Sleeps()

    async def run() -> None:
        async with receiving(Receiver(statuses=[410, 500, 500, 500])) as rx:
            d = dispatcher(settings(subscriber(rx.url), max_attempts=3), store, tmp_path / "data",
                           retry_sleep=sleeps)
            d.start()
            try:
                await d.drain(GUARD_S)
                publish(store, tmp_path, "v2")   # answered 410: final
                publish(store, tmp_path, "v3")   # 500 three times: given up
                await d.drain(GUARD_S)
            finally:
                await d.aclose()
        assert rx.got == [] and rx.requests == 4

    asyncio.run(run())
    outcomes = [(x["status"], x["outcome"]) for x in log_lines(tmp_path / "data")]
    assert outcomes == [(410, "failed"), (500, "retry"), (500, "retry"), (500, "gave_up")]
    assert len(sleeps.delays) == 2


def test_connection_errors_are_retried_then_given_up(store: SqlitePromptStore, tmp_path: Path) -> None:
    async def run() -> None:
        async with receiving(Receiver()) as rx:
            url = rx.url
        # the receiver is gone: connection refused on every attempt
        d = dispatcher(settings(subscriber(url), max_attempts=2, timeout_s=2.0), store, tmp_path / "data")
        d.start()
        try:
            await d.drain(GUARD_S)
            publish(store, tmp_path, "v2")
            await d.drain(10)
        finally:
            await d.aclose()

    asyncio.run(run())
    lines = log_lines(tmp_path / "data")
    assert [(x["status"], x["outcome"]) for x in lines] == [(None, "retry"), (None, "gave_up")]
    assert all(x["error"] for x in lines)


def test_restart_resumes_at_the_cursor_without_loss_or_duplicates(
        store: SqlitePromptStore, tmp_path: Path) -> None:
    data = tmp_path / "data"
    cursor = data / "webhooks" / "cursor.json"

    async def run() -> None:
        async with receiving(Receiver()) as rx:
            cfg = settings(subscriber(rx.url))
            first = dispatcher(cfg, store, data)
            first.start()
            await first.drain(GUARD_S)
            v2 = publish(store, tmp_path, "v2")
            await first.drain(GUARD_S)
            await first.aclose()
            assert rx.types == ["prompt.published"]

            # while no dispatcher runs
            ops.set_label(store, PROMPT, "canary", v2, actor="alice")
            v3 = publish(store, tmp_path, "v3")

            second = dispatcher(cfg, store, data)
            second.start()
            await second.drain(GUARD_S)
            await second.aclose()
            assert rx.types == ["prompt.published", "label.moved", "prompt.published"]
            assert rx.got[2].body["data"]["version"] == v3
            assert len(set(rx.ids)) == len(rx.ids), "nothing twice after a clean restart"

            # a crash after delivering, before the cursor was saved: the same events again,
            # with the same ids, so the receiver can drop them
            saved = cursor.read_bytes()
            third = dispatcher(cfg, store, data)
            third.start()
            ops.set_label(store, PROMPT, "canary", v3, actor="alice", expected=v2)
            await third.drain(GUARD_S)
            await third.aclose()
            cursor.write_bytes(saved)
            fourth = dispatcher(cfg, store, data)
            fourth.start()
            await fourth.drain(GUARD_S)
            await fourth.aclose()
        assert rx.types[3:] == ["label.moved", "label.moved"]
        assert rx.ids[3] == rx.ids[4], "redelivered under the same id"
        assert len(set(rx.ids)) == 4

    asyncio.run(run())


def test_first_start_sends_history_only_when_asked(store: SqlitePromptStore, tmp_path: Path) -> None:
    async def run(replay: bool, data: Path) -> list[str]:
        async with receiving(Receiver()) as rx:
            d = dispatcher(settings(subscriber(rx.url), replay_history=replay), store, data)
            d.start()
            await d.drain(GUARD_S)
            await d.aclose()
        return rx.types

    assert asyncio.run(run(False, tmp_path / "a")) == []
    # the seed published v1 and set production (a recorded bootstrap override)
    assert asyncio.run(run(True, tmp_path / "b")) == ["prompt.published", "label.moved"]


def test_a_full_queue_drops_and_counts_and_logs(store: SqlitePromptStore, tmp_path: Path) -> None:
    registry = CollectorRegistry()

    async def run() -> None:
        async with receiving(Receiver()) as rx:
            d = dispatcher(settings(subscriber(rx.url), queue_max=1), store, tmp_path / "data",
                           registry=registry)
            await d.tick()           # the first scan (cursor at the end); workers not started yet
            v2 = publish(store, tmp_path, "v2")
            ops.set_label(store, PROMPT, "canary", v2, actor="alice")
            publish(store, tmp_path, "v3")
            assert await d.tick(full=True) == 1, "one fits the queue"
            assert d.dropped("ops-hook") == 2
            assert registry.get_sample_value("modgate_webhook_dropped_total",
                                             {"subscriber": "ops-hook"}) == 2
            assert registry.get_sample_value("modgate_webhook_queue_depth",
                                             {"subscriber": "ops-hook"}) == 1
            d.start()
            await d.drain(GUARD_S)
            await d.aclose()
        assert rx.types == ["prompt.published"]

    asyncio.run(run())
    lines = log_lines(tmp_path / "data")
    assert [x["outcome"] for x in lines] == ["dropped", "dropped", "delivered"]
    assert [x["attempt"] for x in lines] == [0, 0, 1]
    # dropped events are finished business: the cursor is past all three
    saved = orjson.loads((tmp_path / "data" / "webhooks" / "cursor.json").read_bytes())
    assert saved["prompts"][PROMPT]["consumed"] == len(store.audit(PROMPT))


def test_the_delivery_log_and_cursor_never_hold_the_secret(store: SqlitePromptStore, tmp_path: Path) -> None:
    data = tmp_path / "data"

    async def run() -> str:
        async with receiving(Receiver(statuses=[500])) as rx:
            d = dispatcher(settings(subscriber(rx.url)), store, data)
            d.start()
            await d.drain(GUARD_S)
            publish(store, tmp_path, "v2")
            await d.drain(GUARD_S)
            assert SECRET not in repr(d._subs)  # noqa: SLF001
            await d.aclose()
            return rx.url

    url = asyncio.run(run())
    files = list((data / "webhooks").iterdir())
    assert {f.name for f in files} == {"cursor.json", "deliveries.jsonl"}
    for f in files:
        text = f.read_text()
        assert SECRET not in text
        assert "url-token-1234" not in text and "/hooks/" not in text, "host only, no path or query"
    lines = log_lines(data)
    assert len(lines) == 2
    host = url.split("/")[2]
    for line in lines:
        assert set(line) == {"at", "event_id", "event", "prompt", "subscriber", "host", "attempt",
                             "status", "outcome", "latency_ms", "error"}
        assert line["host"] == host and line["latency_ms"] >= 0


def test_the_delivery_log_rotates(store: SqlitePromptStore, tmp_path: Path) -> None:
    async def run() -> None:
        async with receiving(Receiver(statuses=[500] * 40)) as rx:
            d = dispatcher(settings(subscriber(rx.url), max_attempts=40, delivery_log_max_bytes=4096),
                           store, tmp_path / "data")
            d.start()
            await d.drain(GUARD_S)
            publish(store, tmp_path, "v2")
            await d.drain(10)
            await d.aclose()

    asyncio.run(run())
    current = tmp_path / "data" / "webhooks" / "deliveries.jsonl"
    rotated = current.with_name("deliveries.jsonl.1")
    assert rotated.exists() and current.stat().st_size <= 4096 and rotated.stat().st_size <= 4096


def test_a_replaced_registry_resets_the_cursor_instead_of_replaying(
        store: SqlitePromptStore, tmp_path: Path) -> None:
    registry = CollectorRegistry()

    async def run() -> None:
        async with receiving(Receiver()) as rx:
            cfg = settings(subscriber(rx.url))
            d = dispatcher(cfg, store, tmp_path / "data")
            d.start()
            await d.drain(GUARD_S)
            publish(store, tmp_path, "v2")
            await d.drain(GUARD_S)
            await d.aclose()
            other = SqlitePromptStore(tmp_path / "other.db")   # a new registry, same data_dir
            try:
                from prompt_registry.loader import seed_store

                seed_store(other, ROOT / "configs" / "prompts")
                d2 = dispatcher(cfg, other, tmp_path / "data", registry=registry)
                d2.start()
                await d2.drain(GUARD_S)
                publish(other, tmp_path, "v2 elsewhere")
                await d2.drain(GUARD_S)
                await d2.aclose()
            finally:
                other.close()
        assert rx.types == ["prompt.published", "prompt.published"]

    asyncio.run(run())
    assert registry.get_sample_value("modgate_webhook_cursor_resets_total") == 1


def test_aclose_leaves_unfinished_deliveries_for_the_next_start(
        store: SqlitePromptStore, tmp_path: Path) -> None:
    async def run() -> None:
        async with receiving(Receiver(statuses=[500] * 3)) as rx:
            blocked = asyncio.Event()

            async def stuck(_: float) -> None:  # a back-off that outlasts the shutdown grace
                await blocked.wait()

            cfg = settings(subscriber(rx.url), drain_timeout_s=0.2)
            d = dispatcher(cfg, store, tmp_path / "data", retry_sleep=stuck)
            d.start()
            await d.drain(GUARD_S)
            publish(store, tmp_path, "v2")
            await d.tick(full=True)
            await wait_for(lambda: rx.requests == 1)
            await d.aclose()
            assert rx.got == []
            d2 = dispatcher(cfg, store, tmp_path / "data")
            d2.start()
            await d2.drain(GUARD_S)
            await d2.aclose()
        assert rx.types == ["prompt.published"] and rx.got[0].attempt == 3

    asyncio.run(run())


# -- configuration -------------------------------------------------------------------------------

def test_configuration_is_checked(store: SqlitePromptStore, tmp_path: Path) -> None:
    ok = {"name": "ops-hook", "url": "https://hooks.example.com/modgate", "secret_env": "HOOK_SECRET"}
    WebhookSubscriber(**ok)
    for bad, match in [({"url": "ftp://x/y"}, "http"), ({"url": "https://u:p@x/y"}, "credentials"),
                       ({"events": ["label.moved", "label.deleted"]}, "label.deleted"),
                       ({"events": []}, "at least one"), ({"name": "Ops Hook"}, "pattern"),
                       ({"secret_env": "not-a-var"}, "pattern"), ({"secret": "x"}, "Extra")]:
        with pytest.raises(ValueError, match=match):
            WebhookSubscriber(**{**ok, **bad})
    with pytest.raises(ValueError, match="used twice"):
        WebhookSettings(subscribers=[WebhookSubscriber(**ok), WebhookSubscriber(**ok)])
    cfg = WebhookSettings(subscribers=[WebhookSubscriber(**ok)])
    with pytest.raises(WebhookConfigError, match="HOOK_SECRET.*not set"):
        WebhookDispatcher(cfg, store, tmp_path, environ={})
    with pytest.raises(WebhookConfigError, match="shorter than 16") as info:
        WebhookDispatcher(cfg, store, tmp_path, environ={"HOOK_SECRET": "short"})
    assert "short'" not in str(info.value)
    assert WebhookSettings().subscribers == []


def test_no_subscribers_still_refreshes_the_rollout_gauges(store: SqlitePromptStore, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = RolloutMetrics(registry)

    async def run() -> None:
        d = WebhookDispatcher(WebhookSettings(metrics_interval_s=0.05), store, tmp_path,
                              rollout_metrics=metrics, environ={})
        d.start()
        await wait_for(lambda: registry.get_sample_value(
            "modgate_rollout_metrics_refresh_timestamp_seconds") is not None)
        await d.aclose()

    asyncio.run(run())
    assert not (tmp_path / "webhooks").exists(), "nothing written without subscribers"


# -- rollout gauges ------------------------------------------------------------------------------

def test_rollout_gauges_follow_the_store(store: SqlitePromptStore, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = RolloutMetrics(registry, clock=lambda: 1234.0)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    metrics.refresh(store)
    assert value("modgate_rollout_metrics_refresh_timestamp_seconds") == 1234.0
    assert value("modgate_rollout_state", prompt=PROMPT, state="running") is None

    v2 = publish(store, tmp_path, "v2")
    v3 = publish(store, tmp_path, "v3")
    r = put_rollout(store, v2, [5, 50], [v3], GateConfig(min_samples=10, max_parse_failure_rate=0.001))
    store.add_rollout_stats(r.id, {"canary:requests": 40, "canary:verdicts": 40, "canary:parse_failures": 1,
                                   "stable:requests": 400, "stable:verdicts": 400, "fb:canary:n": 7,
                                   f"pair:{v3}:n": 20, f"pair:{v3}:agree": 15, "pair:99:n": 5})
    metrics.refresh(store)
    assert value("modgate_rollout_state", prompt=PROMPT, state="running") == 1
    assert value("modgate_rollout_state", prompt=PROMPT, state="aborted") == 0
    assert value("modgate_rollout_weight_percent", prompt=PROMPT) == 5
    assert value("modgate_rollout_step", prompt=PROMPT) == 0
    assert value("modgate_rollout_samples", prompt=PROMPT, arm="canary", kind="parse_failures") == 1
    assert value("modgate_rollout_samples", prompt=PROMPT, arm="stable", kind="requests") == 400
    assert value("modgate_rollout_feedback_labels", prompt=PROMPT, arm="canary") == 7
    assert value("modgate_rollout_agreement_ratio", prompt=PROMPT, version=str(v3)) == 0.75
    assert value("modgate_rollout_shadow_comparisons", prompt=PROMPT, version=str(v3)) == 20
    assert value("modgate_rollout_shadow_comparisons", prompt=PROMPT, version="99") is None, \
        "versions come from the rollout, not from whatever the counters say"
    # 0 errors in 40: too few to pass at 2 %; 1 parse failure in 40 is over 0.1 % for sure
    assert value("modgate_rollout_gate_verdict", prompt=PROMPT, gate="error_rate", verdict="wait") == 1
    assert value("modgate_rollout_gate_verdict", prompt=PROMPT, gate="error_rate", verdict="fail") == 0
    assert value("modgate_rollout_gate_verdict", prompt=PROMPT, gate="parse_failure_rate",
                 verdict="fail") == 1
    assert value("modgate_rollout_last_transition_timestamp_seconds", prompt=PROMPT) == \
        r.updated_at.timestamp()

    apply_action(store, PROMPT, "abort", actor="bob")
    metrics.refresh(store)
    assert value("modgate_rollout_state", prompt=PROMPT, state="aborted") == 1
    assert value("modgate_rollout_state", prompt=PROMPT, state="running") == 0
    assert value("modgate_rollout_weight_percent", prompt=PROMPT) == 0
    assert value("modgate_rollout_gate_verdict", prompt=PROMPT, gate="error_rate", verdict="wait") is None, \
        "a finished rollout has no gates"


def test_rollout_gauge_refresh_failures_keep_the_last_values(store: SqlitePromptStore, tmp_path: Path) -> None:
    from prompt_registry import StoreUnavailable

    registry = CollectorRegistry()
    metrics = RolloutMetrics(registry)
    v2 = publish(store, tmp_path, "v2")
    put_rollout(store, v2, [10], [], GateConfig())

    class Down:
        def __init__(self) -> None:
            self.down = False

        def __getattr__(self, name: str) -> Any:
            if self.down and name in ("list_rollouts", "list_prompts"):
                def fail(*_: Any) -> Any:
                    raise StoreUnavailable("registry down")
                return fail
            return getattr(store, name)

    flaky = Down()

    async def run() -> None:
        d = WebhookDispatcher(WebhookSettings(), flaky, tmp_path, rollout_metrics=metrics,  # type: ignore[arg-type]
                              environ={})
        await d.tick(full=True)
        assert registry.get_sample_value("modgate_rollout_weight_percent", {"prompt": PROMPT}) == 10
        flaky.down = True
        await d.tick(full=True)

    asyncio.run(run())
    assert registry.get_sample_value("modgate_rollout_weight_percent", {"prompt": PROMPT}) == 10
    assert registry.get_sample_value("modgate_rollout_metrics_refresh_errors_total") == 1
