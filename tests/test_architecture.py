"""The layers of docs/architecture.md and their import rules, checked on the source (imports inside
functions count too: a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "deltatune"

# what each layer may import, besides itself and the leaf modules errors / version
LAYERS: dict[str, set[str]] = {
    "core": set(),
    "data": {"core"},
    "methods": {"core", "data"},
    "interop": {"core", "data", "methods"},
    "ops": {"core", "data", "methods", "interop"},
    "train": {"core", "data", "methods"},
    "api": {"core", "data", "methods", "interop", "ops", "train"},
    "hf": {"train"},
    "__init__": {"core", "data", "methods", "interop", "ops", "train", "api"},
    "cli": {"core", "data", "methods", "interop", "ops", "train", "api", "__init__"},
}
LEAVES = {"errors", "version"}

# a method module may import shared machinery (methods/_*.py) and, for a variant, its family's base method
VARIANTS: dict[str, set[str]] = {
    "dora": {"lora"},
    "kasa": {"lora"},
    "scaled_parallel_adapter": {"parallel_adapter"},
}
# imports still to be moved into methods/_*.py (a method that must import another, for now)
PENDING: dict[str, set[str]] = {}


def _layer(module: str) -> str:
    """deltatune.core.forms.base -> core; deltatune.api -> api; deltatune -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    """Every deltatune module the file imports (``from deltatune import data`` gives deltatune.data)."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "deltatune"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "deltatune":
                found += [f"deltatune.{a.name}" for a in node.names]
            elif node.module.split(".")[0] == "deltatune":
                found.append(node.module)
    return found


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_declared_layer():
    unknown = {_layer(_module_name(p)) for p in _sources()} - set(LAYERS) - LEAVES
    assert not unknown, f"modules outside the declared layers: {unknown}; add them to docs/architecture.md and LAYERS"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_follow_the_layers(path: Path):
    me = _module_name(path)
    layer = _layer(me)
    if layer in LEAVES:
        allowed: set[str] = set()
    else:
        allowed = LAYERS[layer] | {layer} | LEAVES
    bad = [m for m in _imports(path) if _layer(m) not in allowed]
    assert not bad, f"{me} (layer {layer!r}) imports {bad}; see docs/architecture.md for what each layer may import"


def test_nothing_imports_the_cli():
    users = [
        _module_name(p) for p in _sources()
        if _layer(_module_name(p)) != "cli" and any(_layer(m) == "cli" for m in _imports(p))
    ]
    assert not users, f"{users} import deltatune.cli: the command line is the top layer"


@pytest.mark.parametrize("path", sorted((PACKAGE / "methods").glob("[!_]*.py")), ids=lambda p: p.stem)
def test_no_method_imports_another(path: Path):
    others = {
        m.split(".")[2] for m in _imports(path)
        if m.startswith("deltatune.methods.") and not m.split(".")[2].startswith("_")
    }
    others.discard(path.stem)
    extra = others - VARIANTS.get(path.stem, set()) - PENDING.get(path.stem, set())
    assert not extra, (
        f"method {path.stem!r} imports method(s) {sorted(extra)}: move what they share into methods/_*.py "
        "(or declare a variant of its family's base method in VARIANTS and docs/architecture.md)"
    )


def test_shared_method_machinery_imports_no_method():
    for path in sorted((PACKAGE / "methods").glob("_*.py")):
        if path.name == "__init__.py":
            continue
        named = [m for m in _imports(path) if m.startswith("deltatune.methods.") and not m.split(".")[2].startswith("_")
                 and m.split(".")[2] not in PENDING.get(path.stem, set())]
        assert not named, f"{path.name} is shared machinery but imports {named}"
