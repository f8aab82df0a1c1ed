"""Reward functions for GRPO (``train.objective: grpo``): the built-ins and loading a Python callable.

A reward function is called as TRL calls one: ``fn(prompts=..., completions=..., completion_ids=..., **columns)
-> list[float | None]``, one value per completion. ``prompts`` are the rows' prompts as written (a string, or a
list of chat messages), ``completions`` the sampled texts (for chat prompts TRL's form, a one-message list
``[{"role": "assistant", "content": text}]``), ``completion_ids`` the sampled token ids (EOS included when the
completion stopped there), and every other column of the rows comes as a keyword list (``answer=[...]``), each
value repeated for the row's completions. ``None`` (or NaN) means "no reward for this completion": TRL's
nanmean / nansum leave it out. A function receives only the keywords its signature names, unless it takes
``**kwargs``; a required argument that the rows do not have is an error when the task is built.

How a run config names them (``rewards:`` in the objective section), a list whose entries are either a name or
a mapping ``{name: ..., <option>: ...}``:

- ``exact`` (option ``field``, default ``answer``): 1.0 when the completion's final answer equals the row's
  answer as text, else 0.0. The final answer is what the completion marks as final (the last ``\\boxed{X}``,
  ``#### X`` or "the answer is X"), else the whole completion; both sides are compared as DART's verifier
  compares them (``deltatune.data.steps.verify.normalise``: whitespace collapsed, case, ``$`` and a trailing
  period ignored).
- ``numeric`` (options ``field``, default ``answer``; ``tolerance``, default 1e-6): 1.0 when the completion's
  final number (a marked answer holding a number, else the last number written) equals the row's answer as a
  number within ``tolerance`` (absolute), else 0.0. Numbers are read by ``verify.parse_number`` (``1,000``,
  ``3/4``, ``\\frac{1}{2}``; nothing is evaluated but arithmetic).
- ``format`` (options ``pattern``, required; ``match``: ``search``, the default, or ``fullmatch``): 1.0 when
  the regular expression matches the completion (``re.search`` anywhere, or ``re.fullmatch`` of the whole
  completion), else 0.0. Inline flags work: ``(?s)`` lets ``.`` cross lines.
- ``length`` (options ``target``, required, a positive whole number; ``unit``: ``tokens``, the default, or
  ``chars``): ``max(0, 1 - |L - target| / target)``, L the completion's length (its generated token ids, EOS
  included, or the characters of its text): 1.0 at the target, falling linearly to 0.0 at 0 and 2·target.
- a dotted path, ``package.module:function`` or ``package.module.function``: any function with the signature
  above, imported with importlib; the mapping's other keys are passed to it as keyword arguments at every call.

A row's answer that is missing (None) gives that completion no reward (None), not 0.0. Each reward gets a name
for the metrics (``rewards/<name>/mean``): the built-in's name or the function's ``__name__``, with ``_2``,
``_3``... when one repeats.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deltatune.data.steps import verify
from deltatune.errors import DeltatuneError

RewardFn = Callable[..., Sequence[Any]]

# what every reward function may be given besides the rows' columns
CALL_ARGS = ("prompts", "completions", "completion_ids")
MATCH_MODES = ("search", "fullmatch")
LENGTH_UNITS = ("tokens", "chars")


def completion_text(completion: Any) -> str:
    """The text of a completion in either of TRL's forms: a string, or a list of messages (the last one's
    content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], Mapping):
        return str(completion[-1].get("content", ""))
    return str(completion)


def _answers(columns: Mapping[str, Any], column: str, reward: str) -> list[Any]:
    if column not in columns:
        raise DeltatuneError(
            f"reward {reward!r} reads the rows' {column!r} column, but the rows have "
            f"{', '.join(sorted(columns)) or 'no other column'}; add it or set the reward's field option"
        )
    return list(columns[column])


# ---------------------------------------------------------------- the built-ins (factories of reward functions)


