"""DART-Math (`deltatune data curate --method dart`): the sampling strategies on a simulated generator with
known pass rates, the verifiers, the arithmetic problem generator and the batched generate path on a tiny
model."""

from __future__ import annotations

import itertools
import math
import random
import re
import statistics
from fractions import Fraction

import pytest

from deltatune.data.steps import arith, dart, verify
from deltatune.data.steps._base import Pool
from deltatune.errors import DeltatuneError

# ---------------------------------------------------------------- a simulated generator


def simulated(rates: dict[str, float], answers: dict[str, str]):
    """A sampler whose response to a prompt is correct with the prompt's pass rate; every response is a
    distinct text ("<answer>|<serial>"), so deduplication never hides a correct one."""
    serial = itertools.count()

    def sample(prompts: list[str], n_each: int, rng: random.Random) -> list[list[str]]:
        out = []
        for p in prompts:
            good = answers[p]
            out.append([f"{good if rng.random() < rates[p] else 'wrong'}|{next(serial)}"
                        for _ in range(n_each)])
        return out

    return sample


def quick(response: str, answer: str) -> bool:
    """A fast verifier for the simulated responses: the part before '|' is the answer."""
    return response.split("|")[0] == answer


def make_pool(rates: list[float]) -> tuple[Pool, dart.Sampler]:
    """A pool with one query per pass rate (query i's answer is str(i)) and its simulated generator."""
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(len(rates))]
    sampler = simulated({r["question"]: p for r, p in zip(rows, rates, strict=True)},
                        {r["question"]: r["answer"] for r in rows})
    return Pool(rows, "question", None, task="text"), sampler


def curate(rates: list[float], seed: int = 0, **options):
    pool, sampler = make_pool(rates)
    opts = dart.Options(verifier=quick, prompt="{question}", **options)
    return dart.run(pool, opts, seed=seed, sampler=sampler)


def _mean_trials(info: dict, rates: list[float], p: float) -> float:
    return statistics.fmean(t for t, r in zip(info["trials"], rates, strict=True) if r == p)


# ---------------------------------------------------------------- the strategies


def test_uniform_gives_k_correct_per_query_and_trials_follow_k_over_p():
    """DARS-Uniform: exactly k distinct correct responses for every solvable query; the trials a query takes
    are negative binomial, mean k/p and variance k(1-p)/p², so the mean over m queries is within 4 standard
    errors."""
    k, m, ps = 8, 40, [0.9, 0.5, 0.2]
    rates = [p for p in ps for _ in range(m)]
    out = curate(rates, strategy="uniform", k=k, max_trials=10_000)
    info = out.info
    assert info["kept"] == [k] * len(rates)
    assert len(out.rows) == k * len(rates) and info["unsolved"] == [] and info["capped"] == []
    assert out.indices == [i for i in range(len(rates)) for _ in range(k)]
    for p in ps:
        se = math.sqrt(k * (1 - p)) / p / math.sqrt(m)
        assert abs(_mean_trials(info, rates, p) - k / p) < 4 * se + 1e-9, p
    # each kept response is one of that query's correct ones
    for row, i in zip(out.rows, out.indices, strict=True):
        assert quick(row["messages"][1]["content"], str(i))
        assert row["messages"][0] == {"role": "user", "content": f"q{i}"}


def test_prop2diff_counts_follow_difficulty():
    """DARS-Prop2Diff: the probe's fail rate d(q) sets n(q) = ⌈k_p·d/d_max⌉ (at least 1), every solved query
    gets exactly n(q) rows, and harder queries get more rows."""
    k, probe = 12, 8
    ps = [0.97, 0.8, 0.6, 0.4, 0.25, 0.1]
    rates = [p for p in ps for _ in range(6)]
    out = curate(rates, strategy="prop2diff", k=k, probe=probe, max_trials=2000, seed=3)
    info = out.info
    d = [Fraction(x).limit_denominator(probe) for x in info["difficulty"]]
    assert all(x.denominator in (1, 2, 4, 8) for x in d), "difficulty is a fail rate over the probe"
    d_max = max(d)
    expected = [max(1, math.ceil(k * x / d_max)) for x in d]
    assert info["target"] == expected
    assert min(expected) >= 1 and max(expected) == k
    assert info["capped"] == [] and info["unsolved"] == []
    assert info["kept"] == expected
    assert all(t >= probe for t in info["trials"])
    per_p = {p: statistics.fmean(n for n, r in zip(info["kept"], rates, strict=True) if r == p) for p in ps}
    assert per_p[0.1] > per_p[0.4] > per_p[0.97], per_p


