"""Every import of a Python source, found with `ast`: at any depth (inside functions and
`if TYPE_CHECKING:` blocks too), relative imports resolved, `importlib.import_module("x")` and
`__import__("x")` included. Used by the boundary test and by the import picture
(`python -m testsupport.import_graph`)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Import", "imports_in", "module_name"]


@dataclass(frozen=True)
class Import:
    line: int
    text: str  # the import as written
    names: tuple[str, ...]  # absolute module names it may load (`from a import b`: a and a.b)


def module_name(path: Path) -> tuple[str, bool]:
    """(dotted module name, is a package __init__) of a file relative to the repository root."""
    parts = list(path.with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _resolve(module: str, is_package: bool, name: str | None, level: int) -> str:
    if level == 0:
        return name or ""
    package = module if is_package else module.rpartition(".")[0]
    base = package.split(".")
    if level - 1 > len(base) - 1:
        raise ImportError(f"relative import beyond the top-level package in {module}")
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _literal(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def imports_in(source: str, module: str, is_package: bool = False) -> Iterator[Import]:
    """Every import of `source` (module `module`), at any depth, relative ones resolved."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield Import(node.lineno, ast.unparse(node), tuple(a.name for a in node.names))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.module, node.level)
            subs = tuple(f"{base}.{a.name}" for a in node.names if a.name != "*")
            yield Import(node.lineno, ast.unparse(node), (base, *subs))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            target = _literal(node.args[0])
            if fname not in ("import_module", "__import__") or target is None:
                continue
            if fname == "import_module" and target.startswith("."):
                package = _literal(node.args[1]) if len(node.args) > 1 else next(
                    (_literal(k.value) for k in node.keywords if k.arg == "package"), None)
                if package is None:
                    continue
                level = len(target) - len(target.lstrip("."))
                target = _resolve(package, True, target.lstrip(".") or None, level)
            yield Import(node.lineno, ast.unparse(node), (target,))
