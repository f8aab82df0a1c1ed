"""Verifiers for DART's rejection sampling: ``(response, answer) -> bool``, is this response's answer right?

Grading bugs dominate rejection-sampled data (the DART-Math paper's own warning), so every built-in is small
and tested case by case:

- ``numeric``: the response's final answer (the last ``\\boxed{X}`` holding a number, else ``#### X``, else
  "the answer is X", else the last number in the text) against the reference answer, compared as numbers with
  SymPy: ``1/2`` = ``0.5`` = ``\\frac{1}{2}``, ``1,000`` = ``1000``, ``$5`` = ``5``, ``50%`` = ``50`` =
  ``0.5``. Two exact numbers (integers, fractions) must be equal; when either side is a decimal or irrational,
  ``math.isclose`` with DART-Math's grader's tolerances (relative 1e-9, absolute 1e-8: float rounding, not a
  looser answer). A reference that is itself a worked solution (GSM8K's ``... #### 72``, MATH's
  ``\\boxed{..}``) has its final answer extracted the same way. Where either side is not a number, their
  normalised texts must be equal.
- ``exact``: the normalised text of the response's explicit final answer (boxed, ``####`` or "the answer is";
  the whole response when it has none) equals the normalised answer (case, spaces, ``$`` and a trailing period
  ignored).
- ``regex:<pattern>``: the pattern's first group (the whole match if it has no group) in its *last* match in
  the response (a final answer comes last) equals the answer, as numbers if both are numbers, else as
  normalised text.
- a Python callable by dotted path, ``pkg.module:function`` or ``pkg.module.function``, imported with
  importlib, or (from Python) any callable. Its result is read as a truth value.

Parsing a number never runs the text it reads: SymPy only sees text made of digits, operators, parentheses,
``sqrt`` and ``pi`` (a model's output can hold anything), with small literal exponents and a bounded length.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable
from typing import Any

from deltatune.errors import DeltatuneError

Verifier = Callable[[str, str], Any]

# DART-Math's grader (dart_math/eval.py): math.isclose with these, for numbers that are not both exact
REL_TOL = 1e-9
ABS_TOL = 1e-8
_MAX_EXPR = 200  # longer "numbers" are not parsed (a runaway generation is not an answer)

# ---------------------------------------------------------------- extracting a final answer

_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*([^\n]+)", re.IGNORECASE)
_HAS_NUMBER = re.compile(r"\d|\\pi")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?!\.\d))?|-?\.\d+")


def _boxes(text: str) -> list[str]:
    """The contents of every closed ``\\boxed{...}`` (or ``\\fbox{...}``) in order, braces matched (a box left
    open by a cut-off generation is not an answer)."""
    out = []
    for found in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth = 1
        for j in range(found.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                out.append(text[found.end():j])
                break
    return out


def _marked(text: str) -> list[list[str]]:
    """What a text marks as final, by kind in order of precedence: boxed, ``#### X``, "the answer is X" (up to
    the end of its line); each kind's marks in the order written."""
    return [_boxes(text), _HASHES.findall(text), _ANSWER_IS.findall(text)]


def explicit_answer(text: str) -> str | None:
    """The answer a text marks as final: the last non-empty ``\\boxed{X}``, else the last ``#### X``, else the
    last "the answer is X"; None when it marks none. (Small models echo the prompt's empty ``\\boxed{}``.)"""
    for marks in _marked(text):
        filled = [m for m in marks if m.strip()]
        if filled:
            return filled[-1]
    return None


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (``1,000``, ``-2.5``, ``3/4``), or None."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def final_answer(response: str) -> str | None:
    """What ``numeric`` reads as the response's answer: the last mark of the first kind (boxed, ``####``, "the
    answer is") that holds a number, else the last number in the text."""
    for marks in _marked(response):
        numeric_marks = [m for m in marks if _HAS_NUMBER.search(m)]
        if numeric_marks:
            return numeric_marks[-1]
    return last_number(response)


# ---------------------------------------------------------------- normalising and parsing

