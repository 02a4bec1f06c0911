"""Prompt store on Redis, for deployments with several gateway replicas.

Key schema (prefix `P`, default "modgate"; `N` is a prompt name):

    P:prompts              set    every prompt name
    P:prompt:N:versions    hash   version number -> version record (JSON)
    P:prompt:N:hashes      hash   content hash -> version number (publish dedup)
    P:prompt:N:seq         string last version number handed out
    P:prompt:N:labels      hash   label -> version number
    P:prompt:N:audit       list   audit entries (JSON), oldest first
    P:prompt:N:scorecards  hash   "<version>:<dataset sha256>" -> scorecard record (JSON)
    P:prompt:N:gate_policy string the prompt's gate policy record (JSON)
    P:prompt:N:gate_policy_rev string its revision (compare-and-set)
    P:prompt:N:four_eyes   string the prompt's four-eyes setting and approval requests (JSON)
    P:prompt:N:four_eyes_rev string its revision (compare-and-set)
    P:prompt:N:lifecycle   string the prompt's deprecated and blocked versions (JSON)
    P:prompt:N:lifecycle_rev string its revision (compare-and-set)
    P:prompt:N:rollout     string the prompt's current (or last) rollout (JSON)
    P:prompt:N:rollout_rev string its revision (compare-and-set)
    P:rollouts             set    prompts that have a rollout
    P:rollout:ID:stats     hash   shared rollout counters (HINCRBY from every gateway)
    P:rollout:ID:flips     list   newest flipped items (JSON), trimmed
    P:memo:REQUEST_ID      string verdict memo of a request under a rollout (JSON, with TTL)
    P:keys                 hash   API key id -> key record (JSON; secret stored hashed)
    P:events               pub/sub channel: {"prompt": N, "kind": "publish"|"label"|"rollout"|
                           "scorecard"|"gate_policy"|<a recorded audit action>}

Writes are Lua scripts, so each is atomic: a publish dedups, numbers, stores the record,
appends the audit entry and announces the change in one step; a label move checks the version
exists, compares-and-sets, audits and announces in one step; a scorecard write stores (or
replaces) the record and audits it in one step; a gate policy write compares-and-sets its
revision, stores, audits and announces in one step; a recorded decision (`record_audit`, e.g.
a promotion-gate refusal) appends its audit entry and announces it in one step. Nothing is
ever half written.

Durability: run Redis with `appendonly yes` and `appendfsync always` for no lost acknowledged
write (or `everysec` to risk at most one second of writes on power loss), on a persistent
volume, with `maxmemory-policy noeviction` so prompts are never evicted. The keys use no hash
tags: use a single primary (with replicas/sentinel) or a managed Redis without cluster mode.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
import redis

from prompt_registry.errors import (
    ApprovalConflict,
    GatePolicyConflict,
    LabelConflict,
    LifecycleConflict,
    PromptNotFound,
    StoreUnavailable,
)
from prompt_registry.gates import (
    FourEyesRecord,
    GatePolicy,
    ScorecardRecord,
    check_four_eyes_action,
    check_recorded_action,
    check_scorecard_version,
    scorecard_audit_note,
)
from prompt_registry.keys import ApiKeyRecord
from prompt_registry.lifecycle import LifecycleRecord
from prompt_registry.models import PromptSpec, PromptVersion
from prompt_registry.rollouts import Rollout, RolloutConflict
from prompt_registry.store import AuditEntry, PublishResult, Subscription

__all__ = ["RedisPromptStore"]

_PUBLISH = """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then return {0, tonumber(existing)} end
local v = redis.call('INCR', KEYS[2])
local record = '{"version":' .. v .. ',' .. string.sub(ARGV[2], 2)
redis.call('HSET', KEYS[3], v, record)
redis.call('HSET', KEYS[1], ARGV[1], v)
redis.call('SADD', KEYS[5], ARGV[4])
redis.call('RPUSH', KEYS[4], '{"to_version":' .. v .. ',' .. string.sub(ARGV[3], 2))
redis.call('PUBLISH', KEYS[6], ARGV[5])
return {1, v}
"""

_SET_LABEL = """
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then return {-1, ''} end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[3] ~= '' and (cur or '0') ~= ARGV[3] then return {-2, cur or ''} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[3], '{"from_version":' .. (cur or 'null') .. ',' .. string.sub(ARGV[4], 2))
redis.call('PUBLISH', KEYS[4], ARGV[5])
return {1, cur or ''}
"""

# KEYS: scorecards hash, audit, events
# ARGV: field "<version>:<sha256>", record, audit entry (new), audit entry (replacing), event
_PUT_SCORECARD = """
local existed = redis.call('HEXISTS', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if existed == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[4])
else
  redis.call('RPUSH', KEYS[2], ARGV[3])
