"""DART-Math (Tong et al., NeurIPS 2024): difficulty-aware rejection sampling of SFT data.

For each query, a generator samples solutions (temperature 1.6, top-p 0.95, zero-shot) and a verifier keeps
the correct ones. Vanilla rejection tuning (VRT, ``strategy: fixed``) draws a fixed number of samples per
query and keeps every correct one, so easy queries dominate the data. DART spends more trials on hard queries:

- ``uniform`` (DARS-Uniform): sample each query until it has ``k`` (the paper's k_u = 40) correct responses;
- ``prop2diff`` (DARS-Prop2Diff): a first pass of ``probe`` samples per query measures its difficulty d(q),
  the fail rate (1 - pass rate) of those samples; each query then gets n(q) = ⌈k·d(q)/d_max⌉ correct responses
  (k = k_p: the hardest gets k), at least one for every query, and is sampled until it has them.

Both stop a query at ``max_trials`` trials (the paper's Uniform runs uncapped, ``--max_n_trials 0``; some
queries are never solved, so a cap is needed); queries with no correct response are reported as unsolved and
give no rows. Responses are deduplicated per query (the same text twice is one response), and the targets
count distinct correct responses. ``Outcome.rows`` are the SFT rows, query by query; ``Outcome.indices`` each
row's query index; ``Outcome.info`` the per-query pass rates, trials, correct counts, targets, difficulties,
the unsolved and the capped queries, the verifier's per-item failures and the time.

Sampling is batched: every round asks each unfinished query for about as many samples as it is expected to
need (from its pass rate so far, Laplace-smoothed), capped by its remaining trials and so that a round is
about one batch when few queries are left. The samples of a query are then read *in order*, stopping at the
one that meets its target: ``trials`` is what the sequential algorithm would have drawn (a sample drawn past
the target is counted in ``samples_drawn``, not in the query's trials), so the counts are the paper's whatever
the batching.

Generation loads the causal LM ``generator`` (a shipped name or a save_pretrained folder) and samples with
``model.generate(do_sample=True)`` (KV cache, left-padded batches, no top-k, stopping at EOS), rendering each
prompt with the tokenizer's chat template when it has one (an instruct model, e.g. the shipped
SmolLM2-Instruct) and as plain text otherwise. Each batch's draw is seeded from ``seed`` inside
``torch.random.fork_rng``: the same seed, data and device give the same rows, and the caller's RNG is left as
it was.

Choices the paper leaves open (or that differ from it, for CPUs):

- ``max_new_tokens`` defaults to 256, not the paper's 2048: the arithmetic word problems this project measures
  on are solved in well under 256 tokens, and 2048-token samples are out of reach on 2 CPU cores.
- ``max_trials`` defaults to 4·k (enough for queries with pass rates above about 1/4 to reach k on average).
- ``probe`` (8) sets how finely Prop2Diff sees difficulty (steps of 1/8); the paper measures it on the pool it
  sampled for Uniform. Probe samples are real trials: their correct responses count towards the target.
- The default prompt is zero-shot, the question followed by the instruction the paper's generator
  (DeepSeekMath-7B-RL) was prompted with ("Please reason step by step, and put your final answer within
  \\boxed{}."), so the ``numeric`` verifier finds the boxed answer; it is the user turn of each chat row.
- ``output: text`` writes the prompt, a newline and the response as one text (a plain LM row)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from deltatune.data.steps import verify
from deltatune.data.steps._base import Outcome, Pool, Progress, no_progress
from deltatune.errors import DeltatuneError

# (prompts, n_each, rng) -> for each prompt, n_each responses (a generator; tests pass a simulated one)
Sampler = Callable[[list[str], int, random.Random], list[list[str]]]

STRATEGIES = ("uniform", "prop2diff", "fixed")
OUTPUTS = ("chat", "text")
DEFAULT_PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
MAX_FAILURES_KEPT = 50  # the verifier's per-item failures listed in the manifest (all are counted)


@dataclass
class Options:
    """DART-Math's options (``deltatune data curate --method dart``)."""

    strategy: str = "prop2diff"  # "prop2diff" (the paper's DART-Math-Hard: more correct responses for harder queries), "uniform" (k correct per query) or "fixed" (VRT baseline: k samples per query, keep all correct)
    k: int = 40  # uniform: k_u, correct responses per query (paper 40); prop2diff: k_p, what the hardest query gets; fixed: samples per query
    max_trials: int | None = None  # trials (samples) per query at most, probe included; None: 4·k (the paper's Uniform has no cap)
    probe: int = 8  # prop2diff: samples per query in the first pass that measures difficulty (the fail rate)
    generator: str = "smollm2-135m"  # the causal LM that samples solutions: a shipped name or a save_pretrained folder
    temperature: float = 1.6  # sampling temperature (paper 1.6)
    top_p: float = 0.95  # nucleus sampling mass (paper 0.95); no top-k
    max_new_tokens: int = 256  # tokens per sampled solution at most (paper 2048; 256 fits short word problems on a CPU)
    batch_size: int = 16  # sequences generated together
    device: str = "auto"  # where the generator runs: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ...
    verifier: str | Callable[[str, str], Any] = "numeric"  # numeric | exact | regex:<pattern> | pkg.module:function (from Python also a callable)
    query_field: str = "question"  # the field of a row that holds the query
    answer_field: str = "answer"  # the field of a row that holds the reference answer
    output: str = "chat"  # "chat": rows {"messages": [user, assistant]}; "text": rows {"text": prompt + newline + response}
    prompt: str = DEFAULT_PROMPT  # the user turn; {question} is replaced by the query (zero-shot, the paper's instruction)


