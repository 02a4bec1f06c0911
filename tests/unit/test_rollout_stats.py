"""Typed rollout statistics (prompt_registry.rollout_stats): the counter-key codec, building
`RolloutStats` from a store's counters, and the recorder writing through the codec.

The stored key strings are pinned literally here: they are what SQLite and Redis hold for
rollouts already running, so a change to the codec that alters one is a data migration, not a
refactoring."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable

import orjson
import pytest

from gateway.rollouts.recorder import RolloutRecorder, flips_view
from gateway.verdict import Verdict
from prompt_registry import StoreUnavailable
from prompt_registry.rollout_stats import (
    ARMS,
    LATENCY_BUCKETS_MS,
    ArmCount,
    ArmFlag,
    ArmLatency,
    CounterKey,
    FeedbackCount,
    FeedbackOutcome,
    Flip,
    FlipVerdict,
    PairConfusion,
    PairCount,
    PairFlag,
    build_rollout_stats,
    decode_key,
    encode_key,
    latency_bucket,
)

# -- the codec ----------------------------------------------------------------------------

STORED_FORMAT: list[tuple[CounterKey, str]] = [
    (ArmCount("stable", "requests"), "stable:requests"),
    (ArmCount("canary", "errors"), "canary:errors"),
    (ArmCount("canary", "verdicts"), "canary:verdicts"),
    (ArmCount("canary", "parse_failures"), "canary:parse_failures"),
    (ArmFlag("canary", "spam"), "canary:flag:spam"),
    (ArmFlag("stable", "none"), "stable:flag:none"),
    (ArmLatency("canary", 25), "canary:lat:25"),
    (ArmLatency("stable", None), "stable:lat:inf"),
    (FeedbackCount("canary"), "fb:canary:n"),
    (FeedbackOutcome("canary", "tp", "spam"), "fb:canary:tp:spam"),
    (FeedbackOutcome("stable", "fp", "weapons"), "fb:stable:fp:weapons"),
    (FeedbackOutcome("stable", "fn", "scam"), "fb:stable:fn:scam"),
    (PairCount(3, "n"), "pair:3:n"),
    (PairCount(3, "agree"), "pair:3:agree"),
    (PairCount(12, "errors"), "pair:12:errors"),
    (PairCount(12, "dropped"), "pair:12:dropped"),
    (PairConfusion(2, "none", "spam"), "pair:2:cm:none:spam"),
    (PairFlag(2, "stable", "spam"), "pair:2:sflag:spam"),
    (PairFlag(2, "candidate", "none"), "pair:2:cflag:none"),
]


@pytest.mark.parametrize(("counter", "key"), STORED_FORMAT, ids=[k for _, k in STORED_FORMAT])
def test_keys_are_the_stored_format(counter: CounterKey, key: str) -> None:
    assert encode_key(counter) == key
    assert decode_key(key) == counter


def _every_counter() -> list[CounterKey]:
    """Every counter over small but representative value sets (each field varied)."""
    cats = ["none", "spam", "weapons_and_ammo"]
    versions = [1, 2, 10, 2**31 - 1]
    out: list[CounterKey] = []
    for arm in ARMS:
        out += [ArmCount(arm, f) for f in ("requests", "errors", "verdicts", "parse_failures")]
        out += [ArmFlag(arm, c) for c in cats]
        out += [ArmLatency(arm, b) for b in (*LATENCY_BUCKETS_MS, 7, None)]
        out += [FeedbackCount(arm)]
        out += [FeedbackOutcome(arm, o, c) for o in ("tp", "fp", "fn") for c in cats]
    for v in versions:
        out += [PairCount(v, f) for f in ("n", "agree", "errors", "dropped")]
        out += [PairConfusion(v, a, b) for a, b in itertools.product(cats, repeat=2)]
        out += [PairFlag(v, s, c) for s in ("stable", "candidate") for c in cats]
    return out


def test_every_counter_round_trips_to_a_distinct_key() -> None:
    counters = _every_counter()
    keys = [encode_key(c) for c in counters]
    assert len(set(keys)) == len(counters)  # no two counters share a key
    assert [decode_key(k) for k in keys] == counters


@pytest.mark.parametrize("key", [
    "", ":", "canary", "canary:", "canary:bogus", "canary:requests:extra", "pinned:requests",
    "Canary:requests", "canary:flag:", "canary:flag:a:b", "canary:lat:", "canary:lat:abc",
    "canary:lat:0", "canary:lat:025", "canary:lat:-5", "canary:lat:2.5", "canary:lat:\u0663",
    "fb", "fb:canary", "fb:pinned:n", "fb:canary:n:x", "fb:canary:tn:spam", "fb:canary:tp",
    "fb:canary:tp:", "pair", "pair:2", "pair:0:n", "pair:02:n", "pair:-1:n", "pair:x:n",
    "pair:2:bogus", "pair:2:cm:spam", "pair:2:cm::spam", "pair:2:cm:a:b:c", "pair:2:sflag",
    "pair:2:xflag:spam", "pair:2:sflag:a:b", "pair:2:n:extra",
])
def test_malformed_keys_decode_to_none(key: str) -> None:
    assert decode_key(key) is None


def test_no_key_near_a_valid_one_crashes_the_decoder() -> None:
    """Every prefix and every single-character deletion of the stored keys decodes to None or
    to a counter that encodes back to exactly that key."""
    variants: set[str] = set()
    for _, key in STORED_FORMAT:
        variants.update(key[:i] for i in range(len(key) + 1))
        variants.update(key[:i] + key[i + 1:] for i in range(len(key)))
        variants.update(key[:i] + ":" + key[i:] for i in range(len(key) + 1))
    decoded = 0
    for v in variants:
        c = decode_key(v)
        if c is not None:
            decoded += 1
            assert encode_key(c) == v
    assert 0 < decoded < len(variants)


@pytest.mark.parametrize("make", [
    lambda: ArmCount("pinned", "requests"),  # type: ignore[arg-type]
    lambda: ArmCount("canary", "flags"),  # type: ignore[arg-type]
    lambda: ArmFlag("canary", "a:b"),
    lambda: ArmFlag("canary", ""),
    lambda: ArmLatency("canary", 0),
    lambda: FeedbackOutcome("canary", "tn", "spam"),  # type: ignore[arg-type]
    lambda: PairCount(0, "n"),
    lambda: PairCount(True, "n"),
    lambda: PairConfusion(2, "spam", "x:y"),
    lambda: PairFlag(2, "both", "spam"),  # type: ignore[arg-type]
])
def test_counters_that_would_not_round_trip_are_refused(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize(("ms", "bucket"), [(0.0, 25), (25.0, 25), (25.01, 50), (25600.0, 25600),
                                             (25600.5, None), (1e9, None)])
def test_latency_buckets(ms: float, bucket: int | None) -> None:
    assert latency_bucket(ms) == bucket


# -- building RolloutStats ----------------------------------------------------------------

RAW = {
    "canary:requests": 110, "canary:errors": 10, "canary:verdicts": 100, "canary:parse_failures": 4,
    "canary:flag:spam": 20, "canary:flag:none": 4,
    "canary:lat:25": 50, "canary:lat:100": 44, "canary:lat:inf": 6,
    "stable:requests": 900, "stable:verdicts": 900, "stable:flag:spam": 90, "stable:lat:50": 900,
    "fb:canary:n": 30, "fb:canary:tp:spam": 12, "fb:canary:fp:spam": 4, "fb:canary:fn:spam": 2,
    "fb:canary:fn:scam": 1, "fb:stable:n": 5, "fb:stable:tp:spam": 5,
    "pair:2:n": 40, "pair:2:agree": 30, "pair:2:errors": 1, "pair:2:dropped": 2,
    "pair:2:cm:none:none": 25, "pair:2:cm:spam:spam": 5, "pair:2:cm:none:spam": 10,
    "pair:2:sflag:spam": 5, "pair:2:cflag:spam": 15,
    "pair:3:dropped": 7,
    "pinned:requests": 3, "canary:lat:soon": 1,
}


def test_build_reads_every_counter() -> None:
    s = build_rollout_stats(RAW)
    c = s.canary
    assert (c.requests, c.errors, c.verdicts, c.parse_failures) == (110, 10, 100, 4)
    assert c.flags == {"spam": 20, "none": 4}
    assert c.flag_rates == {"spam": 0.2, "none": 0.04}
    assert c.latency.total == 100
    assert c.p95_ms == math.inf  # 94 of 100 within 100 ms: the 95th is in the overflow bucket
    assert c.latency.quantile(0.5) == 25.0 and c.latency.quantile(0.9) == 100.0
    assert s.stable.p95_ms == 50.0 and s.stable.errors == 0
    assert c.feedback.n == 30
    spam = c.feedback.category("spam")
    assert (spam.tp, spam.fp, spam.fn) == (12, 4, 2)
    assert spam.precision == 12 / 16 and spam.recall == 12 / 14
    assert c.feedback.category("scam").precision is None and c.feedback.category("scam").recall == 0.0
    assert c.feedback.category("weapons").tp == 0  # never labelled: zeros, not a KeyError
    p = s.pair(2)
    assert (p.n, p.agree, p.errors, p.dropped) == (40, 30, 1, 2)
    assert p.agreement == 0.75
    assert p.confusion == {"none": {"none": 25, "spam": 10}, "spam": {"spam": 5}}
    assert p.stable_flags == {"spam": 5} and p.candidate_flags == {"spam": 15}
    # kappa by hand: po = 30/40; stable none 35, spam 5; candidate none 25, spam 15
    pe = (35 / 40) * (25 / 40) + (5 / 40) * (15 / 40)
    assert p.kappa == pytest.approx((30 / 40 - pe) / (1 - pe))
    assert s.pair(3).dropped == 7 and s.pair(3).agreement is None
    assert s.pair(9).n == 0  # a version never shadowed
    assert s.unknown == {"pinned:requests": 3, "canary:lat:soon": 1}


def test_status_json_shape() -> None:
    """`stats` in `modgate rollouts status --json` and the admin API, as it was when the
    gateway built it from nested dicts: an arm without counters is {}, pairs keyed by str."""
    d = build_rollout_stats({"canary:requests": 2, "canary:verdicts": 2, "canary:flag:spam": 1,
                             "canary:lat:50": 2, "fb:canary:tp:spam": 1, "pair:4:n": 2,
                             "pair:4:agree": 2, "pair:4:cm:spam:spam": 2}).as_dict()
    assert d == {
        "stable": {},
        "canary": {"requests": 2, "errors": 0, "verdicts": 2, "parse_failures": 0, "flags": {"spam": 1},
                   "latency_ms_hist": {"50": 2},
                   "feedback": {"n": 0, "categories": {"spam": {"tp": 1, "fp": 0, "fn": 0, "precision": 1.0,
                                                                "recall": 1.0}}},
                   "p95_ms": 50.0, "flag_rates": {"spam": 0.5}},
        "pairs": {"4": {"n": 2, "agree": 2, "errors": 0, "dropped": 0, "confusion": {"spam": {"spam": 2}},
                        "stable_flags": {}, "candidate_flags": {}, "agreement": 1.0, "kappa": 1.0}},
    }
    assert orjson.loads(orjson.dumps(build_rollout_stats(RAW).as_dict()))["canary"]["latency_ms_hist"] == {
        "25": 50, "100": 44, "inf": 6}


def test_empty_counters_give_zero_stats() -> None:
    s = build_rollout_stats({})
    assert s.canary.requests == 0 and s.canary.p95_ms is None and s.canary.flag_rates == {}
    assert s.as_dict() == {"stable": {}, "canary": {}, "pairs": {}}


# -- the recorder writes through the codec -----------------------------------------------

class FakeStore:
    """The two store calls the recorder makes; `fail` makes the next flushes fail."""

    def __init__(self) -> None:
        self.counters: dict[str, dict[str, int]] = {}
        self.flips: dict[str, list[str]] = {}
        self.memos: dict[str, str] = {}
        self.fail = False

    def add_rollout_stats(self, rollout_id: str, counters: dict[str, int], flips: list[str] | None = None,
                          *, keep_flips: int = 500) -> None:
        if self.fail:
            raise StoreUnavailable("down")
        c = self.counters.setdefault(rollout_id, {})
        for k, v in counters.items():
            c[k] = c.get(k, 0) + v
        self.flips.setdefault(rollout_id, [])[:0] = list(reversed(flips or []))

    def remember_verdicts(self, memos: dict[str, str], *, ttl_s: float) -> None:
        self.memos.update(memos)


ALLOW = Verdict("allow", "none", 0.9)
SPAM = Verdict("reject", "spam", 0.9)
BROKEN = Verdict("needs_review", None, None, fail_reason="unparseable")


def _record(rec: RolloutRecorder) -> None:
    rec.primary("r1", "canary", SPAM, 30.0)
    rec.primary("r1", "canary", BROKEN, 30000.0)
    rec.primary("r1", "canary", None, 5.0)
    rec.primary("r1", "stable", ALLOW, 10.0)
    rec.primary("r1", "pinned", ALLOW, 10.0)  # not a rollout arm: not counted
    rec.feedback("r1", "canary", SPAM, ALLOW)  # flagged, reviewer says fine: fp
    rec.feedback("r1", "canary", SPAM, SPAM)  # tp
    rec.feedback("r1", "stable", ALLOW, SPAM)  # missed: fn
    rec.feedback("r1", "bogus", ALLOW, SPAM)  # damaged memo: not counted
    rec.pair("r1", 2, ALLOW, SPAM, request_id="q1", item_id="i1", stable_version=1)
    rec.pair("r1", 2, SPAM, SPAM, request_id="q2", item_id="i2", stable_version=1)
    rec.pair("r1", 2, ALLOW, None, request_id="q3", item_id="i3", stable_version=1)
    rec.dropped("r1", 2)


EXPECTED_KEYS = {
    "canary:requests": 3, "canary:verdicts": 2, "canary:errors": 1, "canary:parse_failures": 1,
    "canary:lat:50": 1, "canary:lat:inf": 1, "canary:flag:spam": 1, "canary:flag:none": 1,
    "stable:requests": 1, "stable:verdicts": 1, "stable:lat:25": 1,
    "fb:canary:n": 2, "fb:canary:fp:spam": 1, "fb:canary:tp:spam": 1, "fb:stable:n": 1, "fb:stable:fn:spam": 1,
    "pair:2:n": 2, "pair:2:agree": 1, "pair:2:errors": 1, "pair:2:dropped": 1,
    "pair:2:cm:none:spam": 1, "pair:2:cm:spam:spam": 1, "pair:2:cflag:spam": 2, "pair:2:sflag:spam": 1,
}


def test_recorder_writes_the_stored_keys() -> None:
    store = FakeStore()
    rec = RolloutRecorder(store)  # type: ignore[arg-type]
    _record(rec)
    asyncio.run(rec.flush())
    assert store.counters == {"r1": EXPECTED_KEYS}
    s = build_rollout_stats(store.counters["r1"])
    assert s.unknown == {}
    assert s.canary.feedback.category("spam").precision == 0.5
    assert s.pair(2).agreement == 0.5
    flips = flips_view(store.flips["r1"])
    assert [(f.item_id, f.stable.decision, f.candidate.decision) for f in flips] == [("i1", "allow", "reject")]
    assert flips[0].candidate == FlipVerdict(2, "reject", "spam", None)
    assert flips[0].stable == FlipVerdict(1, "allow", "none", None)


def test_recorder_keeps_counts_when_the_store_is_down() -> None:
    store = FakeStore()
    rec = RolloutRecorder(store)  # type: ignore[arg-type]
    _record(rec)
    store.fail = True
    asyncio.run(rec.flush())
    assert store.counters == {}
    store.fail = False
    _record(rec)
    asyncio.run(rec.flush())
    assert store.counters == {"r1": {k: 2 * v for k, v in EXPECTED_KEYS.items()}}
    assert len(store.flips["r1"]) == 2


def test_flip_records_round_trip_and_damaged_ones_are_skipped() -> None:
    flip = Flip(at="2026-01-01T00:00:00+00:00", request_id="q", item_id="i",
                stable=FlipVerdict(1, "allow", "none"),
                candidate=FlipVerdict(2, "needs_review", None, "unparseable"))
    raw = flip.to_json()
    assert orjson.loads(raw) == {
        "at": "2026-01-01T00:00:00+00:00", "request_id": "q", "item_id": "i",
        "stable": {"version": 1, "decision": "allow", "category": "none"},
        "candidate": {"version": 2, "decision": "needs_review", "category": None, "fail_reason": "unparseable"}}
    assert Flip.from_json(raw) == flip
    damaged = ["not json", "[]", '{"at": 1}', orjson.dumps({**orjson.loads(raw), "stable": []}).decode(),
               orjson.dumps({**orjson.loads(raw), "candidate": {"version": "2", "decision": "x"}}).decode()]
    for d in damaged:
        assert Flip.from_json(d) is None, d
    assert flips_view([raw, *damaged, raw]) == [flip, flip]
