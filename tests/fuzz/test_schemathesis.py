"""Property-based fuzzing of the gateway's HTTP API from its own OpenAPI document (schemathesis).

The app runs in-process over ASGI (like tests/unit/test_gateway_app.py: a SQLite store seeded
from configs/prompts, the FakeBackend), twice:

- `test_api_as_admin`: every request carries an API key with the `admin` scope, so handlers
  are reached (and the generated `authorization` / `x-api-key` header values are overridden);
- `test_api_without_a_key`: no key (or the generated garbage), to exercise the 401 paths.

Every built-in schemathesis check runs on every response (server errors, status codes, content
types, response schemas and headers, positive/negative data acceptance, missing required
headers, unsupported methods, Allow headers; `ignored_auth` has nothing to check because the
document declares no security scheme, and the stateful checks need the stateful phase, which is
off), with positive and negative data, in the examples, coverage and fuzzing phases. The run is deterministic (fixed seed; set MODGATE_FUZZ_SEED to explore) and
sized by MODGATE_FUZZ_EXAMPLES (fuzzing examples per operation and mode).

Known gateway bugs found by this suite are listed in KNOWN_BUGS: a failure matching one is
recorded instead of failing the run, and each bug has a reproduction that
`test_known_bugs_still_reproduce` expects to fail: once the gateway is fixed it stops failing,
which fails the suite, so the bug moves to FIXED. Any other failure fails the run.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from prompt_registry.keys import generate_key
from prompt_registry.loader import seed_store
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("MODGATE_FUZZ_SEED", "20240610"))
EXAMPLES = int(os.environ.get("MODGATE_FUZZ_EXAMPLES", "60"))
MIN_REQUESTS = 1_000
log = logging.getLogger("tests.fuzz")

# run name -> (operation, status) -> requests
TALLY: dict[str, collections.Counter[tuple[str, int]]] = collections.defaultdict(collections.Counter)
# failure kind -> list of (run, operation, check, status, request summary); known and unknown
FINDINGS: dict[str, list[tuple[str, str, str, int, str]]] = collections.defaultdict(list)


class _AsAServer:
    """Wraps the app like a real ASGI server does: an exception raised after the 500 response was
    sent (Starlette re-raises it for the server to log) is logged, not propagated, so
    schemathesis sees the 500 response itself."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if scope["type"] != "http" or not started:
                raise
            log.debug("exception after the response was sent", exc_info=True)


def _config() -> schemathesis.Config:
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "generation": {"mode": "all", "max-examples": EXAMPLES},
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True},
                   "fuzzing": {"enabled": True}, "stateful": {"enabled": False}},
        "checks": {"enabled": True},
    })


