"""Package boundaries (DESIGN.md): checked in a fresh interpreter so imports are real."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = {
    "prompt_registry": ["gateway", "serving", "fastapi", "ray", "vllm", "torch", "httpx"],
    "serving": ["gateway", "prompt_registry", "ray", "vllm", "torch", "fastapi"],
    "gateway": ["vllm", "torch", "ray"],
    "gateway.api.app": ["vllm", "torch", "ray"],
}


@pytest.mark.parametrize(("package", "forbidden"), CASES.items())
def test_package_does_not_import(package: str, forbidden: list[str]) -> None:
    code = (
        f"import sys, {package}\n"
        f"bad = [m for m in {forbidden!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{package} imports {out.stdout.strip()}"
