"""The shape of the package, checked: the rooms stay readable as the code grows.

- no function in ``scheduler/`` longer than 60 lines;
- no import circle between modules, nor between rooms (subpackages), counting every import:
  type-only (``if TYPE_CHECKING``) and function-local ones too;
- at most 8 modules directly in ``scheduler/`` (the rest lives in its room);
- the session core imports no Trio and reads no clock;
- every module or file a docstring, comment or doc names exists.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "scheduler"
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every scheduler module ``name`` imports, anywhere in the file."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name and modules[t].name != "__init__.py"}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else module


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_no_import_circle_between_modules():
    assert _cycle(_graph()) is None


def test_no_import_circle_between_rooms():
    rooms: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        rooms.setdefault(_room(module), set()).update(_room(t) for t in targets if _room(t) != _room(module))
    assert _cycle(rooms) is None


def test_the_top_level_holds_at_most_8_modules():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 8, top


def test_the_session_core_does_no_io_and_reads_no_clock():
    graph = _graph()
    reach, todo = set(), ["scheduler.session.core"]
    while todo:  # everything the core imports, transitively, inside the package
        m = todo.pop()
        if m not in reach:
            reach.add(m)
            todo.extend(graph[m])
    for module in reach:
        tree = ast.parse(_modules()[module].read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not names & {"trio", "trio_websocket", "time", "asyncio", "redis", "threading"}, (module, names)


def test_named_files_exist():
    """Paths such as ``scheduler/store/keys.py``, ``luascripts/x.lua`` or ``docs/x.md`` in
    the package and the docs point at files of the repository."""
    pattern = re.compile(r"\b((?:scheduler|luascripts|docs|tests|bench)/[\w/.-]+\.(?:py|lua|md))\b")  # NAME: a placeholder
    texts = [*PKG.rglob("*.py"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
    missing = {(str(f.relative_to(ROOT)), m) for f in texts for m in pattern.findall(f.read_text())
               if "NAME" not in m and not (ROOT / m).exists()}
    assert not missing, sorted(missing)


def _resolves(dotted: str) -> bool:
    """Whether ``scheduler.a.b.Name[.attr]`` names a module of the package, or something
    defined in one (imported and looked up: what a reader would find)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_named_code_exists():
    """Dotted names such as ``scheduler.session.core.SessionCore`` and short paths such as
    ``placement/dispatcher.py`` in the package and the docs point at code that exists: a
    module moved or a class renamed must take its mentions along."""
    # (not in a string literal: logger names such as "scheduler.relay" are names, not code)
    dotted = re.compile(r"(?<![\w\"'])scheduler(?:\.(?!json|toml|service|example|v1\b)[A-Za-z_]\w*)+")
    short = re.compile(r"(?<![\w/.-])((?:edge|session|placement|store|cluster|ops|client|reference)/[\w/]+\.py)\b")
    texts = [*PKG.rglob("*.py"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
    missing = set()
    for f in texts:
        text = f.read_text()
        where = str(f.relative_to(ROOT))
        missing |= {(where, m) for m in dotted.findall(text) if not _resolves(m)}
        missing |= {(where, m) for m in short.findall(text) if not (PKG / m).exists()}
    assert not missing, sorted(missing)
