"""`gateway.workers: 2`: a real `modgate gateway` with two worker processes on one port, in front
of the stub upstream (`benchmarks/stub_upstream.py`, no model).

One label move made through one request is served by both workers within the bound; /metrics
answered by either worker counts the requests of both (once each has written its figures, at most
`metric_files.FLUSH_S` later); the decision log has one stream per
worker and the export merges them in time order; a caller's burst holds for the gateway, not
per worker; a killed worker is replaced. Plus the configuration rules of the field.
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from gateway.config import ConfigError, load_config
from gateway.decision_log import list_segments
from gateway.metric_files import FLUSH_S
from prompt_registry.keys import generate_key
from prompt_registry.loader import seed_store
from prompt_registry.sqlite_store import SqlitePromptStore
from testsupport.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
LISTING = {"item_id": "item-1", "seller_id": "seller-1", "title": "Wireless earbuds, sealed box",
           "description": "Genuine product.", "locale": "en-US"}


@contextlib.contextmanager
def _listening() -> Iterator[int]:
    """A port something else listens on, for as long as the block runs."""
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield int(busy.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"process exited with {proc.returncode}:\n{out}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def _fresh(method: str, url: str, **kw: Any) -> httpx.Response:
    """One request on a new connection: the kernel picks the worker per connection."""
    with httpx.Client(timeout=10) as c:
        return c.request(method, url, **kw)


def _write_config(tmp: Path, *, port: int, stub_port: int, **gateway: Any) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(tmp / "data")
    config["registry"]["seed_dir"] = None
    config["gateway"].update(port=port, **gateway)
    config["serving"].update(mode="http", base_url=f"http://127.0.0.1:{stub_port}/v1")
    path = tmp / "modgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("workers")
    store = SqlitePromptStore(tmp / "data" / "registry.db")
    seed_store(store, ROOT / "configs" / "prompts")
    spec = store.resolve("listing-moderation", "production").spec
    store.publish(spec.model_copy(update={"description": "v2"}), actor="test")
    keys = {}
    for name, scopes in (("admin", ["admin"]), ("caller", ["moderate"]), ("limited", ["moderate"])):
        keys[name], record = generate_key(name, scopes, created_by="test")
        store.put_key(record)
    store.close()
    stub_port, port = free_port(), free_port()
    stub = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "stub_upstream.py"),
                             "--port", str(stub_port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    cfg = _write_config(tmp, port=port, stub_port=stub_port, workers=2, caller_limits={
        "enabled": True, "rate_per_s": 1000, "burst": 1000,
        "callers": {"limited": {"rate_per_s": 0.001, "burst": 6}}})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    gw = subprocess.Popen([sys.executable, "-m", "gateway.cli.main", "gateway", "--config", str(cfg)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"http://127.0.0.1:{stub_port}/v1/models", stub)
        _wait_http(f"{url}/healthz", gw)
        yield {"url": url, "keys": keys, "proc": gw, "tmp": tmp, "config": cfg}
    finally:
        for p in (gw, stub):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in (gw, stub):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def _workers_seen(stack: dict[str, Any], want: set[int] | None = None, tries: int = 200) -> dict[int, int]:
    """pid -> served production version, over fresh connections, until *want* (or 2) are seen."""
    seen: dict[int, int] = {}
    for _ in range(tries):
        body = _fresh("GET", f"{stack['url']}/v1/cache/prompts",
                      headers={"x-api-key": stack["keys"]["admin"]}).json()
        version = next(e["version"] for e in body["entries"] if e["label"] == "production")
        seen[body["process"]] = version
        if (want is None and len(seen) >= 2) or (want is not None and want <= set(seen)):
            break
    return seen


def _cache_events(stack: dict[str, Any], pids: set[int], tries: int = 200) -> dict[int, int]:
    """pid -> change events its prompt cache has received, over fresh connections."""
    seen: dict[int, int] = {}
    for _ in range(tries):
        body = _fresh("GET", f"{stack['url']}/v1/cache/prompts",
                      headers={"x-api-key": stack["keys"]["admin"]}).json()
        seen[body["process"]] = body["stats"]["events"]
        if pids <= set(seen):
            break
    return seen


def _until_served(stack: dict[str, Any], pids: set[int], version: int, within_s: float) -> dict[int, int]:
    """pid -> served production version, polled until each of *pids* serves *version*."""
    seen: dict[int, int] = {}
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and any(seen.get(pid) != version for pid in pids):
        seen.update(_workers_seen(stack, want=pids, tries=40))
    return seen


def test_a_label_move_through_one_worker_is_served_by_both(stack: dict[str, Any]) -> None:
    """Both workers serve the move by its change event, not by the periodic re-read
    (`refresh_s`, 30 s): proved by each worker's count of change events, not by how soon."""
    url, keys = stack["url"], stack["keys"]
    before = _workers_seen(stack)
    assert len(before) == 2, f"one port, two worker processes: {before}"
    assert set(before.values()) == {1}
    events_before = _cache_events(stack, set(before))
    moved = _fresh("PUT", f"{url}/v1/prompts/listing-moderation/labels/production",
                   headers={"x-api-key": keys["admin"]},
                   json={"version": 2, "expected_version": 1,
                         "override": {"reason": "test: v2 has no scorecard"}})
    assert moved.status_code == 200, moved.text
    after = _until_served(stack, set(before), 2, within_s=60)
    assert after == {pid: 2 for pid in before}, after
    events_after = _cache_events(stack, set(before))
    assert all(events_after[pid] > events_before[pid] for pid in before), (events_before, events_after)
    # Moderations over fresh connections (both workers) are all answered by v2.
    for i in range(20):
        r = _fresh("POST", f"{url}/v1/moderate", headers={"x-api-key": keys["caller"]},
                   json={**LISTING, "item_id": f"item-{i}"})
        assert r.status_code == 200, r.text
        assert r.json()["prompt"]["version"] == 2