def test_prop2diff_all_easy_gets_one_each():
    out = curate([1.0, 1.0, 1.0], strategy="prop2diff", k=5, probe=4)
    assert out.info["target"] == [1, 1, 1] and out.info["kept"] == [1, 1, 1]
    assert out.info["trials"] == [4, 4, 4]  # the probe's samples are trials


def test_prop2diff_targets_formula():
    f = Fraction
    assert dart.prop2diff_targets([f(0), f(1, 8), f(1, 2), f(3, 4)], 12) == [1, 2, 8, 12]
    assert dart.prop2diff_targets([f(0), f(0)], 7) == [1, 1]


def test_fixed_vrt_keeps_correct_in_proportion_to_pass_rate():
    """VRT: exactly k trials per query and every correct response kept, so counts are ∝ p on average
    (binomial: mean k·p, within 4 standard errors over m queries)."""
    k, m, ps = 20, 30, [0.9, 0.5, 0.1]
    rates = [p for p in ps for _ in range(m)]
    info = curate(rates, strategy="fixed", k=k).info
    assert info["trials"] == [k] * len(rates) and info["target"] == [None] * len(rates)
    for p in ps:
        kept = statistics.fmean(n for n, r in zip(info["kept"], rates, strict=True) if r == p)
        assert abs(kept - k * p) < 4 * math.sqrt(k * p * (1 - p) / m) + 1e-9, p
    assert info["samples_drawn"] == k * len(rates)


def test_unsolvable_queries_are_reported_and_get_no_rows():
    out = curate([0.0, 0.7, 0.0], strategy="uniform", k=3, max_trials=25)
    info = out.info
    assert info["unsolved"] == [0, 2] and 0 not in out.indices and 2 not in out.indices
    assert info["trials"][0] == info["trials"][2] == 25 and info["pass_rate"][0] == 0.0
    assert info["kept"][1] == 3 and info["solved_share"] == pytest.approx(1 / 3)
    assert info["verifier"] == "test_data_dart:quick"


def test_trial_cap_is_respected():
    """No query takes more trials than max_trials: a hard query stops short of k and is listed as capped."""
    rates = [0.5, 0.05, 0.3, 1.0]
    for strategy in ("uniform", "prop2diff", "fixed"):
        out = curate(rates, strategy=strategy, k=30, max_trials=9, probe=4, batch_size=5)
        assert max(out.info["trials"]) <= 9 and out.info["max_trials"] == 9, strategy
        assert all(n <= 9 for n in out.info["kept"])
    info = curate(rates, strategy="uniform", k=30, max_trials=9).info
    assert info["trials"] == [9, 9, 9, 9]  # none reaches 30 correct in 9 trials
    assert set(info["capped"]) == {i for i, n in enumerate(info["correct"]) if n > 0}
    assert curate(rates, strategy="uniform", k=4).info["max_trials"] == 16  # default cap: 4·k


def test_duplicates_count_once():
    """The same correct text twice is one response: a generator that always says the same thing gives one
    row."""
    pool = Pool([{"question": "q", "answer": "1"}], "question", None)

    def same(prompts, n_each, rng):
        return [["1|the same"] * n_each for _ in prompts]

    opts = dart.Options(strategy="uniform", k=3, max_trials=10, verifier=quick, prompt="{question}")
    out = dart.run(pool, opts, seed=0, sampler=same)
    assert len(out.rows) == 1 and out.info["duplicates"] == 9 and out.info["correct"] == [10]
    assert out.info["capped"] == [0]


def test_deterministic_by_seed():
    rates = [0.3, 0.6, 0.9, 0.1]
    a = curate(rates, seed=5, strategy="prop2diff", k=6, probe=4, batch_size=3)
    b = curate(rates, seed=5, strategy="prop2diff", k=6, probe=4, batch_size=3)
    c = curate(rates, seed=6, strategy="prop2diff", k=6, probe=4, batch_size=3)
    drop = lambda info: {k: v for k, v in info.items() if k != "seconds"}  # noqa: E731
    assert a.rows == b.rows and a.indices == b.indices and drop(a.info) == drop(b.info)
    assert a.info["trials"] != c.info["trials"] or a.rows != c.rows


def test_raising_verifier_is_a_recorded_failure():
    """A verifier that raises on an item counts it as not correct and keeps why; the run goes on."""
    def fragile(response: str, answer: str) -> bool:
        if response.startswith("wrong"):
            raise ValueError("cannot read this one")
        return quick(response, answer)

    pool, sampler = make_pool([0.5, 0.5])
    out = dart.run(pool, dart.Options(strategy="fixed", k=20, verifier=fragile, prompt="{question}"), seed=1,
                   sampler=sampler)
    info = out.info
    wrong = sum(20 - c for c in info["correct"])
    assert info["failure_count"] == wrong > 0
    assert len(info["failures"]) == min(wrong, dart.MAX_FAILURES_KEPT)
    first = info["failures"][0]
    assert first["query"] in (0, 1) and "ValueError: cannot read this one" in first["error"]
    assert len(out.rows) == sum(info["correct"])


