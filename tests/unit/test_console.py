"""The prompt-ops console (`/console`) and the offline `/docs`: sessions, CSRF, scopes, the
playground and review form calling the same code as the API, and nothing loaded from
another origin."""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend


class _Refs(HTMLParser):
    """Every URL an HTML page makes the browser load (script/link/img/iframe/... src/href)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.inline_scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for attr in ("src", "href", "action", "data", "poster"):
            if a.get(attr) and not (tag == "a" and attr == "href"):
                self.refs.append(str(a[attr]))
        if tag == "script" and not a.get("src"):
            self.inline_scripts += 1


def refs_of(html: str) -> _Refs:
    parser = _Refs()
    parser.feed(html)
    return parser


def assert_same_origin(refs: list[str]) -> None:
    assert refs, "the page loads nothing at all?"
    for ref in refs:
        parts = urlsplit(ref)
        assert not parts.scheme and not parts.netloc, f"{ref} is loaded from another origin"
        assert ref.startswith("/"), f"{ref}: expected an absolute path on this origin"


@pytest.fixture
def app_client(store: SqlitePromptStore, backend: FakeBackend) -> Iterator[TestClient]:
    settings = GatewaySettings(key_cache_s=0, readiness_cache_s=0)
    with TestClient(create_app(settings, store, backend, models=["tiny-llama"]),
                    raise_server_exceptions=False) as c:
        yield c


def test_docs_are_served_from_the_gateway(app_client: TestClient) -> None:
    r = app_client.get("/docs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    refs = refs_of(r.text)
    assert_same_origin(refs.refs)
    for ref in refs.refs:
        asset = app_client.get(ref)
        assert asset.status_code == 200 and asset.content, ref
    assert "cdn" not in r.text.lower() and "https://" not in r.text
    assert app_client.get("/openapi.json").status_code == 200
    assert app_client.get("/redoc").status_code == 404  # ReDoc loads from a CDN: switched off
