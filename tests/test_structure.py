"""The package's modules stay small and keep their private names to themselves: no file of ``llc_fast`` is over
MAX_FILE_LINES lines, no function over MAX_FUNCTION_LINES lines (its docstring not counted), and no module imports
another module's private name (``from .x import _y``; a name with one leading underscore that is not a dunder).
Each module is parsed with ``ast`` (as ``test_layers.py`` does)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "llc_fast"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _id(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def function_lengths(tree: ast.AST) -> dict[str, int]:
    """{qualified name: lines} of every function and method (nested ones too), without the docstring's lines."""
    out = {}

    def visit(node, prefix=""):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                lines = child.end_lineno - child.lineno + 1
                body0 = child.body[0]
                if isinstance(body0, ast.Expr) and isinstance(body0.value, ast.Constant) and isinstance(
                        body0.value.value, str):
                    lines -= body0.end_lineno - body0.lineno + 1
                out[name] = lines
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree)
    return out


def private_imports(path: Path, tree: ast.AST) -> list[str]:
    """``module._name`` for every private name that ``path`` imports from another llc_fast module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "llc_fast"):
            out += [f"{'.' * node.level}{node.module or ''}.{a.name}" for a in node.names if _private(a.name)]
    return out


@pytest.mark.parametrize("path", SOURCES, ids=_id)
def test_files_are_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{_id(path)} has {lines} lines (at most {MAX_FILE_LINES}): split it"


@pytest.mark.parametrize("path", SOURCES, ids=_id)
def test_functions_are_short(path):
    long = {name: n for name, n in function_lengths(ast.parse(path.read_text())).items() if n > MAX_FUNCTION_LINES}
    assert not long, f"{_id(path)}: functions over {MAX_FUNCTION_LINES} lines (docstring excluded): {long}"


@pytest.mark.parametrize("path", SOURCES, ids=_id)
def test_no_private_names_cross_modules(path):
    found = private_imports(path, ast.parse(path.read_text()))
    assert not found, f"{_id(path)} imports private names of other modules: {found}; make them public"