def test_numeric_verifier_end_to_end_on_arith_problems():
    """Arithmetic problems, a generator that boxes the right answer with pass rate p (else the answer + 1),
    the default numeric verifier: every kept row's boxed answer is the problem's answer; chat and text
    rows."""
    problems = arith.make_problems(6, seed=0)
    pool = Pool(problems, "question", None, task="text")
    opts = dart.Options(strategy="uniform", k=2, max_trials=40)
    prompts = {opts.prompt.replace("{question}", p["question"]): p["answer"] for p in problems}

    def make_sampler():
        serial = itertools.count()

        def sampler(batch, n_each, rng):
            return [[f"Try {next(serial)}: so the answer is \\boxed{{{int(prompts[p]) + (rng.random() >= 0.6)}}}."
                     for _ in range(n_each)] for p in batch]

        return sampler

    out = dart.run(pool, opts, seed=0, sampler=make_sampler())
    assert out.info["kept"] == [2] * 6
    for row, i in zip(out.rows, out.indices, strict=True):
        user, assistant = row["messages"]
        assert problems[i]["question"] in user["content"] and "\\boxed{}" in user["content"]
        assert verify.final_answer(assistant["content"]) == problems[i]["answer"]
    text = dart.run(pool, dart.Options(strategy="uniform", k=2, max_trials=40, output="text"), seed=0,
                    sampler=make_sampler())
    assert [r["text"] for r in text.rows] == [m["messages"][0]["content"] + "\n" + m["messages"][1]["content"]
                                              for m in out.rows]


@pytest.mark.parametrize(("options", "message"), [
    ({"strategy": "best"}, "strategy='best' is unknown"),
    ({"k": 0}, "k=0 must be a whole number"),
    ({"max_trials": 0}, "max_trials=0"),
    ({"probe": 9, "max_trials": 8}, "probe=9 is more than max_trials=8"),
    ({"top_p": 1.5}, "top_p=1.5"),
    ({"temperature": 0}, "temperature=0"),
    ({"output": "csv"}, "output='csv' is unknown"),
    ({"prompt": "Solve it"}, "must contain {question}"),
    ({"verifier": "numerc"}, "did you mean 'numeric'"),
])
def test_bad_options_are_clear_errors(options, message):
    pool, sampler = make_pool([0.5])
    with pytest.raises(DeltatuneError, match=re.escape(message)):
        dart.run(pool, dart.Options(**{"prompt": "{question}", **options}), seed=0, sampler=sampler)


def test_bad_pool_is_a_clear_error():
    _, sampler = make_pool([0.5])
    with pytest.raises(DeltatuneError, match="empty"):
        dart.run(Pool([], "question", None), dart.Options(), seed=0, sampler=sampler)
    with pytest.raises(DeltatuneError, match=r"row 2 .* no 'answer' field .*answer_field"):
        rows = [{"question": "a", "answer": "1"}, {"question": "b", "solution": "2"}]
        dart.run(Pool(rows, "question", None), dart.Options(), seed=0, sampler=sampler)


def test_sampler_of_the_wrong_shape_is_refused():
    pool, _ = make_pool([0.5])
    with pytest.raises(DeltatuneError, match="one list of n_each responses per prompt"):
        dart.run(pool, dart.Options(prompt="{question}", verifier=quick), seed=0,
                 sampler=lambda prompts, n, rng: [["x"]])


# ---------------------------------------------------------------- verifiers


