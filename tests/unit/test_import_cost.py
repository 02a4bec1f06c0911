"""Every CLI command loads the configuration first: loading it must not pull in the webhook
dispatcher's HTTP client (aiohttp), which only the gateway process uses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_loading_the_configuration_does_not_import_aiohttp() -> None:
    code = ("import sys; import gateway.config; from gateway.config import load_config; "
            "load_config(None); print('aiohttp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert out.stdout.strip() == "False", out.stderr
