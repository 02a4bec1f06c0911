"""The strictly typed parts of the code stay clean under `mypy --strict` (the [tool.mypy] section
of pyproject.toml: strict, the pydantic plugin, the third-party overrides).

CI runs only pytest, so this test is how mypy runs in CI. A package or module joins
STRICT_PATHS once it passes; the goal is the whole of gateway, serving and prompt_registry.
The cache is mypy's default .mypy_cache (gitignored): a developer's own `mypy serving` warms it,
and a cold run (CI's fresh clone) takes well under a minute.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# mypy follows imports, so a module listed here is clean only if everything it imports is.
# With gateway/cli every gateway module is listed.
STRICT_PATHS = [
    "serving", "prompt_registry",
    "gateway/__init__.py", "gateway/admission.py", "gateway/auth.py", "gateway/cascade.py",
    "gateway/config.py",
    "gateway/decision_log.py", "gateway/feedback.py", "gateway/ids.py", "gateway/limits.py",
    "gateway/pipeline.py", "gateway/problems.py", "gateway/prompt_cache.py",
    "gateway/recording.py", "gateway/stores.py", "gateway/telemetry.py", "gateway/verdict.py",
    "gateway/webhooks.py", "gateway/webhook_settings.py", "gateway/samples.py",
    "gateway/decision_reader.py", "gateway/quality", "gateway/rollouts",
    "gateway/api", "gateway/moderation.py", "gateway/bootstrap.py", "gateway/cli",
]


def test_strict_paths_exist() -> None:
    missing = [p for p in STRICT_PATHS if not (ROOT / p).exists()]
    assert not missing, f"STRICT_PATHS names what is not there: {missing}"


def test_mypy_strict_is_clean() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(ROOT / ".mypy_cache"), *STRICT_PATHS],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    report = out.stdout + out.stderr
    print(report)
    assert out.returncode == 0, f"mypy --strict over {STRICT_PATHS} is not clean:\n{report}"
