"""Calibrated verdict probabilities from token log-probabilities, and operating points.

The maths is checked on hand-built token sequences whose answers are worked out in the
comments; the backends on the OpenAI wire shape (vLLM's `logprobs.content`) and the fake's
own tokens; the serve-time rule end to end through /v1/moderate and the decision log.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from gateway.decision_log import DecisionLog
from gateway.quality.decisions import read_segments
from gateway.verdict import ChoiceScores, Verdict, apply_thresholds, parse_verdict, score_field
from prompt_registry.keys import generate_key
from prompt_registry.loader import seed_store
from prompt_registry.models import OperatingPoint, PromptSpec, VerdictSchema
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend
from serving.http_backend import OpenAIHttpBackend, build_chat_body, parse_logprobs
from serving.protocol import ChatRequest, ChatResult, TokenLogprob
from tests.handler_server import HandlerServer

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = VerdictSchema(decisions=["allow", "block", "needs_review"],
                       categories=["none", "counterfeit", "adult"], confidence=False)
HEAD = '{"decision":"'
L = math.log


def T(token: str, p: float, *alts: tuple[str, float]) -> TokenLogprob:  # noqa: N802
    return TokenLogprob(token=token, logprob=L(p), top=tuple((a, L(q)) for a, q in alts))


def _tokens(decision: TokenLogprob, category: TokenLogprob, tail: str = '"}') -> list[TokenLogprob]:
    return [T(HEAD, 1.0), decision, T('","category":"', 1.0), category, T(tail, 1.0)]


def _text(tokens: list[TokenLogprob]) -> str:
    return "".join(t.token for t in tokens)


# -- the maths ---------------------------------------------------------------------------------


def test_single_token_values_renormalise_over_the_allowed_ones() -> None:
    # decision position: block .6, allow .2, a forbidden "yes" .15, rest .05 unlisted.
    # Allowed listed mass .8 + unlisted .05 = .85: block .6/.85, allow .2/.85, unresolved .05/.85.
    toks = _tokens(T("block", .6, ("block", .6), ("allow", .2), ("yes", .15)),
                   T("adult", .9, ("adult", .9), ("none", .1)))
    v = parse_verdict(_text(toks), "stop", SCHEMA, logprobs=toks)
    s = v.decision_scores
    assert s is not None
    assert s.attributed == pytest.approx({"block": .6 / .85, "allow": .2 / .85, "needs_review": 0.0})
    assert s.unresolved == pytest.approx(.05 / .85)
    assert not s.exact
    # point estimate from what was resolved: .6 / .8
    assert v.decision_probability == pytest.approx(.75, abs=1e-6)
    assert s.bounds("block") == pytest.approx((.6 / .85, .65 / .85))
    assert v.category_probability == pytest.approx(.9) and v.category_scores is not None
    assert v.category_scores.exact


def test_engine_masked_alternatives_give_an_exact_distribution() -> None:
    # vLLM masks forbidden tokens to -inf (sent as -9999.0) before computing logprobs.
    dec = TokenLogprob("allow", L(.7), (("allow", L(.7)), ("needs", L(.2)), ("block", L(.1)),
                                        ("x", -9999.0)))
    toks = [T(HEAD, 1.0), dec, T("\",\"category\":\"", 1.0), T("none", 1.0, ("none", 1.0)), T('"}', 1.0)]
    s = score_field(toks, _text(toks), len(HEAD), "allow", SCHEMA.decisions)
    assert s is not None and s.exact
    assert s.attributed == pytest.approx({"allow": .7, "needs_review": .2, "block": .1})


def test_multi_token_values_follow_the_generated_path_through_the_shared_prefix() -> None:
    # allowed: allow, needs_review, needs_escalation. Token 1: "need" .6 (shared by two values),
    # "allow" .3, forbidden "xyz" .05, .05 unlisted: denominator .95.
    # allow = .3/.95; unresolved .05/.95; path weight .6/.95.
    # Token 2 "s_" is certain. Token 3: "review" .75, "esc" .25: needs_review = .6/.95 * .75,
    # needs_escalation = .6/.95 * .25.
    allowed = ["allow", "needs_review", "needs_escalation"]
    toks = [T(HEAD, 1.0), T("need", .6, ("need", .6), ("allow", .3), ("xyz", .05)),
            T("s_", 1.0, ("s_", 1.0)), T("review", .75, ("review", .75), ("esc", .25)), T('"', 1.0)]
    s = score_field(toks, _text(toks), len(HEAD), "needs_review", allowed)
    assert s is not None
    assert s.attributed == pytest.approx({"allow": .3 / .95, "needs_review": .6 / .95 * .75,
                                          "needs_escalation": .6 / .95 * .25})
    assert s.unresolved == pytest.approx(.05 / .95)


def test_a_shared_alternative_off_the_generated_path_stays_unresolved() -> None:
    # "n" (.2) could begin needs_review or needs_escalation; the engine did not say which.
    allowed = ["allow", "needs_review", "needs_escalation"]
    toks = [T(HEAD, 1.0), T("allow", .8, ("allow", .8), ("n", .2)), T('"', 1.0)]
    s = score_field(toks, _text(toks), len(HEAD), "allow", allowed)
    assert s is not None
    assert s.attributed == pytest.approx({"allow": .8, "needs_review": 0.0, "needs_escalation": 0.0})
    assert s.unresolved == pytest.approx(.2)
    assert s.bounds("needs_review") == pytest.approx((0.0, .2))


def test_a_token_straddling_the_value_start_and_a_value_that_prefixes_another() -> None:
    # ":"block" style merge: the token carries the opening quote; "block" vs "block_hard" differ
    # only at the closing quote, decided by the token after.
    allowed = ["allow", "block", "block_hard"]
    text = '{"decision":"block"}'
    toks = [T('{"decision":', 1.0), T('"block', .9, ('"block', .9), ('"allow', .1)),
            T('"}', .7, ('"}', .7), ("_hard", .3))]
    s = score_field(toks, text, len(HEAD), "block", allowed)
    assert s is not None and s.exact
    assert s.attributed == pytest.approx({"allow": .1, "block": .9 * .7, "block_hard": .9 * .3})


def test_unusable_token_streams_give_no_probability() -> None:
    toks = _tokens(T("block", .6, ("block", .6)), T("adult", 1.0))
    text = _text(toks)
    assert parse_verdict(text, "stop", SCHEMA, logprobs=toks[:-1]).decision_scores is None  # do not spell the text
    assert parse_verdict(text, "stop", SCHEMA).decision_probability is None  # no logprobs at all
    zero = _tokens(TokenLogprob("block", -math.inf, ()), T("adult", 1.0))
    assert parse_verdict(_text(zero), "stop", SCHEMA, logprobs=zero).decision_scores is None
    spaced = '{"decision": "block","category":"adult"}'
    assert parse_verdict(spaced, "stop", SCHEMA, logprobs=[T(spaced, 1.0)]).decision_scores is None


def test_probabilities_never_change_a_verdict_or_its_failure() -> None:
    toks = _tokens(T("allow", .01, ("allow", .01), ("block", .99)), T("none", 1.0))
    v = parse_verdict(_text(toks), "stop", SCHEMA, logprobs=toks)
    assert (v.decision, v.decided_by) == ("allow", "model")
    assert v.decision_probability == pytest.approx(.01)
    broken = parse_verdict(_text(toks)[:-1], "stop", SCHEMA, logprobs=toks)
    assert (broken.decision, broken.fail_reason, broken.decided_by) == (
        "needs_review", "unparseable_output", "fail_closed")
    assert broken.decision_probability is None


# -- operating points --------------------------------------------------------------------------

POINT = {"counterfeit": OperatingPoint(block_at=.8, review_at=.3)}


def _scored(decision: str, category: str, p_block: float, unresolved: float = 0.0) -> Verdict:
    rest = 1.0 - p_block - unresolved
    scores = ChoiceScores({"block": p_block, "allow": rest, "needs_review": 0.0}, unresolved)
    return Verdict(decision, category, None, decision_scores=scores)


@pytest.mark.parametrize(("p_block", "unresolved", "expected"), [
    (.8, 0.0, "block"), (.95, 0.0, "block"), (.79, 0.0, "needs_review"), (.3, 0.0, "needs_review"),
    (.29, 0.0, "allow"), (0.0, 0.0, "allow"),
    (.75, .1, "needs_review"),   # may be .85 or .75: not proven above block_at
    (.2, .05, "allow"),          # at most .25 < .3
    (.2, .15, "needs_review"),   # may reach .35
])
def test_operating_point_bands_on_the_bounds(p_block: float, unresolved: float, expected: str) -> None:
    for model_said in ("allow", "block", "needs_review"):
        v = apply_thresholds(_scored(model_said, "counterfeit", p_block, unresolved), POINT)
        assert (v.decision, v.decided_by, v.model_decision) == (expected, "threshold", model_said)


def test_categories_without_a_point_and_failures_stay_with_the_model() -> None:
    v = _scored("allow", "adult", .99)
    assert apply_thresholds(v, POINT) == v
    failed = Verdict("needs_review", None, None, fail_reason="invalid_verdict", decided_by="fail_closed")
    assert apply_thresholds(failed, POINT) == failed


def test_no_probability_fails_closed_only_where_the_model_allowed() -> None:
    allowed = apply_thresholds(Verdict("allow", "counterfeit", .9), POINT)
    assert (allowed.decision, allowed.decided_by, allowed.model_decision) == (
        "needs_review", "fail_closed", "allow")
    for decision in ("block", "needs_review"):
        v = Verdict(decision, "counterfeit", .9)
        assert apply_thresholds(v, POINT) == v


def _spec(**thresholds: dict[str, float]) -> PromptSpec:
    data = yaml.safe_load((ROOT / "configs/prompts/listing-moderation.yaml").read_text())
    if thresholds:
        data["thresholds"] = thresholds
    return PromptSpec.model_validate(data)


def test_thresholds_are_validated_against_the_schema() -> None:
    with pytest.raises(ValidationError, match="review_at"):
        _spec(counterfeit={"block_at": .3, "review_at": .5})
    with pytest.raises(ValidationError, match="not a violation category"):
        _spec(spam={"block_at": .9, "review_at": .5})
    with pytest.raises(ValidationError, match="not a violation category"):
        _spec(none={"block_at": .9, "review_at": .5})
    with pytest.raises(ValidationError):
        _spec(counterfeit={"block_at": 1.2, "review_at": .5})
    data = _spec().model_dump()
    data["verdict"]["decisions"] = ["allow", "needs_review"]
    data["thresholds"] = {"adult": {"block_at": .9, "review_at": .1}}
    with pytest.raises(ValidationError, match="lacks block"):
        PromptSpec.model_validate(data)


def test_thresholds_ship_with_the_version_but_do_not_change_cached_answers() -> None:
    plain, with_points = _spec(), _spec(counterfeit={"block_at": .9, "review_at": .4})
    other = _spec(counterfeit={"block_at": .95, "review_at": .4})
    assert len({plain.content_hash(), with_points.content_hash(), other.content_hash()}) == 3
    assert plain.answer_hash() == with_points.answer_hash() == other.answer_hash()
    # a version without thresholds hashes as before they existed
    data = plain.model_dump(mode="json")
    data["policy"].pop("change_note")
    data["policy"].pop("author")
    assert data.pop("thresholds") is None and data["evaluation"] is not None
    assert plain.content_hash() == hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


# -- backends ----------------------------------------------------------------------------------


REQ = ChatRequest(model="m", messages=[{"role": "user", "content": "a listing"}], max_tokens=64,
                  regex=SCHEMA.regex(), top_logprobs=20)


def _vllm_logprobs(tokens: list[TokenLogprob]) -> dict:
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
                         "top_logprobs": [{"token": a, "logprob": lp, "bytes": None} for a, lp in t.top]}
                        for t in tokens]}


def _http_chat(tokens: list[TokenLogprob], seen: dict) -> ChatResult:
    def handler(req: httpx.Request) -> httpx.Response:
        seen["body"] = orjson.loads(req.content)
        return httpx.Response(200, json={
            "model": "m", "usage": {"prompt_tokens": 3, "completion_tokens": len(tokens)},
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"content": _text(tokens)},
                         "logprobs": _vllm_logprobs(tokens)}]})

    async def go() -> ChatResult:
        async with HandlerServer(handler) as server:
            backend = OpenAIHttpBackend(server.base_url)
            try:
                return await backend.chat(REQ, timeout_s=5)
            finally:
                await backend.aclose()
    return asyncio.run(go())


def _fake_chat(request: ChatRequest = REQ) -> ChatResult:
    return asyncio.run(FakeBackend().chat(request, timeout_s=5))


@pytest.mark.parametrize("backend", ["http", "fake"])
def test_backend_contract_logprobs_spell_the_text_and_score_the_verdict(backend: str) -> None:
    """Both backends: asked for log-probabilities, the tokens spell the text exactly and the
    generated token is among the alternatives; the verdict gets probabilities."""
    seen: dict = {}
    reference = _fake_chat()
    result = _http_chat(list(reference.logprobs or ()), seen) if backend == "http" else reference
    assert result.logprobs is not None
    assert _text(list(result.logprobs)) == result.text
    assert all(any(a == t.token for a, _ in t.top) for t in result.logprobs)
    v = parse_verdict(result.text, result.finish_reason, SCHEMA, logprobs=result.logprobs)
    assert v.decision_scores is not None and v.decision_scores.exact
    assert v.category_scores is not None and v.category_scores.exact
    assert v.decision_probability == max(v.decision_scores.attributed.values())  # greedy
    if backend == "http":
        assert (seen["body"]["logprobs"], seen["body"]["top_logprobs"]) == (True, 20)


def test_no_logprobs_asked_none_returned() -> None:
    assert "logprobs" not in build_chat_body(ChatRequest(model="m", messages=[], max_tokens=8))
    plain = ChatRequest(model="m", messages=REQ.messages, max_tokens=64, regex=SCHEMA.regex())
    assert _fake_chat(plain).logprobs is None
    assert _fake_chat(plain).text == _fake_chat().text


def test_fake_top_k_is_truncated_like_an_engine_and_the_missing_mass_is_bounded() -> None:
    result = _fake_chat(ChatRequest(model="m", messages=REQ.messages, max_tokens=64,
                                    regex=SCHEMA.regex(), top_logprobs=1))
    v = parse_verdict(result.text, "stop", SCHEMA, logprobs=result.logprobs)
    s = v.decision_scores
    assert s is not None and not s.exact
    p = v.decision_probability
    assert p == 1.0  # from what is present: only the generated value
    lo, hi = s.bounds(v.decision) or (0, 0)
    assert lo < 1.0 == pytest.approx(hi)


@pytest.mark.parametrize("block", [None, [], {"content": None}, {"content": [{"token": 1, "logprob": 0}]},
                                   {"content": [{"token": "a"}]}, {"content": [{"token": "a", "logprob": True}]}])
def test_malformed_logprobs_are_dropped_not_fatal(block: object) -> None:
    assert parse_logprobs(block) is None


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture
def thresholded(tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    """The shipped prompt with an operating point at 0 for every violation category: any
    verdict in one is blocked by the threshold."""
    data = yaml.safe_load((ROOT / "configs/prompts/listing-moderation.yaml").read_text())
    cats = [c for c in data["verdict"]["categories"] if c != "none"]
    data["thresholds"] = {c: {"block_at": 0.0, "review_at": 0.0} for c in cats}
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "p.yaml").write_text(yaml.safe_dump(data))
    store = SqlitePromptStore(tmp_path / "r.db")
    seed_store(store, tmp_path / "prompts")
    key, record = generate_key("svc", ["moderate"], created_by="test")
    store.put_key(record)
    log = DecisionLog(tmp_path / "decisions", replica="gw-0")
    app = create_app(GatewaySettings(), store, FakeBackend(), decision_log=log)
    with TestClient(app, headers={"authorization": f"Bearer {key}"}) as client:
        yield client, tmp_path / "decisions"
    store.close()


def test_thresholds_decide_at_serve_time_and_are_recorded(thresholded: tuple[TestClient, Path]) -> None:
    client, log_dir = thresholded
    bodies = []
    for i in range(12):
        r = client.post("/v1/moderate", json={"item_id": f"it-{i}", "title": f"listing {i}",
                                              "description": "d"})
        assert r.status_code == 200, r.text
        bodies.append(r.json())
    by_threshold = [b for b in bodies if b["category"] != "none"]
    by_model = [b for b in bodies if b["category"] == "none"]
    assert by_threshold and by_model  # the fake's hash gives both kinds over 12 listings
    assert all(b["decision"] == "block" and b["decided_by"] == "threshold" for b in by_threshold)
    assert all(b["decided_by"] == "model" for b in by_model)
    assert all(0.5 <= b["decision_probability"] <= 0.99 for b in bodies)
    assert all(b["category_probability"] is not None and b["confidence"] is not None for b in bodies)
    client.portal.call(client.app.state.gateway.service.decision_log.flush)  # type: ignore[attr-defined]
    records = {r.item_id: r for r in read_segments(log_dir)}
    for b in bodies:
        rec = records[b["item_id"]]
        assert (rec.decision, rec.decided_by, rec.decision_probability) == (
            b["decision"], b["decided_by"], b["decision_probability"])
        assert rec.probability_unresolved == 0.0 and rec.block_probability is not None
        if b["decided_by"] == "threshold":
            assert rec.model_decision in {"allow", "block", "needs_review"}
