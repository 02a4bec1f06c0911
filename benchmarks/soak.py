"""Soak test: a steady request rate for a long time against a stack this script starts, judged
on three criteria (issue #10, item 7):

  1. zero errors: every /v1/moderate request gets a 200 with a verdict (locust counts any
     other answer, or none, as a failure);
  2. flat memory: after the warm-up, the resident memory (RSS) of every process of the stack
     stays within ±TOLERANCE % (default 5) of its RSS at the end of the warm-up;
  3. a complete decision log: after the stack has stopped (the log flushes on shutdown) the
     log holds exactly one record per answered request that the gateway records, matched by
     request id: every 200 and every 5xx (4xx answers are not recorded, by design; see
     gateway/api/app.py), with no request missing, none twice and no record for a request that got
     no such answer.

    .venv/bin/python benchmarks/soak.py                       # the real thing: 10 min, CPU stack
    .venv/bin/python benchmarks/soak.py --upstream-stub --duration 60 --warmup 15   # mechanics
    .venv/bin/python benchmarks/soak.py --duration 90 --warmup 30 --out /tmp/soak  # short check

The stack. By default the real CPU stack: `modgate up --config <temporary copy of --config>`
on free ports with a fresh data directory (new registry, new API keys, empty decision log; the
tiny model already built under data/models/ is reused), i.e. the gateway plus Ray (GCS,
raylet, dashboard, ...), Ray Serve (controller, HTTP proxy, the LLM replica) and vLLM's
EngineCore, exactly what `run_locust.py --start-stack` runs. It first waits while another stack
runs on this machine (--wait-other-stack), and warns, and records in soak.json, any stack
that starts during the load (it shares the CPUs). With --upstream-stub, `modgate gateway` runs instead
in front of benchmarks/stub_upstream.py (answers after --stub-delay seconds): seconds to start,
for checking this script's mechanics. Its results are labelled `upstream-stub` in soak.json and
RESULTS.md and say nothing about the model stack.

The load. locust, headless, one process, with benchmarks/locust/soak_locustfile.py (the
workload of benchmarks/locust/locustfile.py, profile --profile for its listing mix, plus one
line per answer with its request id). Open-ish loop at a constant rate: --users users (default
2 × --rate, rounded up) each pacing --rate/--users requests per second (locust's
constant_throughput), so an answer may take up to users/rate seconds before the rate sags.
The default 4 req/s is about half of what the 2-core CPU stack answers (cpu-smoke: ~8 req/s
closed loop, p50 330 ms), so requests do not queue. The run lasts --duration seconds in all;
its first --warmup seconds are the warm-up: memory is not judged there (engine caches, Python
imports and allocator pools fill up), but its requests count for criteria 1 and 3.

Memory. Every --sample-interval seconds the RSS of the stack's root process (`modgate up`, or
`modgate gateway` with the stub) and of every descendant and every process of its session
(psutil), named by role from the command line (`ray raylet`, `Serve replica ...`, `vLLM
EngineCore`, ...; `(pid N)` added when two processes share a role). Reference per process: its
RSS at the end of the warm-up, taken as the median of its last three samples in the warm-up
(one noisy sample does not set it). Judged per process: the largest deviation of any later
sample from the reference, in percent (the end-of-warm-up reference, not the post-warm-up
median, so that a slow leak counts in full: a steady growth of 8 % over the run is an 8 %
deviation, where it would only be ±4 % around the median). Also reported: min, max, last,
post-warm-up median, drift (last vs reference) and the least-squares slope in MB/h.
Processes that appear after the warm-up ends have no reference and are listed, not judged;
processes that exit are judged on the samples they had and listed with the time they exited.

Outputs (in --out, default benchmarks/results/):
  soak.json              date, commit, machine, command, parameters, request counts, errors,
                         decision-log counts, per-process RSS table, each criterion's verdict;
  soak_rss.png           RSS over time per process (absolute, and relative to the reference
                         with the ±tolerance band), and the request rate; warm-up shaded;
  soak_rss_samples.csv   every RSS sample (t_s, pid, role, rss_mb).
Times are seconds since the first request was sent (the idle stack's sample comes just before).
Then `.venv/bin/python benchmarks/make_results.py` puts the soak section into RESULTS.md.
Use --out to a temporary directory for trial runs: benchmarks/results/ is the record.

Exit status: 0 when every criterion holds, 1 when one fails (the summary says which), 2 when
the run could not be made (the stack did not start, locust did not run).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv" / "bin" / "python"
if __name__ == "__main__" and VENV_PY.exists() and Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
    os.execv(str(VENV_PY), [str(VENV_PY), *sys.argv])  # locust, psutil, matplotlib live in the venv
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx
import psutil
import yaml

from benchmarks.run_locust import (
    Stack,
    free_port,
    git_commit,
    load_profile,
    locust_args,
    machine,
    other_stacks,
    wait_for_other_stacks,
)

HERE = ROOT / "benchmarks"
LOCUSTFILE = HERE / "locust" / "soak_locustfile.py"
RESULTS = HERE / "results"
MODE_CPU = "cpu-stack"
MODE_STUB = "upstream-stub"
# Profile keys soak.py sets itself (the rest of the profile is the listing mix).
LOAD_KEYS = {"users", "spawn_rate", "run_time", "processes", "stop_timeout", "wait", "pacing",
             "request_id_share", "why"}


def log(msg: str) -> None:
    print(f"soak: {msg}", flush=True)


# --- the stack under test ----------------------------------------------------------------------


@dataclass
class StopReport:
    exit_code: int | None
    stopped_cleanly: bool  # exited after SIGINT, no SIGKILL needed
    stop_s: float
    left_behind: int  # descendants still alive after the root exited (killed by us)
    left_behind_roles: list[str]


def stop_tree(proc: subprocess.Popen[bytes], timeout_s: float = 90.0) -> StopReport:
    """SIGINT the root (a graceful shutdown: the gateway drains and flushes its decision log,
    `modgate up` stops Ray Serve and Ray), SIGKILL its process group after `timeout_s`, then
    kill whatever descendants are left."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    t0 = time.monotonic()
    clean = True
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log(f"pid {proc.pid} did not stop within {timeout_s:.0f} s of SIGINT; killing its group")
            clean = False
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    else:
        clean = False  # it had already exited
    stop_s = time.monotonic() - t0
    left: list[str] = []
    for p in descendants:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(role_of(p.cmdline(), p.name()))
                p.kill()
        except psutil.Error:
            pass
    return StopReport(proc.returncode, clean, round(stop_s, 1), len(left), sorted(left))