_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_SQRT = re.compile(r"\\sqrt\s*\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_SAFE = re.compile(r"(?:\d+\.?\d*(?:[eE][+-]?\d{1,3}(?!\d))?|\.\d+|sqrt|pi|\*\*|[-+*/()\s])+")
_IMPLICIT = re.compile(r"(?<=[\d)])\s*(?=sqrt|pi|\()")  # 3\sqrt{2}, 2\pi, 2(3): a product
_POWER = re.compile(r"\*\*\s*(?:\(\s*-?\s*\d{1,2}\s*\)|\d{1,2})(?![\d.(]|\s*\*\*)")  # one literal exponent


def normalise(text: str) -> str:
    """Text as both sides are compared: LaTeX wrappers and ``$`` dropped, case and spaces ignored, no trailing
    period, ``1,000`` as ``1000``."""
    s = str(text).strip()
    s = _TEXT.sub(r"\1", s)
    for old in ("\\$", "$", "\\!", "\\,", "\\;", "\\ ", "\\left", "\\right", "{,}"):
        s = s.replace(old, "" if old != "\\ " else " ")
    s = _THOUSANDS.sub("", s)
    s = " ".join(s.split()).strip().rstrip(".").strip()
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}":
        s = s[1:-1].strip()
    return s.casefold()


def _expression(text: str) -> str:
    """A normalised answer rewritten as Python arithmetic (``\\frac{a}{b}`` -> ``(a)/(b)``, ``^`` -> ``**``),
    the part after the last ``=`` (``x = 5``), a percent sign left out."""
    s = normalise(text)
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    for _ in range(4):  # nested fractions, innermost first
        s = _FRAC.sub(r"(\1)/(\2)", s)
    s = _SQRT.sub(r"sqrt(\1)", s)
    for old, new in (("\\cdot", "*"), ("\\times", "*"), ("×", "*"), ("÷", "/"), ("\\div", "/"), ("−", "-"),
                     ("^", "**"), ("\\pi", "pi"), ("\\%", ""), ("%", ""), ("{", "("), ("}", ")")):
        s = s.replace(old, new)
    return _IMPLICIT.sub("*", s).strip()


def parse_number(text: str) -> Any | None:
    """The SymPy number ``text`` writes, or None when it is not a finite number in plain arithmetic.

    Only digits, ``+ - * / ** ( )``, ``sqrt`` and ``pi`` reach SymPy (its parser evaluates Python), exponents
    are literal integers of at most two digits, at most two of them (no tower of powers can blow up), and the
    text is at most ``_MAX_EXPR`` characters."""
    s = _expression(text)
    if not s or len(s) > _MAX_EXPR or not _SAFE.fullmatch(s):
        return None
    powers = s.count("**")
    if powers > 2 or len(_POWER.findall(s)) != powers or not _balanced(s):
        return None
    import tokenize

    import sympy
    from sympy.parsing.sympy_parser import parse_expr

    try:
        names = {"Integer": sympy.Integer, "Float": sympy.Float, "Rational": sympy.Rational,
                 "Symbol": sympy.Symbol}
        value = parse_expr(s, local_dict={"sqrt": sympy.sqrt, "pi": sympy.pi}, global_dict=names)
    except (SyntaxError, TypeError, ValueError, ZeroDivisionError, AttributeError, sympy.SympifyError,
            tokenize.TokenError):  # what a model writes may be any text: never an error, only not a number
        return None
    if not getattr(value, "is_number", False) or not value.is_finite:
        return None
    return value


def _balanced(s: str) -> bool:
    """Every ``)`` closes an earlier ``(`` and every ``(`` is closed: ``the answer is (14`` is not a number (SymPy's
    tokenizer raised on it, which stopped a GRPO run at its reward)."""
    depth = 0
    for ch in s:
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            return False
    return depth == 0


def same_number(a: Any, b: Any) -> bool:
    """Two SymPy numbers are equal: exactly when both are rational, else within ``REL_TOL`` / ``ABS_TOL`` (a
    decimal's float rounding, an irrational written as a decimal to double precision)."""
    if a.is_Rational and b.is_Rational:
        return bool(a == b)
    try:
        fa, fb = complex(a), complex(b)
    except (TypeError, ValueError, OverflowError):
        return False
    return abs(fa - fb) <= max(REL_TOL * max(abs(fa), abs(fb)), ABS_TOL)


def _values(text: str) -> list[Any]:
    """The numbers a text may mean: its value, and its value / 100 when it is written as a percentage."""
    value = parse_number(text)
    if value is None:
        return []
    return [value, value / 100] if "%" in text else [value]


def equivalent(given: str, answer: str) -> bool:
    """``given`` and ``answer`` are the same answer: as numbers when both are (``50%`` matches 50 and 0.5),
    else as normalised text."""
    a, b = _values(given), _values(answer)
    if a and b:
        return any(same_number(x, y) for x in a for y in b)
    return normalise(given) == normalise(answer)


