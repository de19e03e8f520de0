"""The package's shape: rooms that import only downwards, no import circles, every module importable on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ds_pipe_ext"

#: The rooms, lowest first. A module may import from its own room and the rooms below it, never above.
ROOMS = [
    {"compat", "schedules"},
    {"observe"},
    {"partition", "topology", "watchdog", "checkpoint", "models"},
    {"planner"},
    {"config", "module"},
    {"engine"},
    {"cli", "__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next(index for index, names in enumerate(ROOMS) if top in names)


def imports_of(module: str) -> list[tuple[str, int, bool]]:
    """Every ``ds_pipe_ext`` module ``module`` imports, anywhere in it: (name, line, at module level)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from .. import compat`` imports the submodule, not a name of the package's __init__.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            if target in MODULES:
                found.append((target, node.lineno, id(node) in top_level))
    return found


def parents(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


@pytest.mark.parametrize("module", [m for m in MODULES if m != "ds_pipe_ext"])
def test_imports_go_only_to_the_same_room_or_below(module):
    for target, line, _ in imports_of(module):
        if target == "ds_pipe_ext":
            pytest.fail(f"{module}:{line} imports the top-level package, which runs back up through every room")
        assert room(target) <= room(module), f"{module}:{line} imports {target}, a room above it"


def test_there_are_no_import_circles():
    graph = {m: {t for t, _, _ in imports_of(m) if t not in parents(m) and t != m} for m in MODULES}
    visiting, done = [], set()

    def visit(module: str) -> None:
        if module in done:
            return
        if module in visiting:
            circle = visiting[visiting.index(module) :] + [module]
            pytest.fail("import circle: " + " -> ".join(circle))
        visiting.append(module)
        for target in sorted(graph[module]):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in MODULES:
        visit(module)


@pytest.mark.parametrize("module", list(MODULES))
def test_module_level_imports_come_before_any_code(module):
    tree = ast.parse(MODULES[module].read_text())
    first_definition = next(
        (node.lineno for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))), None
    )
    late = [
        node.lineno
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom)) and first_definition and node.lineno > first_definition
    ]
    assert not late, f"{module} imports at line(s) {late}, after its first definition"


def test_every_module_imports_on_its_own():
    """Each module in a clean slate of ds_pipe_ext modules (DeepSpeed and torch stay loaded, to keep this quick)."""
    script = (
        "import importlib, sys\n"
        "import deepspeed, torch\n"
        f"for name in {sorted(MODULES)!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'ds_pipe_ext' or m.startswith('ds_pipe_ext.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(sys.modules) > 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_library_does_not_need_torchvision():
    script = (
        "import sys\n"
        "sys.modules['torchvision'] = None\n"
        "import ds_pipe_ext, ds_pipe_ext.module, ds_pipe_ext.engine, ds_pipe_ext.partition, ds_pipe_ext.cli\n"
        "from ds_pipe_ext.models.vision import build_model\n"
        "try:\n"
        "    build_model('alexnet')\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "needs torchvision: pip install 'ds_pipe_ext[examples]'" in result.stdout