class CpuStack:
    """The real stack, `modgate up`, started like run_locust.py --start-stack."""

    mode = MODE_CPU
    root_role = "modgate up (gateway, Ray driver)"

    def __init__(self, config: Path, prompts_dir: Path | None, timeout_s: float) -> None:
        self.inner = Stack(config, timeout_s, None, prompts_dir)
        self.tmp = self.inner.tmp
        self.config_path = self.inner.config_path
        self.log_path = self.inner.log_path

    @property
    def url(self) -> str:
        return self.inner.url

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.inner.proc

    def start(self) -> None:
        self.inner.start()

    def api_key(self) -> str:
        return self.inner.api_key()

    def tail(self, lines: int = 40) -> str:
        return self.inner.tail(lines)


class StubStack:
    """`modgate gateway` in front of benchmarks/stub_upstream.py (mechanics only)."""

    mode = MODE_STUB
    root_role = "modgate gateway"

    def __init__(self, config: Path, delay_s: float, timeout_s: float) -> None:
        from prompt_registry.keys import generate_key
        from prompt_registry.loader import seed_store
        from prompt_registry.sqlite_store import SqlitePromptStore

        self.tmp = Path(tempfile.mkdtemp(prefix="modgate-soak-stub-"))
        self.timeout_s = timeout_s
        self.delay_s = delay_s
        data = self.tmp / "data"
        store = SqlitePromptStore(data / "registry.db")
        try:
            seed_store(store, ROOT / "configs" / "prompts")
            self.key, record = generate_key("soak", ["moderate"], created_by="soak")
            store.put_key(record)
        finally:
            store.close()
        self.stub_port, self.gateway_port = free_port(), free_port()
        cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
        cfg["data_dir"] = str(data)
        cfg.setdefault("registry", {}).update(store="sqlite", path="registry.db", seed_dir=None)
        cfg.setdefault("gateway", {}).update(host="127.0.0.1", port=self.gateway_port)
        cfg.setdefault("serving", {}).update(mode="http", base_url=f"http://127.0.0.1:{self.stub_port}/v1")
        self.config_path = self.tmp / "modgate.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        self.log_path = self.tmp / "stack.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stub: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def start(self) -> None:
        with self.log_path.open("wb") as fh:
            self.stub = subprocess.Popen(
                [sys.executable, str(HERE / "stub_upstream.py"), "--port", str(self.stub_port),
                 "--delay", str(self.delay_s)], stdout=fh, stderr=subprocess.STDOUT, cwd=self.tmp)
            cmd = [sys.executable, "-m", "gateway.cli.main", "gateway", "--config", str(self.config_path)]
            log(f"starting {shlex.join(cmd)} in front of the stub upstream (:{self.stub_port}, "
                f"{self.delay_s:g} s per answer)")
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True)
        deadline = time.monotonic() + self.timeout_s
        last = ""
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.proc.returncode} during start:\n"
                                   + self.tail())
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=5)
                if r.status_code == 200:
                    return
                last = f"readyz {r.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway was not ready after {self.timeout_s:.0f} s ({last}):\n"
                                   + self.tail())
            time.sleep(0.3)

    def api_key(self) -> str:
        return self.key

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop_stub(self) -> None:
        if self.stub is not None and self.stub.poll() is None:
            self.stub.terminate()
            try:
                self.stub.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.stub.kill()


def decision_log_dir(config_path: Path) -> Path:
    """Where the gateway with this configuration writes its decision log (as `modgate
    decisions` finds it)."""
    from gateway.config import load_config

    cfg = load_config(config_path)
    return cfg.data_path() / cfg.decision_log.dir


# --- processes and their memory ------------------------------------------------------------------

RAY_AGENTS = {"DashboardAgent": "ray dashboard agent", "RuntimeEnvAgent": "ray runtime-env agent",
              "TelemetryAgent": "ray telemetry agent"}
RAY_SCRIPTS = {"dashboard.py": "ray dashboard", "log_monitor.py": "ray log monitor",
               "monitor.py": "ray autoscaler monitor"}


def role_of(cmdline: list[str], name: str) -> str:
    """A readable role for a process of the stack, from its command line."""
    joined = " ".join(cmdline)
    if "EngineCore" in joined or "EngineCore" in name:
        return "vLLM EngineCore"
    if "vllm.entrypoints.openai.api_server" in joined:
        return "vLLM API server"
    if any(Path(a).name == "modgate" for a in cmdline[:2]) and "up" in cmdline:
        return "gateway (modgate up)"
    first = cmdline[0] if cmdline else name
    if first.upper().startswith("VLLM::"):  # vLLM's processes: VLLM::Worker (the model runner)
        title = (first[6:].split() or ["?"])[0]
        return "vLLM worker (model runner)" if title == "Worker" else f"vLLM {title}"
    if first.startswith("ray::"):  # Ray workers retitle themselves ray::<actor class or task>
        title = (first[5:].split() or ["?"])[0]
        if title == "IDLE":
            return "ray idle worker"
        if title.startswith("ServeController"):
            return "Serve controller"
        if title.startswith("ProxyActor"):
            return "Serve HTTP proxy"
        if title.startswith("ServeReplica:"):
            return "Serve replica " + title.removeprefix("ServeReplica:")
        if title in RAY_AGENTS:
            return RAY_AGENTS[title]
        return f"ray actor {title}"
    base = Path(first).name
    if base in ("gcs_server", "raylet"):
        return f"ray {base}"
    for arg in cmdline[:6]:
        if arg.endswith(".py"):
            p = Path(arg)
            if p.name == "agent.py" and "dashboard" in p.parts:
                return "ray dashboard agent"
            if p.name == "main.py" and "runtime_env" in p.parts:
                return "ray runtime-env agent"
            if p.name in RAY_SCRIPTS and "ray" in p.parts:
                return RAY_SCRIPTS[p.name]
            return f"python {p.name}"
    if "-c" in cmdline and "multiprocessing" in joined:
        return ("multiprocessing resource_tracker" if "resource_tracker" in joined
                else "python multiprocessing helper")
    return name or base or "?"


