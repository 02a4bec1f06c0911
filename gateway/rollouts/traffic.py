"""Traffic policy: which prompt version serves a request, and which versions shadow it.

A pure function of (rollout, subject, item, pin). Buckets come from blake2b over the rollout's
salt and the key — never Python's `hash()` — so a subject lands in the same arm on every
gateway replica and across restarts, and raising the canary weight only moves subjects from
stable to canary (a subject's bucket never changes within a rollout).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from prompt_registry.rollouts import Rollout

__all__ = ["BUCKETS", "Assignment", "assign", "bucket"]

BUCKETS = 10_000  # weights resolve to 0.01 %


@dataclass(frozen=True, slots=True)
class Assignment:
    version: int | None  # None: no rollout, serve the label
    arm: str  # stable | canary | pinned
    shadows: tuple[int, ...] = ()
    rollout_id: str | None = None


def bucket(salt: str, key: str) -> int:
    digest = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


_NO_ROLLOUT = Assignment(None, "stable")  # immutable: the one answer for every request without a rollout


def assign(rollout: Rollout | None, subject: str, *, item_id: str, pin: int | None = None) -> Assignment:
    if pin is not None:
        return Assignment(pin, "pinned")
    if rollout is None or not rollout.active:
        return _NO_ROLLOUT
    canary = rollout.canary_version is not None and bucket(rollout.salt, subject) < rollout.weight * (BUCKETS // 100)
    version = rollout.canary_version if canary else rollout.stable_version
    assert version is not None
    # Shadows compare a candidate with the stable verdict, so only stable-arm requests carry
    # them; sampled per item so the same listing is always (or never) shadowed in a rollout.
    shadows = () if canary else tuple(
        s.version for s in rollout.shadows
        if s.version != version and bucket(f"{rollout.salt}:shadow:{s.version}", item_id) < s.sample_rate * BUCKETS
    )
    return Assignment(version, "canary" if canary else "stable", shadows, rollout.id)
