"""Typed rollout statistics (prompt_registry.rollout_stats): the counter-key codec, building
`RolloutStats` from a store's counters, and the recorder writing through the codec.

The stored key strings are pinned literally here: they are what SQLite and Redis hold for
rollouts already running, so a change to the codec that alters one is a data migration, not a
refactoring."""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
from collections.abc import Callable

import orjson
import pytest

from gateway.rollouts.recorder import RolloutRecorder, flips_view
from gateway.verdict import Verdict
from prompt_registry import StoreUnavailable
from prompt_registry.rollout_stats import (
    ARMS,
    ArmCount,
    ArmFlag,
    ArmLatency,
    ArmLatencySketch,
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
    quantile_of,
    sketch_index,
    sketch_value,
)

# -- the codec ----------------------------------------------------------------------------

STORED_FORMAT: list[tuple[CounterKey, str]] = [
    (ArmCount("stable", "requests"), "stable:requests"),
    (ArmCount("canary", "errors"), "canary:errors"),
    (ArmCount("canary", "verdicts"), "canary:verdicts"),
    (ArmCount("canary", "parse_failures"), "canary:parse_failures"),
    (ArmFlag("canary", "spam"), "canary:flag:spam"),
    (ArmFlag("stable", "none"), "stable:flag:none"),
    (ArmLatencySketch("canary", 171), "canary:ms:171"),
    (ArmLatencySketch("stable", -34), "stable:ms:-34"),
    (ArmLatencySketch("stable", 0), "stable:ms:0"),
    (ArmLatencySketch("canary", None), "canary:ms:z"),
    (ArmLatency("canary", 25), "canary:lat:25"),  # the old histogram: still read
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
        out += [ArmLatency(arm, b) for b in (25, 400, 25600, 7, None)]
        out += [ArmLatencySketch(arm, i) for i in (-340, -1, 0, 1, 171, 1037, None)]
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
    "canary:ms:", "canary:ms:-0", "canary:ms:01", "canary:ms:-01", "canary:ms:+1", "canary:ms:1.5",
    "canary:ms:Z", "canary:ms:zero", "canary:ms:--1", "canary:ms:1:2",
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
    lambda: ArmLatencySketch("canary", 1.5),  # type: ignore[arg-type]
    lambda: ArmLatencySketch("canary", True),
    lambda: FeedbackOutcome("canary", "tn", "spam"),  # type: ignore[arg-type]
    lambda: PairCount(0, "n"),
    lambda: PairCount(True, "n"),
    lambda: PairConfusion(2, "spam", "x:y"),
    lambda: PairFlag(2, "both", "spam"),  # type: ignore[arg-type]
])
def test_counters_that_would_not_round_trip_are_refused(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize(("ms", "index"), [(30.0, 171), (30000.0, 516), (10.0, 116), (1.0, 0), (0.5, -34),
                                            (0.001, None), (0.0, None), (-3.0, None), (math.nan, None),
                                            (1e12, 1037), (math.inf, 1037)])
def test_sketch_index(ms: float, index: int | None) -> None:
    assert sketch_index(ms) == index


def test_every_latency_is_within_one_percent_of_its_bucket_value() -> None:
    for k in range(-2000, 4000):
        x = 1.0037 ** k * 0.37
        if x > 0.0011:
            assert abs(sketch_value(sketch_index(x)) - x) <= 0.01 * x * (1 + 1e-9), x


def test_sketch_quantiles_are_within_one_percent_of_the_exact_ones() -> None:
    """p50/p95/p99 from the sketch's counters (as replicas add them) against `quantile_of` the
    raw latencies: within 1 %, in every shape, also split over two replicas."""
    import random

    rng = random.Random(7)
    shapes = {
        "lognormal": [rng.lognormvariate(5.5, 0.6) for _ in range(5000)],
        "bimodal": [rng.gauss(40, 5) if rng.random() < 0.9 else rng.gauss(900, 80) for _ in range(3000)],
        "few": [287.0, 120.0, 210.0, 390.0, 205.0],
        "one": [287.0],
    }
    for name, xs in shapes.items():
        xs = [max(x, 0.5) for x in xs]
        replicas: list[dict[str, int]] = [{}, {}]
        for i, x in enumerate(xs):
            key = encode_key(ArmLatencySketch("canary", sketch_index(x)))
            replicas[i % 2][key] = replicas[i % 2].get(key, 0) + 1
        merged: dict[str, int] = {}
        for r in replicas:
            for k, v in r.items():
                merged[k] = merged.get(k, 0) + v
        arm = build_rollout_stats(merged).canary
        assert arm.latency.total == len(xs)
        for q, got in ((0.5, arm.p50_ms), (0.95, arm.p95_ms), (0.99, arm.p99_ms)):
            exact = quantile_of(xs, q)
            assert exact is not None and got is not None
            assert abs(got - exact) <= 0.01 * exact, (name, q, got, exact)


def test_p95_is_not_a_bucket_edge() -> None:
    """Finding: with the old 200/400 ms buckets a true p95 of 287 ms read as 400 ms."""
    xs = [150.0] * 90 + [287.0] * 10
    counters: dict[str, int] = {}
    for x in xs:
        key = encode_key(ArmLatencySketch("canary", sketch_index(x)))
        counters[key] = counters.get(key, 0) + 1
    p95 = build_rollout_stats(counters).canary.p95_ms
    assert p95 is not None and abs(p95 - 287.0) <= 2.87


def test_quantile_of_is_numpys_default() -> None:
    import numpy as np

    xs = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    for q in (0.0, 0.25, 0.5, 0.95, 0.99, 1.0):
        assert quantile_of(xs, q) == pytest.approx(float(np.percentile(xs, q * 100)))
    assert quantile_of([], 0.5) is None
    with pytest.raises(ValueError):
        quantile_of(xs, 1.5)


def test_old_histogram_counters_still_read_as_upper_estimates() -> None:
    s = build_rollout_stats({"canary:lat:200": 90, "canary:lat:400": 10, "stable:lat:inf": 3})
    assert s.canary.latency.legacy == 100
    assert s.canary.p50_ms == pytest.approx(200.0, rel=0.01)
    assert s.canary.p95_ms == pytest.approx(400.0, rel=0.01)
    assert s.stable.p95_ms == math.inf
    mixed = build_rollout_stats({"canary:lat:200": 1, "canary:ms:171": 3})  # upgraded mid-rollout
    assert mixed.canary.latency.total == 4 and mixed.canary.p50_ms == pytest.approx(30.27, rel=0.01)


# -- building RolloutStats ----------------------------------------------------------------

RAW = {
    "canary:requests": 110, "canary:errors": 10, "canary:verdicts": 100, "canary:parse_failures": 4,
    "canary:flag:spam": 20, "canary:flag:none": 4,
    "canary:ms:116": 50, "canary:ms:171": 44, "canary:ms:516": 6,
    "stable:requests": 900, "stable:verdicts": 900, "stable:flag:spam": 90, "stable:ms:171": 900,
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
    assert c.latency.total == 100 and c.latency.legacy == 0
    # 50 at ~10 ms, 44 at ~30 ms, 6 at ~30 s (ranks 0-49, 50-93, 94-99)
    v10, v30, v30k = sketch_value(116), sketch_value(171), sketch_value(516)
    assert c.p95_ms == v30k  # rank 94.05: both neighbours are 30 s
    assert c.latency.quantile(0.94) == pytest.approx(v30 + (v30k - v30) * 0.06)  # rank 93.06
    assert c.latency.quantile(0.6) == v30 and c.latency.quantile(0.4) == v10
    assert c.p50_ms == pytest.approx((v10 + v30) / 2)  # rank 49.5
    assert s.stable.p95_ms == v30 and s.stable.errors == 0
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
    ONE = sketch_value(0)  # bucket 0: (0.98, 1] ms
    d = build_rollout_stats({"canary:requests": 2, "canary:verdicts": 2, "canary:flag:spam": 1,
                             "canary:ms:0": 2, "fb:canary:tp:spam": 1, "pair:4:n": 2,
                             "pair:4:agree": 2, "pair:4:cm:spam:spam": 2}).as_dict()
    assert d == {
        "stable": {},
        "canary": {"requests": 2, "errors": 0, "verdicts": 2, "parse_failures": 0, "flags": {"spam": 1},
                   "latency_ms": {"n": 2, "p50": ONE, "p95": ONE, "p99": ONE, "relative_error": 0.01,
                                  "from_old_buckets": 0},
                   "feedback": {"n": 0, "categories": {"spam": {"tp": 1, "fp": 0, "fn": 0, "precision": 1.0,
                                                                "recall": 1.0}}},
                   "p95_ms": ONE, "flag_rates": {"spam": 0.5}},
        "pairs": {"4": {"n": 2, "agree": 2, "errors": 0, "dropped": 0, "confusion": {"spam": {"spam": 2}},
                        "stable_flags": {}, "candidate_flags": {}, "agreement": 1.0, "kappa": None}},
    }
    assert orjson.loads(orjson.dumps(build_rollout_stats(RAW).as_dict()))["canary"]["latency_ms"]["n"] == 100


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
    "canary:ms:171": 1, "canary:ms:516": 1, "canary:flag:spam": 1, "canary:flag:none": 1,
    "stable:requests": 1, "stable:verdicts": 1, "stable:ms:116": 1,
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


class BlockingStore(FakeStore):
    """Its first rollout-stats write waits (in the flush's worker thread) until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def add_rollout_stats(self, rollout_id: str, counters: dict[str, int], flips: list[str] | None = None,
                          *, keep_flips: int = 500) -> None:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(30), "never released"
        super().add_rollout_stats(rollout_id, counters, flips, keep_flips=keep_flips)


def test_a_flush_returns_only_once_what_was_recorded_before_it_is_stored() -> None:
    """The recorder's own flush (every second) and an explicit one (the controller's tick, an
    admin call, a test's settle) overlap. The second found the counters already taken by the
    first and returned at once, before they were stored, and its caller read stale evidence
    (tests/unit/test_feedback_integrity.py failed that way under load)."""
    store = BlockingStore()
    rec = RolloutRecorder(store)  # type: ignore[arg-type]
    _record(rec)

    async def main() -> None:
        background = asyncio.ensure_future(rec.flush())
        assert await asyncio.to_thread(store.entered.wait, 30)  # it holds the counters, writing
        explicit = asyncio.ensure_future(rec.flush())
        for _ in range(20):  # event-loop steps, not wall-clock time
            await asyncio.sleep(0)
        assert not explicit.done(), "flush returned while an earlier one was still writing"
        store.release.set()
        await explicit
        assert store.counters == {"r1": EXPECTED_KEYS}
        await background

    try:
        asyncio.run(main())
    finally:
        store.release.set()


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


def test_kappa_is_undefined_when_both_sides_answer_one_class() -> None:
    """#21: kappa was shown as 1.000 when both arms answered one class only."""
    from prompt_registry.rollout_stats import cohen_kappa

    assert cohen_kappa({"allow": {"allow": 40}}) is None
    assert cohen_kappa({"allow": {"allow": 30, "block": 5}, "block": {"block": 5}}) is not None
