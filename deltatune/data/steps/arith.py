"""Small synthetic arithmetic word problems with known answers and graded difficulty (DART's measurement set).

DART-Math draws its queries from MATH and GSM8K, which cannot be downloaded here; this generator makes
GSM8K-like queries whose answers are known exactly, so rejection sampling can be graded and the share of hard
queries covered can be measured. A problem starts with a count of things a person has and applies 1 to
``max_steps`` operations (buy / find / get more, give away / lose / sell some, end up with k times as many,
split into equal groups and keep one); its ``difficulty`` is the number of operations, and the numbers grow
with it (start and addends up to 5·2^d, factors up to d + 2, divisors 2..9 that divide the running count
exactly), so a harder problem is longer and has larger numbers. Every running count stays a positive integer.
Difficulties are balanced (each appears ⌊n / max_steps⌋ or one more times) and shuffled; questions are
distinct."""

from __future__ import annotations

import random
from typing import Any

from deltatune.errors import DeltatuneError

NAMES = ("Tom", "Mia", "Ravi", "Lena", "Omar", "Sara", "Ken", "Ada", "Luis", "Nora")
ITEMS = ("apples", "marbles", "stickers", "coins", "books", "pencils", "cards", "shells")

# one sentence per operation; {n} the person, {x} the operand, {i} the things
ADD = ("{n} buys {x} more {i}.", "{n} finds {x} more {i}.", "A friend gives {n} {x} more {i}.")
SUB = ("{n} gives away {x} {i}.", "{n} loses {x} {i}.", "{n} sells {x} {i}.")
MUL = ("{n} then ends up with {x} times as many {i} as before.",)
DIV = ("{n} splits the {i} into {x} equal groups and keeps one group.",)


def _limit(difficulty: int) -> int:
    """The largest start value or addend at a difficulty: numbers grow with the number of steps."""
    return 5 * 2 ** difficulty


def _step(rng: random.Random, value: int, difficulty: int) -> tuple[str, int, int]:
    """(operation, operand, new value) for one step from ``value``: an operation whose result is a positive
    integer (a subtraction leaves at least one, a division is exact)."""
    ops = ["add", "mul"]
    if value > 1:
        ops.append("sub")
    divisors = [d for d in range(2, 10) if value % d == 0]
    if divisors:
        ops.append("div")
    op = rng.choice(ops)
    if op == "add":
        x = rng.randint(1, _limit(difficulty))
        return op, x, value + x
    if op == "sub":
        x = rng.randint(1, min(value - 1, _limit(difficulty)))
        return op, x, value - x
    if op == "mul":
        x = rng.randint(2, difficulty + 2)
        return op, x, value * x
    x = rng.choice(divisors)
    return op, x, value // x


def _problem(rng: random.Random, difficulty: int) -> dict[str, Any]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, _limit(difficulty))
    sentences = [f"{name} has {value} {item}."]
    templates = {"add": ADD, "sub": SUB, "mul": MUL, "div": DIV}
    for _ in range(difficulty):
        op, x, value = _step(rng, value, difficulty)
        sentences.append(rng.choice(templates[op]).format(n=name, x=x, i=item))
    sentences.append(f"How many {item} does {name} have now?")
    return {"question": " ".join(sentences), "answer": str(value), "difficulty": difficulty}


def make_problems(n: int, seed: int, *, max_steps: int = 4) -> list[dict[str, Any]]:
    """``n`` distinct problems ``{"question", "answer", "difficulty"}`` (answer: the integer as text;
    difficulty: the number of operations, 1..``max_steps``), the same for the same seed."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DeltatuneError(f"make_problems: n={n!r} must be a whole number of problems (0 or more)")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise DeltatuneError(f"make_problems: max_steps={max_steps!r} must be a whole number of at least 1")
    rng = random.Random(seed)
    difficulties = [1 + i % max_steps for i in range(n)]
    rng.shuffle(difficulties)
    seen: set[str] = set()
    out = []
    for d in difficulties:
        for _ in range(10_000):  # one-step problems are the fewest distinct ones; give up only if exhausted
            problem = _problem(rng, d)
            if problem["question"] not in seen:
                break
        else:
            raise DeltatuneError(
                f"make_problems: cannot make {n} distinct problems of {d} step(s); ask for fewer"
            )
        seen.add(problem["question"])
        out.append(problem)
    return out
