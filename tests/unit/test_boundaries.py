"""Package boundaries (DESIGN.md), checked two ways.

1. Statically, over every .py module of the packages: every `import` / `from ... import` at any
   depth (inside functions and `if TYPE_CHECKING:` blocks too) and every
   `importlib.import_module("literal")` / `__import__("literal")` call, relative imports resolved.
   A lazy import inside a function is still a dependency, so it is checked like a top-level one.
2. In a fresh interpreter, so imports are real: importing a package (or starting the server)
   leaves the forbidden modules out of `sys.modules`.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from testsupport.imports import imports_in, module_name

ROOT = Path(__file__).resolve().parents[2]

# The directories whose modules are checked (benchmarks/ is scripts, still checked: it must not
# import tests; testsupport/ is the helper package that tests and benchmarks share).
CHECKED = ("gateway", "serving", "prompt_registry", "benchmarks", "testsupport")
SHIPPED = ("gateway", "serving", "prompt_registry")

HEAVY_ML = ("ray", "vllm", "torch")
# The only modules allowed to import a heavy ML package, and which ones each needs (lazily).
HEAVY_ML_ALLOWED: dict[str, tuple[str, ...]] = {
    "serving.ray_app": ("ray",),  # the Ray Serve application (ray.serve, ray.serve.llm)
    "serving.ray_handle_backend": ("ray",),  # calls the deployments through Ray handles
    "serving.tiny_model": ("torch",),  # writes the random tiny test model
}
OFFLINE_DEPS = ("statsmodels", "matplotlib", "pyarrow", "duckdb", "tqdm")
CLI_DEPS = ("typer",)


@dataclass(frozen=True)
class Rule:
    """Modules under any of `scope` (minus `exempt`) must not import any of `forbidden`."""

    name: str
    scope: tuple[str, ...]
    forbidden: tuple[str, ...]
    exempt: tuple[str, ...] = ()

    def applies_to(self, module: str) -> bool:
        return _under(module, self.scope) and not _under(module, self.exempt)


RULES: tuple[Rule, ...] = (
    Rule("prompt_registry is the bottom layer", ("prompt_registry",),
         ("gateway", "serving", "fastapi", "starlette", *HEAVY_ML)),
    Rule("serving knows nothing about the gateway or prompts", ("serving",),
         ("gateway", "prompt_registry")),
    Rule("the server never imports the CLI or the offline quality tool-chain", ("gateway",),
         ("gateway.cli", "gateway.quality", *OFFLINE_DEPS, *CLI_DEPS),
         exempt=("gateway.cli", "gateway.quality")),
    Rule("the offline quality tool-chain sits below the CLI and beside the HTTP API",
         ("gateway.quality",), ("gateway.cli", "gateway.api")),
    Rule("shipped code never imports tests, benchmarks or their helpers", SHIPPED,
         ("tests", "benchmarks", "testsupport")),
    Rule("benchmarks never import tests (shared helpers live in testsupport)", ("benchmarks",),
         ("tests",)),
    Rule("testsupport is shared by tests and benchmarks and imports neither", ("testsupport",),
         ("tests", "benchmarks")),
)


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations_in(source: str, path: str) -> list[str]:
    """Boundary violations of one module's source; `path` is relative to the repository root."""
    module, is_package = module_name(Path(path))
    out: list[str] = []
    for imp in imports_in(source, module, is_package):
        for rule in RULES:
            if not rule.applies_to(module):
                continue
            bad = sorted({f for n in imp.names for f in rule.forbidden if _under(n, (f,))})
            if bad:
                out.append(f"{path}:{imp.line}: `{imp.text}` imports {', '.join(bad)} "
                           f"({rule.name})")
        if _under(module, CHECKED) and not _under(module, ("benchmarks",)):
            allowed = HEAVY_ML_ALLOWED.get(module, ())
            bad = sorted({h for n in imp.names for h in HEAVY_ML
                          if _under(n, (h,)) and h not in allowed})
            if bad:
                out.append(f"{path}:{imp.line}: `{imp.text}` imports {', '.join(bad)} (ray, vllm "
                           f"and torch only in {', '.join(sorted(HEAVY_ML_ALLOWED))})")
    return out


