"""Serving the gateway app: one process, or `gateway.workers` processes on one port.

Several workers: why SO_REUSEPORT processes and not uvicorn's `--workers`? uvicorn's
supervisor needs the app as an import string (every worker builds it from scratch: the
store, seeding and keys would have to move into a factory reading the config again from the
environment), and its workers share one listening socket, whose wake-ups are left to the
event loops: under light load one worker tends to take most connections. Here the supervisor
(this process) does what only it should do once (open and seed the store, mint local keys,
start Ray Serve for `modgate up`), then starts N worker processes (multiprocessing spawn:
nothing of the supervisor's state, SQLite connections included, is inherited). Each builds the
app with `build_gateway(..., worker=WorkerContext)` and listens on the port with its own
SO_REUSEPORT socket: the kernel spreads new connections evenly over the workers, no worker is
woken for a connection another one takes, and each worker is exactly the single-process
gateway, so CPU per request does not change with N. Linux only (elsewhere SO_REUSEPORT does
not balance); `gateway.workers: 1` (the default) serves in this process as before.

The supervisor:

* checks the port once without SO_REUSEPORT (so a second gateway on the same port fails to
  start instead of silently sharing it), and resolves port 0 to the port the workers use;
* makes a per-run directory (under /dev/shm when there is one) holding the metrics files of
  prometheus-client's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`, set for the workers) and
  the shared caller-limits table, and deletes it when it stops;
* prints the banner once every worker listens; a worker that exits before it listened stops
  the gateway (exit 1, like a single process that cannot start);
* restarts a worker that dies later (after zeroing its in-flight counts in the limits table and
  marking its live gauges dead), at most once per `_RESTART_BACKOFF_S`;
* on SIGINT/SIGTERM sends SIGTERM to every worker (each shuts down gracefully, draining
  requests and flushing its decision log) and waits for them. Workers run in their own process
  group, so a Ctrl-C reaches them once, through the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess
    from multiprocessing.synchronize import Event

    from fastapi import FastAPI

    from gateway.config import AppConfig
    from gateway.workers import WorkerContext

__all__ = ["CannotListen", "Listeners", "bind_listeners", "serve_app", "serve_workers"]

log = logging.getLogger("modgate.workers")

_RESTART_BACKOFF_S = 1.0
_START_TIMEOUT_S = 300.0


class CannotListen(Exception):
    """The gateway's port (or metrics port) is taken or not bindable."""


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket in the port's SO_REUSEPORT group."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def _check_port(host: str, port: int) -> int:
    """Bind *port* once without SO_REUSEPORT: fails when anything listens there (a second
    gateway included). Returns the port (the kernel's choice for 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise CannotListen(f"gateway could not listen on {host}:{port}: {exc.strerror}") from None
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class Listeners:
    """The gateway's ports, bound before anything slow starts.

    `modgate up` binds them before it starts Ray Serve (a minute or more): a taken port fails at
    once instead of after the models load, and nothing Ray starts meanwhile (its GCS, raylets,
    workers and proxies bind ports the kernel picks, from the same range a port-0 check hands
    out) can take the gateway's port in between. With one process the sockets are the ones
    uvicorn serves on; with workers, `api` is a bound, never listening member of the port's
    SO_REUSEPORT group that holds the port until the workers (each with its own socket) stop.
    """

    api: socket.socket
    metrics: socket.socket | None
    shared: bool

    @property
    def port(self) -> int:
        return int(self.api.getsockname()[1])

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics is None else int(self.metrics.getsockname()[1])

    def close(self) -> None:
        for sock in (self.api, self.metrics):
            if sock is not None:
                sock.close()


def _bind(host: str, port: int, *, shared: bool) -> socket.socket:
    """A plain bound socket, or (*shared*) one in the port's SO_REUSEPORT group after checking
    nothing else listens there (`_check_port`: a second gateway fails instead of sharing)."""
    try:
        if shared:
            return reuseport_socket(host, _check_port(host, port))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return sock
    except OSError as exc:
        raise CannotListen(f"gateway could not listen on {host}:{port}: {exc.strerror}") from None


def bind_listeners(cfg: AppConfig) -> Listeners:
    """Bind the API port (and the metrics port when set) now. Raises `CannotListen`."""
    g = cfg.gateway
    shared = g.workers > 1
    api = _bind(g.host, g.port, shared=shared)
    try:
        metrics = _bind(g.host, g.metrics_port, shared=shared) if g.metrics_port is not None else None
    except CannotListen:
        api.close()
        raise
    return Listeners(api, metrics, shared)


def serve_app(cfg: AppConfig, fastapi_app: FastAPI, *, on_started: Callable[[], None] | None = None,
              sockets: list[socket.socket] | None = None,
              metrics_sockets: list[socket.socket] | None = None) -> bool:
    """Serve *fastapi_app* (and the metrics listener when `gateway.metrics_port` is set) until
    SIGINT/SIGTERM. On the configured host/port, or on *sockets* (a worker's). Returns whether
    the API server ever started."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(
        fastapi_app, host=cfg.gateway.host, port=cfg.gateway.port, log_level="warning",
        access_log=False, loop="auto", http="auto", timeout_graceful_shutdown=10,
        limit_concurrency=cfg.gateway.max_connections,
        proxy_headers=False))  # nothing reads the client address; saves a middleware per request

    metrics_server = None
    if cfg.gateway.metrics_port is not None:
        from gateway.api.ops import build_metrics_app

        metrics_server = uvicorn.Server(uvicorn.Config(
            build_metrics_app(fastapi_app.state.gateway.service), host=cfg.gateway.host,
            port=cfg.gateway.metrics_port, log_level="warning", access_log=False, lifespan="off"))

    async def serve() -> None:
        # The metrics listener starts first, so the API server (started after it) is the one
        # whose signal handlers are installed last and see Ctrl-C / SIGTERM; it then stops this.
        metrics_task = (asyncio.create_task(metrics_server.serve(sockets=metrics_sockets))
                        if metrics_server is not None else None)
        try:
            task = asyncio.create_task(server.serve(sockets=sockets))
            while not server.started and not task.done():
                await asyncio.sleep(0.05)
            if server.started and on_started is not None:
                on_started()
            await task
        finally:
            if metrics_server is not None and metrics_task is not None:
                metrics_server.should_exit = True
                await metrics_task

    # uvicorn's own loop choice ("auto": uvloop when installed). asyncio.run() would silently use
    # the default selector loop, which cost ~20 % more CPU per request in the overhead benchmark.
    with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
        runner.run(serve())
    return bool(server.started)