@pytest.mark.parametrize(("response", "answer"), [
    ("so the result is \\boxed{\\frac{1}{2}}", "0.5"),
    ("The answer is 0.5", "1/2"),
    ("The answer is 1,000.", "1000"),
    ("In total 1,000 apples", "1,000"),
    ("Tom has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("The answer is 42 apples.", "42"),
    ("The answer is $5.", "5"),
    ("... \\boxed{3\\sqrt{2}}", "\\sqrt{18}"),
    ("She keeps 12.50 dollars", "12.5"),
    ("\\boxed{0.30000000000000004}", "0.3"),  # float rounding is within the tolerance
    ("\\boxed{1.4142135623730951}", "\\sqrt{2}"),
    ("The answer is 50%", "50"),
    ("The answer is 50%", "0.5"),
    # what SmolLM2-135M writes: the prompt's empty box echoed, the number said in words around it
    ("Give your final answer within \\boxed{}: Mia has 4 cards, so the answer is 4.", "4"),
    ("So, the answer is 21.\n\nThe final answer is within \\boxed", "21"),
    ("first 3, then 9, finally 27", "27"),
    ("so 72 clips", "Natalia sold 48/2 = 24 clips in May. 48+24 = 72. #### 72"),
    ("\\boxed{-4}", "-4"),
])
def test_numeric_equivalent(response, answer):
    assert verify.numeric(response, answer)


@pytest.mark.parametrize(("response", "answer"), [
    ("The answer is 10001", "10000"),  # integers are compared exactly, no tolerance
    ("I get 0.333", "1/3"),  # a rounded decimal is another answer (DART's grader: relative 1e-9)
    ("I get 0.33333", "1/3"),
    ("So, the answer is 21.\n\nThe final answer is within \\boxed", "39"),
    ("\\boxed{}", "0"),
    ("\\boxed{5}, or maybe 7", "7"),  # the boxed answer is the final one
    ("no number here", "3"),
    ("the answer is 4", "-4"),
    ("#### 2**99**99", "1"),  # a tower of powers is not evaluated
    ("the answer is __import__('os').getcwd()", "0"),
])
def test_numeric_not_equivalent(response, answer):
    assert not verify.numeric(response, answer)


def test_numeric_never_evaluates_code():
    assert verify.parse_number("__import__('os').system('true')") is None
    assert verify.parse_number("(lambda: 1)()") is None
    assert verify.parse_number("9**9**9") is None and verify.parse_number("2**999") is None
    assert verify.parse_number("(2**10)**2") == 2 ** 20


@pytest.mark.parametrize("text", ["(14", "14)", "(2+3", "((", "2*(3", ")14(", "(2))(("])
def test_unbalanced_parentheses_are_not_a_number_and_never_an_error(text):
    """A GRPO run stopped at its reward: a sampled "the answer is (14" made SymPy's tokenizer raise."""
    assert verify.parse_number(text) is None
    # the verifier reads the number inside the mark (14 where there is one) and never raises
    assert verify.numeric(f"The answer is {text}.", "14") == ("14" in text)


def test_exact_verifier():
    assert verify.exact("The answer is Paris.", "paris")
    assert verify.exact("  Blue  whale ", "blue whale")
    assert not verify.exact("The answer is Lyon.", "Paris")


def test_regex_verifier():
    check = verify.resolve(r"regex:ANSWER=(\S+)")
    assert check("ANSWER=3 no wait ANSWER=4", "4")
    assert not check("ANSWER=3 no wait ANSWER=4", "3")  # the last match is the final answer
    assert check("ANSWER=1,000", "1000")  # compared as numbers when both are
    assert not check("nothing", "4")
    assert verify.resolve(r"regex:\d+")("the code is 17", "17")  # no group: the whole match
    with pytest.raises(DeltatuneError, match="not a valid regular expression"):
        verify.resolve("regex:(unclosed")


def test_dotted_path_verifier(tmp_path, monkeypatch):
    (tmp_path / "my_graders.py").write_text(
        "def grade(response, answer):\n    return response.strip().endswith(answer)\n\nNOT_A_FUNCTION = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("my_graders:grade", "my_graders.grade"):
        check = verify.resolve(spec)
        assert check("it is 5", "5") and not check("it is 6", "5")
    with pytest.raises(DeltatuneError, match="cannot import module 'no_such_graders'"):
        verify.resolve("no_such_graders:grade")
    with pytest.raises(DeltatuneError, match="has no 'nope'"):
        verify.resolve("my_graders:nope")
    with pytest.raises(DeltatuneError, match="not a function"):
        verify.resolve("my_graders:NOT_A_FUNCTION")
    # the dotted path through the whole step
    pool, sampler = make_pool([1.0])
    opts = dart.Options(strategy="fixed", k=2, verifier="my_graders:grade", prompt="{question}")
    out = dart.run(pool, opts, seed=0,
                   sampler=lambda prompts, n, rng: [[f"it is {i}" for i in (0, 1)[:n]] for _ in prompts])
    assert [r["messages"][1]["content"] for r in out.rows] == ["it is 0"]


# ---------------------------------------------------------------- the arithmetic problems

_START = re.compile(r"^(\w+) has (\d+) (\w+)\.$")
_OPS = [
    (re.compile(r"(?:buys|finds) (\d+) more"), lambda v, x: v + x),
    (re.compile(r"gives \w+ (\d+) more"), lambda v, x: v + x),
    (re.compile(r"(?:gives away|loses|sells) (\d+) "), lambda v, x: v - x),
    (re.compile(r"ends up with (\d+) times as many"), lambda v, x: v * x),
    (re.compile(r"into (\d+) equal groups and keeps one"), lambda v, x: v / x),
]


def _solve(question: str) -> tuple[Fraction, int]:
    """The answer a question's text states, worked out sentence by sentence, and its number of operations."""
    sentences = re.split(r"(?<=[.?])\s+", question)
    start = _START.match(sentences[0])
    assert start and sentences[-1].startswith("How many")
    value, steps = Fraction(int(start.group(2))), 0
    for s in sentences[1:-1]:
        hits = [(m, f) for p, f in _OPS if (m := p.search(s))]
        assert len(hits) == 1, s
        m, f = hits[0]
        value, steps = f(value, Fraction(int(m.group(1)))), steps + 1
        assert value.denominator == 1 and value > 0, question  # every running count: a positive integer
    return value, steps


def test_arith_answers_are_right():
    problems = arith.make_problems(400, seed=11)
    for p in problems:
        value, steps = _solve(p["question"])
        assert p["answer"] == str(value) and p["difficulty"] == steps
    assert len({p["question"] for p in problems}) == 400
    counts = [sum(p["difficulty"] == d for p in problems) for d in (1, 2, 3, 4)]
    assert counts == [100, 100, 100, 100]
    # harder problems have larger numbers on average
    mean_start = [statistics.fmean(int(_START.match(p["question"].split(". ")[0] + ".").group(2))
                                   for p in problems if p["difficulty"] == d) for d in (1, 4)]
    assert mean_start[1] > 2 * mean_start[0]


def test_arith_is_deterministic_by_seed():
    assert arith.make_problems(50, seed=3) == arith.make_problems(50, seed=3)
    assert arith.make_problems(50, seed=3) != arith.make_problems(50, seed=4)
    assert [p["difficulty"] for p in arith.make_problems(10, seed=0, max_steps=2)].count(2) == 5
    with pytest.raises(DeltatuneError, match="n=-1"):
        arith.make_problems(-1, seed=0)


# ---------------------------------------------------------------- a real generator


@pytest.fixture(scope="module")
def word_llama(tmp_path_factory):
    from conftest import save_word_llama

    return save_word_llama(tmp_path_factory.mktemp("dart-gen"))


def test_tiny_generator_batched_and_deterministic(word_llama):
    """The real path: a tiny Llama samples with generate() in left-padded batches smaller than the rows,
    decodes only the new tokens, and gives the same rows for the same seed (other rows for another)."""
    import torch

    rows = [{"question": q, "answer": "1"} for q in ("what a day", "a great day number 3", "sad")]
    opts = dart.Options(strategy="fixed", k=3, generator=str(word_llama), max_new_tokens=6, batch_size=4,
                        verifier=lambda r, a: True, prompt="{question}", device="cpu")
    before = torch.random.get_rng_state()
    a = dart.run(Pool(rows, "question", None), opts, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before), "the caller's RNG is left alone"
    b = dart.run(Pool(rows, "question", None), opts, seed=0)
    c = dart.run(Pool(rows, "question", None), opts, seed=1)
    assert a.rows == b.rows and a.indices == b.indices
    assert a.rows != c.rows
    assert a.info["trials"] == [3, 3, 3] and a.info["samples_drawn"] == 9
    assert 1 <= len(a.rows) <= 9 and set(a.indices) == {0, 1, 2}
    for row in a.rows:
        response = row["messages"][1]["content"]
        assert 0 < len(response.split()) <= 6  # the new tokens only, at most max_new_tokens words


def test_chat_template_renders_the_user_turn(word_llama):
    """A tokenizer with a chat template gets the prompt as a user turn with the generation prompt; one without
    gets the plain text."""
    from deltatune.data import models

    tok = models.load_tokenizer(str(word_llama))
    plain = dart.encode_prompts(tok, ["what a day"])
    assert plain == [tok("what a day")["input_ids"]]
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}number{% endif %}")
    chat = dart.encode_prompts(tok, ["what a day"])
    assert chat == [tok("what a day number", add_special_tokens=False)["input_ids"]]
    sampler = dart.model_sampler(dart.Options(max_new_tokens=3, batch_size=2, device="cpu"),
                                 model=models.load(str(word_llama), task="causal_lm"), tokenizer=tok)
    out = sampler(["what a day", "sad"], 3, random.Random(0))
    assert [len(r) for r in out] == [3, 3]
