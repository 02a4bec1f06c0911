"""Signed webhooks for registry and rollout events, and rollout gauges for Prometheus.

Events are derived from the registry's **audit log**, which every registry write already leaves
in the same atomic store write (publish, label move, rollout transition, scorecard), rather than
from hooks in each code path that writes: nothing can change the registry without an audit entry,
so nothing can change it without an event. A background loop (`WebhookDispatcher`) reads the
audit log of every prompt past a persisted cursor, turns each new entry into events, and hands
each event to the bounded queue of every subscriber whose filter takes it; one worker per
subscriber delivers in order, with retries.

Event types (one audit entry gives one event, two for a held promotion):

    prompt.published    action "publish"
    label.moved         action "label" (`data.gate_overridden` when an admin overrode the gate)
    rollout.started     action "rollout", the first entry of a rollout (its note is plain text)
    rollout.stepped | rollout.paused | rollout.resumed | rollout.promoted | rollout.aborted
    | rollout.fallback  action "rollout", by the JSON note's `action` (start too, when noted so;
                        fallback: the controller put a canary back to its last safe weight)
    rollout.changed     action "rollout" that none of the above describes
    gate.refused        action "rollout" with action "hold" (the controller's promotion was
                        refused by the promotion gate; the rollout is paused too, so a
                        `rollout.paused` with `data.reason: gate_refused` comes with it), or an
                        audit action "gate_refused" (see the module's notes on refusals)
    scorecard.stored    action "scorecard"
    gate.policy_changed action "gate_policy" (a prompt's promotion-gate policy kept in the registry)

Delivery guarantees:

- **At least once, with an id to dedupe on.** An event's id is a hash of the prompt, the audit
  entry's position in the prompt's audit log and the entry itself: the same entry always gives
  the same id, on every replica and after every restart. The cursor (per prompt: entries
  consumed, and a digest of the last one) lives in `<data_dir>/<dir>/cursor.json` and only
  moves past an entry once every delivery of its events has finished (delivered, refused for
  good by the receiver, given up after `max_attempts`, or dropped from a full queue). A clean
  shutdown therefore neither loses nor repeats events; a crash repeats the deliveries that had
  not been recorded yet, with the same ids.
- **Bounded memory.** Each subscriber's queue holds `queue_max` events; beyond that an event is
  dropped for that subscriber, counted (`modgate_webhook_dropped_total`) and written to the
  delivery log with outcome `dropped`.
- **First start.** With no cursor file, existing audit entries are not sent (only what happens
  from then on), unless `replay_history` is set. A prompt the cursor does not know yet is new,
  and all its entries are sent.
- If a prompt's audit log no longer matches the cursor (shorter, or a different entry where
  the cursor stopped: the registry was replaced), the cursor restarts at its current end, logged
  and counted (`modgate_webhook_cursor_resets_total`), rather than replay another registry's
  history.
- Every replica running a dispatcher against a shared Redis registry delivers every event (same
  ids): configure subscribers on one replica, or dedupe on the id (which receivers must do
  anyway).

Signing. Each request carries

    X-Modgate-Event-Id: <id>            X-Modgate-Event: <type>
    X-Modgate-Delivery-Attempt: <n>     X-Modgate-Signature: t=<unix seconds>,v1=<hex>

where `v1` is HMAC-SHA256, keyed with the subscriber's secret (UTF-8), over the bytes
`<t>` + `.` + the exact request body. To verify (what `verify_signature` does): take `t` and
`v1` from the header, refuse when `|now - t|` exceeds your tolerance (300 s here), compute
the HMAC over `f"{t}.".encode() + raw_body` and compare in constant time
(`hmac.compare_digest`), then dedupe on `X-Modgate-Event-Id` (keep ids for longer than the
tolerance: a replay inside the window carries an id already seen). Each attempt is signed with
a fresh `t`. The secret is read from the environment variable the subscriber names
(`secret_env`), never from the config file, and never logged.

Retries: connection errors, timeouts, 408, 425, 429 and 5xx are retried up to `max_attempts`,
after `backoff_base_s * 2**(attempt-1)` capped at `backoff_max_s` with equal jitter (half fixed,
half random; a `Retry-After` of a 429/503 is honoured up to the cap). Other answers (3xx, 4xx)
are final: redirects are not followed. Every attempt is a line in
`<data_dir>/<dir>/deliveries.jsonl` (event id, type, subscriber, URL host, attempt, HTTP status,
outcome, latency; no secret, no URL path or query), rotated to `deliveries.jsonl.1` at
`delivery_log_max_bytes`.

`RolloutMetrics` exports every rollout's state, weight, gate verdicts, shadow agreement and
reviewer-feedback counts as gauges, refreshed from the store by the same loop (every
`metrics_interval_s`), on the registry it is given. Its label values are the registry's prompt
names, the rollout's own versions and its gates; every replica exports the same values, so
aggregate with `max by (prompt)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from gateway.webhook_settings import (
    EVENT_TYPES,
    MIN_SECRET_BYTES,
    WebhookSettings,
    WebhookSubscriber,
)
from prompt_registry import AuditEntry, PromptReader, RegistryError, RolloutReader
from prompt_registry.rollout_stats import build_rollout_stats
from prompt_registry.rollouts import ACTIVE, evaluate_gates

__all__ = [
    "EVENT_TYPES", "SIGNATURE_HEADER", "CursorStore", "FileCursorStore", "RolloutMetrics", "WebhookConfigError", "WebhookDispatcher",
    "WebhookEvent", "WebhookSettings", "WebhookSource", "WebhookSubscriber", "events_from_audit",
    "sign", "verify_signature",
]

log = logging.getLogger("modgate.webhooks")

SIGNATURE_HEADER = "X-Modgate-Signature"
EVENT_ID_HEADER = "X-Modgate-Event-Id"
EVENT_TYPE_HEADER = "X-Modgate-Event"
ATTEMPT_HEADER = "X-Modgate-Delivery-Attempt"
DEFAULT_TOLERANCE_S = 300.0
_RETRY_STATUSES = frozenset({408, 425, 429})
_ROLLOUT_ACTIONS = {"start": "rollout.started", "step": "rollout.stepped", "pause": "rollout.paused",
                    "resume": "rollout.resumed", "promote": "rollout.promoted",
                    "abort": "rollout.aborted", "fallback": "rollout.fallback"}
_STATE_EVENTS = {"paused": "rollout.paused", "aborted": "rollout.aborted",
                 "promoted": "rollout.promoted", "running": "rollout.changed"}
_CURSOR_FORMAT = 1
_T = TypeVar("_T")


class WebhookConfigError(ValueError):
    """A subscriber cannot be used (its secret's variable is unset or too short)."""


# -- events and signatures ---------------------------------------------------------------------

@dataclass(frozen=True)
class WebhookEvent:
    id: str
    type: str
    prompt: str
    position: int            # index of the audit entry in the prompt's audit log
    body: bytes              # the exact JSON sent (and signed)


def _digest(prompt: str, index: int, entry: AuditEntry) -> str:
    h = hashlib.sha256()
    h.update(prompt.encode())
    h.update(b"\x00")
    h.update(str(index).encode())
    h.update(b"\x00")
    h.update(entry.model_dump_json().encode())
    return h.hexdigest()


def _json_note(note: str) -> dict[str, Any] | None:
    if not note.startswith("{"):
        return None
    try:
        value = orjson.loads(note)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def events_from_audit(prompt: str, index: int, entry: AuditEntry) -> list[WebhookEvent]:
    """The events of one audit entry (the *index*-th of *prompt*'s audit log). Pure."""
    base = "evt_" + _digest(prompt, index, entry)[:32]
    audit = {"index": index, "action": entry.action, "label": entry.label,
             "from_version": entry.from_version, "to_version": entry.to_version, "note": entry.note}
    typed: list[tuple[str, dict[str, Any]]] = []
    if entry.action == "publish":
        typed.append(("prompt.published", {"version": entry.to_version}))
    elif entry.action == "label":
        typed.append(("label.moved", {"label": entry.label, "from_version": entry.from_version,
                                      "to_version": entry.to_version,
                                      "gate_overridden": "GATE OVERRIDDEN" in entry.note}))
    elif entry.action == "scorecard":
        typed.append(("scorecard.stored", {"version": entry.to_version}))
    elif entry.action == "gate_policy":
        typed.append(("gate.policy_changed", {"label": entry.label}))
    elif entry.action == "gate_refused":
        typed.append(("gate.refused", {"label": entry.label, "production_version": entry.from_version,
                                       "version": entry.to_version, "source": "label_move"}))
    elif entry.action == "rollout":
        detail = _json_note(entry.note)
        data: dict[str, Any] = {"state": entry.label, "stable_version": entry.from_version,
                                "canary_version": entry.to_version}
        action = detail.get("action") if detail is not None else None
        if detail is not None:
            # Chosen fields only: the note may carry the whole rollout, whose salt decides
            # which sellers get the canary and stays inside.
            data.update({k: detail[k] for k in ("action", "weight", "note", "gate", "evidence",
                                                "gate_note", "override") if k in detail})
            audit["note"] = str(detail.get("note", ""))  # the raw note holds the rollout
            stored = detail.get("rollout")
            if isinstance(stored, dict) and isinstance(stored.get("id"), str):
                data["rollout_id"] = stored["id"]
        if detail is None and entry.label == "running":  # a start noted in plain text
            typed.append(("rollout.started", data))
        elif action == "hold":
            typed.append(("rollout.paused", {**data, "reason": "gate_refused"}))
            typed.append(("gate.refused", {**data, "source": "rollout_promotion"}))
        elif isinstance(action, str) and action in _ROLLOUT_ACTIONS:
            typed.append((_ROLLOUT_ACTIONS[action], data))
        else:
            typed.append((_STATE_EVENTS.get(entry.label or "", "rollout.changed"), data))
    elif entry.action == "four_eyes":
        typed.append(("four_eyes.changed", {"note": entry.note}))
    elif entry.action.startswith("approval_"):
        typed.append((f"approval.{entry.action.removeprefix('approval_')}",
                      {"label": entry.label, "from_version": entry.from_version,
                       "version": entry.to_version}))
    elif entry.action == "lifecycle":
        # the note is "<from> -> <to>: <reason>" (prompt_registry.ops.set_version_state)
        states, _, reason = entry.note.partition(": ")
        before, _, after = states.partition(" -> ")
        kind = {"deprecated": "version.deprecated", "blocked": "version.blocked",
                "active": "version.reinstated"}.get(after)
        if kind is None:
            return []
        typed.append((kind, {"version": entry.to_version, "from_state": before, "to_state": after,
                             "reason": reason}))
    else:
        return []  # an action this code does not know: nothing to claim about it
    out = []
    for n, (kind, data) in enumerate(typed):
        event_id = base if n == 0 else f"{base}-{n}"
        payload = {"id": event_id, "type": kind, "occurred_at": entry.at.isoformat(),
                   "prompt": prompt, "actor": entry.actor, "data": data, "audit": audit}
        out.append(WebhookEvent(event_id, kind, prompt, index, orjson.dumps(payload)))
    return out


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header's value for *body* sent at *timestamp* (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: str, body: bytes, header: str, *, now: float | None = None,
                     tolerance_s: float = DEFAULT_TOLERANCE_S) -> bool:
    """The receiver's check: a well-formed header, a timestamp within *tolerance_s* of *now*,
    and an HMAC over `<t>.<body>` equal (in constant time) to one of its `v1` values."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if sep:
            parts.setdefault(key, []).append(value)
    try:
        (ts_text,) = parts.get("t", [])
        ts = int(ts_text)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, v) for v in parts.get("v1", []))


# -- the store, as the dispatcher reads it -----------------------------------------------------

class WebhookSource(PromptReader, RolloutReader, Protocol):
    """What the dispatcher reads: prompts and their audit logs (with change announcements), and
    rollouts with their counters for the gauges."""


# -- rollout gauges ----------------------------------------------------------------------------

_STATES: tuple[str, ...] = ("running", "paused", "promoted", "aborted")
_GATE_VERDICTS: tuple[str, ...] = ("pass", "wait", "fail", "skip")
MAX_GATES_PER_ROLLOUT = 64


@dataclass(frozen=True)
class _Sample:
    name: str
    labels: tuple[str, ...]
    value: float


_ROLLOUT_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "modgate_rollout_state": ("1 for the state of the prompt's current (or last) rollout, 0 for "
                              "the other states", ("prompt", "state")),
    "modgate_rollout_weight_percent": ("Canary share of traffic, percent (0 once finished)",
                                       ("prompt",)),
    "modgate_rollout_step": ("Index of the current step in the rollout's schedule", ("prompt",)),
    "modgate_rollout_last_transition_timestamp_seconds": (
        "When the rollout last changed state, weight or decision (unix seconds)", ("prompt",)),
    "modgate_rollout_gate_verdict": ("1 for each gate's current verdict (pass, wait, fail, skip) "
                                     "of an active rollout", ("prompt", "gate", "verdict")),
    "modgate_rollout_samples": ("Counters of an active rollout's arms: requests, errors, verdicts, "
                                "parse_failures (sum over replicas)", ("prompt", "arm", "kind")),
    "modgate_rollout_agreement_ratio": ("Share of shadow comparisons of a version whose decision "
                                        "agreed with stable", ("prompt", "version")),
    "modgate_rollout_shadow_comparisons": ("Shadow comparisons of a version with stable",
                                           ("prompt", "version")),
    "modgate_rollout_feedback_labels": ("Reviewer labels counted against an arm of an active "
                                        "rollout", ("prompt", "arm")),
    "modgate_rollout_metrics_refresh_timestamp_seconds": (
        "When the rollout gauges were last read from the registry (unix seconds)", ()),
}


class RolloutMetrics:
    """Rollout gauges on *registry*, from a snapshot that `refresh` replaces whole (so a scrape
    never sees half an update, and gauges of rollouts that are gone vanish)."""

    def __init__(self, registry: CollectorRegistry, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._samples: tuple[_Sample, ...] = ()
        self.refresh_errors = 0
        registry.register(self)

    def describe(self) -> Iterable[Metric]:
        yield from self._families(())

    def collect(self) -> Iterable[Metric]:
        yield from self._families(self._samples)

    def _families(self, samples: Iterable[_Sample]) -> Iterable[Metric]:
        by_name: dict[str, list[_Sample]] = {name: [] for name in _ROLLOUT_FAMILIES}
        for s in samples:
            by_name[s.name].append(s)
        for name, (doc, labels) in _ROLLOUT_FAMILIES.items():
            fam = GaugeMetricFamily(name, doc, labels=list(labels))
            for s in by_name[name]:
                fam.add_metric(list(s.labels), s.value)
            yield fam
        errors = CounterMetricFamily("modgate_rollout_metrics_refresh_errors",
                                     "Refreshes of the rollout gauges that failed (registry "
                                     "unreachable); the gauges keep their last values")
        errors.add_metric([], float(self.refresh_errors))
        yield errors

    def refresh(self, store: RolloutReader) -> None:
        """Read every rollout from *store* (blocking: call it in a thread) and swap the gauges."""
        out: list[_Sample] = []
        for r in store.list_rollouts():
            p = r.prompt
            out += [_Sample("modgate_rollout_state", (p, s), 1.0 if r.state == s else 0.0) for s in _STATES]
            out.append(_Sample("modgate_rollout_weight_percent", (p,), float(r.weight)))
            out.append(_Sample("modgate_rollout_step", (p,), float(r.step_index)))
            out.append(_Sample("modgate_rollout_last_transition_timestamp_seconds", (p,),
                               r.updated_at.timestamp()))
            if r.state not in ACTIVE:
                continue
            stats = build_rollout_stats(store.rollout_stats(r.id))
            for g in evaluate_gates(r, stats)[:MAX_GATES_PER_ROLLOUT]:
                out += [_Sample("modgate_rollout_gate_verdict", (p, g.name, v),
                                1.0 if g.verdict == v else 0.0)
                        for v in dict.fromkeys((*_GATE_VERDICTS, str(g.verdict)))]
            for arm_name, arm in (("stable", stats.stable), ("canary", stats.canary)):
                for kind, value in (("requests", arm.requests), ("errors", arm.errors),
                                    ("verdicts", arm.verdicts), ("parse_failures", arm.parse_failures)):
                    out.append(_Sample("modgate_rollout_samples", (p, arm_name, kind), float(value)))
                out.append(_Sample("modgate_rollout_feedback_labels", (p, arm_name),
                                   float(arm.feedback.n)))
            versions = {s.version for s in r.shadows}
            if r.canary_version is not None:
                versions.add(r.canary_version)
            for v in sorted(versions):  # only the rollout's own versions, whatever the counters say
                pair = stats.pair(v)
                out.append(_Sample("modgate_rollout_shadow_comparisons", (p, str(v)), float(pair.n)))
                if pair.agreement is not None:
                    out.append(_Sample("modgate_rollout_agreement_ratio", (p, str(v)), pair.agreement))
        out.append(_Sample("modgate_rollout_metrics_refresh_timestamp_seconds", (), self._clock()))
        self._samples = tuple(out)


# -- delivery log and cursor files -------------------------------------------------------------

class _DeliveryLog:
    """JSON lines, one per delivery attempt (or drop); rotated to `<name>.1` at *max_bytes*."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self._path = path
        self._max = max_bytes
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = orjson.dumps(record) + b"\n"
        with self._lock:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            try:
                if self._path.stat().st_size + len(line) > self._max:
                    os.replace(self._path, self._path.with_name(self._path.name + ".1"))
            except FileNotFoundError:
                pass
            with open(self._path, "ab") as f:
                f.write(line)


