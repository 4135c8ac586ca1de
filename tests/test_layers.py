"""The packages are layers: a module imports only from its own package or a layer below, so
the import graph has no circle and the folders show the architecture (README "Layout")."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fedjax_poison"
# Top to bottom; the parts on one line are peers and do not import each other.
LAYERS = [
    {"__init__", "report", "compare_defenses", "pca_analysis", "list", "testing"},
    {"runner"},
    {"results"},
    {"config"},
    {"round"},
    {"attacks", "defenses", "models", "data"},
    {"registry", "files", "signals"},
    {"errors"},
]


def part_of(module: str) -> str:
    """'fedjax_poison.round.client' -> 'round'; 'fedjax_poison' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(part: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def imports_of(path: pathlib.Path) -> set[str]:
    """The fedjax_poison modules a file imports (any depth, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedjax_poison"):
            if node.module == "fedjax_poison":
                found |= {f"fedjax_poison.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fedjax_poison")}
    return found


def test_every_part_of_the_package_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()}
    parts = {p for p in parts if not p.startswith("__pycache__")}
    assert parts == set().union(*LAYERS)


def test_imports_only_go_down_or_stay_in_their_package():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        mine = part_of(".".join(rel.parts))
        for module in imports_of(path):
            theirs = part_of(module)
            if theirs == mine:
                continue
            if layer_of(theirs) <= layer_of(mine):
                upward.append(f"{rel} imports {module}")
    assert not upward, "\n".join(sorted(upward))