def checked(options: Options) -> int:
    """Check the options' values (a clear error naming the option); the trial cap per query."""
    where = "data curate --method dart"

    def whole(name: str, value: Any, least: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DeltatuneError(f"{where}: {name}={value!r} must be a whole number of at least {least}")
        return value

    if options.strategy not in STRATEGIES:
        raise DeltatuneError(
            f"{where}: strategy={options.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}"
        )
    if options.output not in OUTPUTS:
        raise DeltatuneError(
            f"{where}: output={options.output!r} is unknown; use one of {', '.join(OUTPUTS)}"
        )
    whole("k", options.k, 1)
    whole("batch_size", options.batch_size, 1)
    whole("max_new_tokens", options.max_new_tokens, 1)
    cap = 4 * options.k if options.max_trials is None else whole("max_trials", options.max_trials, 1)
    if options.strategy == "prop2diff":
        whole("probe", options.probe, 1)
        if options.probe > cap:
            raise DeltatuneError(
                f"{where}: probe={options.probe} is more than max_trials={cap}; the probe's samples are "
                "trials, so give max_trials at least probe"
            )
    if not isinstance(options.temperature, int | float) or options.temperature <= 0:
        raise DeltatuneError(f"{where}: temperature={options.temperature!r} must be above 0 (paper 1.6)")
    if not isinstance(options.top_p, int | float) or not 0 < options.top_p <= 1:
        raise DeltatuneError(f"{where}: top_p={options.top_p!r} must be in (0, 1] (paper 0.95)")
    if not isinstance(options.prompt, str) or "{question}" not in options.prompt:
        raise DeltatuneError(
            f"{where}: prompt={options.prompt!r} must contain {{question}}, where the query goes"
        )
    return cap


# ---------------------------------------------------------------- per-query state


@dataclass
class _Query:
    """One query's sampling so far."""

    prompt: str
    answer: str
    target: int | None = None  # distinct correct responses wanted; None: no target (fixed, and the probe)
    limit: int = 0  # trials allowed
    trials: int = 0
    correct: int = 0  # correct samples, duplicates included (the pass rate's numerator)
    kept: list[str] = field(default_factory=list)  # distinct correct responses, in the order drawn
    seen: set[str] = field(default_factory=set)
    duplicates: int = 0

    @property
    def done(self) -> bool:
        return self.trials >= self.limit or (self.target is not None and len(self.kept) >= self.target)

    def wanted(self, chunk: int) -> int:
        """Samples to ask for this round: the expected need at the smoothed pass rate, at most ``chunk`` and
        the trials left."""
        left = self.limit - self.trials
        if self.target is None:
            return max(1, min(left, chunk))
        rate = (self.correct + 1) / (self.trials + 2)
        need = math.ceil((self.target - len(self.kept)) / rate)
        return max(1, min(need, chunk, left))


def _key(response: str) -> str:
    """Two responses are the same when they differ only in spacing."""
    return " ".join(response.split())


def _consume(q: _Query, index: int, responses: list[str], verifier: verify.Verifier,
             failures: list[dict[str, Any]], counts: dict[str, int]) -> None:
    """Read a query's new samples in order until it is done: judge each, keep distinct correct ones."""
    for response in map(str, responses):
        if q.done:
            break
        q.trials += 1
        ok, why = verify.judge(verifier, response, q.answer)
        if why is not None:
            counts["failures"] += 1
            if len(failures) < MAX_FAILURES_KEPT:
                failures.append({"query": index, "trial": q.trials, "error": why, "response": response[:200]})
        if not ok:
            continue
        q.correct += 1
        key = _key(response)
        if key in q.seen:
            q.duplicates += 1
            continue
        q.seen.add(key)
        q.kept.append(response)


def _draw(sampler: Sampler, queries: list[_Query], asks: list[tuple[int, int]],
          rng: random.Random) -> list[list[str]]:
    """Each (query, n) ask's n responses, in one sampler call: n_each when every ask wants the same number,
    else the prompts repeated with n_each = 1 (so one call fills whole batches either way)."""
    counts = {n for _, n in asks}
    if len(counts) == 1:
        n = counts.pop()
        out = sampler([queries[i].prompt for i, _ in asks], n, rng)
        _check_shape(out, [n] * len(asks))
        return [list(r) for r in out]
    flat = [queries[i].prompt for i, n in asks for _ in range(n)]
    out = sampler(flat, 1, rng)
    _check_shape(out, [1] * len(flat))
    grouped, at = [], 0
    for _, n in asks:
        grouped.append([r[0] for r in out[at:at + n]])
        at += n
    return grouped


def _check_shape(out: Any, sizes: list[int]) -> None:
    if not isinstance(out, list) or len(out) != len(sizes) or any(
            not isinstance(r, list) or len(r) != n for r, n in zip(out, sizes, strict=False)):
        raise DeltatuneError(
            f"the sampler must return one list of n_each responses per prompt ({len(sizes)} lists); it "
            "returned something else"
        )


def _sample_until_done(sampler: Sampler, queries: list[_Query], verifier: verify.Verifier, batch_size: int,
                       rng: random.Random, failures: list[dict[str, Any]], counts: dict[str, int],
                       progress: Progress, what: str) -> None:
    """Rounds of batched sampling until every query has met its target or used its trials."""
    total = len(queries)
    while True:
        active = [i for i, q in enumerate(queries) if not q.done]
        progress(what, total - len(active), total)
        if not active:
            return
        chunk = max(1, math.ceil(batch_size / len(active)))
        asks = [(i, queries[i].wanted(chunk)) for i in active]
        for (i, n), responses in zip(asks, _draw(sampler, queries, asks, rng), strict=True):
            counts["drawn"] += n
            _consume(queries[i], i, responses, verifier, failures, counts)


def prop2diff_targets(fail_rates: list[Fraction], k: int) -> list[int]:
    """n(q) = ⌈k·d(q)/d_max⌉, at least 1 (every query gets one; d_max = 0, all easy: one each)."""
    d_max = max(fail_rates, default=Fraction(0))
    if d_max == 0:
        return [1] * len(fail_rates)
    return [max(1, math.ceil(k * d / d_max)) for d in fail_rates]


# ---------------------------------------------------------------- the step


def _queries(pool: Pool, options: Options) -> list[_Query]:
    if not pool.rows:
        raise DeltatuneError(
            f"data curate: the pool {pool.source} is empty; give it rows with a query and an answer"
        )
    out = []
    for n, row in enumerate(pool.rows):
        for name, option in ((options.query_field, "query_field"), (options.answer_field, "answer_field")):
            if row.get(name) is None:
                raise DeltatuneError(
                    f"data curate: row {n + 1} of {pool.source} has no {name!r} field (its fields: "
                    f"{', '.join(sorted(map(str, row))) or 'none'}); set {option} to the field that holds it"
                )
        prompt = options.prompt.replace("{question}", str(row[options.query_field]))
        out.append(_Query(prompt=prompt, answer=str(row[options.answer_field])))
    return out


def _row(prompt: str, response: str, output: str) -> dict[str, Any]:
    if output == "text":
        return {"text": f"{prompt}\n{response}"}
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def run(pool: Pool, options: Options, *, seed: int, progress: Progress = no_progress,
        sampler: Sampler | None = None, **context: Any) -> Outcome:
    """Curate an SFT set from ``pool``'s queries (see the module docstring). ``sampler``: a callable
    ``(prompts, n_each, rng) -> list[list[str]]`` used instead of loading ``options.generator`` (tests, or a
    generator deltatune does not load)."""
    start = time.perf_counter()
    cap = checked(options)
    queries = _queries(pool, options)
    judge = verify.resolve(options.verifier)
    draw = sampler if sampler is not None else model_sampler(options, progress=progress)
    rng = random.Random(seed)
    failures: list[dict[str, Any]] = []
    counts = {"drawn": 0, "failures": 0}
    difficulty: list[float] | None = None
    for q in queries:
        q.limit = min(options.k, cap) if options.strategy == "fixed" else cap
        q.target = options.k if options.strategy == "uniform" else None
    if options.strategy == "prop2diff":
        for q in queries:  # the probe: a fixed pass with no target, whose fail rate is the difficulty
            q.limit = options.probe
        _sample_until_done(draw, queries, judge, options.batch_size, rng, failures, counts, progress, "probe")
        fail = [Fraction(q.trials - q.correct, q.trials) for q in queries]
        difficulty = [float(d) for d in fail]
        for q, target in zip(queries, prop2diff_targets(fail, options.k), strict=True):
            q.target, q.limit = target, cap
            del q.kept[target:]  # a probe that found more than the target keeps the first ones drawn
    _sample_until_done(draw, queries, judge, options.batch_size, rng, failures, counts, progress, "curate")
    rows, indices = [], []
    for i, q in enumerate(queries):
        for response in q.kept:
            rows.append(_row(q.prompt, response, options.output))
            indices.append(i)
    info = _info(queries, options, cap, difficulty, failures, counts)
    info["seconds"] = round(time.perf_counter() - start, 3)
    return Outcome(rows=rows, indices=indices, scores=None, info=info)


def _name(verifier: str | Callable[..., Any]) -> str:
    """How the manifest names a verifier: its spec, or a callable's module:qualified name."""
    if isinstance(verifier, str):
        return verifier
    return f"{getattr(verifier, '__module__', '?')}:{getattr(verifier, '__qualname__', type(verifier).__name__)}"


def _info(queries: list[_Query], options: Options, cap: int, difficulty: list[float] | None,
          failures: list[dict[str, Any]], counts: dict[str, int]) -> dict[str, Any]:
    """What the manifest keeps: per-query pass rates, trials, correct and kept counts, targets and
    difficulties."""
    pass_rate = [q.correct / q.trials if q.trials else None for q in queries]
    unsolved = [i for i, q in enumerate(queries) if q.correct == 0]
    capped = [i for i, q in enumerate(queries)
              if q.correct > 0 and q.target is not None and len(q.kept) < q.target]
    return {
        "strategy": options.strategy, "k": options.k, "max_trials": cap,
        "probe": options.probe if options.strategy == "prop2diff" else None,
        "generator": options.generator, "verifier": _name(options.verifier),
        "queries": len(queries), "rows": sum(len(q.kept) for q in queries),
        "pass_rate": pass_rate, "trials": [q.trials for q in queries],
        "correct": [q.correct for q in queries],
        "kept": [len(q.kept) for q in queries], "target": [q.target for q in queries],
        "difficulty": difficulty if difficulty is not None
        else [None if r is None else 1 - r for r in pass_rate],
        "unsolved": unsolved, "solved_share": 1 - len(unsolved) / len(queries), "capped": capped,
        "samples_drawn": counts["drawn"], "duplicates": sum(q.duplicates for q in queries),
        "failure_count": counts["failures"], "failures": failures,
    }


# ---------------------------------------------------------------- the generator


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise DeltatuneError(
            f"data curate: device={name!r} is not a device; use auto, cpu or cuda[:N]"
        ) from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeltatuneError(f"data curate: device={name!r} but CUDA is not available here; use auto or cpu")
    return device


def _eos_ids(tokenizer: Any, model: Any) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS and the model's generation config's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return sorted(ids)


def encode_prompts(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt as the generator sees it: a user turn of the tokenizer's chat template with
    the generation prompt when it has a template (the template writes its own special tokens), else the plain
    text with the tokenizer's usual special tokens."""
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return [list(tokenizer(p)["input_ids"]) for p in prompts]


def model_sampler(options: Options, *, progress: Progress = no_progress, model: Any = None,
                  tokenizer: Any = None) -> Sampler:
    """A sampler over a causal LM (``options.generator``, loaded here unless ``model`` and ``tokenizer`` are
    given): rows are generated ``batch_size`` at a time in prompt-length order (less padding), each batch
    seeded from the call's rng inside ``fork_rng``."""
    import torch

    from deltatune.data import models
    from deltatune.data.encode import left_pad, pad_id

    device = _device(options.device)
    if model is None:
        if models.natural_task(options.generator) != "causal_lm":
            raise DeltatuneError(
                f"data curate: generator={options.generator!r} is not a causal language model; name one that "
                "generates text, e.g. smollm2-135m"
            )
        model = models.load(options.generator, task="causal_lm")
    tokenizer = tokenizer if tokenizer is not None else models.load_tokenizer(options.generator)
    model = model.to(device).eval()
    pad = pad_id(tokenizer)
    eos = _eos_ids(tokenizer, model)
    forked = [device] if device.type == "cuda" else []

    def sample(prompts: list[str], n_each: int, rng: random.Random) -> list[list[str]]:
        ids = encode_prompts(tokenizer, prompts)
        rows = [i for i in range(len(prompts)) for _ in range(n_each)]
        order = sorted(range(len(rows)), key=lambda r: (len(ids[rows[r]]), r))
        texts: list[str] = [""] * len(rows)
        for start in range(0, len(order), options.batch_size):
            chunk = order[start:start + options.batch_size]
            batch = left_pad([ids[rows[r]] for r in chunk], pad)
            width = batch["input_ids"].shape[1]
            with torch.random.fork_rng(devices=forked), torch.no_grad():
                torch.manual_seed(rng.getrandbits(63))
                out = model.generate(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    do_sample=True, temperature=float(options.temperature), top_p=float(options.top_p),
                    top_k=0, max_new_tokens=options.max_new_tokens, pad_token_id=pad,
                    eos_token_id=eos or None,
                )
            for r, seq in zip(chunk, out[:, width:].tolist(), strict=True):
                texts[r] = tokenizer.decode(seq, skip_special_tokens=True).strip()
            progress("generate", min(start + options.batch_size, len(order)), len(order))
        return [texts[i * n_each:(i + 1) * n_each] for i in range(len(prompts))]

    return sample