def checked_files() -> list[Path]:
    files = []
    for top in CHECKED:
        files += [p for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(p.relative_to(ROOT) for p in files)


# --- the checker itself: it finds what it should (so the real check below can fail) ----------

@pytest.mark.parametrize(("path", "source", "expected"), [
    # a lazy import inside a function, in the server
    ("gateway/admission.py", "class A:\n    def f(self):\n        import typer\n",
     ["gateway/admission.py:3: `import typer` imports typer"]),
    ("gateway/pipeline.py", "def f():\n    if True:\n        from gateway.cli import main\n",
     ["gateway/pipeline.py:3: `from gateway.cli import main` imports gateway.cli"]),
    # `from package import submodule`
    ("gateway/limits.py", "from gateway import quality\n",
     ["gateway/limits.py:1: `from gateway import quality` imports gateway.quality"]),
    # relative imports, from a module and from a package __init__
    ("gateway/api/app.py", "from ..cli import main\n",
     ["gateway/api/app.py:1: `from ..cli import main` imports gateway.cli"]),
    ("gateway/api/__init__.py", "from ..quality import decisions\n",
     ["gateway/api/__init__.py:1: `from ..quality import decisions` imports gateway.quality"]),
    ("gateway/quality/evaluation/report.py", "from ...api import app\n",
     ["gateway/quality/evaluation/report.py:1: `from ...api import app` imports gateway.api"]),
    # importlib.import_module with a literal, plain and relative; __import__
    ("gateway/telemetry.py", "import importlib\nm = importlib.import_module('statsmodels.api')\n",
     ["gateway/telemetry.py:2: `importlib.import_module('statsmodels.api')` imports statsmodels"]),
    ("gateway/config.py", "from importlib import import_module\nimport_module('.cli', 'gateway')\n",
     ["gateway/config.py:2: `import_module('.cli', 'gateway')` imports gateway.cli"]),
    ("prompt_registry/render.py", "x = __import__('fastapi')\n",
     ["prompt_registry/render.py:1: `__import__('fastapi')` imports fastapi"]),
    # heavy ML: only the allow-listed serving modules, only what each needs
    ("serving/http_backend.py", "def f():\n    import ray.serve\n",
     ["serving/http_backend.py:2: `import ray.serve` imports ray"]),
    ("serving/tiny_model.py", "import vllm\n", ["serving/tiny_model.py:1: `import vllm` imports vllm"]),
    ("gateway/api/app.py", "import torch\n", ["gateway/api/app.py:1: `import torch` imports torch"]),
    ("serving/ray_app.py", "def f():\n    import ray\n    from ray.serve.llm import LLMServer\n", []),
    ("serving/tiny_model.py", "def f():\n    import torch\n", []),
    # layers
    ("serving/protocol.py", "from prompt_registry.models import PromptSpec\n",
     ["serving/protocol.py:1: `from prompt_registry.models import PromptSpec` imports prompt_registry"]),
    ("prompt_registry/store.py", "from starlette.requests import Request\n",
     ["prompt_registry/store.py:1: `from starlette.requests import Request` imports starlette"]),
    ("benchmarks/overhead.py", "from tests.redis_server import RedisServer\n",
     ["benchmarks/overhead.py:1: `from tests.redis_server import RedisServer` imports tests"]),
    ("serving/config.py", "import benchmarks.soak\n",
     ["serving/config.py:1: `import benchmarks.soak` imports benchmarks"]),
    # allowed: the CLI and quality import what the server may not; names that merely share a prefix
    ("gateway/cli/main.py", "import typer\nfrom gateway.quality import decisions\nimport tqdm\n", []),
    ("gateway/quality/reporting.py", "import matplotlib.pyplot as plt\n", []),
    ("gateway/api/app.py", "import rayon\nimport gateway.clippy\nfrom gateway import api\n", []),
    ("benchmarks/soak.py", "from testsupport.redis_server import RedisServer\nimport ray\n", []),
])
def test_checker_finds_violations(path: str, source: str, expected: list[str]) -> None:
    found = violations_in(source, path)
    assert len(found) == len(expected), found
    for message, prefix in zip(found, expected, strict=True):
        assert message.startswith(prefix), message


def test_every_module_parses_and_is_seen() -> None:
    files = checked_files()
    for top in CHECKED:
        assert any(f.parts[0] == top for f in files), f"no modules found under {top}/"
    for module in HEAVY_ML_ALLOWED:
        assert Path(*module.split(".")).with_suffix(".py") in files, f"stale allow-list: {module}"


def test_package_boundaries_over_every_module() -> None:
    problems: list[str] = []
    for path in checked_files():
        problems += violations_in((ROOT / path).read_text(encoding="utf-8"), path.as_posix())
    assert not problems, "package boundary violations:\n" + "\n".join(problems)


def test_heavy_ml_allow_list_is_exactly_what_is_used() -> None:
    # An allow-listed module that no longer needs its heavy import should leave the list.
    for module, allowed in HEAVY_ML_ALLOWED.items():
        path = Path(*module.split(".")).with_suffix(".py")
        used = {h for imp in imports_in((ROOT / path).read_text(encoding="utf-8"), module)
                for n in imp.names for h in allowed if _under(n, (h,))}
        assert used == set(allowed), f"{path} no longer imports {set(allowed) - used}"


# --- fresh interpreter: what importing really loads ------------------------------------------

CASES = {
    "prompt_registry": ["gateway", "serving", "fastapi", "starlette", "ray", "vllm", "torch",
                        "httpx"],
    "serving": ["gateway", "prompt_registry", "ray", "vllm", "torch", "fastapi"],
    "gateway": ["vllm", "torch", "ray"],
    "gateway.api.app": ["vllm", "torch", "ray"],
}


def _loaded(imports: str, forbidden: list[str]) -> list[str]:
    code = (
        f"import sys\n{imports}\n"
        f"print(','.join(m for m in {forbidden!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return [m for m in out.stdout.strip().split(",") if m]


@pytest.mark.parametrize(("package", "forbidden"), CASES.items())
def test_package_does_not_import(package: str, forbidden: list[str]) -> None:
    loaded = _loaded(f"import {package}", forbidden)
    assert not loaded, f"{package} imports {','.join(loaded)}"


SERVER_FORBIDDEN = [*OFFLINE_DEPS, *CLI_DEPS, "gateway.cli", "gateway.quality"]


def test_starting_the_server_loads_no_offline_code() -> None:
    # gateway.bootstrap (the server's start-up module) is imported too once it exists.
    imports = (
        "import importlib.util\n"
        "import gateway.api.app\n"
        "if importlib.util.find_spec('gateway.bootstrap') is not None:\n"
        "    import gateway.bootstrap\n"
    )
    loaded = _loaded(imports, SERVER_FORBIDDEN)
    assert not loaded, f"starting the server imports {','.join(loaded)}"