@dataclass
class Sample:
    t: float  # unix time of the sweep
    key: str  # pid:create_time (a reused pid is another process)
    pid: int
    role: str
    rss: int  # bytes
    # The parts of RSS (Linux /proc/<pid>/status, bytes; None where unreadable): a leak grows the
    # anonymous part (heap); file-backed pages (the program's code and libraries, touched lazily
    # as new code paths first run) and shared memory grow towards a bound and are not leaks.
    anon: int | None = None
    file: int | None = None
    shmem: int | None = None


def rss_parts(pid: int) -> tuple[int | None, int | None, int | None]:
    """RssAnon, RssFile and RssShmem of `pid` in bytes (None each where not available)."""
    parts: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                    key, value = line.split(":", 1)
                    parts[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return parts.get("RssAnon"), parts.get("RssFile"), parts.get("RssShmem")


class RssSampler(threading.Thread):
    """RSS of the stack's processes every `interval_s`: the root, its descendants, and any
    process of the root's session (Ray workers re-parented elsewhere stay in the session)."""

    def __init__(self, root_pid: int, root_role: str, interval_s: float) -> None:
        super().__init__(name="soak-rss-sampler", daemon=True)
        self.root_pid = root_pid
        self.root_role = root_role
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self.errors = 0
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        try:
            self.sid: int | None = os.getsid(root_pid)
        except OSError:
            self.sid = None

    def _processes(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.root_pid)
            found[root.pid] = root
            for p in root.children(recursive=True):
                found[p.pid] = p
        except psutil.Error:
            pass
        if self.sid is not None and self.sid == self.root_pid:  # the root leads its own session
            for p in psutil.process_iter():
                if p.pid in found:
                    continue
                try:
                    if os.getsid(p.pid) == self.sid:
                        found[p.pid] = p
                except OSError:
                    continue
        return list(found.values())

    def sweep(self) -> list[Sample]:
        now = time.time()
        out = []
        for p in self._processes():
            try:
                with p.oneshot():
                    if p.status() == psutil.STATUS_ZOMBIE:
                        continue
                    rss = p.memory_info().rss
                    role = (self.root_role if p.pid == self.root_pid
                            else role_of(p.cmdline(), p.name()))
                    key = f"{p.pid}:{p.create_time():.2f}"
            except psutil.Error:
                continue  # exited between listing and reading: the next sweep will tell
            out.append(Sample(now, key, p.pid, role, rss, *rss_parts(p.pid)))
        with self._lock:
            self.samples.extend(out)
        return out

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.sweep()
            except Exception as exc:  # never let sampling kill the run
                self.errors += 1
                log(f"RSS sampling failed: {exc!r}")
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)

    def snapshot(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)


def _median_of_last(values: list[float], n: int = 3) -> float:
    return float(statistics.median(values[-n:]))


def _slope_per_h(ts: list[float], ys: list[float]) -> float | None:
    if len(ts) < 3 or max(ts) - min(ts) <= 0:
        return None
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den * 3600.0


