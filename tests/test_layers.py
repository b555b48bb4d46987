"""The import rules of ARCHITECTURE.md, read from the code: every `import` statement of every
module (those inside functions too; only `if TYPE_CHECKING:` blocks are left out, they never
run), mapped to the packages of the layout."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("bandit", "features", "router", "carriers", "experiments")
SERVING = (
    "bandit",
    "features",
    "router.contract",
    "router.core",
    "router.http",
    "router.replicas",
    "router.log",
    "router.serving",
    "carriers.catalog",
    "carriers.smpp",
    "carriers.sender",
)


def _modules() -> Iterator[tuple[str, Path]]:
    for top in TOP:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.AST, module: str) -> Iterator[str]:
    """The project modules a module's code imports (absolute names)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                pkg = module.split(".")[: -node.level] if node.level else []
                base = ".".join([*pkg, base] if base else pkg)
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)
        stack.extend(ast.iter_child_nodes(node))


@cache
def imports() -> dict[str, set[str]]:
    """Module -> the project modules (and packages) it imports."""
    known = dict(_modules())
    out: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        out[name] = {m for m in _imported(tree, name) if m in known and m != name}
    return out


def _within(module: str, packages: tuple[str, ...] | str) -> bool:
    packages = (packages,) if isinstance(packages, str) else packages
    return any(module == p or module.startswith(p + ".") for p in packages)


def _breaking(sources: tuple[str, ...], allowed: tuple[str, ...]) -> list[str]:
    """`a -> b` for every import of a project module outside `allowed` by a module in `sources`."""
    return sorted(
        f"{a} -> {b}"
        for a, targets in imports().items()
        if _within(a, sources)
        for b in targets
        if not _within(b, allowed)
    )


def test_the_math_imports_no_io_layer() -> None:
    """bandit/ and features/ are plain functions on arrays: nothing of the router, the carriers
    or the simulator."""
    assert _breaking(("bandit", "features"), ("bandit", "features")) == []


def test_the_sender_speaks_only_the_wire_contract() -> None:
    """The sender worker and the SMPP side know the router only by its contract and client."""
    assert _breaking(("carriers.smpp", "carriers.sender"), ALLOWED_FOR_SENDER) == []


ALLOWED_FOR_SENDER = (
    "features.clock",
    "carriers.smpp",
    "carriers.sender",
    "carriers.catalog",
    "router.contract",
    # The `router worker` command reads the policy file's SLA per message class.
    "router.core.config",
)


def test_a_sender_worker_does_not_load_the_engine() -> None:
    """Importing the worker (and its reporter and ledger) loads neither the engine nor numpy."""
    code = (
        "import sys, carriers.sender.worker, carriers.sender.ledger, carriers.sender.queue\n"
        "heavy = ('numpy', 'scipy', 'pyarrow', 'phonenumbers', 'router.core', 'bandit')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or "
        "m.startswith('router.core')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_serving_code_never_imports_the_simulator() -> None:
    """experiments/ drives the engine; nothing that serves traffic depends on it."""
    assert [
        line for line in _breaking(SERVING, TOP) if line.split(" -> ")[1].startswith("experiments")
    ] == []


def _package(module: str) -> str:
    """A module's node in the package graph: its subpackage (router.core, carriers.smpp, …),
    or the module itself for a top-level module (router.cli, carriers.catalog)."""
    parts = module.split(".")
    if parts[0] in ("bandit", "features", "experiments"):
        return parts[0]
    path = ROOT.joinpath(*parts[:2])
    return ".".join(parts[:2]) if path.is_dir() or path.with_suffix(".py").exists() else parts[0]


def test_no_package_depends_on_itself_through_another() -> None:
    """The package graph has no cycle."""
    graph: dict[str, set[str]] = {}
    for a, targets in imports().items():
        for b in targets:
            pa, pb = _package(a), _package(b)
            if pa != pb:
                graph.setdefault(pa, set()).add(pb)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_module_depends_on_itself_through_another() -> None:
    """Within packages too: no circle of module imports."""
    graph = imports()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:  # a package name, not a module file's
                continue
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