def _reference(answer: str) -> str:
    """The reference's final answer: itself when it is a number, else what it marks as final (a worked
    solution's ``#### 72`` or ``\\boxed{..}``), else itself."""
    if parse_number(answer) is not None:
        return answer
    marked = explicit_answer(answer)
    return marked if marked is not None else answer


# ---------------------------------------------------------------- the built-ins


def _numeric_part(marked: str) -> str:
    """A marked answer as a number: itself when it parses, else the first number after its last ``=`` ("42
    apples" -> 42, "3 + 4 = 7 apples" -> 7), else itself (compared as text)."""
    if parse_number(marked) is not None:
        return marked
    found = _NUMBER.findall(normalise(marked).rsplit("=", 1)[-1])
    return found[0] if found else marked


def numeric(response: str, answer: str) -> bool:
    """The response's final answer equals the reference's, as numbers (see the module docstring)."""
    given = final_answer(response)
    return given is not None and equivalent(_numeric_part(given), _numeric_part(_reference(str(answer))))


def exact(response: str, answer: str) -> bool:
    """The response's explicit final answer (the whole response if it marks none) equals the answer, as
    text."""
    marked = explicit_answer(response)
    return normalise(marked if marked is not None else response) == normalise(str(answer))


def regex(pattern: str) -> Verifier:
    """A verifier: the first group of the pattern's last match in the response equals the answer."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise DeltatuneError(
            f"verifier 'regex:{pattern}': not a valid regular expression ({e}); fix the pattern, e.g. "
            "'regex:answer: (-?\\d+)'"
        ) from e

    def check(response: str, answer: str) -> bool:
        matches = list(compiled.finditer(response))
        if not matches:
            return False
        last = matches[-1]
        found = last.group(1) if compiled.groups else last.group(0)
        return found is not None and equivalent(found, str(answer))

    check.__name__ = f"regex:{pattern}"
    return check


BUILTINS: dict[str, Verifier] = {"numeric": numeric, "exact": exact}


def _import(spec: str) -> Verifier:
    """A callable named ``pkg.module:function`` or ``pkg.module.function``."""
    module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not attr:
        raise DeltatuneError(
            f"verifier {spec!r}: name a function as pkg.module:function or pkg.module.function"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise DeltatuneError(
            f"verifier {spec!r}: cannot import module {module_name!r} ({e}); install it or put its folder on "
            "PYTHONPATH, or use a built-in verifier (numeric, exact, regex:<pattern>)"
        ) from e
    except Exception as e:  # the module itself fails on import: say so rather than crash later
        raise DeltatuneError(
            f"verifier {spec!r}: importing {module_name!r} failed: {type(e).__name__}: {e}"
        ) from e
    func = getattr(module, attr, None)
    if func is None:
        raise DeltatuneError(
            f"verifier {spec!r}: module {module_name!r} has no {attr!r}; check the function's name"
        )
    if not callable(func):
        raise DeltatuneError(
            f"verifier {spec!r}: {module_name}.{attr} is a {type(func).__name__}, not a function "
            "(response, answer) -> bool"
        )
    return func


def resolve(spec: str | Verifier) -> Verifier:
    """The verifier a spec names: a built-in, ``regex:<pattern>``, a dotted path, or a callable passed as
    is."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise DeltatuneError(f"verifier={spec!r}: use numeric, exact, regex:<pattern> or pkg.module:function")
    spec = spec.strip()
    if spec in BUILTINS:
        return BUILTINS[spec]
    if spec.startswith("regex:"):
        return regex(spec[len("regex:"):])
    if "." in spec or ":" in spec:
        return _import(spec)
    close = difflib.get_close_matches(spec, [*BUILTINS, "regex"], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DeltatuneError(
        f"unknown verifier {spec!r}{hint}; use numeric, exact, regex:<pattern> or a function as "
        "pkg.module:function"
    )


def judge(verifier: Verifier, response: str, answer: str) -> tuple[bool, str | None]:
    """(correct, why it failed): a verifier that raises on an item counts that item as not correct and the
    reason is kept (one bad item must not end a long sampling run)."""
    try:
        return bool(verifier(response, answer)), None
    except Exception as e:  # any user code: recorded, not raised
        return False, f"{type(e).__name__}: {e}"