def analyse_rss(samples: list[Sample], t0: float, warmup_s: float, tolerance_pct: float) -> dict[str, Any]:
    """Per-process RSS figures after the warm-up (times relative to `t0`, the load's start)."""
    mb = 1024.0 * 1024.0
    by: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by[s.key].append(s)
    sweeps = sorted({s.t for s in samples})
    first_sweep = (sweeps[0] - t0) if sweeps else 0.0
    last_sweep = (sweeps[-1] - t0) if sweeps else 0.0
    half = 0.5 * (min(b - a for a, b in zip(sweeps, sweeps[1:], strict=False)) if len(sweeps) > 1 else 1.0)
    roles = Counter()
    final_role: dict[str, str] = {}
    for key, pts in by.items():
        pts.sort(key=lambda s: s.t)
        named = [s.role for s in pts if s.role != "ray idle worker"]  # an idle worker may become an actor
        final_role[key] = named[-1] if named else pts[-1].role
        roles[final_role[key]] += 1

    procs = []
    for key, pts in by.items():
        role = final_role[key]
        label = role if roles[role] == 1 else f"{role} (pid {pts[0].pid})"
        t = [s.t - t0 for s in pts]
        rss = [s.rss / mb for s in pts]
        before = [r for ti, r in zip(t, rss, strict=True) if ti <= warmup_s]
        after_t = [ti for ti in t if ti > warmup_s]
        after = [r for ti, r in zip(t, rss, strict=True) if ti > warmup_s]
        entry: dict[str, Any] = {
            "_key": key, "label": label, "role": role, "pid": pts[0].pid, "samples": len(pts),
            "first_seen_s": round(t[0], 1), "last_seen_s": round(t[-1], 1),
            "appeared_during_run": t[0] > first_sweep + half,
            "exited_during_run": t[-1] < last_sweep - half,
            "rss_mb_warmup_end": None, "rss_mb_min": None, "rss_mb_max": None, "rss_mb_last": None,
            "rss_mb_median_after": None, "max_dev_pct": None, "drift_pct": None,
            "slope_mb_per_h": None, "flat": None, "note": None,
            "anon_mb_warmup_end": None, "anon_max_dev_pct": None, "file_shmem_mb_warmup_end": None,
            "file_shmem_change_mb": None,
        }
        if after:
            entry.update(rss_mb_min=round(min(after), 1), rss_mb_max=round(max(after), 1),
                         rss_mb_last=round(after[-1], 1),
                         rss_mb_median_after=round(statistics.median(after), 1))
            slope = _slope_per_h(after_t, after)
            entry["slope_mb_per_h"] = None if slope is None else round(slope, 2)
        if before and after:
            ref = _median_of_last(before)
            devs = [100.0 * (r / ref - 1.0) for r in after] if ref > 0 else [math.inf]
            worst = max(devs, key=abs)
            entry.update(rss_mb_warmup_end=round(ref, 1), max_dev_pct=round(worst, 2),
                         drift_pct=round(100.0 * (after[-1] / ref - 1.0), 2) if ref > 0 else None,
                         flat=abs(worst) <= tolerance_pct)
        elif not after:
            entry["note"] = f"exited during the warm-up (at {t[-1]:.0f} s): not judged"
        else:
            entry["note"] = f"appeared after the warm-up (at {t[0]:.0f} s): no reference, not judged"
        anon = [(ti, s.anon / mb) for ti, s in zip(t, pts, strict=True) if s.anon is not None]
        fsh = [(ti, (s.file + (s.shmem or 0)) / mb) for ti, s in zip(t, pts, strict=True) if s.file is not None]
        a_before, a_after = [a for ti, a in anon if ti <= warmup_s], [a for ti, a in anon if ti > warmup_s]
        f_before, f_after = [f for ti, f in fsh if ti <= warmup_s], [f for ti, f in fsh if ti > warmup_s]
        if a_before and a_after and _median_of_last(a_before) > 0:
            a_ref = _median_of_last(a_before)
            entry.update(anon_mb_warmup_end=round(a_ref, 1), anon_max_dev_pct=round(
                max((100.0 * (a / a_ref - 1.0) for a in a_after), key=abs), 2))
        if f_before and f_after:
            f_ref = _median_of_last(f_before)
            entry.update(file_shmem_mb_warmup_end=round(f_ref, 1),
                         file_shmem_change_mb=round(f_after[-1] - f_ref, 2))
        if entry["exited_during_run"] and after:
            entry["note"] = f"exited at ~{t[-1]:.0f} s; judged on its samples until then"
        procs.append(entry)
    procs.sort(key=lambda e: (-(e["rss_mb_warmup_end"] or e["rss_mb_max"] or 0.0), e["label"]))

    # the whole stack: the sum per sweep (informational; processes come and go)
    tot_t = [s - t0 for s in sweeps]
    per_sweep: dict[float, float] = defaultdict(float)
    for s in samples:
        per_sweep[s.t] += s.rss / mb
    tot = [per_sweep[s] for s in sweeps]
    total: dict[str, Any] = {}
    tb = [r for ti, r in zip(tot_t, tot, strict=True) if ti <= warmup_s]
    ta = [r for ti, r in zip(tot_t, tot, strict=True) if ti > warmup_s]
    if tb and ta:
        ref = _median_of_last(tb)
        total = {"rss_mb_warmup_end": round(ref, 1), "rss_mb_min": round(min(ta), 1),
                 "rss_mb_max": round(max(ta), 1), "rss_mb_last": round(ta[-1], 1),
                 "max_dev_pct": round(max((100.0 * (r / ref - 1.0) for r in ta), key=abs), 2),
                 "processes_at_end": sum(1 for s in samples if s.t == sweeps[-1])}
    judged = [e for e in procs if e["flat"] is not None]
    return {
        "reference": ("RSS at the end of the warm-up (median of the process's last 3 samples up to "
                      "then); deviation = largest |RSS / reference − 1| over the later samples"),
        "parts": ("RSS = anonymous (heap: where a leak shows) + file-backed (code and libraries, "
                  "paged in as code first runs) + shared memory; anon_max_dev_pct is the same "
                  "deviation for the anonymous part alone, file_shmem_change_mb the change of the "
                  "other two from the end of the warm-up to the last sample"),
        "tolerance_pct": tolerance_pct,
        "sweeps": len(sweeps),
        "sweeps_after_warmup": sum(1 for x in tot_t if x > warmup_s),
        "processes": procs,
        "judged": len(judged),
        "not_flat": [e["label"] for e in judged if not e["flat"]],
        "not_judged": [e["label"] for e in procs if e["flat"] is None],
        "total": total,
    }


# --- requests and the decision log ----------------------------------------------------------------


def read_answers(path: Path) -> list[dict[str, Any]]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a killed locust
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    return round(xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))], 1)


def analyse_requests(answers: list[dict[str, Any]], t0: float, warmup_s: float, duration_s: float,
                     locust: dict[str, Any]) -> dict[str, Any]:
    status = Counter(str(a.get("status", 0)) for a in answers)
    answered = [a for a in answers if int(a.get("status") or 0) > 0]
    def sent(a: dict[str, Any]) -> float:
        return float(a["t"]) - float(a.get("ms") or 0) / 1000.0 - t0

    after = [a for a in answers if warmup_s < sent(a) <= duration_s]
    window = max(1e-9, duration_s - warmup_s)
    ms = [float(a.get("ms") or 0) for a in answered]
    return {
        "sent": len(answers),
        "answered": len(answered),
        "unanswered": len(answers) - len(answered),
        "by_status": dict(sorted(status.items())),
        "ok_200": status.get("200", 0),
        "failures": sum(1 for a in answers if a.get("failed") or a.get("status") != 200),
        "errors": locust.get("errors", {}),
        "achieved_rps": round(sum(1 for a in answers if sent(a) <= duration_s) / duration_s, 3),
        "achieved_rps_after_warmup": round(len(after) / window, 3),
        "latency_ms": {"p50": _pct(ms, 0.50), "p95": _pct(ms, 0.95), "p99": _pct(ms, 0.99),
                       "max": round(max(ms), 1) if ms else None},
        "locust_request_count": locust.get("requests"),
        "locust_failure_count": locust.get("failures"),
    }


