"""Hand-made scorecard records for tests of promotion gates (what `modgate eval run` stores)."""

from __future__ import annotations

from datetime import UTC, datetime

from prompt_registry.gates import MetricCounts, RateCount, ScorecardRecord
from prompt_registry.store import PromptStore

__all__ = ["SAMPLE_SHA", "SAMPLE_SUPPORT", "make_record", "store_scorecard"]

# datasets/listings-sample.jsonl, as pinned by configs/prompts/listing-moderation.yaml
SAMPLE_SHA = "e08b6d315ed6e338f072c66324f25c9d53e54b36fdc4c23397add9eef2b2abed"
# gold positives per violation category in the sample (block or needs_review with that category)
SAMPLE_SUPPORT = {"counterfeit": 27, "prohibited_item": 27, "misleading_claim": 24,
                  "off_platform_payment": 21, "adult": 16, "hate_harassment": 16}


def make_record(name: str, version: int, version_hash: str, *,
                counts: dict[str, tuple[int, int, int]] | None = None, parse_failures: int = 0,
                errors: int = 0, items: int = 194, sha: str = SAMPLE_SHA) -> ScorecardRecord:
    """A scorecard record; *counts* overrides (tp, fp, fn) per category, the others are perfect
    (every gold positive found, no false positive)."""
    cats = {c: MetricCounts(tp=n, fp=0, fn=0) for c, n in SAMPLE_SUPPORT.items()}
    for c, (tp, fp, fn) in (counts or {}).items():
        cats[c] = MetricCounts(tp=tp, fp=fp, fn=fn)
    tp, fp, fn = (sum(getattr(c, k) for c in cats.values()) for k in ("tp", "fp", "fn"))
    return ScorecardRecord(
        prompt=name, version=version, version_hash=version_hash, dataset_sha256=sha,
        dataset_source="datasets/listings-sample.jsonl", model="tiny-llama", items=items,
        correct=items - fp - fn - parse_failures - errors, categories=cats,
        micro=MetricCounts(tp=tp, fp=fp, fn=fn), flagged=MetricCounts(tp=tp + 4, fp=fp, fn=fn),
        parse_failures=RateCount(count=parse_failures, n=items - errors),
        errors=RateCount(count=errors, n=items), needs_review=RateCount(count=0, n=items - errors),
        created_at=datetime.now(UTC), created_by="test")


def store_scorecard(store: PromptStore, name: str, version: int, **kw: object) -> ScorecardRecord:
    """Store a scorecard for a published version (its content hash read from the store)."""
    record = make_record(name, version, store.get_version(name, version).content_hash, **kw)  # type: ignore[arg-type]
    store.put_scorecard(record, actor="test")
    return record
