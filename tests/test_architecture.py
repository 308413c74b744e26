"""The package's imports follow the data flow that docs/architecture.md states.

Every module under `trl_onpolicy/` is parsed with `ast` (nothing is imported or run). Its imports of the package, at
module level and inside functions, are edges of a graph; imports under `if TYPE_CHECKING:` are left out (they never
run). Each module has the layer that the table "Where each concept lives" of docs/architecture.md gives it, and an
import may go to the same layer or a lower one only.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trl_onpolicy"
DOC = ROOT / "docs" / "architecture.md"

# Imports against the flow that are known and not yet fixed: (importer, imported) -> why. Only removals are allowed:
# an entry whose edge is gone fails `test_allowed_back_edges_still_exist`.
ALLOWED_BACK_EDGES: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    """`trl_onpolicy/teachers/local.py` -> `teachers.local`; a package's `__init__.py` is the package (`""` for the
    root)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every `import` / `from ... import` node, outside `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _imports_in(child))
            continue
        yield from _imports_in(node)


def _imports_in(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from _imports(node)


def _resolve(name: str) -> str:
    """A dotted name inside the package -> the module it is (a name imported from a module is that module)."""
    while name not in MODULES:
        name = name.rsplit(".", 1)[0] if "." in name else ""  # `from . import __version__`: the root package
    return name


def imports_of(module: str) -> set[str]:
    """The package modules `module` imports (relative or absolute), without itself."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = [p for p in package if p]
    found = set()
    for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            base = package[: len(package) - node.level + 1]
            prefix = ".".join(["trl_onpolicy", *base, *([node.module] if node.module else [])])
            names = [f"{prefix}.{a.name}" for a in node.names]
        for name in names:
            if name == "trl_onpolicy" or name.startswith("trl_onpolicy."):
                target = _resolve(name.removeprefix("trl_onpolicy").lstrip("."))
                if target != module:
                    found.add(target)
    return found


def doc_layers() -> dict[str, tuple[int, str]]:
    """docs/architecture.md's layer table: a module file or folder (`loss.py`, `teachers/`) -> (number, name)."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Where each concept lives", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for line in section.splitlines():
        row = re.match(r"\| (\d+) ([a-z ]+?) \| (.+?) \|", line)
        if row:
            for entry in re.findall(r"`([\w/.]+)`", row[3]):
                assert entry not in layers, f"docs/architecture.md places `{entry}` in two layers"
                layers[entry] = (int(row[1]), row[2])
    return layers


def layer_of(module: str, layers: dict[str, tuple[int, str]]) -> tuple[int, str] | None:
    """A module's layer: its own file's entry, else the entry of the nearest folder above it."""
    path = MODULES[module].relative_to(PACKAGE).as_posix()
    if path in layers:
        return layers[path]
    parts = path.split("/")[:-1]
    while parts:
        folder = "/".join(parts) + "/"
        if folder in layers:
            return layers[folder]
        parts.pop()
    return None


def edges() -> set[tuple[str, str]]:
    return {(module, target) for module in MODULES for target in imports_of(module)}


def back_edges() -> dict[tuple[str, str], str]:
    layers = doc_layers()
    found = {}
    for module, target in edges():
        (src, src_name), (dst, dst_name) = layer_of(module, layers), layer_of(target, layers)
        if dst > src:
            found[(module, target)] = (
                f"{module or '__init__'} (layer {src} {src_name}) imports {target} (layer {dst} {dst_name})"
            )
    return found


def test_the_graph_sees_imports_at_every_level():
    """The parser finds module-level, function-level, relative and package imports, and skips TYPE_CHECKING ones:
    edges known to be in the code today."""
    assert {"heads", "fused_divergence", "divergences", "precision"} <= imports_of("loss")
    assert "teachers.base" not in imports_of("loss")  # under `if TYPE_CHECKING:` only
    assert "teachers.local" in imports_of("commands.serve_teacher")  # imported inside a function
    assert {"teachers.base", "teachers.local", "heads"} <= imports_of("teachers")  # the package's __init__.py
    assert "" in imports_of("model_card")  # `from . import __version__`: the root package


def test_every_module_is_placed_in_a_layer():
    layers = doc_layers()
    unplaced = sorted(module or "__init__" for module in MODULES if layer_of(module, layers) is None)
    assert not unplaced, f"Place these modules in a layer of docs/architecture.md's table: {unplaced}"


def test_every_entry_of_the_layer_table_exists():
    missing = sorted(entry for entry in doc_layers() if not (PACKAGE / entry).exists())
    assert not missing, f"docs/architecture.md names files that are not in trl_onpolicy/: {missing}"


def test_imports_go_down_the_layers_only():
    against = {edge: why for edge, why in back_edges().items() if edge not in ALLOWED_BACK_EDGES}
    assert not against, "Imports against the data flow of docs/architecture.md:\n" + "\n".join(
        sorted(against.values())
    )


def test_allowed_back_edges_still_exist():
    stale = sorted(edge for edge in ALLOWED_BACK_EDGES if edge not in back_edges())
    assert not stale, f"These allowed back-edges are gone (or no longer back-edges): remove them: {stale}"


def test_the_check_fails_on_an_edge_against_the_flow(monkeypatch):
    """A loss-layer module that imported the trainer would be reported, named by its edge."""
    real = imports_of
    monkeypatch.setitem(globals(), "imports_of", lambda m: real(m) | ({"trainer"} if m == "loss" else set()))
    assert back_edges() == {("loss", "trainer"): "loss (layer 5 loss) imports trainer (layer 8 trainer)"}
    with pytest.raises(AssertionError, match=re.escape("loss (layer 5 loss) imports trainer (layer 8 trainer)")):
        test_imports_go_down_the_layers_only()