@dataclass
class _PromptCursor:
    consumed: int = 0          # audit entries fully handled (persisted)
    digest: str = ""           # digest of entry consumed-1 ("" when consumed == 0)
    read: int = 0              # entries turned into events (in memory, >= consumed)
    open: dict[int, int] = field(default_factory=dict)     # index -> deliveries not finished
    digests: dict[int, str] = field(default_factory=dict)  # index -> digest, while open


class CursorStore(Protocol):
    """Where the cursor is kept: a file under data_dir by default. A cluster whose pods have no
    persistent data_dir would keep it in the registry instead (one cursor for all replicas)."""

    def load(self) -> bytes | None:
        """The saved cursor, None when there is none yet."""
        ...

    def save(self, data: bytes) -> None: ...


class FileCursorStore:
    """The cursor in one JSON file, replaced atomically (write, fsync, rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def save(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


# -- the dispatcher ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Job:
    event: WebhookEvent


class _Subscriber:
    def __init__(self, config: WebhookSubscriber, secret: str, queue_max: int) -> None:
        self.config = config
        self.secret = secret
        self.host = urlsplit(config.url).netloc
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_max)
        self.task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:  # never the secret
        return f"<subscriber {self.config.name} {self.host}>"


class WebhookDispatcher:
    """Reads the audit log, delivers signed events, refreshes the rollout gauges.

    `start()` in the app's lifespan (with a running loop), `await aclose()` at shutdown. Tests
    drive it with `tick()` and `drain()`, and inject `retry_sleep`, `clock` and `rng`."""

    def __init__(self, settings: WebhookSettings, store: WebhookSource, data_dir: Path, *,
                 registry: CollectorRegistry | None = None,
                 rollout_metrics: RolloutMetrics | None = None,
                 environ: Mapping[str, str] | None = None,
                 cursor_store: CursorStore | None = None,
                 retry_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self._settings = s = settings
        self._store = store
        self._dir = Path(data_dir) / s.dir
        self._cursor_store = cursor_store or FileCursorStore(self._dir / "cursor.json")
        self._log = _DeliveryLog(self._dir / "deliveries.jsonl", s.delivery_log_max_bytes)
        self._rollout_metrics = rollout_metrics
        self._retry_sleep = retry_sleep
        self._clock = clock
        self._rng = rng or random.Random()
        env = os.environ if environ is None else environ
        self._subs: list[_Subscriber] = []
        for sub in s.subscribers:
            secret = env.get(sub.secret_env, "")
            if not secret:
                raise WebhookConfigError(f"webhook subscriber {sub.name!r}: environment variable "
                                         f"{sub.secret_env} (its signing secret) is not set")
            if len(secret.encode()) < MIN_SECRET_BYTES:
                raise WebhookConfigError(f"webhook subscriber {sub.name!r}: the secret in "
                                         f"{sub.secret_env} is shorter than {MIN_SECRET_BYTES} bytes")
            self._subs.append(_Subscriber(sub, secret, s.queue_max))
        self._cursors: dict[str, _PromptCursor] = {}
        self._first_start: bool | None = None  # unknown until the cursor file is read
        self._cursor_dirty = False
        self._dirty: set[str] = set()
        self._unlogged: list[dict[str, Any]] = []  # drops seen while scanning, written after it
        self._full_scan_due = True
        self._last_full_scan = -1e18
        self._last_metrics = -1e18
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._subscription: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._scan_lock: asyncio.Lock | None = None
        self._save_lock = asyncio.Lock()
        self._saving: asyncio.Future[None] | None = None  # the cursor write in progress
        self._registry = r = registry if registry is not None else CollectorRegistry()
        self._m_events = Counter("modgate_webhook_events", "Events read from the audit log, by type",
                                 ["type"], registry=r)
        self._m_deliveries = Counter(
            "modgate_webhook_deliveries", "Finished deliveries by subscriber and outcome (delivered, "
            "failed: refused by the receiver, gave_up: attempts exhausted)",
            ["subscriber", "outcome"], registry=r)
        self._m_attempts = Counter("modgate_webhook_attempts", "Delivery attempts by subscriber",
                                   ["subscriber"], registry=r)
        self._m_dropped = Counter("modgate_webhook_dropped", "Events dropped because the "
                                  "subscriber's queue was full", ["subscriber"], registry=r)
        self._m_latency = Histogram("modgate_webhook_attempt_seconds", "Duration of one delivery "
                                    "attempt", ["subscriber"], registry=r)
        self._m_queue = Gauge("modgate_webhook_queue_depth", "Events waiting per subscriber",
                              ["subscriber"], registry=r)
        self._m_resets = Counter("modgate_webhook_cursor_resets", "Prompts whose audit log no "
                                 "longer matched the cursor (the cursor restarted at its end)",
                                 registry=r)
        for subscriber in self._subs:
            name = subscriber.config.name
            self._m_queue.labels(subscriber=name).set_function(subscriber.queue.qsize)
            for outcome in ("delivered", "failed", "gave_up"):
                self._m_deliveries.labels(subscriber=name, outcome=outcome)
            self._m_dropped.labels(subscriber=name)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def subscribers(self) -> list[str]:
        return [s.config.name for s in self._subs]

    def dropped(self, subscriber: str) -> int:
        """Events dropped for *subscriber* because its queue was full."""
        value = self._registry.get_sample_value("modgate_webhook_dropped_total",
                                                {"subscriber": subscriber})
        return int(value or 0)

    def start(self) -> None:
        """Start the loop and one delivery worker per subscriber (needs a running loop)."""
        self._ensure_loop_state()
        assert self._loop is not None
        if self._subs:
            self._session = self._new_session()
            try:
                self._subscription = self._store.subscribe(self._announced)
            except RegistryError as exc:
                log.warning("webhooks: no change announcements from the registry (%s); polling "
                            "every %.0f s", exc, self._settings.poll_interval_s)
            for sub in self._subs:
                sub.task = asyncio.ensure_future(self._worker(sub))
        self._task = asyncio.ensure_future(self._run())

    def _ensure_loop_state(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._scan_lock = asyncio.Lock()

    def _new_session(self) -> aiohttp.ClientSession:
        s = self._settings
        timeout = aiohttp.ClientTimeout(total=s.timeout_s, connect=s.timeout_s, sock_read=s.timeout_s)
        return aiohttp.ClientSession(timeout=timeout, trust_env=False,
                                     connector=aiohttp.TCPConnector(limit=max(4, len(self._subs) * 2)))

    async def aclose(self) -> None:
        """Stop reading, give queued deliveries `drain_timeout_s`, stop the workers, save the
        cursor (deliveries not finished are sent again after the next start)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            await asyncio.to_thread(subscription.close)
        with contextlib.suppress(TimeoutError):
            await self.drain(self._settings.drain_timeout_s, scan=False)
        for sub in self._subs:
            if sub.task is not None:
                sub.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sub.task
                sub.task = None
        await self._save_cursor()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def drain(self, timeout_s: float, *, scan: bool = True) -> None:
        """Read what is new (when *scan*), then wait until every queued delivery has finished;
        TimeoutError after *timeout_s*."""
        async with asyncio.timeout(timeout_s):
            if scan:
                await self.tick(full=True)
            for sub in self._subs:
                if sub.task is not None:
                    await sub.queue.join()
            await self._save_cursor()

    # -- reading the audit log -------------------------------------------------------------

    def _announced(self, prompt: str | None) -> None:
        """Store callback, from the store's thread."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(self._mark_dirty, prompt)

    def _mark_dirty(self, prompt: str | None) -> None:
        if prompt is None:
            self._full_scan_due = True
        else:
            self._dirty.add(prompt)
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        s = self._settings
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhooks: scan failed")
            wait = min(s.poll_interval_s, s.metrics_interval_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(s.min_tick_s)

    async def _read(self, fn: Callable[[], _T]) -> _T:
        async with asyncio.timeout(self._settings.store_timeout_s):
            return await asyncio.to_thread(fn)

    async def tick(self, *, full: bool = False) -> int:
        """One pass: read new audit entries (every prompt when *full* or due, else the prompts
        announced as changed), queue their events, refresh the rollout gauges when due, save the
        cursor. Returns the number of events queued."""
        self._ensure_loop_state()
        assert self._scan_lock is not None
        queued = 0
        async with self._scan_lock:
            if self._subs:
                queued = await self._scan(full)
                if self._unlogged:
                    records, self._unlogged = self._unlogged, []
                    await self._write_log(*records)
            now = time.monotonic()
            if self._rollout_metrics is not None and (
                    full or now - self._last_metrics >= self._settings.metrics_interval_s):
                self._last_metrics = now
                metrics = self._rollout_metrics
                try:
                    await self._read(lambda: metrics.refresh(self._store))
                except (RegistryError, TimeoutError) as exc:
                    metrics.refresh_errors += 1
                    log.warning("webhooks: rollout gauges not refreshed: %s", exc)
            await self._save_cursor()
        return queued

    async def _scan(self, full: bool) -> int:
        now = time.monotonic()
        if full or self._full_scan_due or now - self._last_full_scan >= self._settings.poll_interval_s:
            self._full_scan_due = False
            self._dirty.clear()
            try:
                prompts = await self._read(self._store.list_prompts)
            except (RegistryError, TimeoutError) as exc:
                self._full_scan_due = True
                log.warning("webhooks: registry unavailable: %s", exc)
                return 0
            self._last_full_scan = now
        else:
            prompts, self._dirty = sorted(self._dirty), set()
        if self._first_start is None:
            self._first_start = not await self._load_cursor()
        first_start, complete = self._first_start, True
        queued = 0
        for name in prompts:
            try:
                entries = await self._read(functools.partial(self._store.audit, name))
            except (RegistryError, TimeoutError) as exc:
                self._dirty.add(name)
                complete = False
                log.warning("webhooks: audit log of %s unavailable: %s", name, exc)
                continue
            queued += self._consume(name, entries, first_start=first_start)
        if first_start and complete:
            # Every prompt has its starting point: from now on a prompt the cursor does not
            # know is new. Saved now, so a restart does not skip what comes next.
            self._first_start = False
            self._cursor_dirty = True
        return queued

    def _consume(self, name: str, entries: list[AuditEntry], *, first_start: bool) -> int:
        cur = self._cursors.get(name)
        if cur is None:
            start = len(entries) if first_start and not self._settings.replay_history else 0
            cur = self._cursors[name] = _PromptCursor(consumed=start, read=start)
            if start:
                cur.digest = _digest(name, start - 1, entries[start - 1])
                self._cursor_dirty = True
        if cur.consumed > len(entries) or (
                cur.consumed and _digest(name, cur.consumed - 1, entries[cur.consumed - 1]) != cur.digest):
            log.warning("webhooks: the audit log of %s no longer matches the cursor (%d entries "
                        "consumed, %d now); restarting at its end", name, cur.consumed, len(entries))
            self._m_resets.inc()
            end = len(entries)
            self._cursors[name] = cur = _PromptCursor(
                consumed=end, read=end, digest=_digest(name, end - 1, entries[end - 1]) if end else "")
            self._cursor_dirty = True
            return 0
        queued = 0
        for index in range(cur.read, len(entries)):
            cur.digests[index] = _digest(name, index, entries[index])
            pending = 0
            for event in events_from_audit(name, index, entries[index]):
                self._m_events.labels(type=event.type).inc()
                for sub in self._subs:
                    if not sub.config.wants(event):
                        continue
                    try:
                        sub.queue.put_nowait(_Job(event))
                    except asyncio.QueueFull:
                        self._m_dropped.labels(subscriber=sub.config.name).inc()
                        self._unlogged.append(self._record(sub, event, attempt=0, status=None,
                                                           outcome="dropped", latency_s=None,
                                                           error="queue full"))
                        log.warning("webhooks: queue of %s full; event %s (%s) dropped",
                                    sub.config.name, event.id, event.type)
                        continue
                    pending += 1
                    queued += 1
            cur.open[index] = pending
        cur.read = len(entries)
        self._advance(name)
        return queued

    def _finish(self, event: WebhookEvent) -> None:
        cur = self._cursors.get(event.prompt)
        if cur is None or event.position not in cur.open:
            return  # the cursor was reset meanwhile
        cur.open[event.position] -= 1
        self._advance(event.prompt)

    def _advance(self, name: str) -> None:
        cur = self._cursors[name]
        while cur.open.get(cur.consumed, -1) == 0:
            del cur.open[cur.consumed]
            cur.digest = cur.digests.pop(cur.consumed)
            cur.consumed += 1
            self._cursor_dirty = True

    async def _load_cursor(self) -> bool:
        """Load the saved cursor; False when there is none (the very first start)."""
        raw = await self._read(self._cursor_store.load)
        if raw is None:
            return False
        try:
            data = orjson.loads(raw)
            if data.get("format") != _CURSOR_FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            cursors = {name: _PromptCursor(consumed=int(c["consumed"]), read=int(c["consumed"]),
                                           digest=str(c["digest"]))
                       for name, c in data["prompts"].items()}
        except (orjson.JSONDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Not guessed around: starting at the end would lose events, from the start repeat
            # them all. An operator decides (deleting the file starts at the current end).
            raise ValueError(f"webhook cursor unreadable ({exc}); no events are sent until it "
                             "is fixed or removed") from exc
        self._cursors.update(cursors)
        return True

    async def _save_cursor(self) -> None:
        """Write the cursor if it moved. One write at a time and in order, and a write whose
        waiter was cancelled (shutdown) is waited for before the next one, so an older cursor
        can never land after a newer one, nor after aclose() returned."""
        async with self._save_lock:
            if self._saving is not None:  # its waiter was cancelled: wait here instead
                try:
                    await asyncio.shield(self._saving)
                except Exception:
                    self._cursor_dirty = True
                self._saving = None
            if not self._cursor_dirty:
                return
            self._cursor_dirty = False
            await self._write_cursor()

    async def _write_cursor(self) -> None:
        data = orjson.dumps({"format": _CURSOR_FORMAT, "prompts": {
            name: {"consumed": c.consumed, "digest": c.digest}
            for name, c in sorted(self._cursors.items())}}, option=orjson.OPT_INDENT_2)
        self._saving = saving = asyncio.ensure_future(
            self._read(functools.partial(self._cursor_store.save, data)))
        try:
            await asyncio.shield(saving)  # cancelled: the write goes on, the next save waits
        except (OSError, RegistryError, TimeoutError):
            self._cursor_dirty = True
            log.exception("webhooks: cursor not saved")
        self._saving = None

    # -- delivering ------------------------------------------------------------------------

    async def _worker(self, sub: _Subscriber) -> None:
        while True:
            job = await sub.queue.get()
            try:
                await self._deliver(sub, job.event)
            except asyncio.CancelledError:
                raise  # unfinished: the cursor stays before it, so it is sent after a restart
            except Exception:
                log.exception("webhooks: delivery of %s to %s failed", job.event.id, sub.config.name)
                self._finish(job.event)
            else:
                self._finish(job.event)
            finally:
                sub.queue.task_done()

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt *attempt* (1-based): exponential, capped, with
        equal jitter; at least a receiver's Retry-After, within the cap."""
        s = self._settings
        ceiling = min(s.backoff_max_s, s.backoff_base_s * 2.0 ** (attempt - 1))
        delay = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, s.backoff_max_s))
        return delay

    async def _deliver(self, sub: _Subscriber, event: WebhookEvent) -> None:
        s = self._settings
        name = sub.config.name
        for attempt in range(1, s.max_attempts + 1):
            status, error, retry_after = None, None, None
            started = time.perf_counter()
            try:
                status, retry_after = await self._post(sub, event, attempt)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = type(exc).__name__
            latency = time.perf_counter() - started
            self._m_attempts.labels(subscriber=name).inc()
            self._m_latency.labels(subscriber=name).observe(latency)
            if status is not None and 200 <= status < 300:
                outcome = "delivered"
            elif status is not None and status not in _RETRY_STATUSES and status < 500:
                outcome = "failed"
            elif attempt == s.max_attempts:
                outcome = "gave_up"
            else:
                outcome = "retry"
            await self._write_log(self._record(sub, event, attempt=attempt, status=status,
                                               outcome=outcome, latency_s=latency, error=error))
            if outcome != "retry":
                self._m_deliveries.labels(subscriber=name, outcome=outcome).inc()
                if outcome != "delivered":
                    log.warning("webhooks: %s of %s to %s %s after %d attempt(s) (status %s, %s)",
                                event.type, event.prompt, name, outcome, attempt, status, error)
                return
            await self._retry_sleep(self.backoff(attempt, retry_after))

    async def _post(self, sub: _Subscriber, event: WebhookEvent, attempt: int) -> tuple[int, float | None]:
        if self._session is None:
            self._session = self._new_session()
        ts = int(self._clock())
        headers = {"Content-Type": "application/json", "User-Agent": "modgate-webhooks/1",
                   EVENT_ID_HEADER: event.id, EVENT_TYPE_HEADER: event.type,
                   ATTEMPT_HEADER: str(attempt), SIGNATURE_HEADER: sign(sub.secret, event.body, ts)}
        async with asyncio.timeout(self._settings.timeout_s):
            async with self._session.post(sub.config.url, data=event.body, headers=headers,
                                          allow_redirects=False) as resp:
                return resp.status, _retry_after(resp.headers.get("Retry-After"))

    def _record(self, sub: _Subscriber, event: WebhookEvent, *, attempt: int, status: int | None,
                outcome: str, latency_s: float | None, error: str | None) -> dict[str, Any]:
        """One delivery-log line: the URL's host only (a path or query may carry a token), the
        exception's class only (its message may quote the URL), never the secret."""
        return {"at": datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="milliseconds"),
                "event_id": event.id, "event": event.type, "prompt": event.prompt,
                "subscriber": sub.config.name, "host": sub.host, "attempt": attempt,
                "status": status, "outcome": outcome,
                "latency_ms": None if latency_s is None else round(latency_s * 1000, 2),
                "error": error}

    async def _write_log(self, *records: dict[str, Any]) -> None:
        def write() -> None:
            for record in records:
                self._log.write(record)

        try:
            await asyncio.to_thread(write)
        except OSError:
            log.exception("webhooks: delivery log not written")


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: the back-off applies