def test_metrics_from_either_worker_count_both(stack: dict[str, Any]) -> None:
    url, keys = stack["url"], stack["keys"]

    def count(text: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("modgate_requests_total{") and 'route="/v1/moderate"' in line
                   and 'code="200"' in line)

    def settled(want: float | None = None) -> float:
        """The count once every worker has written its figures (gateway.metric_files: each
        writes its values at most FLUSH_S after they change): *want*, or the same over a span
        of several flush intervals."""
        last, since = None, time.monotonic()
        deadline = since + 60
        while time.monotonic() < deadline:
            got = count(_fresh("GET", f"{url}/metrics").text)
            if got == want or (want is None and got == last and time.monotonic() - since > 3 * FLUSH_S):
                return got
            if got != last:
                last, since = got, time.monotonic()
            time.sleep(0.1)
        raise AssertionError(f"/metrics counted {last}, wanted {want}")

    base = settled()
    for i in range(12):
        assert _fresh("POST", f"{url}/v1/moderate", headers={"x-api-key": keys["caller"]},
                      json={**LISTING, "item_id": f"m-{i}"}).status_code == 200
    settled(base + 12)
    scrapes = [_fresh("GET", f"{url}/metrics").text for _ in range(10)]
    assert {count(t) for t in scrapes} == {base + 12}  # every scrape, whichever worker answers
    assert "modgate_rollout_metrics_refresh_errors_total" in scrapes[0]  # scrape-time collectors too
    assert not any('pid="' in line for line in scrapes[0].splitlines()
                   if line.startswith("modgate_inflight_requests"))  # summed over workers


def test_a_callers_burst_holds_across_workers(stack: dict[str, Any]) -> None:
    codes = [_fresh("POST", f"{stack['url']}/v1/moderate", headers={"x-api-key": stack["keys"]["limited"]},
                    json={**LISTING, "item_id": f"l-{i}"}).status_code for i in range(14)]
    assert codes.count(200) == 6 and codes.count(429) == 8, codes


