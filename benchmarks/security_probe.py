"""The two measured findings of the second security probe, before and after, in one run.

    .venv/bin/python benchmarks/security_probe.py --before /tmp/before --after . \
        [--out benchmarks/results/security_probe.json]

`--before` and `--after` are checkouts of the repository (e.g. `git worktree add /tmp/before
89a8dc6`); each runs its own `modgate gateway` (from that checkout's code, this machine's
virtualenv) in front of the stub upstream, with its own registry. For each:

1. **made-up prompt names**: 100 `POST /v1/moderations` with a caller key, each naming a
   different made-up prompt of ~60 KB (`model`, which the route took as any string up to the
   body limit); then the size of one `/metrics` scrape and the gateway's RSS;
2. **a 40 MB anonymous body**: `POST /v1/feedback` with no key and 40 MB of JSON, streamed;
   the answer's status, the gateway's peak RSS during it and its RSS after.

RSS is read from /proc (VmRSS, VmHWM for the peak). The figures are the point of the issue's
"Done when"; tests/unit/test_security_findings.py is what keeps them fixed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import yaml

HERE = Path(__file__).resolve().parent
NAME_BYTES = 60_000
N_NAMES = 100
BIG_BODY = 40 * 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _wait(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def _caller_key(root: Path, db: Path) -> str:
    """A `moderate` key created by *root*'s own code in *root*'s registry format."""
    code = ("import sys; from prompt_registry.sqlite_store import SqlitePromptStore; "
            "from prompt_registry.keys import generate_key; from prompt_registry.loader import seed_store; "
            "from pathlib import Path; s = SqlitePromptStore(Path(sys.argv[1])); "
            "seed_store(s, Path('configs/prompts')); "
            "k, r = generate_key('probe', ['moderate'], created_by='probe'); s.put_key(r); print(k)")
    out = subprocess.run([sys.executable, "-c", code, str(db)], cwd=root, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def probe(root: Path, tmp: Path) -> dict[str, object]:
    root = root.resolve()
    stub_port, gw_port = _free_port(), _free_port()
    data = tmp / "data"
    data.mkdir(parents=True)
    key = _caller_key(root, data / "registry.db")
    config = yaml.safe_load((root / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(data)
    config["registry"]["seed_dir"] = None
    config["gateway"]["port"] = gw_port
    config["serving"].update(mode="http", base_url=f"http://127.0.0.1:{stub_port}/v1")
    config["tracing"] = {"exporter": "none", "sample_ratio": 0.0}
    cfg_path = tmp / "modgate.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    module = "gateway.cli.main" if (root / "gateway" / "cli" / "main.py").exists() else "gateway.cli"
    stub = subprocess.Popen([sys.executable, str(root / "benchmarks" / "stub_upstream.py"), "--port",
                             str(stub_port)], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gw = subprocess.Popen([sys.executable, "-m", module, "gateway", "--config", str(cfg_path)], cwd=root,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{gw_port}"
    auth = {"authorization": f"Bearer {key}"}
    try:
        _wait(f"http://127.0.0.1:{stub_port}/v1/models")
        _wait(f"{base}/healthz")
        with httpx.Client(base_url=base, timeout=60) as client:
            for i in range(5):  # warm-up: every path once
                client.post("/v1/moderate", headers=auth, json={
                    "item_id": f"w{i}", "seller_id": "s", "title": "bike", "description": "",
                    "locale": "en-US"})
                client.post("/v1/moderations", headers=auth, json={"input": "bike"})
            client.get("/metrics")
            rss_before = _rss_kib(gw.pid)
            metrics_before = len(client.get("/metrics").content)
            statuses: dict[str, int] = {}
            for i in range(N_NAMES):
                name = f"made-up-{i:03d}-" + "x" * (NAME_BYTES - 13)
                r = client.post("/v1/moderations", headers=auth, json={"input": "bike", "model": name})
                statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            scrape = client.get("/metrics")
            names = {"statuses": statuses, "metrics_bytes_before": metrics_before,
                     "metrics_bytes_after": len(scrape.content),
                     "rss_mib_before": round(rss_before / 1024, 1),
                     "rss_mib_after": round(_rss_kib(gw.pid) / 1024, 1)}

            rss0 = _rss_kib(gw.pid)
            peak = [rss0]
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak.append(_rss_kib(gw.pid))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            chunk = b" " * (1 << 20)

            def body() -> object:
                yield b'{"request_id": "x", "decision": "allow", "note": "'
                for _ in range(BIG_BODY // len(chunk)):
                    yield chunk
                yield b'"}'

            started = time.monotonic()
            try:
                r = client.post("/v1/feedback", content=body(),  # type: ignore[arg-type]
                                headers={"content-type": "application/json"})
                answer: object = {"status": r.status_code, "type": (r.json().get("error") or {}).get("type")
                                  if r.headers.get("content-type", "").startswith("application/json") else None}
            except httpx.HTTPError as exc:  # the server may close the connection on a refused body
                answer = {"status": None, "error": type(exc).__name__}
            elapsed = time.monotonic() - started
            time.sleep(0.5)
            stop.set()
            sampler.join()
            big = {"answer": answer, "seconds": round(elapsed, 2), "rss_mib_before": round(rss0 / 1024, 1),
                   "rss_mib_peak": round(max(peak) / 1024, 1),
                   "rss_mib_after": round(_rss_kib(gw.pid) / 1024, 1)}
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True).stdout.strip()
        return {"root": str(root), "commit": commit, "made_up_prompt_names": names,
                "anonymous_40mb_feedback": big}
    finally:
        gw.terminate()
        stub.terminate()
        gw.wait(timeout=20)
        stub.wait(timeout=20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="checkout of the code before the fixes")
    ap.add_argument("--after", type=Path, default=HERE.parent, help="checkout after (default: this one)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "security_probe.json")
    args = ap.parse_args(argv)
    result: dict[str, object] = {"benchmark": "security_probe", "recorded_at": datetime.now(UTC).isoformat(),
                                 "command": "python benchmarks/security_probe.py " + " ".join(sys.argv[1:]),
                                 "cpus": os.cpu_count()}
    for which, root in (("before", args.before), ("after", args.after)):
        with tempfile.TemporaryDirectory() as tmp:
            result[which] = probe(root, Path(tmp))
        print(which, json.dumps(result[which], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
