# The source passes the linter (pyflakes rules and syntax errors), as asyncpg checks its own.
import ast
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.fail("ruff is part of the test extras: pip install -e '.[test]'")
    r = subprocess.run([ruff, "check", "--select", "F,E9", "--no-cache", "pgguard", "tests",
                        "bench"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# -- the import direction (issue 16) ----------------------------------------------------
# cli -> proxy -> services -> base. A layer imports only layers to its right (and itself);
# inside a package, modules import each other freely as long as no cycle forms.
LAYERS = (
    ("cli", {"__main__", "cli", "demo", "demo_data"}),
    ("proxy", {"proxy"}),
    ("services", {"policy", "masking", "audit", "auth", "approvals", "control"}),
    # "": pgguard/__init__; cliparse: the argparse subclass every CLI shares
    ("base", {"config", "protocol", "_core", "errors", "cliparse", ""}),
)
WHY = "# why:"


class _Import(NamedTuple):
    source: str         # the importing module, dotted
    target: str         # the pgguard module (or package) imported
    line: int
    nested: bool        # inside a function or class body
    typing_only: bool   # under `if TYPE_CHECKING:`
    why: bool           # a `# why:` comment on its line or the line above


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted((ROOT / "pgguard").rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _targets(node, source: str, is_pkg: bool, mods: dict) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = source.split(".") if is_pkg else source.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
    out = []
    for name in names:
        while name and name not in mods:        # `import pgguard.x.y` names module x.y
            name = name.rpartition(".")[0]
        if name.startswith("pgguard") and name not in out:
            out.append(name)
    return out


def _imports() -> list[_Import]:
    mods = _modules()
    found = []
    for source, path in mods.items():
        text = path.read_text()
        lines = text.splitlines()
        is_pkg = path.name == "__init__.py"

        def walk(node, nested: bool, typing_only: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    ln = child.lineno
                    why = WHY in lines[ln - 1] or (ln >= 2 and WHY in lines[ln - 2])
                    for t in _targets(child, source, is_pkg, mods):
                        found.append(_Import(source, t, ln, nested, typing_only, why))
                    continue
                if isinstance(child, ast.If) and "__main__" in ast.unparse(child.test):
                    continue    # a program's own wiring: runs only as `python -m`
                n = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.ClassDef, ast.Lambda))
                tc = typing_only or (isinstance(child, ast.If)
                                     and "TYPE_CHECKING" in ast.unparse(child.test))
                if isinstance(child, ast.If) and tc and not typing_only:
                    for c in child.body:
                        walk(ast.Module(body=[c], type_ignores=[]), n, True)
                    for c in child.orelse:
                        walk(ast.Module(body=[c], type_ignores=[]), n, False)
                    continue
                walk(child, n, tc)

        walk(ast.parse(text), False, False)
    return found


def _package(module: str) -> str:
    """The node of the package graph: pgguard's subpackage or top-level module; a
    service's own command line (``pgguard/audit/cli.py``, ...) belongs to "cli", the
    top of the graph, which wires services together (a token revoked in a fleet)."""
    parts = module.split(".")
    if parts[-1] == "cli":
        return "cli"
    return parts[1] if len(parts) > 1 else ""


def _layer(module: str) -> int:
    pkg = _package(module)
    for i, (_, pkgs) in enumerate(LAYERS):
        if pkg in pkgs:
            return i
    raise AssertionError(f"{module}: no layer in LAYERS (add its package there)")


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None (depth-first, colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_imports_go_one_way():
    """cli -> proxy -> services (policy, masking, audit, auth, approvals, control) ->
    base (config, protocol, _core, errors): no service imports proxy, not even for
    type hints."""
    bad = [f"{i.source}:{i.line} imports {i.target}" for i in _imports()
           if _layer(i.target) < _layer(i.source)]
    assert not bad, "imports against the direction:\n" + "\n".join(bad)


def test_no_import_cycle():
    """No cycle between pgguard's modules (what runs: type-only imports left out) and
    none between its packages (type-only imports included)."""
    imports = _imports()
    modules: dict[str, set[str]] = {}
    packages: dict[str, set[str]] = {}
    for i in imports:
        if i.target == i.source or i.source.startswith(i.target + "."):
            continue            # a package's own __init__, imported by its modules
        if not i.typing_only:
            modules.setdefault(i.source, set()).add(i.target)
        a, b = _package(i.source), _package(i.target)
        if a != b:
            packages.setdefault(a, set()).add(b)
    assert _cycle(modules) is None, "module import cycle: " + " -> ".join(_cycle(modules))
    assert _cycle(packages) is None, "package import cycle: " + " -> ".join(
        p or "pgguard" for p in _cycle(packages))


def test_nested_imports_say_why():
    """A pgguard module imported inside a function says why on its line or the line
    above (`# why: ...`): an optional heavy dependency, kept off the startup path."""
    bad = [f"{i.source}:{i.line} imports {i.target}" for i in _imports()
           if i.nested and not i.typing_only and not i.why]
    assert not bad, "function-level imports without a '# why:' comment:\n" + "\n".join(bad)


# the session's parts, and what else holds a session: each changes its own state only
# (the session wires its parts together in proxy/session.py; everything else asks)
_PART_MODULES = ["proxy/enforce.py", "proxy/holds.py", "proxy/blast.py", "proxy/fncall.py",
                 "proxy/console.py", "proxy/tracking.py", "proxy/upstream.py",
                 "proxy/startup.py", "proxy/sideconn.py", "proxy/cancel.py",
                 "proxy/server.py", "masking/wire.py", "masking/lane.py",
                 "masking/parking.py"]
_SESSION_NAMES = {"s", "session", "sess"}


def _root(node) -> ast.AST:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node


def _is_session(node) -> bool:
    """``s``, ``session`` or ``self.s``: a session as the parts name it."""
    return (isinstance(node, ast.Name) and node.id in _SESSION_NAMES) or (
        isinstance(node, ast.Attribute) and node.attr == "s"
        and isinstance(node.value, ast.Name) and node.value.id == "self")


def _foreign_writes(tree: ast.AST) -> list[tuple[int, str]]:
    """Assignments to an attribute reached through a session (``s.x = ``,
    ``self.s.masking.y += ``), or through a name bound to one of its parts in the same
    function (``mask = s.masking`` ... ``mask.y = ``)."""
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        parts = set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(
                    node.targets[0], ast.Name) and isinstance(node.value, ast.Attribute) \
                    and _is_session(node.value.value):
                parts.add(node.targets[0].id)
        for node in ast.walk(fn):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if not isinstance(el, (ast.Attribute, ast.Subscript)):
                        continue
                    r = el
                    while isinstance(r, (ast.Attribute, ast.Subscript)) and \
                            not _is_session(r.value):
                        r = r.value
                    through_session = isinstance(r, (ast.Attribute, ast.Subscript)) and \
                        _is_session(r.value)
                    root = _root(el)
                    through_part = isinstance(root, ast.Name) and root.id in parts
                    if through_session or through_part:
                        out.append((node.lineno, ast.unparse(el)))
    return out


def test_parts_change_only_their_own_state():
    """Who may change a session's state is read from one file: the parts (enforcement,
    holds, guard, function calls, console, tracking, masking) and the server change
    their own attributes only; what they need changed elsewhere they ask for by a
    method (``s.upstream_ready(status)``, ``mask.owe_ready()``)."""
    root = Path(__file__).resolve().parent.parent / "pgguard"
    bad = []
    for rel in _PART_MODULES:
        tree = ast.parse((root / rel).read_text(encoding="utf-8"))
        bad += [f"pgguard/{rel}:{line}: {what} = ..." for line, what in _foreign_writes(tree)]
    assert not bad, "a part writes state that is not its own:\n" + "\n".join(bad)
