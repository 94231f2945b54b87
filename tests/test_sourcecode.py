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