end
redis.call('PUBLISH', KEYS[3], ARGV[5])
return existed
"""

# KEYS: record, record_rev, audit, prompts set, events (gate_policy, four_eyes, lifecycle)
# ARGV: record, expected revision, new revision, audit entry, prompt name, event
_PUT_GATE_POLICY = """
if redis.call('SISMEMBER', KEYS[4], ARGV[5]) == 0 then return {-1, ''} end
local rev = redis.call('GET', KEYS[2]) or '0'
if rev ~= ARGV[2] then return {-2, rev} end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[3])
redis.call('RPUSH', KEYS[3], ARGV[4])
redis.call('PUBLISH', KEYS[5], ARGV[6])
return {1, rev}
"""

# KEYS: audit, prompts set, events
# ARGV: audit entry, prompt name, event
_RECORD_AUDIT = """
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 0 then return -1 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[3], ARGV[3])
return 1
"""

# KEYS: rollout, rollout_rev, audit, rollouts set, events
# ARGV: record, expected "<id>:<revision>" or "", new "<id>:<revision>", audit entry,
#       "1" if the stored rollout is active, prompt name, event
_PUT_ROLLOUT = """
local rev = redis.call('GET', KEYS[2])
if ARGV[2] == '' then
  if rev and ARGV[5] == '1' then return {-1} end
