"""What a config dataclass's options are, as a person reads them: name, type in words, default, and a one-line
meaning taken from the dataclass's own source (the field's trailing ``# comment``, the comment lines just above
it, or a string right below it), so the reference cannot drift from the code (``deltatune methods NAME``,
docs/config.md). ``family`` groups the registered methods by the kind of delta they build.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import sys
import tokenize
import typing
from dataclasses import dataclass
from typing import Any

from deltatune.core import registry


@dataclass(frozen=True)
class Option:
    name: str
    type: str  # in words, as errors say it (registry.type_name): "a whole number", "null or a list of names"
    default: str  # as written in YAML: 8, null, [q_proj, v_proj]
    meaning: str  # one line, from the dataclass source ("" when it has none)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    description: str
    family: str
    merges: str  # "yes", "no", or the phrase saying when
    options: list[Option]


# -- options of a dataclass -------------------------------------------------------------------------------------
def options(cls: type) -> list[Option]:
    """The fields of config dataclass ``cls`` in declaration order, each with its meaning."""
    hints = typing.get_type_hints(cls)
    return [Option(f.name, registry.type_name(hints[f.name]), _default(f), meaning(cls, f.name))
            for f in dataclasses.fields(cls)]


def meaning(cls: type, field_name: str) -> str:
    """The field's meaning from the source of the first class in ``cls``'s MRO that declares it with one."""
    for klass in cls.__mro__:
        text = _meanings(klass).get(field_name)
        if text:
            return text
    return ""


@functools.cache
def _meanings(cls: type) -> dict[str, str]:
    """Field name -> meaning for the fields ``cls`` itself declares (inherited ones are its bases' business)."""
    try:
        source = inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):  # a class made at run time has no source to read
        return {}
    node = _class_node(ast.parse(source), cls.__qualname__)
    if node is None:
        return {}
    comments = _comments(source)
    found = {}
    for i, stmt in enumerate(node.body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        after = node.body[i + 1] if i + 1 < len(node.body) else None
        found[stmt.target.id] = _field_meaning(stmt, after, comments)
    return found


def _class_node(tree: ast.Module, qualname: str) -> ast.ClassDef | None:
    body: list[ast.stmt] = tree.body
    node = None
    for part in qualname.split("."):
        node = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == part), None)
        if node is None:
            return None
        body = node.body
    return node


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """Line number -> (comment text, whether the comment is the whole line)."""
    out = {}
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            whole = not lines[row - 1][:col].strip()
            out[row] = (tok.string.lstrip("#").strip(), whole)
    return out


def _field_meaning(stmt: ast.AnnAssign, after: ast.stmt | None, comments: dict[int, tuple[str, bool]]) -> str:
    # 1. a trailing comment on the field's (last) line
    for row in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1):
        if row in comments and not comments[row][1]:
            return _one_line(comments[row][0])
    # 2. a string right below it (the attribute docstring convention)
    if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
        return _one_line(after.value.value)
    # 3. the block of whole-line comments right above it
    above, row = [], stmt.lineno - 1
    while row in comments and comments[row][1]:
        above.insert(0, comments[row][0])
        row -= 1
    return _one_line(" ".join(above))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    return yaml_value(value)


def yaml_value(value: Any) -> str:
    """A value as a YAML config writes it (flow style, one line)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str) and not _needs_quotes(value):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:  # not a JSON value (a config should not hold one, but say what it is)
        return str(value)


def _needs_quotes(text: str) -> bool:
    return not text or text != text.strip() or any(c in text for c in ":#{}[],\n\"'") or text in (
        "null", "true", "false", "yes", "no")


# -- methods ----------------------------------------------------------------------------------------------------
def describe(name: str) -> MethodInfo:
    """A registered method: description, family, whether it merges, and its options (``deltatune methods NAME``).
    An unknown name raises with the nearest names ("did you mean 'lora'?")."""
    method = registry.get(name)
    merges = {True: "yes", False: "no (serve it attached)"}.get(method.mergeable, str(method.mergeable))
    return MethodInfo(method.name, method.description, family(method.name), merges, options(method.config_cls))


def family(name: str) -> str:
    """The kind of delta a method builds, as it declares where it registers (tests/test_discoverability.py checks
    the declaration against the forms the method builds)."""
    return registry.get(name).family


def grouped() -> dict[str, list[str]]:
    """Family -> the registered method names in it, families in ``registry.FAMILIES`` order (empty ones left out)."""
    by_family = {n: registry.get(n).family for n in registry.names()}
    return {fam: names for fam in registry.FAMILIES
            if (names := [n for n in registry.names() if by_family[n] == fam])}


def missing_meanings() -> list[str]:
    """``method.option`` for every option of a registered method whose dataclass gives it no meaning."""
    return [f"{n}.{o.name}" for n in registry.names() for o in options(registry.get(n).config_cls) if not o.meaning]


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """``raw["a"]["b"] = value`` for the run config key ``a.b`` (``--set``, a search space): missing or non-mapping
    sections become mappings, and a method given by name becomes ``{"name": ...}`` so that its options can be set."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "method":
            child = {"name": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value