# -- workers ------------------------------------------------------------------------------------

def _run_dir() -> Path:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="modgate-run-", dir=base))


def _worker_main(cfg: AppConfig, ctx: WorkerContext, started: Event) -> None:
    """One worker process (spawned): open the store, build the app, listen with SO_REUSEPORT."""
    os.setpgrp()  # Ctrl-C reaches the supervisor only; it sends SIGTERM once
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s w{ctx.index} %(name)s: %(message)s")
    from gateway import metric_files
    from gateway.bootstrap import build_gateway
    from gateway.stores import open_store

    # Before the app makes its metrics: their values are written to the run's files in the
    # background, not on every change (gateway.metric_files: CPU per request as with one worker).
    metric_writer = metric_files.install(str(ctx.metrics_dir))
    store = open_store(cfg)
    try:
        app = build_gateway(cfg, store, worker=ctx)
        sockets = [reuseport_socket(cfg.gateway.host, cfg.gateway.port)]
        metrics = ([reuseport_socket(cfg.gateway.host, cfg.gateway.metrics_port)]
                   if cfg.gateway.metrics_port is not None else None)
        ok = serve_app(cfg, app, on_started=started.set, sockets=sockets, metrics_sockets=metrics)
    finally:
        store.close()
        metric_writer.close()
    sys.exit(0 if ok else 1)