def test_zz_each_worker_logs_its_own_stream_and_export_merges_them(stack: dict[str, Any]) -> None:
    """Runs last (zz): stops the gateway to read its complete log."""
    proc: subprocess.Popen[bytes] = stack["proc"]
    # A killed worker is replaced, and the gateway keeps serving on both.
    pids = set(_workers_seen(stack))
    os.kill(next(iter(pids)), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            now = set(_workers_seen(stack, tries=40))
        except (httpx.HTTPError, ValueError):
            now = set()
        if len(now) == 2 and now != pids:
            break
        time.sleep(0.2)
    assert len(now) == 2 and len(now & pids) == 1, (pids, now)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()
    assert b"with 2 worker processes" in out and b"restarting it" in out

    root = stack["tmp"] / "data" / "decisions"
    streams = {d.name: segs for d, segs in list_segments(root).items()}
    host = socket.gethostname()
    assert set(streams) == {f"{host}-w0", f"{host}-w1"}, streams
    from typer import Typer

    from gateway.cli.decisions import decisions_app

    app = Typer()
    app.add_typer(decisions_app, name="decisions")
    out_csv = stack["tmp"] / "all.csv"
    r = CliRunner().invoke(app, ["decisions", "export", "--config", str(stack["config"]),
                                 "--out", str(out_csv), "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    with open(out_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    items = [r["item_id"] for r in rows]
    assert {f"item-{i}" for i in range(20)} <= set(items) and {f"m-{i}" for i in range(12)} <= set(items)
    assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)  # one stream, in time order
    v2 = [r for r in rows if r["item_id"].startswith("item-")]
    assert {r["prompt_version"] for r in v2} == {"2"}
    # ... and both workers answered some of them: each stream holds moderations.
    per_stream = {name: sum(1 for seg in segs for _ in seg.path.open("rb")) for name, segs in streams.items()}
    assert all(n > 0 for n in per_stream.values()), per_stream


def test_workers_config_rules(tmp_path: Path) -> None:
    path = _write_config(tmp_path, port=8080, stub_port=9)
    assert load_config(path).gateway.workers == 1  # the default stays one process
    with pytest.raises(ConfigError, match="gateway.workers"):
        load_config(path, {"gateway.workers": 0})
    with pytest.raises(ConfigError, match=r"gateway.workers above 1 needs serving.transport: http"):
        load_config(path, {"gateway.workers": 2, "serving.mode": "ray", "serving.transport": "handle"})
    assert load_config(path, {"gateway.workers": 4}).gateway.workers == 4


@pytest.mark.parametrize("workers", [1, 2])
def test_a_taken_port_fails_cleanly(tmp_path: Path, workers: int) -> None:
    with _listening() as port:
        cfg = _write_config(tmp_path, port=port, stub_port=9, workers=workers)
        r = subprocess.run([sys.executable, "-m", "gateway.cli.main", "gateway", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1
    assert f"could not listen on 127.0.0.1:{port}" in r.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_up_with_a_taken_port_fails_before_it_starts_ray(tmp_path: Path, workers: int) -> None:
    """`modgate up` binds the gateway's port before Ray Serve starts (a minute or more): taken,
    it fails at once, and no Ray process it starts meanwhile can take the port (CI once lost a
    whole run to `address already in use` after the models had loaded)."""
    with _listening() as port:
        cfg = _write_config(tmp_path, port=port, stub_port=9, workers=workers)
        config = yaml.safe_load(cfg.read_text())
        config["serving"].update(mode="ray", transport="http", base_url=None)
        cfg.write_text(yaml.safe_dump(config))
        r = subprocess.run([sys.executable, "-m", "gateway.cli.main", "up", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"could not listen on 127.0.0.1:{port}" in r.stderr
    assert "serving: starting" not in r.stdout
    assert not (tmp_path / "data" / "local-keys.json").exists()


def test_a_worker_builds_its_own_streams_shared_limits_and_only_worker_0_delivers_webhooks(
        store: SqlitePromptStore, caller_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from gateway import bootstrap
    from gateway.limits import SharedCallerLimiter, SharedCallerTable
    from gateway.webhook_settings import WebhookSettings
    from gateway.webhooks import WebhookDispatcher
    from gateway.workers import WorkerContext
    from serving.fake_backend import FakeBackend

    settings_seen: list[WebhookSettings] = []

    class RecordingDispatcher(WebhookDispatcher):
        def __init__(self, settings: WebhookSettings, *args: Any, **kwargs: Any) -> None:
            settings_seen.append(settings)
            super().__init__(settings, *args, **kwargs)

    monkeypatch.setattr(bootstrap, "WebhookDispatcher", RecordingDispatcher)
    monkeypatch.setenv("HOOK_SECRET", "s" * 32)
    cfg = load_config(None, {"data_dir": str(tmp_path / "data"), "gateway.caller_limits": {"enabled": True},
                             "webhooks": {"subscribers": [{"name": "ops", "url": "http://127.0.0.1:9/x",
                                                           "secret_env": "HOOK_SECRET"}]}})
    SharedCallerTable.create(tmp_path / "caller-limits.bin", workers=2)
    for index in (0, 1):
        ctx = WorkerContext(index=index, count=2, run_dir=tmp_path)
        app = bootstrap.build_gateway(cfg, store, backend=FakeBackend(), worker=ctx)
        with TestClient(app, headers={"authorization": f"Bearer {caller_key}"}) as client:
            r = client.post("/v1/moderate", json={"item_id": f"i-{index}", "title": "bike"})
            assert r.status_code == 200, r.text
            limiter = app.state.gateway.service.limiter
            assert isinstance(limiter, SharedCallerLimiter) and limiter.worker == index
        assert list((tmp_path / "data" / "decisions" / ctx.replica).glob("decisions-*.jsonl"))
    assert [len(s.subscribers) for s in settings_seen] == [1, 0]
