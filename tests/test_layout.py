"""The shape of the code (docs/design.md §3), checked: imports flow one way — no import cycle anywhere in the
package, function-level and TYPE_CHECKING imports included —, the library never imports the application, no
private name is imported across modules, and no library function is longer than about a screen."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "geffect_fast"
#: body lines (docstring excluded) a library function may have
MAX_BODY = 80


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in sorted(PKG.rglob("*.py"))}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mods: dict[str, ast.Module]) -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported module, imported name or "")} for the package's own modules."""
    pkgs = {m for m in mods if (PKG.parent / m.replace(".", "/") / "__init__.py").exists()}
    out: dict[str, set[tuple[str, str]]] = {m: set() for m in mods}
    for m, tree in mods.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("geffect_fast"):
                        out[m].add((a.name, ""))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(m, m in pkgs, node)
                if not target.startswith("geffect_fast"):
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    out[m].add((sub, "") if sub in mods else (target, a.name))
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _graph(imports: dict[str, set[tuple[str, str]]], mods) -> dict[str, set[str]]:
    """Module -> the modules it needs (importing a package's name means its __init__; a module its parents')."""
    g: dict[str, set[str]] = {}
    for m, deps in imports.items():
        g[m] = {d for d, _ in deps if d in mods and d != m}
    return g


def test_no_import_cycle_in_the_package():
    mods = _modules()
    assert "geffect_fast.engine.run" in mods and "geffect_fast.app.cli" in mods
    cycles = _cycles(_graph(_imports(mods), mods))
    assert not cycles, cycles


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_never_imports_the_application():
    imports = _imports(_modules())
    bad = sorted(
        (m, d) for m, deps in imports.items() if not m.startswith("geffect_fast.app") for d, _ in deps
        if d.startswith("geffect_fast.app")
    )  # fmt: skip
    assert not bad, bad


def test_no_private_name_imported_across_modules():
    mods = _modules()
    bad = sorted(
        (m, f"{d}.{name}") for m, deps in _imports(mods).items() for d, name in deps
        if name.startswith("_") and not name.startswith("__") and not name.startswith("_C_")
    )  # fmt: skip
    assert not bad, bad


def test_no_library_function_longer_than_a_screen():
    long = []
    for m, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                start = body[1].lineno if len(body) > 1 and isinstance(body[0], ast.Expr) else body[0].lineno
                if node.end_lineno - start + 1 > MAX_BODY:
                    long.append((m, node.name, node.end_lineno - start + 1))
    assert not long, long