elseif rev ~= ARGV[2] then
  return {-2}
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[3])
redis.call('RPUSH', KEYS[3], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[6])
redis.call('PUBLISH', KEYS[5], ARGV[7])
return {1}
"""


def _now() -> datetime:
    return datetime.now(UTC)


class RedisPromptStore:
    """`PromptStore` on a real Redis server. Thread-safe (one connection pool)."""

    def __init__(self, url: str, *, prefix: str = "modgate", timeout_s: float = 1.0) -> None:
        self._url = url
        self._prefix = prefix
        self._r = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            health_check_interval=15, decode_responses=False)
        self._publish = self._r.register_script(_PUBLISH)
        self._set_label = self._r.register_script(_SET_LABEL)
        self._put_rollout = self._r.register_script(_PUT_ROLLOUT)
        self._put_scorecard = self._r.register_script(_PUT_SCORECARD)
        self._put_gate_policy = self._r.register_script(_PUT_GATE_POLICY)
        self._record_audit = self._r.register_script(_RECORD_AUDIT)
        self._events = f"{prefix}:events"

    def _k(self, name: str, part: str) -> str:
        return f"{self._prefix}:prompt:{name}:{part}"

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"Redis at {_redact(self._url)} unreachable: {exc}") from exc

    @staticmethod
    def _decode(raw: bytes) -> PromptVersion:
        data = orjson.loads(raw)
        return PromptVersion(spec=PromptSpec.model_validate(data["spec"]), version=data["version"],
                             content_hash=data["content_hash"],
                             created_at=datetime.fromisoformat(data["created_at"]),
                             created_by=data["created_by"])

    # -- reader ---------------------------------------------------------------------------
    def get_version(self, name: str, version: int) -> PromptVersion:
        raw = self._call(lambda: self._r.hget(self._k(name, "versions"), str(version)))
        if raw is None:
            if not self._exists(name):
                raise PromptNotFound(f"unknown prompt {name!r}")
            raise PromptNotFound(f"prompt {name!r} has no version {version}")
        return self._decode(raw)

    def resolve(self, name: str, label: str) -> PromptVersion:
        # Two reads in one round trip would need Lua; a label read then a version read is
        # consistent because versions are immutable and never deleted.
        version = self._call(lambda: self._r.hget(self._k(name, "labels"), label))
        if version is None:
            if not self._exists(name):
                raise PromptNotFound(f"unknown prompt {name!r}")
            raise PromptNotFound(f"prompt {name!r} has no label {label!r}")
        return self.get_version(name, int(version))

    def list_prompts(self) -> list[str]:
        names = self._call(lambda: self._r.smembers(f"{self._prefix}:prompts"))
        return sorted(n.decode() for n in names)

    def labels(self, name: str) -> dict[str, int]:
        raw = self._call(lambda: self._r.hgetall(self._k(name, "labels")))
        return {k.decode(): int(v) for k, v in sorted(raw.items())}

    def versions(self, name: str) -> list[int]:
        raw = self._call(lambda: self._r.hkeys(self._k(name, "versions")))
        return sorted(int(v) for v in raw)

    def _exists(self, name: str) -> bool:
        return bool(self._call(lambda: self._r.sismember(f"{self._prefix}:prompts", name)))

    # -- writer ---------------------------------------------------------------------------
    def publish(self, spec: PromptSpec, *, actor: str, note: str = "") -> PublishResult:
        spec.check_renders()  # publish-time only: versions already stored keep loading
        digest = spec.content_hash()
        now = _now()
        record = orjson.dumps({"content_hash": digest, "spec": spec.model_dump(mode="json"),
                               "created_at": now.isoformat(), "created_by": actor})
        audit = orjson.dumps({"at": now.isoformat(), "actor": actor, "action": "publish",
                              "prompt": spec.name, "label": None, "from_version": None,
                              "note": note or spec.policy.change_note})
        event = orjson.dumps({"prompt": spec.name, "kind": "publish"})
        keys = [self._k(spec.name, "hashes"), self._k(spec.name, "seq"),
                self._k(spec.name, "versions"), self._k(spec.name, "audit"),
                f"{self._prefix}:prompts", self._events]
        created, number = self._call(
            lambda: self._publish(keys=keys, args=[digest, record, audit, spec.name, event]))
        return PublishResult(version=self.get_version(spec.name, int(number)), created=bool(created))

    def set_label(self, name: str, label: str, version: int, *, expected: int | None = None,
                  actor: str, note: str = "") -> int | None:
        audit = orjson.dumps({"at": _now().isoformat(), "actor": actor, "action": "label",
                              "prompt": name, "label": label, "to_version": version, "note": note})
        event = orjson.dumps({"prompt": name, "kind": "label"})
        keys = [self._k(name, "labels"), self._k(name, "versions"), self._k(name, "audit"),
                self._events]
        status, current = self._call(lambda: self._set_label(
            keys=keys, args=[label, str(version), "" if expected is None else str(expected),
                             audit, event]))
        if status == -1:
            if not self._exists(name):
                raise PromptNotFound(f"unknown prompt {name!r}")
            raise PromptNotFound(f"prompt {name!r} has no version {version}")
        previous = int(current) if current else None
        if status == -2:
            raise LabelConflict(f"label {label!r} of {name!r} points at {previous}, not {expected}")
        return previous

    def record_audit(self, name: str, action: str, *, label: str | None = None,
                     from_version: int | None = None, to_version: int | None = None,
                     actor: str, note: str = "") -> None:
        check_recorded_action(action)
        audit = orjson.dumps({"at": _now().isoformat(), "actor": actor, "action": action,
                              "prompt": name, "label": label, "from_version": from_version,
                              "to_version": to_version, "note": note})
        event = orjson.dumps({"prompt": name, "kind": action})
        keys = [self._k(name, "audit"), f"{self._prefix}:prompts", self._events]
        status = self._call(lambda: self._record_audit(keys=keys, args=[audit, name, event]))
        if status == -1:
            raise PromptNotFound(f"unknown prompt {name!r}")

    def audit(self, name: str) -> list[AuditEntry]:
        raw = self._call(lambda: self._r.lrange(self._k(name, "audit"), 0, -1))
        return [AuditEntry.model_validate(orjson.loads(r)) for r in raw]

    def get_rollout(self, prompt: str) -> Rollout | None:
        raw = self._call(lambda: self._r.get(self._k(prompt, "rollout")))
        return Rollout.model_validate_json(raw) if raw else None

    def list_rollouts(self) -> list[Rollout]:
        names = self._call(lambda: self._r.smembers(f"{self._prefix}:rollouts"))
        out = [self.get_rollout(n.decode()) for n in sorted(names)]
        return [r for r in out if r is not None]

    def put_rollout(self, rollout: Rollout, *, expected_revision: int | None, actor: str,
                    note: str = "") -> None:
        current = self.get_rollout(rollout.prompt)
        audit = orjson.dumps({"at": _now().isoformat(), "actor": actor, "action": "rollout",
                              "prompt": rollout.prompt, "label": rollout.state,
                              "from_version": rollout.stable_version,
                              "to_version": rollout.canary_version, "note": note})
        event = orjson.dumps({"prompt": rollout.prompt, "kind": "rollout"})
        keys = [self._k(rollout.prompt, "rollout"), self._k(rollout.prompt, "rollout_rev"),
                self._k(rollout.prompt, "audit"), f"{self._prefix}:rollouts", self._events]
        current_active = "1" if current is not None and current.active else "0"
        expected = "" if expected_revision is None else f"{rollout.id}:{expected_revision}"
        (status,) = self._call(lambda: self._put_rollout(keys=keys, args=[
            rollout.model_dump_json(), expected, f"{rollout.id}:{rollout.revision}", audit,
            current_active, rollout.prompt, event]))
        if status == -1:
            raise RolloutConflict(f"prompt {rollout.prompt!r} already has an active rollout")
        if status == -2:
            raise RolloutConflict(f"rollout of {rollout.prompt!r} changed concurrently "
                                  f"(expected revision {expected_revision})")

    def put_scorecard(self, record: ScorecardRecord, *, actor: str, note: str = "") -> bool:
        # Versions are immutable and never deleted, so checking the version before the script
        # runs cannot be invalidated by a concurrent write.
        version = self.get_version(record.prompt, record.version)
        check_scorecard_version(record, version.content_hash)
        name = record.prompt
        audits = [orjson.dumps({"at": _now().isoformat(), "actor": actor, "action": "scorecard",
                                "prompt": name, "label": None, "from_version": None,
                                "to_version": record.version,
                                "note": scorecard_audit_note(record, note, replaced=replaced)})
                  for replaced in (False, True)]
        event = orjson.dumps({"prompt": name, "kind": "scorecard"})
        keys = [self._k(name, "scorecards"), self._k(name, "audit"), self._events]
        existed = self._call(lambda: self._put_scorecard(keys=keys, args=[
            f"{record.version}:{record.dataset_sha256}", record.model_dump_json(), *audits, event]))
        return bool(existed)

    def get_scorecard(self, name: str, version: int, dataset_sha256: str) -> ScorecardRecord | None:
        raw = self._call(lambda: self._r.hget(self._k(name, "scorecards"), f"{version}:{dataset_sha256}"))
        return ScorecardRecord.model_validate_json(raw) if raw else None

    def list_scorecards(self, name: str, version: int | None = None) -> list[ScorecardRecord]:
        raw = self._call(lambda: self._r.hgetall(self._k(name, "scorecards")))
        records = [ScorecardRecord.model_validate_json(v) for k, v in raw.items()
                   if version is None or k.decode().split(":", 1)[0] == str(version)]
        return sorted(records, key=lambda r: (r.version, r.created_at, r.dataset_sha256))

    def get_gate_policy(self, name: str) -> GatePolicy | None:
        raw = self._call(lambda: self._r.get(self._k(name, "gate_policy")))
        return GatePolicy.model_validate_json(raw) if raw else None

    def put_gate_policy(self, policy: GatePolicy, *, expected_revision: int, actor: str,
                        note: str = "") -> None:
        self._put_revisioned("gate_policy", "gate policy", "the gate policy", GatePolicyConflict,
                             policy.prompt, policy.model_dump_json(), policy.revision,
                             expected_revision, actor=actor, action="gate_policy",
                             label="gate-policy", note=note)

    def get_four_eyes(self, name: str) -> FourEyesRecord | None:
        raw = self._call(lambda: self._r.get(self._k(name, "four_eyes")))
        return FourEyesRecord.model_validate_json(raw) if raw else None

    def put_four_eyes(self, record: FourEyesRecord, *, expected_revision: int, actor: str,
                      action: str, label: str | None = None, from_version: int | None = None,
                      to_version: int | None = None, note: str = "") -> None:
        check_four_eyes_action(action)
        self._put_revisioned("four_eyes", "four-eyes", "the four-eyes record", ApprovalConflict,
                             record.prompt, record.model_dump_json(), record.revision,
                             expected_revision, actor=actor, action=action, label=label,
                             from_version=from_version, to_version=to_version, note=note)

    def get_lifecycle(self, name: str) -> LifecycleRecord | None:
        raw = self._call(lambda: self._r.get(self._k(name, "lifecycle")))
        return LifecycleRecord.model_validate_json(raw) if raw else None

    def put_lifecycle(self, record: LifecycleRecord, *, expected_revision: int, actor: str,
                      version: int, note: str = "") -> None:
        self._put_revisioned("lifecycle", "lifecycle", "the version states", LifecycleConflict,
                             record.prompt, record.model_dump_json(), record.revision,
                             expected_revision, actor=actor, action="lifecycle",
                             to_version=version, note=note)

    def _put_revisioned(self, part: str, noun: str, what: str, conflict: type[LabelConflict],
                        name: str, record_json: str, revision: int, expected_revision: int, *,
                        actor: str, action: str, label: str | None = None,
                        from_version: int | None = None, to_version: int | None = None,
                        note: str = "") -> None:
        """One per-prompt record (gate policy, four eyes, version states) at `P:prompt:N:<part>`,
        compared-and-set on `<part>_rev`, stored, audited and announced by one script."""
        if revision != expected_revision + 1:
            raise conflict(f"{noun} revision {revision} does not follow revision {expected_revision}")
        audit = orjson.dumps({"at": _now().isoformat(), "actor": actor, "action": action,
                              "prompt": name, "label": label, "from_version": from_version,
                              "to_version": to_version, "note": note})
        event = orjson.dumps({"prompt": name, "kind": action})
        keys = [self._k(name, part), self._k(name, f"{part}_rev"),
                self._k(name, "audit"), f"{self._prefix}:prompts", self._events]
        status, current = self._call(lambda: self._put_gate_policy(keys=keys, args=[
            record_json, str(expected_revision), str(revision), audit, name, event]))
        if status == -1:
            raise PromptNotFound(f"unknown prompt {name!r}")
        if status == -2:
            raise conflict(f"{what} of {name!r} is at revision {int(current)}, not "
                           f"{expected_revision} (changed concurrently)")

    def add_rollout_stats(self, rollout_id: str, counters: dict[str, int],
                          flips: list[str] | None = None, *, keep_flips: int = 500) -> None:
        def work() -> None:
            pipe = self._r.pipeline(transaction=True)
            key = f"{self._prefix}:rollout:{rollout_id}:stats"
            for k, v in counters.items():
                pipe.hincrby(key, k, v)
            if flips:
                fkey = f"{self._prefix}:rollout:{rollout_id}:flips"
                pipe.lpush(fkey, *flips)
                pipe.ltrim(fkey, 0, keep_flips - 1)
            pipe.execute()
        self._call(work)

    def rollout_stats(self, rollout_id: str) -> dict[str, int]:
        raw = self._call(lambda: self._r.hgetall(f"{self._prefix}:rollout:{rollout_id}:stats"))
        return {k.decode(): int(v) for k, v in raw.items()}

    def rollout_flips(self, rollout_id: str, limit: int = 100) -> list[str]:
        raw = self._call(lambda: self._r.lrange(f"{self._prefix}:rollout:{rollout_id}:flips", 0, limit - 1))
        return [r.decode() for r in raw]

    def remember_verdicts(self, memos: dict[str, str], *, ttl_s: float) -> None:
        def work() -> None:
            pipe = self._r.pipeline(transaction=False)
            for rid, rec in memos.items():
                pipe.set(f"{self._prefix}:memo:{rid}", rec, ex=max(1, int(ttl_s)))
            pipe.execute()
        self._call(work)

    def recall_verdict(self, request_id: str) -> str | None:
        raw = self._call(lambda: self._r.get(f"{self._prefix}:memo:{request_id}"))
        return raw.decode() if raw else None

    def get_key(self, key_id: str) -> ApiKeyRecord | None:
        raw = self._call(lambda: self._r.hget(f"{self._prefix}:keys", key_id))
        return ApiKeyRecord.model_validate_json(raw) if raw else None

    def put_key(self, record: ApiKeyRecord) -> None:
        self._call(lambda: self._r.hset(f"{self._prefix}:keys", record.key_id, record.model_dump_json()))

    def list_keys(self) -> list[ApiKeyRecord]:
        raw = self._call(lambda: self._r.hgetall(f"{self._prefix}:keys"))
        return [ApiKeyRecord.model_validate_json(v) for _, v in sorted(raw.items())]

    # -- change events --------------------------------------------------------------------
    def subscribe(self, callback: Callable[[str | None], None]) -> Subscription:
        """Call `callback(prompt_name)` on every change; `callback(None)` after a reconnect
        (changes may have been missed while disconnected, so everything must be re-read)."""
        return _RedisSubscription(self._r, self._events, callback)

    def ping(self) -> None:
        self._call(self._r.ping)

    def close(self) -> None:
        self._r.close()


class _PubSub(Protocol):
    """What _RedisSubscription uses of redis-py's sync PubSub, whose methods are unannotated."""

    def subscribe(self, *channels: str) -> None: ...

    def get_message(self, ignore_subscribe_messages: bool = False,
                    timeout: float = 0.0) -> dict[str, Any] | None: ...

    def close(self) -> None: ...


