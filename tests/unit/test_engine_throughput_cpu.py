"""benchmarks/engine_throughput.py counts only its own processes' CPU by role: on a machine
shared with others, their work must not show up as the serving path's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import engine_throughput as et  # noqa: E402


def test_processes_outside_the_benchmark_are_counted_apart() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        snap = et.cpu_snapshot()
        roles = {key.split(":")[0]: role for key, (role, _) in snap.items()}
        assert roles[str(child.pid)] != et.OUTSIDE  # started by the benchmark: its own role
        assert roles["1"] == et.OUTSIDE  # init was not
    finally:
        child.kill()
        child.wait()


def test_cpu_delta_keeps_other_users_out_of_the_roles() -> None:
    before = {"10:1": ("vLLM EngineCore", 1.0), "11:1": ("gateway (modgate up)", 0.5),
              "12:1": (et.OUTSIDE, 100.0)}
    after = {"10:1": ("vLLM EngineCore", 9.0), "11:1": ("gateway (modgate up)", 1.5),
             "12:1": (et.OUTSIDE, 107.0), "13:5": (et.OUTSIDE, 3.0), "14:5": ("Serve HTTP proxy", 0.25)}
    got = et.cpu_delta(before, after, 4.0, (6.5, 6.0, 5.0))
    assert got["cpu_s_by_role"] == {"vLLM EngineCore": 8.0, "gateway (modgate up)": 1.0, "Serve HTTP proxy": 0.25}
    assert (got["cpu_s_total"], got["cpu_s_engine"], got["cpu_s_outside"]) == (9.25, 8.0, 10.0)
    assert got["engine_share_of_cpu_used"] == round(8.0 / 9.25, 3)
    assert got["loadavg_1m_before"] == 6.5 and got["loadavg_1m_after"] >= 0
