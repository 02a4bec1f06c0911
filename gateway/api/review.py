"""The review queue and the sample store's admin routes.

- `GET /v1/review/queue` (scopes `feedback` and `samples:read`): a stratified sample of recent
  decisions from the sample store (`gateway.samples`), with their listing content. Strata are
  the model's (decision, category), `allow` included: a queue of flagged items only would
  measure precision and never recall. Strata get equal room in the queue (round-robin), each
  item carries its stratum's size in the window so estimates can be re-weighted. Within a
  stratum the order is a hash of the request id, the same for every reviewer, so reviewers
  overlap on items and their agreement with each other can be measured. Items the calling
  reviewer already labelled are left out.
- Labels go through `POST /v1/feedback` (or the console's `/console/api/feedback`), the one
  feedback path (`FeedbackDesk`): checked against the answering version's verdict schema,
  recorded under the reviewer's own key, counted once per request.
- `GET /v1/review/agreement` (scope `feedback`): per reviewer, agreement and Cohen's kappa with
  the model (on sampled items) and with each other reviewer (on items both labelled), from the
  feedback log.
- `GET /v1/review/flips?prompt=NAME` (scopes `prompts:read` and `samples:read`): the prompt's
  rollout's recent shadow flips (as `GET /v1/prompts/{name}/rollout` lists them), each with
  its listing content when the sample store kept the request (or the item).
- `GET|DELETE /v1/admin/samples/{item_id}`: read (`samples:read`) or delete (`samples:delete`)
  an item's stored content.

The console's queue page (`gateway.api.console.queue`) calls the same `ReviewQueue`.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query
from starlette.responses import Response

from gateway.api.edge import ERROR_RESPONSES, json_response
from gateway.auth import Authenticator, _Anonymous
from gateway.feedback import FeedbackLog, feedback_lines
from gateway.problems import ApiError
from gateway.prompt_cache import PromptCache
from gateway.rollouts.recorder import flips_view
from gateway.samples import Sample, SampleStore, content_for
from prompt_registry import FAIL_CLOSED_DECISION, PromptNotFound, PromptStore
from prompt_registry.keys import ApiKeyRecord
from prompt_registry.rollout_stats import cohen_kappa

__all__ = ["ReviewQueue", "build_review_router", "label_key", "read_labels"]

AuthHeader = Annotated[str | None, Header()]
Principal = ApiKeyRecord | _Anonymous
ITEM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_QUEUE = 200


def label_key(decision: str, category: str | None) -> str:
    """One class per verdict, for agreement: `allow`, `needs_review`, or `block:<category>`."""
    if decision == "allow" or decision == FAIL_CLOSED_DECISION:
        return decision
    return f"{decision}:{category or 'none'}"


def read_labels(directory: Path | None, since: datetime) -> dict[str, dict[str, str]]:
    """The latest label of each reviewer for each request, from the feedback log files of the
    days since *since*: {request_id: {reviewer: label_key}}. Unreadable lines are skipped."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for line in feedback_lines(directory, since):
        try:
            rec = orjson.loads(line)
            out[str(rec["request_id"])][str(rec["reviewer"])] = label_key(
                str(rec["decision"]), rec.get("category"))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
    return dict(out)


def _stratum(s: Sample) -> str:
    return label_key(s.decision, s.category)


def _order(request_id: str) -> bytes:
    return hashlib.sha256(request_id.encode()).digest()