def _openapi_document() -> dict[str, Any]:
    """The gateway's OpenAPI document (building the app touches no store, starts nothing)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SqlitePromptStore(Path(tmp) / "schema.db")
        try:
            return create_app(GatewaySettings(), store, FakeBackend(), models=["tiny-llama"]).openapi()
        finally:
            store.close()


# Loaded at import so schemathesis' pytest plugin makes one test per operation; the apps the
# requests go to are built by the fixtures below and passed to `case.call(app=...)`.
# (`schemathesis.pytest.from_fixture` would load it lazily, but schemathesis 4.32 sets
# `Node._nodeid`, which pytest 9 no longer has.)
DOC = _openapi_document()
SCHEMA = schemathesis.openapi.from_dict(DOC, config=_config())


@dataclass
class Api:
    app: Any
    key: str | None


def _api(tmp: Path, with_key: bool) -> Iterator[Api]:
    store = SqlitePromptStore(tmp / "r.db")
    seed_store(store, ROOT / "configs" / "prompts")
    key, record = generate_key("fuzz-admin", ["admin"], created_by="fuzz")
    store.put_key(record)
    app = _AsAServer(create_app(GatewaySettings(), store, FakeBackend(), models=["tiny-llama"]))
    try:
        yield Api(app, key if with_key else None)
    finally:
        from schemathesis.python import asgi  # the lifespan schemathesis started for the app

        asgi.shutdown_lifespans()
        store.close()


@pytest.fixture(scope="module")
def admin_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from _api(tmp_path_factory.mktemp("fuzz-admin"), with_key=True)


@pytest.fixture(scope="module")
def anonymous_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from _api(tmp_path_factory.mktemp("fuzz-anon"), with_key=False)


# -- known gateway bugs ---------------------------------------------------------------------

INT64_MAX = 2**63 - 1
ERROR_STATUSES = {400, 401, 403, 404, 409, 413, 415, 422, 429, 503}


def _ints(value: Any) -> Iterator[int]:
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _ints(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _ints(v)
    elif isinstance(value, str) and value.lstrip("-").isdigit() and value.isascii():
        yield int(value)


def _has_huge_int(case: Any) -> bool:
    parts = [case.path_parameters, case.query, case.body if isinstance(case.body, dict | list) else None]
    return any(not -INT64_MAX - 1 <= n <= INT64_MAX for part in parts for n in _ints(part))


def _json(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _label_is_null(response: Any) -> bool:
    body = _json(response)
    return isinstance(body, dict) and isinstance(body.get("prompt"), dict) and body["prompt"].get("label") is None


def _no_body(case: Any) -> bool:
    return case.body is None or type(case.body).__name__ == "NotSet"


@dataclass(frozen=True)
class KnownBug:
    id: str
    reason: str
    matches: Callable[[Any, Any, Exception], bool]  # (case, response, failure)


KNOWN_BUGS: list[KnownBug] = []

# Found by this suite and fixed: their reproductions now run as regression tests.
FIXED: list[str] = ['unbounded-version-500', 'unbounded-version-rejected', 'moderate-lax-types', 'pinned-label-null', 'undocumented-error-statuses', 'openai-bodies-undocumented', 'allow-header-incomplete']

# Deviations that are not gateway bugs: what the documented schema cannot say.
ACCEPTED: list[KnownBug] = [
    KnownBug(
        "openai-semantic-validation",
        "the OpenAI-compatible routes document their bodies loosely (an OpenAI request, or a "
        "registry prompt) and answer 400 invalid_request_error, in OpenAI's error shape, for "
        "bodies the document cannot rule out (no messages, unknown fields, n != 1, ...)",
        lambda case, response, f: isinstance(f, RejectedPositiveData) and response.status_code == 400
        and case.operation.label in ("POST /v1/chat/completions", "POST /v1/moderations",
                                     "POST /v1/decisions")),
    KnownBug(
        "publish-semantic-validation",
        "POST /v1/prompts documents its YAML/Markdown bodies as any string and its JSON body by "
        "PromptSpec's JSON schema; a schema-valid body can still be rejected with the documented "
        "422 (not a mapping, template outside the sandbox, undeclared variable, ...)",
        lambda case, response, f: isinstance(f, RejectedPositiveData) and response.status_code == 422
        and case.operation.label == "POST /v1/prompts"),
    KnownBug(
        "gate-policy-semantic-validation",
        "PUT /v1/prompts/{name}/gate-policy documents its evaluation block by EvaluationSpec's "
        "JSON schema, which cannot say 'exactly one of min, max, max_drop_vs_production' or which "
        "metrics take a category; a schema-valid body can still be rejected with the documented 422",
        lambda case, response, f: isinstance(f, RejectedPositiveData) and response.status_code == 422
        and case.operation.label == "PUT /v1/prompts/{name}/gate-policy"),
    KnownBug(
        "feedback-semantic-validation",
        "POST /v1/feedback checks a label against the verdict schema of the prompt version that "
        "answered the request (allow/block and that prompt's categories, no contradictory pairs); "
        "the document can only say 'an identifier', so a schema-valid label can get the "
        "documented 422 invalid_label",
        lambda case, response, f: isinstance(f, RejectedPositiveData) and response.status_code == 422
        and case.operation.label == "POST /v1/feedback"
        and '"invalid_label"' in response.text),
    KnownBug(
        "scorecard-semantic-validation",
        "POST /v1/prompts/{name}/scorecards documents its body by ScorecardRecord's JSON schema, "
        "which cannot say 'no more correct items than items', 'the prompt named in the path' or "
        "'computed for this version's content'; a schema-valid scorecard can still get the "
        "documented 422 (invalid_request or scorecard_mismatch)",
        lambda case, response, f: isinstance(f, RejectedPositiveData) and response.status_code == 422
        and case.operation.label == "POST /v1/prompts/{name}/scorecards"),
]


def _known(case: Any, response: Any, failure: Exception) -> KnownBug | None:
    return next((b for b in KNOWN_BUGS + ACCEPTED if b.matches(case, response, failure)), None)


def _summary(case: Any) -> str:
    body = case.body if case.body is not None and type(case.body).__name__ != "NotSet" else None
    return (f"{case.method} {case.formatted_path} query={case.query or {}} "
            f"body={str(body)[:300] if body is not None else '-'}")


def _exercise(run: str, case: Any, api: Api) -> None:
    headers = {"authorization": f"Bearer {api.key}", "x-api-key": api.key} if api.key else None
    transport = {"app": api.app, "base_url": "http://testserver"}
    response = case.call(headers=headers, **transport)
    TALLY[run][(case.operation.label, response.status_code)] += 1
    try:
        case.validate_response(response, headers=headers,
                               transport_kwargs={**transport, "headers": headers or {}})
    except FailureGroup as group:
        unknown = []
        for failure in group.exceptions:
            bug = _known(case, response, failure)
            kind = bug.id if bug else f"NEW {type(failure).__name__}"
            FINDINGS[kind].append((run, case.operation.label, type(failure).__name__,
                                   response.status_code, _summary(case)))
            if bug is None:
                unknown.append(failure)
        if unknown:
            raise


_SETTINGS = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))

@SCHEMA.parametrize()
@_SETTINGS
def test_api_as_admin(case: Any, admin_api: Api) -> None:
    _exercise("admin", case, admin_api)


@SCHEMA.parametrize()
@_SETTINGS
def test_api_without_a_key(case: Any, anonymous_api: Api) -> None:
    _exercise("anonymous", case, anonymous_api)


def test_volume_and_summary() -> None:
    """Runs after the two fuzz runs (same module, file order): enough requests were made, and
    no 5xx or response-schema violation other than the known bugs."""
    total = sum(sum(t.values()) for t in TALLY.values())
    if total == 0:
        pytest.skip("run the whole module: the fuzz runs did not run in this session")
    for kind, items in sorted(FINDINGS.items()):
        print(f"{kind}: {len(items)}")
        for item in items[:3]:
            print("   ", item)
    by_status = collections.Counter(status for t in TALLY.values() for (_, status), n in t.items()
                                    for _ in range(n))
    print(f"requests: {total}; by status: {dict(sorted(by_status.items()))}")
    assert total >= MIN_REQUESTS, f"only {total} requests were generated"
    assert not [k for k in FINDINGS if k.startswith("NEW")]


# -- reproductions of the known bugs (strict xfail: a fix makes them pass, and the suite fail
# until the entry above is removed) ------------------------------------------------------------

LISTING = {"item_id": "item-1", "seller_id": "seller-1", "title": "Wireless earbuds"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    store = SqlitePromptStore(tmp_path / "r.db")
    seed_store(store, ROOT / "configs" / "prompts")
    key, record = generate_key("fuzz-admin", ["admin"], created_by="fuzz")
    store.put_key(record)
    app = create_app(GatewaySettings(), store, FakeBackend(), models=["tiny-llama"])
    try:
        with TestClient(app, raise_server_exceptions=False,
                        headers={"authorization": f"Bearer {key}"}) as c:
            yield c, key
    finally:
        store.close()


def _check(case: Any, response: Any, check: Any) -> None:
    """Run one schemathesis check on a response (raises its FailureGroup)."""
    case.validate_response(response, checks=[check])


def _op(path: str, method: str) -> Any:
    return SCHEMA[path][method]


def repro_unbounded_version_500(c: TestClient) -> None:
    big = 2**63 + 5
    calls = [
        (_op("/v1/prompts/{name}/versions/{version}", "GET").Case(
            path_parameters={"name": "listing-moderation", "version": big}),
         lambda: c.get(f"/v1/prompts/listing-moderation/versions/{big}")),
        (_op("/v1/prompts/{name}/labels/{label}", "PUT").Case(
            path_parameters={"name": "listing-moderation", "label": "canary"}, body={"version": big}),
         lambda: c.put("/v1/prompts/listing-moderation/labels/canary", json={"version": big})),
        (_op("/v1/prompts/{name}/diff", "GET").Case(
            path_parameters={"name": "listing-moderation"}, query={"from": 1, "to": big}),
         lambda: c.get("/v1/prompts/listing-moderation/diff", params={"from": 1, "to": big})),
        (_op("/v1/prompts/{name}/rollout", "POST").Case(
            path_parameters={"name": "listing-moderation"}, body={"canary_version": big}),
         lambda: c.post("/v1/prompts/listing-moderation/rollout", json={"canary_version": big})),
        (_op("/v1/moderate", "POST").Case(body={**LISTING, "prompt_version": big}),
         lambda: c.post("/v1/moderate", json={**LISTING, "prompt_version": big})),
        (_op("/v1/chat/completions", "POST").Case(),
         lambda: c.post("/v1/chat/completions", json={"prompt": {
             "name": "listing-moderation", "version": big, "variables": {"title": "x"}}})),
    ]
    for case, send in calls:
        _check(case, send(), not_a_server_error)


def repro_unbounded_version_rejected(c: TestClient) -> None:
    body = DOC["paths"]["/v1/moderate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    documented = body["properties"]["prompt_version"]
    if "maximum" in json.dumps(documented):
        return
    r = c.post("/v1/moderate", json={**LISTING, "prompt_version": 2**64 + 5})
    assert r.status_code != 422, r.text


def repro_moderate_lax_types(c: TestClient) -> None:
    for value in (True, "1", 1.5):  # 1.0 is an integer in JSON Schema, and accepted
        r = c.post("/v1/moderate", json={**LISTING, "prompt_version": value})
        assert r.status_code == 422, f"prompt_version={value!r}: {r.status_code}"


def repro_pinned_label_null(c: TestClient) -> None:
    body = {**LISTING, "prompt_version": 1}
    r = c.post("/v1/moderate", json=body)
    assert r.status_code == 200 and r.json()["arm"] == "pinned"
    _check(_op("/v1/moderate", "POST").Case(body=body), r, response_schema_conformance)


def repro_undocumented_error_statuses(c: TestClient) -> None:
    case = _op("/v1/prompts/{name}", "GET").Case(path_parameters={"name": "no-such-prompt"})
    _check(case, c.get("/v1/prompts/no-such-prompt"), status_code_conformance)  # 404
    _check(case, c.get("/v1/prompts/no-such-prompt", headers={"authorization": ""}),
           status_code_conformance)  # 401
    _check(_op("/v1/models", "GET").Case(), c.get("/v1/models", headers={"authorization": ""}),
           status_code_conformance)


def repro_openai_bodies_undocumented(c: TestClient) -> None:
    for path in ("/v1/chat/completions", "/v1/moderations"):
        assert DOC["paths"][path]["post"].get("requestBody"), f"{path} declares no requestBody"


def repro_allow_header_incomplete(c: TestClient) -> None:
    """A 405 lists in `Allow` exactly the methods the path documents - on every path, including
    /v1/prompts and /v1/prompts/{name}/rollout, where GET and POST are separate routes (Starlette
    alone answers from the first route matching the path and lists only its methods)."""
    params = {"name": "listing-moderation", "version": 1, "label": "canary", "action": "pause",
              "rollout_id": "0123456789ab", "approval_id": "0123456789ab", "decision": "approve",
              "item_id": "item-1", "key_id": "0123456789ab"}
    for path, operations in DOC["paths"].items():
        url = path.format(**params)
        r = c.options(url)
        assert r.status_code == 405, (url, r.status_code)
        assert r.json()["error"]["type"] == "method_not_allowed"
        documented = {m.upper() for m in operations}
        advertised = {m.strip() for m in r.headers["allow"].split(",")}
        assert advertised - {"HEAD", "OPTIONS"} == documented, (url, r.headers["allow"])
        method = next(iter(operations))
        names = {k: v for k, v in params.items() if "{" + k + "}" in path} or None
        _check(_op(path, method).Case(method="OPTIONS", path_parameters=names), r,
               allow_header_conformance)


REPROS: dict[str, Callable[[TestClient], None]] = {
    "unbounded-version-500": repro_unbounded_version_500,
    "unbounded-version-rejected": repro_unbounded_version_rejected,
    "moderate-lax-types": repro_moderate_lax_types,
    "pinned-label-null": repro_pinned_label_null,
    "undocumented-error-statuses": repro_undocumented_error_statuses,
    "openai-bodies-undocumented": repro_openai_bodies_undocumented,
    "allow-header-incomplete": repro_allow_header_incomplete,
}


def test_known_bugs_still_reproduce(client: tuple[TestClient, str]) -> None:
    """Every bug listed in KNOWN_BUGS still reproduces (a fixed one moves to FIXED, where
    test_fixed_bug_stays_fixed keeps it fixed), and every reproduction is listed in one of the
    two. One test rather than a parameter per bug: an empty list showed up as a skipped test."""
    assert set(REPROS) == set(FIXED) | {b.id for b in KNOWN_BUGS}, "REPROS, FIXED and KNOWN_BUGS disagree"
    for bug in KNOWN_BUGS:
        with pytest.raises((AssertionError, FailureGroup)):
            REPROS[bug.id](client[0])


@pytest.mark.parametrize("bug_id", FIXED)
def test_fixed_bug_stays_fixed(bug_id: str, client: tuple[TestClient, str]) -> None:
    REPROS[bug_id](client[0])