class _RedisSubscription:
    def __init__(self, client: redis.Redis, channel: str,
                 callback: Callable[[str | None], None]) -> None:
        self._client = client
        self._channel = channel
        self._callback = callback
        self._stop = threading.Event()
        # Subscribe before returning, so no change made after subscribe() can be missed.
        self._pubsub: _PubSub | None = None
        try:
            self._pubsub = self._connect()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self._pubsub = None
        self._thread = threading.Thread(target=self._run, name="modgate-registry-events", daemon=True)
        self._thread.start()

    def _connect(self) -> _PubSub:
        # redis-py annotates the asyncio client's pubsub() but not the sync client's.
        pubsub: _PubSub = self._client.pubsub(ignore_subscribe_messages=False)  # type: ignore[no-untyped-call]
        pubsub.subscribe(self._channel)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # wait for the server's confirmation
            msg = pubsub.get_message(timeout=0.5)
            if msg and msg.get("type") == "subscribe":
                return pubsub
        pubsub.close()
        raise redis.TimeoutError("no subscribe confirmation")

    def _run(self) -> None:
        backoff = 0.1
        pubsub = self._pubsub
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self._connect()
                    self._callback(None)  # changes may have been missed while disconnected
                    backoff = 0.1
                msg = pubsub.get_message(timeout=0.5)
                if msg and msg.get("type") == "message":
                    try:
                        self._callback(orjson.loads(msg["data"]).get("prompt"))
                    except orjson.JSONDecodeError:
                        self._callback(None)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except (redis.RedisError, OSError):
                        pass
                pubsub = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        if pubsub is not None:
            try:
                pubsub.close()
            except (redis.RedisError, OSError):
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _redact(url: str) -> str:
    """Drop credentials from a Redis URL before it goes into a message."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


