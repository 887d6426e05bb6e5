"""The import layers of docs/design-decisions.md hold: every `import` under pretrain/,
data_tools/ and launch/ (inside functions too) goes to the importer's own layer or a lower
one, and no modules import each other in a circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pretrain", "data_tools", "launch")
DESIGN = REPO / "docs" / "design-decisions.md"


def read_layers(text: str) -> dict[str, int]:
    """{module or package name: layer number} from the numbered lines under "Import layers"."""
    section = text.split("## Import layers", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for line in section.splitlines():
        match = re.match(r"(\d+)\. (.*)", line)
        if match:
            names = re.findall(r"`([\w.]+)`", match.group(2).split(":")[0])
            layers.update({name: int(match.group(1)) for name in names})
    return layers


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def resolve(name: str, known: dict) -> str | None:
    """The longest known module that NAME is or lies in (None: not ours)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_edges(known: dict[str, Path]) -> dict[str, set[str]]:
    """{module: modules it imports}, from every import statement in the file."""
    edges = {}
    for module, path in known.items():
        targets = set()
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importer's package upwards
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from a import b` imports the module a.b when there is one, else a.
                names = [f"{base}.{alias.name}" for alias in node.names] or [base]
                names = [n if resolve(n, known) == n else base for n in names]
            for name in names:
                target = resolve(name, known)
                if target is not None and target != module:
                    targets.add(target)
        edges[module] = targets
    return edges


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    name = resolve(module, layers)
    return layers.get(name) if name else None


def upward_imports(edges, layers) -> list[str]:
    bad = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            if layer_of(target, layers) > layer_of(source, layers):
                bad.append(f"{source} (layer {layer_of(source, layers)}) imports {target} "
                           f"(layer {layer_of(target, layers)})")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    layers = read_layers(DESIGN.read_text())
    missing = [m for m in modules() if layer_of(m, layers) is None]
    assert not missing, f"modules with no line in {DESIGN.name}'s Import layers: {missing}"


def test_no_upward_import():
    layers = read_layers(DESIGN.read_text())
    bad = upward_imports(import_edges(modules()), layers)
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle():
    found = cycles(import_edges(modules()))
    assert not found, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in found)


def test_checker_sees_imports_inside_functions_and_cycles(tmp_path):
    """The checker itself: a function-level upward import and a two-module circle are found."""
    layers = {"low": 1, "high": 2}
    edges = {"low": {"high"}, "high": {"low"}}
    assert upward_imports(edges, layers) == ["low (layer 1) imports high (layer 2)"]
    assert cycles(edges) == [["high", "low"]]
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from pretrain.train import main\n")
    (tmp_path / "t.py").write_text("")
    known = {"pkg.mod": source, "pretrain.train": tmp_path / "t.py"}
    assert import_edges(known)["pkg.mod"] == {"pretrain.train"}


def test_top_level_stays_small():
    """At most 10 modules directly under pretrain/ besides packages (issue 20)."""
    top = [p.name for p in (REPO / "pretrain").glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= 10, sorted(top)


def test_no_file_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in (REPO / "pretrain").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