def exact(field: str = "answer") -> RewardFn:
    """1.0 when the completion's final answer equals the row's ``field`` as text, else 0.0."""

    def exact_answer(completions: list[Any], **columns: Any) -> list[float | None]:
        answers = _answers(columns, field, "exact")
        return [None if a is None else float(verify.exact(completion_text(c), str(a)))
                for c, a in zip(completions, answers, strict=True)]

    exact_answer.columns = (field,)  # type: ignore[attr-defined]
    return exact_answer


def final_number(text: str) -> Any | None:
    """The number a completion gives as its answer: its final answer (``verify.final_answer``: a marked answer
    holding a number, else the last number written), read as a number; a marked answer with words around the
    number (``\\boxed{42 apples}``) gives its last number. None when there is none."""
    given = verify.final_answer(text)
    if given is None:
        return None
    value = verify.parse_number(given)
    if value is None:
        last = verify.last_number(given)
        value = verify.parse_number(last) if last is not None else None
    return value


def _same(a: Any, b: Any, tolerance: float) -> bool:
    try:
        return abs(complex(a) - complex(b)) <= tolerance
    except (TypeError, ValueError, OverflowError):
        return False


def numeric(field: str = "answer", tolerance: float = 1e-6) -> RewardFn:
    """1.0 when the completion's final number equals the row's ``field`` as a number within ``tolerance``."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not (
            math.isfinite(tolerance) and tolerance >= 0):
        raise DeltatuneError(f"reward 'numeric': tolerance={tolerance!r} must be a number >= 0 (0: exact)")

    def numeric_answer(completions: list[Any], **columns: Any) -> list[float | None]:
        out: list[float | None] = []
        for c, a in zip(completions, _answers(columns, field, "numeric"), strict=True):
            if a is None:
                out.append(None)
                continue
            reference = verify.parse_number(str(a))
            if reference is None:
                raise DeltatuneError(
                    f"reward 'numeric': the answer {a!r} is not a number; use the exact reward for text answers"
                )
            given = final_number(completion_text(c))
            out.append(float(given is not None and _same(given, reference, float(tolerance))))
        return out

    numeric_answer.columns = (field,)  # type: ignore[attr-defined]
    return numeric_answer


def pattern_format(pattern: str, match: str = "search") -> RewardFn:
    """1.0 when ``pattern`` matches the completion (``re.search`` or ``re.fullmatch``), else 0.0."""
    if not isinstance(pattern, str) or not pattern:
        raise DeltatuneError(f"reward 'format': pattern={pattern!r} must be a regular expression, e.g. "
                             "'\\\\boxed\\{.+\\}'")
    if match not in MATCH_MODES:
        raise DeltatuneError(f"reward 'format': match={match!r} is unknown; use one of {', '.join(MATCH_MODES)}")
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise DeltatuneError(f"reward 'format': pattern={pattern!r} is not a valid regular expression ({e})") from e
    test = compiled.search if match == "search" else compiled.fullmatch

    def format_match(completions: list[Any], **_: Any) -> list[float]:
        return [float(test(completion_text(c)) is not None) for c in completions]

    return format_match


def length(target: int, unit: str = "tokens") -> RewardFn:
    """``max(0, 1 - |L - target| / target)``, L the completion's length in ``unit`` (tokens or chars)."""
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise DeltatuneError(f"reward 'length': target={target!r} must be a whole number of at least 1")
    if unit not in LENGTH_UNITS:
        raise DeltatuneError(f"reward 'length': unit={unit!r} is unknown; use one of {', '.join(LENGTH_UNITS)}")

    def length_match(completions: list[Any], completion_ids: list[list[int]] | None = None,
                     **_: Any) -> list[float]:
        if unit == "tokens":
            if completion_ids is None:
                raise DeltatuneError("reward 'length' with unit tokens needs the completions' token ids")
            sizes = [len(ids) for ids in completion_ids]
        else:
            sizes = [len(completion_text(c)) for c in completions]
        return [max(0.0, 1.0 - abs(n - target) / target) for n in sizes]

    return length_match


