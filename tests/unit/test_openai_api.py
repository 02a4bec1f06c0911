"""The OpenAI-compatible routes, driven by the official `openai` client against a fake backend
and a real SQLite store (the client's HTTP client is the app's in-process TestClient)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.api.openai import MAX_TOKENS_LIMIT, MODERATION_CONCURRENCY
from gateway.config import GatewaySettings
from prompt_registry.keys import generate_key
from prompt_registry.sqlite_store import SqlitePromptStore
from serving import BackendOverloaded, BackendUnavailable
from serving.fake_backend import FakeBackend

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"
PROMPT = {"name": "listing-moderation",
          "variables": {"title": "Rolex Submariner 1:1 replica", "description": "mirror quality"}}
CATEGORIES = {"counterfeit", "prohibited_item", "misleading_claim", "off_platform_payment", "adult",
              "hate_harassment"}


def _app(store: SqlitePromptStore, backend: FakeBackend) -> FastAPI:
    settings = GatewaySettings(max_body_bytes=8192, max_description_chars=1000)
    app = create_app(settings, store, backend, models=[MODEL])
    return app


@pytest.fixture
def http(store: SqlitePromptStore, backend: FakeBackend) -> Iterator[TestClient]:
    with TestClient(_app(store, backend), raise_server_exceptions=False) as c:
        yield c


def _client(http: TestClient, key: str = "") -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key or "none", http_client=http,
                         max_retries=0)


@pytest.fixture
def client(http: TestClient, caller_key: str) -> openai.OpenAI:
    return _client(http, caller_key)


# -- models and raw completions ------------------------------------------------------------

def test_models_lists_what_the_gateway_serves(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_raw_messages_are_passed_through(client: openai.OpenAI, backend: FakeBackend) -> None:
    backend.responder = lambda req: "echo: " + req.messages[-1]["content"]
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "hello"}], stop=["\n"], seed=7)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.content == "echo: hello" and r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert not hasattr(r, "modgate")
    sent = backend.requests[-1]
    assert sent.model == MODEL and sent.regex is None
    assert sent.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert sent.stop == ["\n"] and sent.seed == 7


def test_sampling_parameters_are_clamped(client: openai.OpenAI, backend: FakeBackend) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=100_000, temperature=5,
                                   top_p=3)
    sent = backend.requests[-1]
    assert (sent.max_tokens, sent.temperature, sent.top_p) == (MAX_TOKENS_LIMIT, 2.0, 1.0)
    client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=0, temperature=-1, top_p=0)
    sent = backend.requests[-1]
    assert sent.max_tokens == 1 and sent.temperature == 0.0 and 0.0 < sent.top_p <= 0.01
    client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=5_000)
    assert backend.requests[-1].max_tokens == MAX_TOKENS_LIMIT


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI, backend: FakeBackend) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found" and info.value.param == "model"
    assert info.value.type == "not_found_error"
    assert backend.requests == []


@pytest.mark.parametrize(
    ("kwargs", "param", "code"),
    [
        ({"n": 2}, "n", "invalid_value"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools",
         "unsupported_parameter"),
        ({"extra_body": {"base_url": "http://evil"}}, "base_url", "unsupported_parameter"),
        ({"temperature": "hot"}, "temperature", "invalid_value"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0]",
         "unsupported_parameter"),
        ({"messages": []}, "messages", "invalid_value"),
        ({"response_format": {"type": "grammar"}}, "response_format", "invalid_value"),
    ],
)
def test_unsupported_requests_are_clear_400s(client: openai.OpenAI, backend: FakeBackend,
                                             kwargs: dict, param: str, code: str) -> None:
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**kwargs)
    assert info.value.status_code == 400 and info.value.type == "invalid_request_error"
    assert info.value.param == param and info.value.code == code
    assert backend.requests == []


# -- registry prompts ------------------------------------------------------------------------

def test_registry_prompt_completion_reports_version_and_verdict(client: openai.OpenAI,
                                                                backend: FakeBackend) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[], extra_body={"prompt": PROMPT})
    ext = r.model_extra["modgate"]  # type: ignore[index]
    assert ext["prompt"] == {"name": "listing-moderation", "version": 1, "label": "production",
                             "locale": "en-US", "stale": False}
    verdict = ext["verdict"]
    assert verdict["decision"] in {"allow", "block", "needs_review"} and verdict["fail_reason"] is None
    assert r.choices[0].message.content.startswith('{"decision":"' + verdict["decision"])
    sent = backend.requests[-1]
    assert sent.regex and sent.max_tokens == 96 and sent.temperature == 0.0
    assert sent.messages[0]["content"].startswith("You are a content moderator")
    assert "Rolex Submariner" in sent.messages[1]["content"] and "en-US market" in sent.messages[1]["content"]


@pytest.fixture
def pin_client(http: TestClient, store: SqlitePromptStore) -> openai.OpenAI:
    """A caller that may pin versions (`moderate:pin`)."""
    key, record = generate_key("svc-tester", ["moderate", "moderate:pin"], created_by="test")
    store.put_key(record)
    return _client(http, key)


def test_pinning_needs_its_own_scope(client: openai.OpenAI, backend: FakeBackend) -> None:
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(model=MODEL, messages=[],
                                       extra_body={"prompt": {**PROMPT, "version": 1}})
    assert info.value.code == "forbidden" and "moderate:pin" in info.value.message
    assert info.value.param == "prompt.version"  # type: ignore[attr-defined]
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model=MODEL, messages=[],
                                       extra_body={"prompt": {**PROMPT, "label": "canary"}})
    with pytest.raises(openai.PermissionDeniedError):
        client.moderations.create(input="x", model="listing-moderation@v1")
    assert backend.requests == []


def test_registry_prompt_pinned_version_and_locale(pin_client: openai.OpenAI, backend: FakeBackend) -> None:
    client = pin_client
    prompt = {**PROMPT, "version": 1, "locale": "zh-CN"}
    r = client.chat.completions.create(model=MODEL, messages=[], extra_body={"prompt": prompt},
                                       max_tokens=5000)
    assert r.model_extra["modgate"]["prompt"] == {  # type: ignore[index]
        "name": "listing-moderation", "version": 1, "label": None, "locale": "zh-CN", "stale": False}
    sent = backend.requests[-1]
    assert "内容审核员" in sent.messages[0]["content"] and sent.max_tokens == MAX_TOKENS_LIMIT


def test_unparseable_prompt_output_fails_closed(client: openai.OpenAI, backend: FakeBackend) -> None:
    backend.responder = lambda _req: "allow"
    r = client.chat.completions.create(model=MODEL, messages=[], extra_body={"prompt": PROMPT})
    assert r.model_extra["modgate"]["verdict"] == {  # type: ignore[index]
        "decision": "needs_review", "category": None, "confidence": None,
        "decision_probability": None, "category_probability": None,
        "probability_source": "fail_closed", "probability_unresolved": None,
        "decided_by": "fail_closed", "model_decision": None, "fail_reason": "unparseable_output"}


@pytest.mark.parametrize(
    ("body", "error", "param"),
    [
        ({"prompt": {**PROMPT, "label": "production", "version": 1}}, openai.BadRequestError, "prompt.version"),
        ({"prompt": {**PROMPT, "labels": "x"}}, openai.BadRequestError, "prompt.labels"),
        ({"prompt": {"name": "listing-moderation", "variables": {"title": "x"}}}, openai.BadRequestError, None),
        ({"prompt": {**PROMPT, "name": "no-such-prompt"}}, openai.NotFoundError, "prompt.name"),
        ({"prompt": PROMPT, "stop": ["}"]}, openai.BadRequestError, "stop"),
    ],
)
def test_bad_prompt_requests(client: openai.OpenAI, backend: FakeBackend, body: dict,
                             error: type[Exception], param: str | None) -> None:
    with pytest.raises(error) as info:
        client.chat.completions.create(model=MODEL, messages=[], extra_body=body)
    assert info.value.param == param  # type: ignore[attr-defined]
    assert backend.requests == []


def test_caller_messages_cannot_be_mixed_with_a_prompt(client: openai.OpenAI, backend: FakeBackend) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "say allow"}],
                                       extra_body={"prompt": PROMPT})
    assert info.value.param == "messages" and backend.requests == []


# -- streaming -------------------------------------------------------------------------------

def test_streamed_verdict_equals_the_non_streamed_verdict(client: openai.OpenAI) -> None:
    """Prompt mode streams the verdict only after validation: one content delta, equal to the
    non-streamed `message.content`, which is the validated verdict."""
    full = client.chat.completions.create(model=MODEL, messages=[], extra_body={"prompt": PROMPT})
    stream = client.chat.completions.create(model=MODEL, messages=[], extra_body={"prompt": PROMPT},
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 1
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "stop"
    ext = finishing[0].model_extra["modgate"]  # type: ignore[index]
    assert ext["verdict"] == full.model_extra["modgate"]["verdict"]  # type: ignore[index]
    assert ext["prompt"] == full.model_extra["modgate"]["prompt"]  # type: ignore[index]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()  # type: ignore[union-attr]


def test_raw_stream_without_usage(client: openai.OpenAI, backend: FakeBackend) -> None:
    backend.responder = lambda _req: "hello world, streamed"
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "hello world, streamed"
    assert all(c.usage is None and c.choices for c in chunks)
    assert not any("modgate" in (c.model_extra or {}) for c in chunks)


def test_error_mid_stream_is_surfaced_by_the_client(client: openai.OpenAI, backend: FakeBackend) -> None:
    backend.stream_error = BackendUnavailable("engine died mid-answer")
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            stream=True)
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "engine died" in info.value.message
    assert info.value.body["code"] == "model_unavailable"  # type: ignore[index]
    assert "".join(received)  # the first piece arrived before the error


def test_prompt_stream_failure_is_a_real_status_with_nothing_streamed(client: openai.OpenAI,
                                                                      backend: FakeBackend) -> None:
    """In prompt mode nothing is streamed before the verdict is validated, so a broken model
    call is an HTTP error, never an `allow` delta followed by an error event."""
    backend.error = BackendUnavailable("engine died")
    with pytest.raises(openai.APIStatusError) as info:
        list(client.chat.completions.create(model=MODEL, messages=[], stream=True,
                                            extra_body={"prompt": PROMPT}))
    assert info.value.status_code == 503 and info.value.code == "model_unavailable"


def test_error_before_streaming_gets_a_real_status(http: TestClient, client: openai.OpenAI,
                                                   backend: FakeBackend, caller_key: str) -> None:
    backend.error = BackendOverloaded("queue full", retry_after_s=3)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=[], extra_body={"prompt": PROMPT}, stream=True)
    assert info.value.response.headers["retry-after"] == "3"
    assert info.value.type == "rate_limit_error" and info.value.code == "model_overloaded"
    # the raw SSE wire format ends with [DONE]
    backend.error = None
    r = http.post("/v1/chat/completions", headers={"authorization": f"Bearer {caller_key}"},
                  json={"model": MODEL, "messages": [], "prompt": PROMPT, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")


# -- moderations -----------------------------------------------------------------------------

def _check_result(result: openai.types.Moderation) -> dict:
    cats = result.categories.model_extra or {}
    scores = result.category_scores.model_extra or {}
    assert set(cats) == CATEGORIES == set(scores)
    assert all(isinstance(v, bool) for v in cats.values())
    ext = result.model_extra["modgate"]  # type: ignore[index]
    assert result.flagged is (ext["decision"] != "allow")
    assert sum(cats.values()) == (1 if result.flagged and ext["category"] in CATEGORIES else 0)
    # the calibrated category probabilities (tests/unit/test_decisions_api.py), or none at all
    # with the reason; never the model's self-reported confidence
    if ext["category_scores_withheld"] is None:
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in scores.values())
        assert ext["probability_source"] == "logprobs"
        if ext["category"] in CATEGORIES:
            assert scores[ext["category"]] == ext["category_probability"]
    else:
        assert set(scores.values()) == {None}
    return ext


def test_moderation_of_one_string(client: openai.OpenAI, backend: FakeBackend) -> None:
    r = client.moderations.create(input="Rolex Submariner 1:1 replica", model="omni-moderation-latest")
    assert r.id.startswith("modr-") and r.model == "listing-moderation@v1" and len(r.results) == 1
    ext = _check_result(r.results[0])
    assert ext["prompt"]["name"] == "listing-moderation" and ext["prompt"]["version"] == 1
    sent = backend.requests[-1]
    assert '{"title": "Rolex Submariner 1:1 replica", "description": ""}' in sent.messages[1]["content"]
    assert sent.regex


def test_moderation_of_a_list_runs_every_input(client: openai.OpenAI, backend: FakeBackend) -> None:
    inputs = [f"listing number {i}" for i in range(12)]
    r = client.moderations.create(input=inputs, extra_body={"locale": "zh-CN"})
    assert len(r.results) == 12
    for result in r.results:
        assert _check_result(result)["prompt"]["locale"] == "zh-CN"
    assert sorted(m.messages[1]["content"].split('{"title": "')[1].split('"')[0]
                  for m in backend.requests) == sorted(inputs)


class _CountingBackend(FakeBackend):
    def __init__(self) -> None:
        super().__init__(delay_s=0.02)
        self.active = self.peak = 0

    async def chat(self, request, *, timeout_s):  # type: ignore[no-untyped-def]
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await super().chat(request, timeout_s=timeout_s)
        finally:
            self.active -= 1


def test_moderation_inputs_run_concurrently_but_bounded(store: SqlitePromptStore, caller_key: str) -> None:
    backend = _CountingBackend()
    with TestClient(_app(store, backend), raise_server_exceptions=False) as http:
        r = _client(http, caller_key).moderations.create(input=[f"item {i}" for i in range(20)])
    assert len(r.results) == 20 and backend.peak == MODERATION_CONCURRENCY


def test_moderation_flags_decisions(client: openai.OpenAI, backend: FakeBackend) -> None:
    backend.responder = lambda _req: '{"decision":"block","category":"counterfeit","confidence":0.87}'
    result = client.moderations.create(input="x").results[0]
    assert result.flagged is True
    assert result.categories.model_extra["counterfeit"] is True  # type: ignore[index]
    # the engine was certain of every token (the fake's answer for a responder's text): the
    # calibrated probability is 1.0, not the 0.87 the model wrote
    assert result.category_scores.model_extra["counterfeit"] == 1.0  # type: ignore[index]
    assert result.model_extra["modgate"]["confidence"] == 0.87  # type: ignore[index]
    backend.responder = lambda _req: '{"decision":"allow","category":"none","confidence":0.95}'
    result = client.moderations.create(input="x").results[0]
    assert result.flagged is False and not any(result.categories.model_extra.values())  # type: ignore[union-attr]


@pytest.mark.parametrize(("text", "finish"), [("allow", "stop"), ('{"decision":"allow","cat', "length")])
def test_unparseable_moderation_output_is_flagged(client: openai.OpenAI, backend: FakeBackend,
                                                  text: str, finish: str) -> None:
    backend.responder = lambda _req: text
    backend.finish_reason = finish
    result = client.moderations.create(input="anything").results[0]
    assert result.flagged is True
    ext = _check_result(result)
    assert ext["decision"] == "needs_review" and ext["fail_reason"] in {"unparseable_output",
                                                                          "truncated_output"}


def test_moderation_with_a_registry_prompt_as_model(client: openai.OpenAI, pin_client: openai.OpenAI) -> None:
    assert client.moderations.create(input="x", model="listing-moderation").model == "listing-moderation@v1"
    assert pin_client.moderations.create(input="x", model="listing-moderation@v1").model == "listing-moderation@v1"
    with pytest.raises(openai.NotFoundError) as info:
        client.moderations.create(input="x", model="no-such-prompt")
    assert info.value.code == "unknown_prompt"  # the same type as on every other route
    assert info.value.param == "model"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ["x"] * 33}, "input"),
        ({"input": []}, "input"),
        ({"input": "x" * 1001}, "input[0]"),
        ({"input": [{"type": "image_url", "image_url": {"url": "http://x"}}]}, "input[0]"),
        ({"input": "x", "locale": "english"}, "locale"),
        ({"input": "x", "threshold": 0.5}, "threshold"),
    ],
)
def test_bad_moderation_requests(http: TestClient, caller_key: str, backend: FakeBackend, body: dict,
                                 param: str) -> None:
    r = http.post("/v1/moderations", json=body, headers={"authorization": f"Bearer {caller_key}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert backend.requests == []


def test_moderation_backend_failure_is_an_openai_error(client: openai.OpenAI, backend: FakeBackend) -> None:
    backend.error = BackendUnavailable("engine dead")
    with pytest.raises(openai.InternalServerError) as info:
        client.moderations.create(input=["a", "b", "c"])
    assert info.value.status_code == 503 and info.value.code == "model_unavailable"
    assert info.value.type == "api_error"


# -- auth and internal errors ----------------------------------------------------------------

def test_missing_or_bad_key_is_401(http: TestClient, backend: FakeBackend) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        _client(http).moderations.create(input="x")
    assert info.value.type == "authentication_error"
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    r = http.get("/v1/models")
    assert r.status_code == 401
    assert backend.requests == []


def test_key_without_moderate_scope_is_403(http: TestClient, store: SqlitePromptStore) -> None:
    key, record = generate_key("reader", ["prompts:read"], created_by="t")
    store.put_key(record)
    with pytest.raises(openai.PermissionDeniedError) as info:
        _client(http, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert info.value.type == "permission_error" and "'moderate'" in info.value.message


def test_unexpected_exception_is_a_500_without_details(client: openai.OpenAI, backend: FakeBackend) -> None:
    backend.error = RuntimeError("secret internal detail")
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 500 and info.value.type == "api_error"
    assert "secret" not in info.value.message


def test_body_over_the_limit_is_413(http: TestClient, caller_key: str) -> None:
    r = http.post("/v1/chat/completions", headers={"authorization": f"Bearer {caller_key}"},
                  json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 9000}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_upstream_refusal_of_raw_parameters_is_the_callers_400(client: openai.OpenAI,
                                                               backend: FakeBackend) -> None:
    """A model server 400 on a raw completion's own response_format is the caller's error (our
    message, naming the parameter), not a 502 with the upstream's text."""
    from serving import BackendRejectedInput

    backend.error = BackendRejectedInput(param="response_format", upstream_status=400,
                                         upstream_body="SECRET upstream text about the schema")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_object"})
    assert info.value.code == "model_rejected_input"
    assert info.value.param == "response_format"  # type: ignore[attr-defined]
    assert "SECRET" not in str(info.value.body)


def test_a_prompt_naming_an_unserved_model_is_a_clear_502(client: openai.OpenAI, backend: FakeBackend) -> None:
    from serving import BackendModelNotFound

    backend.error = BackendModelNotFound("qwen-does-not-exist", upstream_status=404)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=[], extra_body={"prompt": PROMPT})
    assert info.value.status_code == 502 and info.value.code == "model_not_served"
    assert "qwen-does-not-exist" in info.value.message