class ReviewQueue:
    """What the queue API and the console's queue page show: built from the sample store and
    the feedback log, read in a worker thread."""

    def __init__(self, samples: SampleStore | None, feedback_log: FeedbackLog | None,
                 cache: PromptCache) -> None:
        self.samples = samples
        self.feedback_dir = feedback_log.directory if feedback_log is not None else None
        self.cache = cache

    def store(self) -> SampleStore:
        if self.samples is None:
            raise ApiError(404, "not_found", "the sample store is off (samples.enabled: false in "
                           "the configuration): no listing content is kept to review")
        return self.samples

    def _items(self, reviewer: str, n: int, days: float, prompt: str | None) -> dict[str, Any]:
        store = self.store()
        since = datetime.now(UTC) - timedelta(days=days)
        rows = store.recent(since=since, prompt=prompt)
        labels = read_labels(self.feedback_dir, since)
        population = Counter(_stratum(s) for s in rows)
        strata: dict[str, list[Sample]] = defaultdict(list)
        for s in sorted(rows, key=lambda s: _order(s.request_id)):
            if reviewer not in labels.get(s.request_id, {}):
                strata[_stratum(s)].append(s)
        picked: list[Sample] = []
        queues = [strata[k] for k in sorted(strata)]
        depth = 0
        while len(picked) < n and any(depth < len(q) for q in queues):
            for q in queues:
                if depth < len(q) and len(picked) < n:
                    picked.append(q[depth])
            depth += 1
        items = [{**s.as_dict(), "stratum": _stratum(s), "stratum_size": population[_stratum(s)],
                  "labelled_by": sorted(labels.get(s.request_id, {}))} for s in picked]
        return {"reviewer": reviewer, "window_days": days, "population": dict(population),
                "remaining": sum(len(q) for q in queues), "items": items}

    async def queue(self, reviewer: str, *, n: int = 20, days: float = 7.0,
                    prompt: str | None = None) -> dict[str, Any]:
        out = await asyncio.to_thread(self._items, reviewer, n, days, prompt)
        schemas: dict[str, Any] = {}
        for item in out["items"]:
            ref = f"{item['prompt']}@{item['version']}"
            if ref in schemas:
                continue
            try:
                spec = (await self.cache.get_version(item["prompt"], item["version"])).version.spec
            except PromptNotFound:
                continue
            schemas[ref] = {"decisions": [d for d in spec.verdict.decisions if d != FAIL_CLOSED_DECISION],
                            "categories": [c for c in spec.verdict.categories if c != "none"]}
        out["schemas"] = schemas
        return out

    def _agreement(self, days: float) -> dict[str, Any]:
        since = datetime.now(UTC) - timedelta(days=days)
        labels = read_labels(self.feedback_dir, since)
        model = ({rid: _stratum(s) for rid, s in self.samples.by_request(labels).items()}
                 if self.samples is not None else {})
        reviewers = sorted({r for by in labels.values() for r in by})
        out: list[dict[str, Any]] = []
        for r in reviewers:
            mine = {rid: by[r] for rid, by in labels.items() if r in by}
            entry: dict[str, Any] = {"reviewer": r, "labels": len(mine),
                                     "with_model": _pair((mine[rid], model[rid]) for rid in mine
                                                          if rid in model),
                                     "with_reviewers": []}
            for o in reviewers:
                if o == r:
                    continue
                pair = _pair((label, labels[rid][o]) for rid, label in mine.items()
                             if o in labels[rid])
                if pair["n"]:
                    entry["with_reviewers"].append({"reviewer": o, **pair})
            out.append(entry)
        return {"window_days": days, "reviewers": out}

    async def agreement(self, *, days: float = 30.0) -> dict[str, Any]:
        return await asyncio.to_thread(self._agreement, days)

    def _flips(self, store: PromptStore, prompt: str, n: int) -> dict[str, Any]:
        rollout = store.get_rollout(prompt)
        if rollout is None:
            raise PromptNotFound(f"prompt {prompt!r} has no rollout")
        flips = [f.as_dict() for f in flips_view(store.rollout_flips(rollout.id, n))]
        content = content_for(self.samples, request_ids=[str(f["request_id"]) for f in flips],
                              item_ids=[str(f["item_id"]) for f in flips])
        for f in flips:
            found = content.get(str(f["request_id"])) or content.get(str(f["item_id"]))
            f["content"] = dict(found) if found is not None else None
        return {"prompt": prompt, "rollout_id": rollout.id, "sample_store": self.samples is not None,
                "flips": flips}

    async def flips(self, store: PromptStore, prompt: str, *, n: int = 20) -> dict[str, Any]:
        """The rollout's recent shadow flips with listing content where the store has it."""
        return await asyncio.to_thread(self._flips, store, prompt, n)


