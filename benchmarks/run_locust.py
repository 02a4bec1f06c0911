"""Run one locust load profile against the gateway's public API, then summarise it.

    .venv/bin/python benchmarks/run_locust.py --profile cpu-smoke --start-stack
    .venv/bin/python benchmarks/run_locust.py --profile gpu-saturate [--host http://127.0.0.1:8080]
    .venv/bin/python benchmarks/run_locust.py --profile cpu-smoke --set users=8 --set run_time=2m

Profiles live in benchmarks/locust/profiles.toml; the workload is benchmarks/locust/locustfile.py.
Locust runs headless with --csv and --html into benchmarks/results/locust/<profile>/ (previous
results of that profile are replaced), together with run.json (the command, time, machine,
git commit and effective profile). benchmarks/summarize_locust.py then writes summary.md,
summary.json and PNG plots there and updates the profile's section of benchmarks/RESULTS.md.

--start-stack runs `modgate up` itself (configs/modgate.yaml unless --config) on free ports with
a temporary data directory (fresh registry and API keys; the tiny model already built under
data/models/ is reused), waits for /readyz, and stops it with SIGINT at the end. It first waits
(polling every 30 s, up to --wait-other-stack seconds) while another stack runs on this
machine, since two stacks on a small machine distort each other's figures. It suits the
CPU configuration; on a GPU node start the stack yourself (`modgate up --config
configs/examples/gpu-node.yaml`, with a prompt version for its model published) and pass
--host, or give --config and --prompts-dir (prompts naming the served model).

Without --start-stack the API key comes from --key, env MODGATE_API_KEY, or the `local-caller`
entry of data/local-keys.json (what `modgate up` writes). Exit status: locust's (1 when any
request failed), or 2 when the run could not be made.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv" / "bin" / "python"
if VENV_PY.exists() and Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
    os.execv(str(VENV_PY), [str(VENV_PY), *sys.argv])  # locust, httpx, yaml live in the venv

import httpx
import psutil
import yaml

HERE = ROOT / "benchmarks"
PROFILES = HERE / "locust" / "profiles.toml"
LOCUSTFILE = HERE / "locust" / "locustfile.py"
RESULTS = HERE / "results" / "locust"
LOCUST_KEYS = {"users": "-u", "spawn_rate": "-r", "run_time": "-t", "processes": "--processes",
               "stop_timeout": "--stop-timeout"}
CSV_PREFIX = "locust"


def log(msg: str) -> None:
    print(f"run_locust: {msg}", flush=True)


# --- profiles ------------------------------------------------------------------------------


def load_profile(name: str, sets: list[str], path: Path = PROFILES) -> dict[str, Any]:
    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    profiles = doc.get("profiles", {})
    if name not in profiles:
        raise SystemExit(f"run_locust: unknown profile {name!r}; {path} has: {', '.join(profiles)}")
    prof = {**doc.get("defaults", {}), **profiles[name]}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"run_locust: --set expects KEY=VALUE, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string such as 2m
        prof[key.strip()] = value
    return prof


def locust_args(prof: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in prof.items():
        if key == "why":
            continue
        if key in LOCUST_KEYS:
            if key == "processes" and int(value) <= 1:
                continue
            args += [LOCUST_KEYS[key], str(value)]
        elif key == "wait":
            lo, hi = (value, value) if isinstance(value, int | float) else value
            args += ["--mg-wait", f"{lo},{hi}"]
        else:
            args += [f"--mg-{key.replace('_', '-')}", str(value)]
    return args


# --- machine and commit ----------------------------------------------------------------------


def machine() -> str:
    desc = f"{platform.machine()} python {platform.python_version()} ({os.cpu_count()} cpus)"
    if shutil.which("nvidia-smi"):
        try:
            gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=10, check=False).stdout.split("\n")
            gpus = [g.strip() for g in gpus if g.strip()]
            if gpus:
                desc += f", {len(gpus)}x {gpus[0]}"
        except (OSError, subprocess.SubprocessError):
            pass
    return desc


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10, check=False)
        if out.returncode != 0:
            return None
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT, timeout=30,
                               check=False).returncode
        return commit + ("-dirty" if dirty == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return None


# --- the stack -------------------------------------------------------------------------------


def _is_stack(cmdline: list[str]) -> bool:
    for i, arg in enumerate(cmdline[:-1]):
        nxt = cmdline[i + 1]
        if Path(arg).name == "modgate" and nxt in ("up", "serving"):
            return True
        if arg == "gateway.cli.main" and nxt in ("up", "serving"):  # python -m gateway.cli.main up (tests)
            return True
    return False


def other_stacks() -> list[psutil.Process]:
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] not in mine and _is_stack(p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


def wait_for_other_stacks(limit_s: float, poll_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while procs := other_stacks():
        desc = "; ".join(f"pid {p.pid}: {' '.join(p.cmdline())[:120]}" for p in procs if p.is_running())
        if time.monotonic() >= deadline:
            raise SystemExit(f"run_locust: another stack is still running after {limit_s:.0f}s "
                             f"({desc}); not starting a second one")
        log(f"another stack is running ({desc}); waiting {poll_s:.0f}s")
        time.sleep(poll_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """`modgate up` in a subprocess on free ports with a temporary data directory."""

    def __init__(self, base_config: Path, timeout_s: float, keep_log: Path | None,
                 prompts_dir: Path | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="modgate-locust-"))
        self.timeout_s = timeout_s
        self.keep_log = keep_log
        base_config = base_config.resolve()
        cfg = yaml.safe_load(base_config.read_text(encoding="utf-8"))
        base_dir = base_config.parent
        orig_data = Path(cfg.get("data_dir", "../data"))
        orig_data = orig_data if orig_data.is_absolute() else (base_dir / orig_data).resolve()
        cfg["data_dir"] = str(self.tmp / "data")
        reg = cfg.setdefault("registry", {})
        seed = reg.get("seed_dir", "prompts")
        if prompts_dir is not None:
            reg["seed_dir"] = str(prompts_dir.resolve())
        elif seed is not None and not Path(seed).is_absolute():
            reg["seed_dir"] = str((base_dir / seed).resolve())
        self.gateway_port, self.serving_port = free_port(), free_port()
        cfg.setdefault("gateway", {})["port"] = self.gateway_port
        cfg["gateway"]["host"] = "127.0.0.1"
        cfg.setdefault("serving", {}).setdefault("ray", {})["http_port"] = self.serving_port
        for model in cfg["serving"].get("models", []):
            src = str(model.get("source", ""))
            if src.startswith("tiny:") and not Path(src[5:]).is_absolute():
                built = orig_data / src[5:]
                if (built / "config.json").exists():  # reuse the tiny model already built
                    model["source"] = f"tiny:{built}"
        self.config_path = self.tmp / "modgate.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        self.log_path = self.tmp / "stack.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.descendants: list[psutil.Process] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def start(self) -> None:
        exe = ROOT / ".venv" / "bin" / "modgate"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gateway.cli.main"]
        cmd += ["up", "--config", str(self.config_path)]
        log(f"starting the stack: {shlex.join(cmd)} (gateway :{self.gateway_port}, "
            f"Ray Serve :{self.serving_port}, data {self.tmp / 'data'})")
        with self.log_path.open("wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=self.tmp,
                                         start_new_session=True)
        t0 = time.monotonic()
        last = ""
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the stack exited with {self.proc.returncode} during start:\n"
                                   + self.tail())
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=15)
                if r.status_code == 200:
                    break
                last = f"readyz {r.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            waited = time.monotonic() - t0
            if waited > self.timeout_s:
                raise RuntimeError(f"the stack was not ready after {self.timeout_s:.0f}s ({last}):\n"
                                   + self.tail())
            time.sleep(2.0)
        log(f"stack ready after {time.monotonic() - t0:.0f}s")
        self._remember_descendants()

    def _remember_descendants(self) -> None:
        if self.proc is None:
            return
        try:
            self.descendants = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            self.descendants = []

    def api_key(self) -> str:
        keys = json.loads((self.tmp / "data" / "local-keys.json").read_text())
        return str(keys["local-caller"])

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                self._remember_descendants()
                log("stopping the stack (SIGINT)")
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    log("the stack did not stop in 90 s; killing its process group")
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(timeout=10)
            for p in self.descendants:  # whatever Ray left behind (raylet, workers, engine)
                try:
                    p.kill()
                except psutil.Error:
                    pass
        if self.keep_log is not None and self.log_path.exists():  # without the API keys it printed
            text = self.log_path.read_text(errors="replace")
            self.keep_log.write_text(re.sub(r"mgk_[A-Za-z0-9_-]+", "mgk_<redacted>", text))
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- main ------------------------------------------------------------------------------------


def default_key() -> str | None:
    if os.environ.get("MODGATE_API_KEY"):
        return os.environ["MODGATE_API_KEY"]
    try:
        return str(json.loads((ROOT / "data" / "local-keys.json").read_text())["local-caller"])
    except (OSError, ValueError, KeyError):
        return None


def clean(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for pattern in (f"{CSV_PREFIX}_*", "report.html", "*.png", "summary.md", "summary.json",
                    "run.json", "stack.log"):
        for f in out.glob(pattern):
            f.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="a profile of benchmarks/locust/profiles.toml")
    ap.add_argument("--host", default="http://127.0.0.1:8080", help="gateway base URL (ignored "
                    "with --start-stack)")
    ap.add_argument("--start-stack", action="store_true", help="run `modgate up` for the test")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "modgate.yaml",
                    help="configuration for --start-stack")
    ap.add_argument("--prompts-dir", type=Path, default=None,
                    help="with --start-stack: seed the temporary registry from this directory "
                    "instead of the config's seed_dir (prompts whose `model:` the config serves)")
    ap.add_argument("--key", default=None, help="caller API key (default: MODGATE_API_KEY or "
                    "data/local-keys.json)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a profile key for this run (repeatable)")
    ap.add_argument("--out-root", type=Path, default=RESULTS, help="results go to OUT_ROOT/<profile>/")
    ap.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md",
                    help="file whose profile section the summary updates")
    ap.add_argument("--stack-timeout", type=float, default=600.0, help="seconds to wait for /readyz")
    ap.add_argument("--wait-other-stack", type=float, default=1200.0,
                    help="with --start-stack: how long to wait for another running stack to end")
    ap.add_argument("--keep-stack-log", action="store_true", help="copy the stack's log into the results")
    ap.add_argument("locust_extra", nargs=argparse.REMAINDER,
                    help="after --: more locust arguments, passed as they are")
    args = ap.parse_args()
    extra = args.locust_extra[1:] if args.locust_extra[:1] == ["--"] else args.locust_extra

    prof = load_profile(args.profile, args.set)
    out = args.out_root / args.profile
    clean(out)
    prefix = out / CSV_PREFIX

    stack: Stack | None = None
    rc = 2
    try:
        if args.start_stack:
            wait_for_other_stacks(args.wait_other_stack)
            stack = Stack(args.config, args.stack_timeout,
                          out / "stack.log" if args.keep_stack_log else None, args.prompts_dir)
            stack.start()
            host, key = stack.url, args.key or stack.api_key()
        else:
            host, key = args.host.rstrip("/"), args.key or default_key()
            try:
                ready = httpx.get(f"{host}/readyz", timeout=15)
            except httpx.HTTPError as exc:
                log(f"{host}/readyz: {exc!r}; is the stack up? (or use --start-stack)")
                return 2
            if ready.status_code != 200:
                log(f"{host}/readyz answered {ready.status_code}: {ready.text[:300]}")
                return 2
        if not key:
            log("no API key: pass --key, set MODGATE_API_KEY or run `modgate up` (data/local-keys.json)")
            return 2

        cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
               "--host", host, "--csv", str(prefix), "--html", str(out / "report.html"),
               *locust_args(prof), *extra]
        run = {
            "benchmark": f"locust/{args.profile}",
            "profile": args.profile,
            "command": "python benchmarks/run_locust.py " + shlex.join(sys.argv[1:]),
            "locust_command": shlex.join(["locust", *cmd[3:]]).replace(str(ROOT) + "/", ""),
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "git_commit": git_commit(),
            "host": host,
            "stack": ("started by run_locust (modgate up --config "
                      f"{os.path.relpath(args.config.resolve(), ROOT)}, temporary data dir)")
            if args.start_stack else "already running",
            "settings": prof,
        }
        env = {**os.environ, "MODGATE_API_KEY": key}
        log("running: " + run["locust_command"])
        t0 = time.monotonic()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
        run["duration_s"] = round(time.monotonic() - t0, 1)
        run["locust_exit_code"] = rc
        (out / "run.json").write_text(json.dumps(run, indent=2, ensure_ascii=False) + "\n")
    except RuntimeError as exc:
        log(str(exc))
        return 2
    finally:
        if stack is not None:
            stack.stop()

    if not (out / f"{CSV_PREFIX}_stats.csv").exists():
        log(f"locust wrote no {CSV_PREFIX}_stats.csv (exit {rc}); nothing to summarise")
        return rc or 2
    summ = subprocess.run([sys.executable, str(HERE / "summarize_locust.py"), str(out),
                           "--results-md", str(args.results_md)], cwd=ROOT, check=False)
    if summ.returncode != 0:
        return summ.returncode
    if rc != 0:
        log(f"locust exited with {rc} (some requests failed; see {out / 'summary.md'})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