# the names configs use -> the factories (their keyword arguments are the reward's options)
BUILTINS: dict[str, Callable[..., RewardFn]] = {"exact": exact, "numeric": numeric, "format": pattern_format,
                                                "length": length}


# ---------------------------------------------------------------- loading a callable


def load_callable(spec: str) -> Callable[..., Any]:
    """The function a dotted path names: ``package.module:function`` or ``package.module.function``."""
    module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not attr:
        raise DeltatuneError(f"reward {spec!r}: name a function as package.module:function or "
                             "package.module.function")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise DeltatuneError(
            f"reward {spec!r}: cannot import module {module_name!r} ({e}); install it or put its folder on "
            f"PYTHONPATH, or use a built-in reward ({', '.join(BUILTINS)})"
        ) from e
    except Exception as e:  # the module itself fails on import: say so here rather than mid-run
        raise DeltatuneError(f"reward {spec!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from e
    func = getattr(module, attr, None)
    if func is None:
        raise DeltatuneError(f"reward {spec!r}: module {module_name!r} has no {attr!r}; check the function's name")
    if not callable(func):
        raise DeltatuneError(
            f"reward {spec!r}: {module_name}.{attr} is a {type(func).__name__}, not a function "
            "(prompts, completions, **columns) -> list of floats"
        )
    return func


# ---------------------------------------------------------------- a resolved reward


@dataclass
class Reward:
    """One reward function as a run uses it: its metric name, the function, and the keyword options it gets at
    every call (a dotted function's extra keys; the built-ins have theirs bound already)."""

    name: str
    fn: Callable[..., Any]
    options: dict[str, Any] = field(default_factory=dict)

    def _parameters(self) -> tuple[set[str], set[str], bool]:
        """(every named parameter, the required ones, whether it takes **kwargs)."""
        try:
            params = inspect.signature(self.fn).parameters.values()
        except (TypeError, ValueError):  # a builtin without a signature: give it everything
            return set(), set(), True
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        required = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                    and p.default is p.empty}
        return named, required, any(p.kind == p.VAR_KEYWORD for p in params)

    def check_columns(self, columns: Sequence[str]) -> None:
        """Refuse, before any sampling, a function that requires an argument neither the call nor the rows give,
        and options that collide with a column."""
        named, required, _ = self._parameters()
        reads = [c for c in getattr(self.fn, "columns", ()) if c not in columns]
        if reads:
            raise DeltatuneError(
                f"reward {self.name!r} reads the rows' {reads[0]!r} column, but the rows have "
                f"{', '.join(sorted(columns)) or 'no column but the prompt'}; add it or set the reward's field "
                f"option ({{name: {self.name}, field: ...}})"
            )
        given = set(CALL_ARGS) | set(columns) | set(self.options)
        missing = sorted(required - given)
        if missing:
            raise DeltatuneError(
                f"reward {self.name!r} requires {', '.join(map(repr, missing))}, but the rows have no such column "
                f"(columns: {', '.join(sorted(columns)) or 'none'}) and its options do not set it; add the "
                f"column or give it as an option ({{name: ..., {missing[0]}: ...}})"
            )
        clash = sorted(set(self.options) & (set(columns) | set(CALL_ARGS)))
        if clash:
            raise DeltatuneError(
                f"reward {self.name!r}: option {clash[0]!r} is also a column of the rows (or a call argument); "
                "rename the option or the column"
            )
        if named and not self._parameters()[2]:
            unknown = sorted(set(self.options) - named)
            if unknown:
                raise DeltatuneError(f"reward {self.name!r} takes no argument {unknown[0]!r}; its arguments are "
                                     f"{', '.join(sorted(named))}")

    def arguments(self, available: dict[str, Any]) -> dict[str, Any]:
        """The keywords of one call: what the function names (everything if it takes **kwargs), plus options."""
        named, _, var_kw = self._parameters()
        picked = dict(available) if var_kw else {k: v for k, v in available.items() if k in named}
        picked.update(self.options)
        return picked

    def __call__(self, available: dict[str, Any], n: int) -> list[float]:
        """The function's rewards for ``n`` completions as floats, NaN for None; a wrong answer shape is an error.
        Exceptions propagate (the caller names the row)."""
        out = self.fn(**self.arguments(available))
        return checked_rewards(self.name, out, n)