def read_decision_log(directory: Path) -> tuple[Counter[str], int, dict[str, Any]]:
    """Records per request id (primary arms), shadow records, and what the read saw."""
    from gateway.quality.decisions import ReadStats, read_segments

    per_rid: Counter[str] = Counter()
    shadows = 0
    stats = ReadStats()
    first = last = None
    if directory.is_dir():
        for r in read_segments(directory, stats=stats):
            if r.arm == "shadow":
                shadows += 1
                continue
            per_rid[r.request_id] += 1
            first = r.ts if first is None or r.ts < first else first
            last = r.ts if last is None or r.ts > last else last
    info = {"segments": stats.segments, "torn_lines": stats.torn_lines, "bad_lines": stats.bad_lines,
            "first_ts": first.isoformat() if first else None, "last_ts": last.isoformat() if last else None}
    return per_rid, shadows, info


def analyse_log(answers: list[dict[str, Any]], per_rid: Counter[str], shadows: int,
                info: dict[str, Any]) -> dict[str, Any]:
    """Match answered requests with log records by request id. The gateway records every 200
    and every 5xx of a request it could parse and resolve a prompt for; 4xx are not recorded."""
    expected: Counter[str] = Counter()
    no_rid = 0
    four_xx = 0
    for a in answers:
        st = int(a.get("status") or 0)
        if st == 0:
            continue
        rid = a.get("rid")
        if 400 <= st < 500:
            four_xx += 1
            continue
        if not rid:
            no_rid += 1
            continue
        expected[rid] += 1
    missing = sorted(rid for rid in expected if per_rid.get(rid, 0) == 0)
    duplicates = sorted(rid for rid, n in per_rid.items() if n > 1)
    unexpected = sorted(rid for rid in per_rid if rid not in expected)
    reused = sorted(rid for rid, n in expected.items() if n > 1)  # one request id sent twice
    records = sum(per_rid.values())
    expected_n = sum(expected.values()) + no_rid
    return {
        "records": records,
        "expected_records": expected_n,
        "answered_4xx_not_recorded": four_xx,
        "missing": len(missing),
        "duplicates": len(duplicates),
        "unexpected": len(unexpected),
        "answers_without_request_id": no_rid,
        "request_ids_sent_twice": len(reused),
        "shadow_records": shadows,
        **info,
        "examples": {k: v[:5] for k, v in (("missing", missing), ("duplicates", duplicates),
                                            ("unexpected", unexpected)) if v},
        "match": (records == expected_n and not missing and not duplicates and not unexpected
                  and not no_rid),
    }


def read_locust_stats(prefix: Path) -> dict[str, Any]:
    """Totals from the locustfile's end-of-run `<prefix>_stats_final.csv` (locust's own
    `<prefix>_stats.csv` if missing) and the failures by error."""
    def rows(kind: str) -> list[dict[str, str]]:
        for name in (f"{prefix}_{kind}_final.csv", f"{prefix}_{kind}.csv"):
            p = Path(name)
            if p.exists():
                with p.open(newline="", encoding="utf-8") as fh:
                    return list(csv.DictReader(fh))
        return []

    agg = next((r for r in rows("stats") if r.get("Name") == "Aggregated"), None)
    errors: Counter[str] = Counter()
    for r in rows("failures"):
        errors[str(r.get("Error"))] += int(float(r.get("Occurrences") or 0))
    return {"requests": int(float(agg["Request Count"])) if agg else None,
            "failures": int(float(agg["Failure Count"])) if agg else None,
            "errors": dict(errors.most_common())}


# --- criteria, outputs -------------------------------------------------------------------------


def criteria(req: dict[str, Any], rss: dict[str, Any], dlog: dict[str, Any]) -> list[dict[str, Any]]:
    errors = req["failures"]  # no answer, a non-200 or a 200 without a usable verdict
    locust_failures = req.get("locust_failure_count")
    if isinstance(locust_failures, int):
        errors = max(errors, locust_failures)
    worst = max((e for e in rss["processes"] if e["max_dev_pct"] is not None),
                key=lambda e: abs(e["max_dev_pct"]), default=None)
    tol = rss["tolerance_pct"]
    flat_ok = rss["judged"] > 0 and not rss["not_flat"]
    flat_text = (f"{rss['judged']} processes judged; largest deviation {worst['max_dev_pct']:+.2f} % "
                 f"({worst['label']})" if worst else "no process judged")
    if rss["not_flat"]:
        flat_text += "; outside the band: " + ", ".join(rss["not_flat"])
        for e in rss["processes"]:
            if e["label"] in rss["not_flat"] and e["anon_max_dev_pct"] is not None:
                flat_text += (f" ({e['label']}: anonymous memory {e['anon_max_dev_pct']:+.2f} %, "
                              f"file-backed and shared {e['file_shmem_change_mb']:+.2f} MB)")
    if rss["not_judged"]:
        flat_text += f"; not judged: {len(rss['not_judged'])}"
    return [
        {"criterion": "zero errors", "measured": f"{errors} of {req['sent']} requests failed",
         "pass": errors == 0 and req["sent"] > 0},
        {"criterion": f"RSS of every process within ±{tol:g} % after the warm-up",
         "measured": flat_text, "pass": flat_ok},
        {"criterion": "decision log: exactly one record per answered request",
         "measured": (f"{dlog['records']} records for {dlog['expected_records']} answers that are "
                      f"recorded (missing {dlog['missing']}, twice {dlog['duplicates']}, "
                      f"unexpected {dlog['unexpected']})"),
         "pass": bool(dlog["match"]) and dlog["expected_records"] > 0},
    ]


