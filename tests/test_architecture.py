"""The shape of the house: no import circles inside the package (imports inside functions count too:
a late import is still a dependency), layers import only downwards, and no source file grows past
about a thousand lines."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "qlora_rs"
MAX_LINES = 1000

# Each layer imports only from itself and the layers before it (README, "Architecture"). "models"
# locates the bundled model files; "api" holds the entry points that choose between one process
# and a device mesh; "demo" is `python -m qlora_rs.demo`, which drives the CLI.
LAYERS = ["errors", "_lib", "core", "nn", "optim", "models", "io", "surgery", "distributed", "api", "training", "cli",
          "demo"]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Package modules that ``path`` imports, at any depth of its code."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("qlora_rs"):
                continue
            for alias in node.names:  # "from . import x" may name a submodule
                sub = f"{target}.{alias.name}"
                out.add(sub if _exists(sub) else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("qlora_rs"))
    out.discard(me)
    return {m for m in out if _exists(m)}


def _exists(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    base = PACKAGE / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() or base.with_suffix(".pyi").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            # A package's __init__ re-exporting its own submodules is not a circle of the layers.
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS)  # the package's own __init__: the facade above everything
    top = parts[1]
    assert top in LAYERS, f"{module}: in no layer (add its folder to LAYERS in this test)"
    return LAYERS.index(top)


def test_no_import_circles():
    # __init__ files may import their own submodules (re-exports) and the submodules may import
    # siblings through the package: that is how a folder exposes its parts, not a circle of layers.
    g = graph()
    found = cycles(g)
    assert found == [], "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_layers_import_downwards():
    wrong = []
    for module, deps in graph().items():
        for dep in deps:
            if layer_of(dep) > layer_of(module):
                wrong.append(f"{module} -> {dep}")
    assert wrong == [], "imports pointing up: " + ", ".join(sorted(wrong))


def test_no_source_file_above_a_thousand_lines():
    files = [p for d in ("python", "rust", "cuda") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".rs", ".cu", ".cuh") and p.is_file()]
    assert len(files) > 30
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_moved_modules_stay_importable_at_their_old_paths():
    import qlora_rs

    for old, new in qlora_rs._MOVED.items():
        module = importlib.import_module(f"qlora_rs.{old}")
        assert module is importlib.import_module(new, "qlora_rs"), old
        assert module.__spec__.name == "qlora_rs" + new, old  # its own spec, not the alias's
    from qlora_rs.inference import generate  # noqa: F401  (README's path before the layers)

    assert callable(qlora_rs.train)  # the function, not the module of the same name
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("qlora_rs.no_such_module")
    # `python -m qlora_rs.datasets` (an old package path) still finds the package's __main__.
    assert importlib.util.find_spec("qlora_rs.datasets.__main__") is not None