class _Supervisor:
    def __init__(self, cfg: AppConfig, run_dir: Path) -> None:
        from gateway.limits import SharedCallerTable

        self.cfg = cfg
        self.count = cfg.gateway.workers
        self.run_dir = run_dir
        self.ctx = multiprocessing.get_context("spawn")
        self.table = SharedCallerTable.create(run_dir / "caller-limits.bin", workers=self.count)
        self.procs: dict[int, SpawnProcess] = {}
        self.started: dict[int, Event] = {}
        self.ever_started: set[int] = set()
        self.stopping = False

    def start(self, index: int) -> None:
        from gateway.workers import WorkerContext

        ctx = WorkerContext(index=index, count=self.count, run_dir=self.run_dir)
        started = self.ctx.Event()
        proc = self.ctx.Process(target=_worker_main, args=(self.cfg, ctx, started),
                                name=f"modgate-gateway-w{index}", daemon=False)
        proc.start()
        self.procs[index], self.started[index] = proc, started

    def reap(self, index: int) -> None:
        """A worker is gone: mark its live gauges dead and give back its caller slots."""
        from prometheus_client import multiprocess

        proc = self.procs[index]
        proc.join(timeout=0)
        if proc.pid is not None:
            multiprocess.mark_process_dead(proc.pid, str(self.run_dir / "metrics"))  # type: ignore[no-untyped-call]
        self.table.reset_worker(index)

    def stop(self, timeout_s: float) -> None:
        for proc in self.procs.values():
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker %s did not stop within %.0f s; killing it", proc.name, timeout_s)
                proc.kill()
                proc.join(timeout=5)
        self.table.close()


def serve_workers(cfg: AppConfig, *, on_started: Callable[[int], None] | None = None,
                  echo: Callable[[str], None] = print, listeners: Listeners | None = None) -> bool:
    """Run `cfg.gateway.workers` worker processes on one port until SIGINT/SIGTERM (module
    docstring). Returns False when they could not all start. Raises `CannotListen`.

    *listeners*: the ports already bound by `bind_listeners` (held until the workers stop);
    bound here when not given."""
    from gateway.workers import MULTIPROC_ENV

    g = cfg.gateway
    held = listeners if listeners is not None else bind_listeners(cfg)
    port = held.port
    overrides: dict[str, Any] = {"port": port}
    if held.metrics_port is not None:
        overrides["metrics_port"] = held.metrics_port
    cfg = cfg.model_copy(update={"gateway": g.model_copy(update=overrides)})
    run_dir = _run_dir()
    (run_dir / "metrics").mkdir()
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = str(run_dir / "metrics")  # inherited by the spawned workers
    stop_requested: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop_requested.append(signum)

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    sup = _Supervisor(cfg, run_dir)
    ok = True
    try:
        for i in range(sup.count):
            sup.start(i)
        announced = False
        restart_at: dict[int, float] = {}
        start_deadline = time.monotonic() + _START_TIMEOUT_S
        while not stop_requested:
            sentinels = {p.sentinel: i for i, p in sup.procs.items() if i not in restart_at}
            ready = multiprocessing.connection.wait(list(sentinels), timeout=0.1)
            for i, ev in sup.started.items():
                if ev.is_set():
                    sup.ever_started.add(i)
            for s in ready:
                i = sentinels[s]  # type: ignore[index]
                code = sup.procs[i].exitcode
                sup.reap(i)
                if i not in sup.ever_started:
                    echo(f"gateway: worker {i} exited with code {code} before it listened")
                    ok = False
                    stop_requested.append(0)
                    break
                echo(f"gateway: worker {i} exited with code {code}; restarting it")
                restart_at[i] = time.monotonic() + _RESTART_BACKOFF_S
            for i, at in list(restart_at.items()):
                if time.monotonic() >= at and not stop_requested:
                    del restart_at[i]
                    sup.start(i)
            if not announced and len(sup.ever_started) == sup.count:
                announced = True
                if on_started is not None:
                    on_started(port)
            if not announced and time.monotonic() > start_deadline:
                echo(f"gateway: workers did not start within {_START_TIMEOUT_S:.0f} s")
                ok = False
                break
    finally:
        sup.stop(timeout_s=cfg.gateway.request_timeout_s + 15)
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(run_dir, ignore_errors=True)
        if listeners is None:
            held.close()
    return ok
