"""Locales per BCP 47 (issue #18 item 10): what callers send is normalised, scripts are
understood, fallbacks are visible, and text with no locale is not judged by the English prompt."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from prompt_registry.locales import LocaleError, guess_locale, match_locale, normalize_locale
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend


@pytest.mark.parametrize(("tag", "canonical"), [
    ("zh_CN", "zh-CN"), ("ZH-cn", "zh-CN"), ("zh-hans-cn", "zh-Hans-CN"), ("es-419", "es-419"),
    ("en", "en"), ("zh-Hant-TW", "zh-Hant-TW"),
])
def test_tags_are_normalised(tag: str, canonical: str) -> None:
    assert normalize_locale(tag) == canonical


@pytest.mark.parametrize("tag", ["english", "zh--CN", "z", "zh-CN-extra-stuff", "../../etc", "x" * 40])
def test_non_locales_are_refused(tag: str) -> None:
    with pytest.raises(LocaleError):
        normalize_locale(tag)


@pytest.mark.parametrize(("requested", "available", "served"), [
    ("zh-Hans-CN", ["zh-CN"], "zh-CN"),          # script + region → the Simplified variant
    ("zh-TW", ["zh-CN", "zh-TW"], "zh-TW"),      # exact wins
    ("zh-HK", ["zh-CN", "zh-TW"], "zh-TW"),      # Traditional region → the Traditional variant
    ("zh-Hant", ["zh-CN", "zh-TW"], "zh-TW"),
    ("zh-TW", ["zh-CN"], "zh-CN"),               # no Traditional variant: same language, visible
    ("en-GB", ["zh-CN"], "en-US"),               # same language as the default
    ("es-419", ["zh-CN"], "en-US"),              # nothing for Spanish: the default
])
def test_variant_matching(requested: str, available: list[str], served: str) -> None:
    assert match_locale(requested, available, "en-US") == served


def test_text_without_a_locale_gets_its_script() -> None:
    assert guess_locale("劳力士 高仿 一比一") == "zh-CN"
    assert guess_locale("這個勞力士是真的") == "zh-TW"
    assert guess_locale("kids bicycle") is None


@pytest.fixture
def client(store: SqlitePromptStore, backend: FakeBackend, caller_key: str) -> Iterator[TestClient]:
    with TestClient(create_app(GatewaySettings(), store, backend),
                    headers={"authorization": f"Bearer {caller_key}"}) as c:
        yield c


@pytest.mark.parametrize("tag", ["zh_CN", "ZH-cn", "zh-Hans-CN"])
def test_moderate_takes_bcp47_locales(client: TestClient, tag: str) -> None:
    r = client.post("/v1/moderate", json={"item_id": "i", "seller_id": "s", "title": "手表", "locale": tag})
    assert r.status_code == 200, r.text
    assert r.json()["prompt"]["locale"] == "zh-CN"


def test_an_omitted_locale_is_the_prompts_default(client: TestClient) -> None:
    r = client.post("/v1/moderate", json={"item_id": "i", "seller_id": "s", "title": "watch"})
    assert r.status_code == 200 and r.json()["prompt"]["locale"] == "en-US"


def test_moderations_without_a_locale_judge_chinese_with_the_chinese_prompt(
        client: TestClient, backend: FakeBackend) -> None:
    r = client.post("/v1/moderations", json={"input": ["劳力士 高仿 一比一", "kids bicycle"]})
    assert r.status_code == 200, r.text
    locales = [res["modgate"]["prompt"]["locale"] for res in r.json()["results"]]
    assert locales == ["zh-CN", "en-US"]
    assert any("内容审核员" in m["content"] for m in backend.requests[0].messages + backend.requests[1].messages)
