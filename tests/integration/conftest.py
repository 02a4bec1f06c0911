"""The real stack — Ray Serve + vLLM CPU engine + gateway on real sockets — started once per
test session as a `modgate up` subprocess with its own ports, data directory, registry and Ray
temp directory (RAY_TMPDIR), so nothing of another stack on the machine, running or orphaned,
is shared with it; its teardown leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from testsupport.otlp_receiver import OtlpHttpReceiver
from testsupport.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = float(os.environ.get("MODGATE_TEST_START_TIMEOUT", "600"))


@dataclass
class Stack:
    gateway_url: str
    serving_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    data_dir: Path
    transport: str = "http"  # as configured: http, or auto (the default)
    ray_tmpdir: Path | None = None  # the stack's RAY_TMPDIR: Ray keeps its sessions in <it>/ray

    @property
    def headers(self) -> dict[str, str]:
        """The caller key `modgate up` created on first start."""
        keys = json.loads((self.data_dir / "local-keys.json").read_text())
        return {"authorization": f"Bearer {keys['local-caller']}"}

    @property
    def admin_headers(self) -> dict[str, str]:
        keys = json.loads((self.data_dir / "local-keys.json").read_text())
        return {"authorization": f"Bearer {keys['local-admin']}"}

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def ray_processes(self) -> list[psutil.Process]:
        """Every live process of this stack's Ray cluster, wherever it was reparented: all
        inherit the RAY_TMPDIR `modgate up` was started with (another stack's, even one
        orphaned by an earlier run, never matches)."""
        assert self.ray_tmpdir is not None
        return _processes_with_env("RAY_TMPDIR", str(self.ray_tmpdir))

    def ray_processes_where(self, test: Callable[[psutil.Process], bool]) -> list[psutil.Process]:
        """This stack's Ray processes *test* holds for; one that ends meanwhile (Ray ends idle
        workers all the time) is left out instead of failing the caller."""
        out = []
        for p in self.ray_processes():
            try:
                if test(p):
                    out.append(p)
            except (psutil.Error, IndexError):
                continue
        return out

    def engine_processes(self) -> list[psutil.Process]:
        procs = psutil.Process(self.process.pid).children(recursive=True)
        out = []
        for p in procs:
            try:
                if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name():
                    out.append(p)
            except psutil.Error:
                continue
        return out


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpHttpReceiver]:
    """Where the gateway and the vLLM engine both send their spans during the session."""
    receiver = OtlpHttpReceiver()
    yield receiver
    receiver.close()


# "auto" is the shipped default (no serving.transport in the config): `modgate up` with one
# gateway process resolves it to deployment handles.
TRANSPORTS = ["http", "auto"]
SECOND_MODEL = "tiny-llama-b"


@pytest.fixture(scope="session", params=TRANSPORTS)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          otlp: OtlpHttpReceiver) -> Iterator[Stack]:
    """The same tests run against both ways the gateway reaches the model: Ray Serve's HTTP
    proxy (OpenAI-compatible) and Ray Serve deployment handles (the default, `auto`)."""
    tmp = tmp_path_factory.mktemp(f"stack-{request.param}")
    gateway_port, serving_port = free_port(), free_port()
    config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(tmp / "data")
    config["registry"]["seed_dir"] = str(ROOT / "configs" / "prompts")
    config["gateway"]["port"] = gateway_port
    config["gateway"]["readiness_cache_s"] = 0  # the destructive test reads readiness right after a kill
    config["serving"]["ray"]["http_port"] = serving_port
    if request.param != "auto":
        config["serving"]["transport"] = request.param
    # Tracing end to end: the gateway and the engine export to the same receiver.
    config["tracing"] = {"exporter": "otlp_http", "endpoint": otlp.endpoint, "sample_ratio": 1.0}
    model = config["serving"]["models"][0]
    model["engine_kwargs"]["otlp_traces_endpoint"] = otlp.endpoint
    model["env"] = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
    # A second model (same tiny weights, its own Ray Serve deployment and engine): prompt
    # versions choose the model they run on (test_a_prompt_version_runs_on_the_model_it_names).
    config["serving"]["models"].append({**model, "name": SECOND_MODEL})
    config_path = tmp / "modgate.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp / "stack.log"
    # Ray's own directory for this stack (short: Ray's unix sockets live under it, at most 107
    # bytes a path). In it, what a `ray start` cluster killed earlier leaves behind: its address
    # file. `modgate up` starts its own cluster (no `serving.ray.address`) and must ignore it;
    # ray.init() without address="local" tried to join it and failed.
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="mgray-", dir="/tmp"))  # not $TMPDIR: it may be long
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_tmpdir)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli.main", "up", "--config", str(config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True, env=env,
        )
    stack = Stack(f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{serving_port}/v1", proc, log_path,
                  tmp / "data", request.param, ray_tmpdir)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"stack exited with {proc.returncode} during start:\n{stack.log_tail()}")
            try:
                if httpx.get(f"{stack.gateway_url}/readyz", timeout=15).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"stack not ready after {START_TIMEOUT_S:.0f}s:\n{stack.log_tail()}")
            time.sleep(1.0)
        yield stack
    finally:
        try:
            _stop(proc, ray_tmpdir)
        finally:
            shutil.rmtree(ray_tmpdir, ignore_errors=True)


def _processes_with_env(name: str, value: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if _live(p) and p.environ().get(name) == value:
                out.append(p)
        except psutil.Error:
            continue
    return out


def _stop(proc: subprocess.Popen[bytes], ray_tmpdir: Path) -> None:
    """SIGINT (`modgate up` shuts Serve and Ray down), then SIGKILL for whatever is left of
    the stack: its descendants as they were, and every process carrying its RAY_TMPDIR, which
    also finds Ray processes started during shutdown or reparented when their parent died."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    leftovers = {p.pid: p for p in descendants if p.is_running()}
    leftovers.update((p.pid, p) for p in _processes_with_env("RAY_TMPDIR", str(ray_tmpdir)))
    for p in leftovers.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(leftovers.values()), timeout=30)
    assert not [p for p in alive if _live(p)], f"stack processes survived SIGKILL: {alive}"


def _live(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
