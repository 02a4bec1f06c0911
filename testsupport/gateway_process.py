"""A real gateway in its own process, for clients that must reach one over a socket (the
remote CLI): `build_gateway` on the configuration's store (seeded from its `seed_dir`, as
`modgate gateway` does), `FakeBackend` as the model, uvicorn on a free loopback port.

    with GatewayProcess(config_path) as gw:
        httpx.get(f"{gw.url}/healthz")

or, by hand: `python -m testsupport.gateway_process CONFIG PORT`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from testsupport.ports import free_port

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["GatewayProcess"]


class GatewayProcess:
    """Start (`with`) and stop a gateway process; `url` is its base URL once started."""

    def __init__(self, config: Path, *, start_timeout_s: float = 60.0) -> None:
        self.config, self.start_timeout_s = config, start_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config.parent / f"gateway-{self.port}.log"

    def __enter__(self) -> GatewayProcess:
        import httpx

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "testsupport.gateway_process", str(self.config), str(self.port)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the gateway did not answer within {self.start_timeout_s:g}s:\n"
                                   f"{self.log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()


def main(config: str, port: str) -> None:
    import uvicorn

    from gateway.bootstrap import build_gateway
    from gateway.config import load_config
    from gateway.stores import open_store
    from prompt_registry.loader import seed_store
    from serving.fake_backend import FakeBackend

    cfg = load_config(Path(config), {"gateway.port": int(port), "gateway.host": "127.0.0.1"})
    store = open_store(cfg)
    seed = cfg.seed_path()
    if seed is not None:
        seed_store(store, seed, label=cfg.gateway.default_label,
                   served_models=[m.name for m in cfg.serving.models])
    try:
        uvicorn.run(build_gateway(cfg, store, backend=FakeBackend()), host="127.0.0.1",
                    port=int(port), log_level="warning", access_log=False)
    finally:
        store.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