def write_samples_csv(path: Path, samples: list[Sample], t0: float, labels: dict[str, str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["t_s", "pid", "process", "rss_mb", "anon_mb", "file_mb", "shmem_mb"])
        for s in sorted(samples, key=lambda s: (s.t, s.pid)):
            w.writerow([f"{s.t - t0:.1f}", s.pid, labels.get(s.key, s.role), f"{s.rss / 1048576:.2f}",
                        *("" if v is None else f"{v / 1048576:.2f}" for v in (s.anon, s.file, s.shmem))])


def plot(path: Path, samples: list[Sample], t0: float, labels: dict[str, str], refs: dict[str, float],
         answers: list[dict[str, Any]], warmup_s: float, duration_s: float, tolerance_pct: float,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - matplotlib.ticker.FuncFormatter below

    by: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by[s.key].append(s)
    order = sorted(by, key=lambda k: -max(s.rss for s in by[k]))
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 10), sharex=True,
                                        gridspec_kw={"height_ratios": [3, 2, 1.2]})
    cmap = plt.get_cmap("tab20")
    for i, key in enumerate(order):
        pts = sorted(by[key], key=lambda s: s.t)
        t = [s.t - t0 for s in pts]
        y = [s.rss / 1048576 for s in pts]
        color = cmap(i % 20)
        ax1.plot(t, y, color=color, lw=1.2, label=labels.get(key, pts[0].role))
        ref = refs.get(key)
        if ref:
            ax2.plot(t, [100.0 * (v / ref - 1.0) for v in y], color=color, lw=1.0)
    all_mb = [s.rss / 1048576 for s in samples] or [1.0]
    if max(all_mb) > 10 * max(1e-3, min(all_mb)):  # processes from tens of MB to GB: log scale
        ax1.set_yscale("log")
        ax1.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax1.set_ylabel("RSS (MB, log scale)")
    else:
        ax1.set_ylabel("RSS (MB)")
    ax1.set_title(title)
    ax1.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    ax2.axhspan(-tolerance_pct, tolerance_pct, color="tab:green", alpha=0.10,
                label=f"±{tolerance_pct:g} %")
    ax2.axhline(0, color="gray", lw=0.6)
    ax2.set_ylabel("RSS vs end of warm-up (%)")
    ax2.legend(loc="upper left", fontsize=7, frameon=False)
    if answers:
        width = 10.0
        bins: Counter[int] = Counter()
        bad: Counter[int] = Counter()
        for a in answers:
            b = int((a["t"] - t0) // width)
            bins[b] += 1
            if a.get("failed"):
                bad[b] += 1
        xs = list(range(min(bins), max(bins) + 1))
        edges = [b * width for b in xs] + [(xs[-1] + 1) * width]
        ax3.stairs([bins[b] / width for b in xs], edges, label="requests/s (10 s bins)")
        if bad:
            ax3.stairs([bad[b] / width for b in xs], edges, color="tab:red", label="failures/s")
        ax3.set_ylim(bottom=0)
        ax3.legend(loc="lower right", fontsize=7, frameon=False)
    ax3.set_ylabel("req/s")
    ax3.set_xlabel("seconds since the first request")
    start = min([0.0, *(s.t - t0 for s in samples)])
    for ax in (ax1, ax2, ax3):
        ax.axvspan(start, warmup_s, color="gray", alpha=0.15, lw=0)
        ax.axvline(duration_s, color="gray", lw=0.6, ls="--")
    ax1.text(warmup_s / 2, 0.02, "warm-up", transform=ax1.get_xaxis_transform(), ha="center",
             fontsize=8, color="dimgray")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_summary(doc: dict[str, Any]) -> None:
    req, dlog, rss = doc["requests"], doc["decision_log"], doc["rss"]
    p = doc["parameters"]
    print()
    print(f"soak ({doc['mode']}): {p['duration_s']:g} s at {p['rate_rps']:g} req/s "
          f"({p['users']} users × {p['pacing_per_user_rps']:g} req/s), warm-up {p['warmup_s']:g} s")
    print(f"  requests: {req['sent']} sent, {req['answered']} answered, by status {req['by_status']}, "
          f"{req['achieved_rps_after_warmup']:g} req/s after warm-up, p50 {req['latency_ms']['p50']} ms, "
          f"p99 {req['latency_ms']['p99']} ms")
    if req["errors"]:
        print(f"  errors: {req['errors']}")
    print(f"  decision log: {dlog['records']} records, {dlog['expected_records']} expected; missing "
          f"{dlog['missing']}, twice {dlog['duplicates']}, unexpected {dlog['unexpected']}"
          + (f"; examples {dlog['examples']}" if dlog.get("examples") else ""))
    st = doc["stack"]
    print(f"  stack stop: {'clean' if st['stopped_cleanly'] else 'NOT clean'} (exit {st['exit_code']}, "
          f"{st['stop_s']} s; left behind and killed: {st['left_behind']}"
          + (f" {st['left_behind_processes']}" if st["left_behind_processes"] else "") + ")")
    print(f"  RSS after warm-up (reference: end of warm-up; tolerance ±{rss['tolerance_pct']:g} %):")
    print(f"    {'process':<52} {'ref MB':>9} {'min':>9} {'max':>9} {'last':>9} {'max dev':>8}  flat"
          f"  {'anon dev':>8} {'file+shm':>9}")
    for e in rss["processes"]:
        def f(v: Any) -> str:
            return "—" if v is None else f"{v:,.1f}"
        dev = "—" if e["max_dev_pct"] is None else f"{e['max_dev_pct']:+.2f}%"
        flat = "—" if e["flat"] is None else ("yes" if e["flat"] else "NO")
        adev = "—" if e.get("anon_max_dev_pct") is None else f"{e['anon_max_dev_pct']:+.2f}%"
        fch = "—" if e.get("file_shmem_change_mb") is None else f"{e['file_shmem_change_mb']:+.2f}MB"
        print(f"    {e['label'][:52]:<52} {f(e['rss_mb_warmup_end']):>9} {f(e['rss_mb_min']):>9} "
              f"{f(e['rss_mb_max']):>9} {f(e['rss_mb_last']):>9} {dev:>8}  {flat:<4}  {adev:>8} {fch:>9}"
              + (f"  ({e['note']})" if e["note"] else ""))
    if rss.get("total"):
        t = rss["total"]
        print(f"    {'(sum of all)':<52} {t['rss_mb_warmup_end']:>9,.1f} {t['rss_mb_min']:>9,.1f} "
              f"{t['rss_mb_max']:>9,.1f} {t['rss_mb_last']:>9,.1f} {t['max_dev_pct']:>+7.2f}%")
    if doc["other_stacks_during_run"]:
        print(f"  WARNING: other stacks ran on this machine during the load: {doc['other_stacks_during_run']}")
    print("  criteria:")
    for c in doc["criteria"]:
        print(f"    [{'PASS' if c['pass'] else 'FAIL'}] {c['criterion']}: {c['measured']}")
    print(f"  => {'PASS' if doc['passed'] else 'FAIL'}" + ("" if doc["mode"] == MODE_CPU else
          " (upstream-stub: mechanics check, not the CPU stack)"))


# --- main ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="benchmarks/soak.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=4.0,
                    help="offered load, requests/s in total (default 4: about half of what the "
                    "2-core CPU stack answers)")
    ap.add_argument("--users", type=int, default=None,
                    help="locust users sharing --rate (default: 2 × rate, rounded up; each user "
                    "may then wait up to users/rate s for an answer without lowering the rate)")
    ap.add_argument("--duration", type=float, default=600.0,
                    help="seconds of load in all, warm-up included (default 600)")
    ap.add_argument("--warmup", type=float, default=60.0,
                    help="first seconds of the load whose memory is not judged (default 60)")
    ap.add_argument("--sample-interval", type=float, default=5.0,
                    help="seconds between RSS samples (default 5)")
    ap.add_argument("--tolerance", type=float, default=5.0,
                    help="allowed RSS deviation from the end of warm-up, percent (default 5)")
    ap.add_argument("--upstream-stub", action="store_true",
                    help="`modgate gateway` in front of benchmarks/stub_upstream.py instead of the "
                    "CPU stack: for checking the mechanics; results are labelled upstream-stub")
    ap.add_argument("--stub-delay", type=float, default=0.05,
                    help="with --upstream-stub: seconds the stub takes per answer (default 0.05)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "modgate.yaml",
                    help="base configuration (ports, data directory and, with the stub, serving "
                    "are replaced; default configs/modgate.yaml)")
    ap.add_argument("--prompts-dir", type=Path, default=None,
                    help="CPU stack: seed the temporary registry from this directory instead of "
                    "the config's seed_dir")
    ap.add_argument("--profile", default="cpu-smoke",
                    help="profile of benchmarks/locust/profiles.toml whose listing mix to send "
                    "(its users, waits and run time are ignored; default cpu-smoke, whose zh-CN "
                    "lengths fit the tiny model's context)")
    ap.add_argument("--seed", default="soak", help="locust workload seed (reproducible listings)")
    ap.add_argument("--stop-timeout", type=float, default=30.0,
                    help="seconds locust lets requests in flight finish at the end (default 30)")
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help="directory for soak.json, soak_rss.png, soak_rss_samples.csv (default "
                    "benchmarks/results/; use a temporary directory for trial runs)")
    ap.add_argument("--stack-timeout", type=float, default=600.0,
                    help="seconds to wait for the stack's /readyz (default 600)")
    ap.add_argument("--wait-other-stack", type=float, default=1200.0,
                    help="CPU stack: how long to wait while another stack runs here (default 1200)")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep the work directory (locust CSVs, answers, stack log, data directory "
                    "with the decision log) and print where it is")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.warmup < 0 or args.sample_interval <= 0:
        raise SystemExit("soak: --rate, --duration and --sample-interval must be > 0, --warmup >= 0")
    if args.warmup >= args.duration:
        raise SystemExit("soak: --warmup must be shorter than --duration (nothing would be judged)")
    if args.warmup < 2 * args.sample_interval:
        log(f"warning: a warm-up of {args.warmup:g} s gives fewer than 3 samples for the reference")
    users = args.users or max(1, math.ceil(2 * args.rate))
    pacing = args.rate / users
    mode = MODE_STUB if args.upstream_stub else MODE_CPU
    prof = {k: v for k, v in load_profile(args.profile, []).items() if k not in LOAD_KEYS}

    work = Path(tempfile.mkdtemp(prefix="modgate-soak-"))
    answers_path = work / "answers.jsonl"
    prefix = work / "locust"
    stack: CpuStack | StubStack | None = None
    sampler: RssSampler | None = None
    stop: StopReport | None = None
    t0 = time.time()
    locust_rc: int | None = None
    started = False
    others: dict[int, str] = {}  # other stacks seen on this machine during the load
    try:
        if mode == MODE_CPU:
            wait_for_other_stacks(args.wait_other_stack)
            stack = CpuStack(args.config, args.prompts_dir, args.stack_timeout)
        else:
            stack = StubStack(args.config, args.stub_delay, min(args.stack_timeout, 120.0))
        t_start = time.monotonic()
        stack.start()
        started = True
        start_s = round(time.monotonic() - t_start, 1)
        assert stack.proc is not None
        sampler = RssSampler(stack.proc.pid, stack.root_role, args.sample_interval)
        sampler.sweep()  # the idle stack, before any load

        cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
               "--host", stack.url, "-u", str(users), "-r", str(users), "-t", f"{args.duration:g}s",
               "--stop-timeout", f"{args.stop_timeout:g}", "--csv", str(prefix),
               "--soak-answers", str(answers_path), "--mg-pacing", f"{pacing:g}",
               "--mg-request-id-share", "1", "--mg-seed", args.seed, *locust_args(prof)]
        env = {**os.environ, "MODGATE_API_KEY": stack.api_key()}
        log(f"load: {users} users × {pacing:g} req/s = {args.rate:g} req/s for {args.duration:g} s "
            f"(warm-up {args.warmup:g} s), RSS every {args.sample_interval:g} s")
        locust_log = (work / "locust.log").open("wb")
        t0 = time.time()
        sampler.start()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=locust_log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + args.duration + args.stop_timeout + 120
        next_report = time.monotonic() + 30
        next_check = time.monotonic()
        while proc.poll() is None:
            time.sleep(1.0)
            if time.monotonic() >= next_check:  # another stack on this machine skews the figures
                next_check += 15
                for p in other_stacks():
                    try:
                        if p.pid != stack.proc.pid and p.pid not in others:
                            others[p.pid] = " ".join(p.cmdline())[:160]
                            log(f"warning: another stack started during the run (pid {p.pid}: "
                                f"{others[p.pid]}); its load shares the CPUs")
                    except psutil.Error:
                        continue
            if time.monotonic() > deadline:
                log("locust overran its run time by 2 minutes; stopping it")
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                break
            if time.monotonic() >= next_report:
                next_report += 30
                ans = read_answers(answers_path)
                bad = sum(1 for a in ans if a.get("failed"))
                snap = sampler.snapshot()
                last = [s for s in snap if snap and s.t == snap[-1].t]
                log(f"t={time.time() - t0:4.0f} s  answered {len(ans)}  failed {bad}  stack RSS "
                    f"{sum(s.rss for s in last) / 1048576:,.0f} MB in {len(last)} processes")
        locust_rc = proc.returncode
        locust_log.close()
        sampler.stop()
        sampler.sweep()  # the stack just after the load
    except (RuntimeError, SystemExit) as exc:
        log(f"the run could not be made: {exc}")
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 2
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if stack is not None and stack.proc is not None:
            log("stopping the stack (SIGINT; the decision log flushes on shutdown)")
            stop = stop_tree(stack.proc)
            if isinstance(stack, StubStack):
                stack.stop_stub()
            if not started or locust_rc is None:
                tail = stack.tail()
                if tail:
                    print(tail)
                if not args.keep_work:
                    shutil.rmtree(stack.tmp, ignore_errors=True)
                    shutil.rmtree(work, ignore_errors=True)

    assert stack is not None and sampler is not None and stop is not None
    if not (Path(f"{prefix}_stats.csv").exists() or Path(f"{prefix}_stats_final.csv").exists()):
        log(f"locust wrote no statistics (exit {locust_rc}); see {work / 'locust.log'}")
        print((work / "locust.log").read_text(errors="replace")[-3000:])
        return 2

    answers = read_answers(answers_path)
    if answers:  # times from here on: since the first request was sent (locust takes ~1 s to start)
        t0 = min(a["t"] - float(a.get("ms") or 0) / 1000.0 for a in answers)
    locust_stats = read_locust_stats(prefix)
    req = analyse_requests(answers, t0, args.warmup, args.duration, locust_stats)
    samples = sampler.snapshot()
    rss = analyse_rss(samples, t0, args.warmup, args.tolerance)
    per_rid, shadows, info = read_decision_log(decision_log_dir(stack.config_path))
    dlog = analyse_log(answers, per_rid, shadows, info)
    crit = criteria(req, rss, dlog)

    labels: dict[str, str] = {}
    refs: dict[str, float] = {}
    for e in rss["processes"]:
        key = e.pop("_key")
        labels[key] = e["label"]
        if e["rss_mb_warmup_end"]:
            refs[key] = e["rss_mb_warmup_end"]

    params: dict[str, Any] = {
        "rate_rps": args.rate, "users": users, "pacing_per_user_rps": round(pacing, 4),
        "duration_s": args.duration, "warmup_s": args.warmup, "sample_interval_s": args.sample_interval,
        "tolerance_pct": args.tolerance, "stop_timeout_s": args.stop_timeout, "profile": args.profile,
        "seed": args.seed, "workload": prof,
        "config": os.path.relpath(args.config.resolve(), ROOT),
    }
    if mode == MODE_STUB:
        params["stub_delay_s"] = args.stub_delay
    doc: dict[str, Any] = {
        "benchmark": "soak",
        "mode": mode,
        "mode_note": ("the real CPU stack: modgate up (gateway, Ray Serve, vLLM CPU engine, tiny model) "
                      "with a fresh data directory" if mode == MODE_CPU else
                      "upstream-stub: modgate gateway in front of benchmarks/stub_upstream.py; checks "
                      "the soak's mechanics, says nothing about the model stack"),
        "command": "python benchmarks/soak.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "when": datetime.fromtimestamp(t0, UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine(),
        "parameters": params,
        "stack": {"start_s": start_s, "exit_code": stop.exit_code, "stopped_cleanly": stop.stopped_cleanly,
                  "stop_s": stop.stop_s, "left_behind": stop.left_behind,
                  "left_behind_processes": stop.left_behind_roles},
        "other_stacks_during_run": [f"pid {pid}: {cmd}" for pid, cmd in sorted(others.items())],
        "locust_exit_code": locust_rc,
        "requests": req,
        "decision_log": dlog,
        "rss": rss,
        "criteria": crit,
        "passed": all(c["pass"] for c in crit),
        "plot": "soak_rss.png",
        "samples_file": "soak_rss_samples.csv",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    title = (f"soak ({mode}): {args.rate:g} req/s for {args.duration:g} s, "
             f"{doc['when']}, {doc['commit'] or 'unknown commit'}")
    plot(args.out / "soak_rss.png", samples, t0, labels, refs, answers, args.warmup, args.duration,
         args.tolerance, title)
    write_samples_csv(args.out / "soak_rss_samples.csv", samples, t0, labels)
    (args.out / "soak.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    print_summary(doc)
    log(f"wrote {args.out / 'soak.json'}, {args.out / 'soak_rss.png'}, {args.out / 'soak_rss_samples.csv'}")
    if args.keep_work:
        log(f"work directory kept: {work} (stack data: {stack.tmp})")
    else:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(stack.tmp, ignore_errors=True)
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