def checked_rewards(name: str, out: Any, n: int) -> list[float]:
    """A reward function's output as n floats (None and NaN as NaN), or an error saying what is wrong with it."""
    if isinstance(out, str | bytes | Mapping) or not isinstance(out, Sequence) and not hasattr(out, "tolist"):
        raise DeltatuneError(f"reward function {name!r} returned {type(out).__name__}; return a list with one "
                             "float (or None) per completion")
    values = out.tolist() if hasattr(out, "tolist") else list(out)
    if len(values) != n:
        raise DeltatuneError(f"reward function {name!r} returned {len(values)} rewards for {n} completions; "
                             "return one per completion")
    floats = []
    for v in values:
        if v is None:
            floats.append(math.nan)
        elif isinstance(v, numbers.Real):  # bool is an int (True -> 1.0); numpy scalars register as Real
            floats.append(float(v))
        elif hasattr(v, "item") and isinstance(v.item(), numbers.Real):  # a one-element tensor
            floats.append(float(v.item()))
        else:
            raise DeltatuneError(f"reward function {name!r} returned {v!r} ({type(v).__name__}); each reward "
                                 "must be a number or None")
    return floats


def _spec_parts(spec: Any) -> tuple[str, dict[str, Any]]:
    """(name or dotted path, options) of one entry of ``rewards``."""
    if isinstance(spec, str) and spec.strip():
        return spec.strip(), {}
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        if isinstance(name, str) and name.strip():
            return name.strip(), options
    raise DeltatuneError(
        f"reward {spec!r}: give a name ({', '.join(BUILTINS)}, or package.module:function) or a mapping "
        "{name: ..., <option>: ...}"
    )


def _builtin(name: str, options: dict[str, Any]) -> Callable[..., Any]:
    factory = BUILTINS[name]
    params = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        allowed = ", ".join(params) or "none"
        raise DeltatuneError(f"reward {name!r}: unknown option {unknown[0]!r}; its options are {allowed}")
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in options]
    if missing:
        raise DeltatuneError(f"reward {name!r} needs the option {missing[0]!r}: write it as "
                             f"{{name: {name}, {missing[0]}: ...}}")
    return factory(**options)


def resolve(spec: Any) -> Reward:
    """The reward one entry of ``rewards`` names: a built-in (with its options), a dotted path (its extra keys
    passed at every call), or a callable given from Python."""
    if callable(spec):
        return Reward(getattr(spec, "__name__", type(spec).__name__), spec)
    name, options = _spec_parts(spec)
    if name in BUILTINS:
        return Reward(name, _builtin(name, options))
    if "." in name or ":" in name:
        func = load_callable(name)
        return Reward(getattr(func, "__name__", name), func, options)
    close = difflib.get_close_matches(name, list(BUILTINS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DeltatuneError(f"unknown reward {name!r}{hint}; use {', '.join(BUILTINS)} or a function as "
                         "package.module:function")


def resolve_all(specs: Sequence[Any]) -> list[Reward]:
    """Every reward of ``rewards``, their metric names made unique (``format``, ``format_2``...)."""
    out: list[Reward] = []
    seen: dict[str, int] = {}
    for spec in specs:
        reward = resolve(spec)
        seen[reward.name] = seen.get(reward.name, 0) + 1
        if seen[reward.name] > 1:
            reward.name = f"{reward.name}_{seen[reward.name]}"
        out.append(reward)
    return out