def _pair(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    matrix: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    n = agree = 0
    for a, b in pairs:
        matrix[a][b] += 1
        n += 1
        agree += a == b
    kappa = cohen_kappa(matrix)
    return {"n": n, "agree": agree, "agreement": agree / n if n else None,
            "kappa": None if kappa is None else round(kappa, 4)}


def require_all(auth: Authenticator, principal: Principal, scopes: Iterable[str]) -> None:
    for scope in scopes:
        auth.require(principal, scope)


def check_item_id(item_id: str) -> str:
    if not ITEM_ID.match(item_id):
        raise ApiError(422, "invalid_request", "item_id must be 1-128 characters of [A-Za-z0-9._:-]",
                       fields=[{"field": "item_id", "problem": "malformed"}])
    return item_id


def sample_view(samples: Iterable[Sample]) -> list[Mapping[str, object]]:
    return [s.as_dict() for s in samples]


QUEUE_SCOPES = ("feedback", "samples:read")


def build_review_router(queue: ReviewQueue, auth: Authenticator, store: PromptStore) -> APIRouter:
    router = APIRouter(tags=["review"], responses=ERROR_RESPONSES)

    async def caller(authorization: str | None, x_api_key: str | None, *scopes: str) -> Principal:
        principal = await auth.authenticate(authorization, x_api_key)
        require_all(auth, principal, scopes)
        return principal

    @router.get("/v1/review/queue")
    async def review_queue(n: Annotated[int, Query(ge=1, le=MAX_QUEUE)] = 20,
                           days: Annotated[float, Query(gt=0, le=366)] = 7.0,
                           prompt: Annotated[str | None, Query(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")] = None,
                           authorization: AuthHeader = None, x_api_key: AuthHeader = None) -> Response:
        """A stratified sample of recent decisions with their listing content, for review
        (scopes `feedback` and `samples:read`). Label them with `POST /v1/feedback`."""
        principal = await caller(authorization, x_api_key, *QUEUE_SCOPES)
        return json_response(await queue.queue(principal.name, n=n, days=days, prompt=prompt))

    @router.get("/v1/review/agreement")
    async def review_agreement(days: Annotated[float, Query(gt=0, le=366)] = 30.0,
                               authorization: AuthHeader = None,
                               x_api_key: AuthHeader = None) -> Response:
        """Each reviewer's agreement (and Cohen's kappa) with the model and with the other
        reviewers (scope `feedback`)."""
        await caller(authorization, x_api_key, "feedback")
        return json_response(await queue.agreement(days=days))

    @router.get("/v1/review/flips")
    async def review_flips(prompt: Annotated[str, Query(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")],
                           n: Annotated[int, Query(ge=1, le=500)] = 20,
                           authorization: AuthHeader = None, x_api_key: AuthHeader = None) -> Response:
        """A rollout's recent shadow flips, each with its listing content when the sample store
        kept it (scopes `prompts:read` and `samples:read`)."""
        await caller(authorization, x_api_key, "prompts:read", "samples:read")
        return json_response(await queue.flips(store, prompt, n=n))

    @router.get("/v1/admin/samples/{item_id}")
    async def get_samples(item_id: str, authorization: AuthHeader = None,
                          x_api_key: AuthHeader = None) -> Response:
        """The stored listing content of one item (scope `samples:read`)."""
        await caller(authorization, x_api_key, "samples:read")
        store = queue.store()
        rows = await asyncio.to_thread(store.item, check_item_id(item_id))
        if not rows:
            raise ApiError(404, "not_found", f"no stored sample for item {item_id!r}")
        return json_response({"item_id": item_id, "samples": sample_view(rows)})

    @router.delete("/v1/admin/samples/{item_id}")
    async def delete_samples(item_id: str, authorization: AuthHeader = None,
                             x_api_key: AuthHeader = None) -> Response:
        """Delete every stored sample of one item (scope `samples:delete`); answers how many
        rows went (0 is not an error: deleting is idempotent)."""
        await caller(authorization, x_api_key, "samples:delete")
        store = queue.store()
        deleted = await asyncio.to_thread(store.delete_item, check_item_id(item_id))
        return json_response({"item_id": item_id, "deleted": deleted})

    return router
