"""The package's layers point down: kernels -> state -> chains -> estimators -> distributed -> api -> studies
-> cli (``docs/architecture.md``). A module may import its own layer and the ones below, never one above."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "llc_fast"
#: Each top-level part of the package and its layer (higher numbers may import lower ones).
LAYERS = {
    "oracles": 0, "kernels": 0, "diagnostics": 0, "state": 1, "chains": 2, "config": 3, "estimators": 3,
    "files": 0, "integrations": 3, "distributed": 4, "api": 5, "studies": 6, "compat": 6, "cli": 7, "__main__": 7,
}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path) -> list[str]:
    """The llc_fast modules imported by ``path`` (absolute names), at module level or inside functions."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                if node.module:
                    out.append(name)
                else:  # "from .. import x": a submodule x, or a name of the package's facade
                    out += [f"{name}.{a.name}" if name != "llc_fast" or a.name in LAYERS else name
                            for a in node.names]
            elif node.module and node.module.startswith("llc_fast"):
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("llc_fast")]
    return out


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.parts[-1] != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    here = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    assert here in LAYERS, f"{here} has no layer in LAYERS"
    for module in _imports(path):
        there = _part(module)
        if there in ("__init__",) or there == here:
            continue
        assert there in LAYERS, f"{path.name} imports {module}, which has no layer"
        assert LAYERS[there] <= LAYERS[here], f"{path.relative_to(PACKAGE)} ({here}) imports {module} ({there})"


def test_the_package_imports_without_cycles():
    import subprocess
    import sys

    for module in ("llc_fast.kernels", "llc_fast.state", "llc_fast.chains", "llc_fast.estimators",
                   "llc_fast.distributed", "llc_fast.compat.devinterp", "llc_fast.cli"):
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
