"""Back-translation for ``deltatune data augment --method backtranslation``: each row translated to a pivot
language and back, the result kept as a label-keeping variant when it differs from the source.

No translation model ships with deltatune and nothing can be downloaded here, so the user names two seq2seq
models that load offline: ``translator`` (source → pivot, e.g. a local ``Helsinki-NLP/opus-mt-en-de`` folder)
and ``back_translator`` (pivot → source, e.g. ``opus-mt-de-en``). Without them the step stops with an error
that says so, before it reads anything.

Choices the spec leaves open ([unverified] in ``augmentation.md``: the paper's pivot, decoding and number of
paraphrases are not known here): one variant per row; beam search with ``num_beams`` (4, MarianMT's own
default) or, with ``sample``, sampling at ``temperature`` seeded by the run's seed (``torch.random.fork_rng``:
the caller's random state is left as it was). A back-translation is dropped when it is empty or equal to the
source once case and runs of spaces are ignored. Output rows, per pool row: its variant (if kept), then the
row itself, each with ``parent`` (the row's index) and ``augmented``, as EDA writes them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltatune.data.steps._base import Outcome, Pool, Progress, no_progress
from deltatune.data.steps.eda import check_pool, variant_row
from deltatune.errors import DeltatuneError

WHERE = "data augment --method backtranslation"
# texts -> their translations; run() takes one per direction through ``translate`` (tests, other engines)
Translate = Callable[[list[str]], list[str]]


@dataclass
class Options:
    translator: str | None = None  # seq2seq model from the data's language to a pivot (local MarianMT folder)
    back_translator: str | None = None  # seq2seq model from the pivot back to the data's language
    num_beams: int = 4  # beam width of both translations (MarianMT's default); 1: greedy
    sample: bool = False  # sample the translations (at temperature, seeded) instead of beam search
    temperature: float = 1.0  # sampling temperature (with sample: true)
    batch_size: int = 16  # texts per generate call
    max_length: int = 256  # tokens of a source text read, and of a translation written
    device: str = "auto"  # auto (cuda when there is one) | cpu | cuda | cuda:N

    def problems(self) -> list[str]:
        out = []
        for name in ("num_beams", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                out.append(f"{name}={value!r} must be a whole number >= 1")
        if not isinstance(self.temperature, int | float) or not self.temperature > 0:
            out.append(f"temperature={self.temperature!r} must be a number > 0")
        return out


def missing_models(options: Options) -> DeltatuneError:
    """Why back-translation cannot run without the user's translation models."""
    absent = [n for n in ("translator", "back_translator") if getattr(options, n) is None]
    return DeltatuneError(
        f"{WHERE} needs two translation models and {' and '.join(absent)} "
        f"{'is' if len(absent) == 1 else 'are'} not set: deltatune ships no translation model and cannot "
        "download one here. Name local seq2seq folders written by save_pretrained, e.g. translator: "
        "models/opus-mt-en-de and back_translator: models/opus-mt-de-en (MarianMT), or use --method eda"
    )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_translator(name: str, options: Options, seed: int) -> Translate:
    """A seq2seq model and its tokenizer from a local folder (offline, safetensors only)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from deltatune.data import models

    folder = models.resolve(name)
    models.refuse_pickle_weights(Path(folder))
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DeltatuneError(f"{WHERE}: {name} is not a model folder ({e}); name a seq2seq translation "
                             "model") from e
    if not getattr(config, "is_encoder_decoder", False):
        raise DeltatuneError(f"{WHERE}: {name} is a {config.model_type} model, not an encoder-decoder "
                             "(seq2seq) translation model; name one such as a MarianMT folder")
    with models.quiet_transformers():
        model = AutoModelForSeq2SeqLM.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    tokenizer = models.load_tokenizer(folder)
    model.eval().to(_device(options.device))
    calls = itertools.count()  # each call (a chunk of rows) samples from its own seed

    def translate(texts: list[str]) -> list[str]:
        return _generate(model, tokenizer, texts, options, seed * 1_000_003 + next(calls))

    return translate


@torch.no_grad()
def _generate(model: Any, tokenizer: Any, texts: list[str], options: Options, seed: int) -> list[str]:
    out: list[str] = []
    device = next(model.parameters()).device
    decoding: dict[str, Any] = ({"do_sample": True, "temperature": float(options.temperature), "num_beams": 1}
                                if options.sample else {"do_sample": False, "num_beams": options.num_beams})
    for start in range(0, len(texts), options.batch_size):
        enc = tokenizer(texts[start:start + options.batch_size], padding=True, truncation=True,
                        max_length=options.max_length, return_tensors="pt").to(device)
        # sampling draws from torch's generator: seeded per batch, and the caller's state is put back
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + start)
            ids = model.generate(**enc, max_new_tokens=options.max_length, **decoding)
        out += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return out


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def run(pool: Pool, options: Options, *, seed: int, progress: Progress = no_progress,
        translate: tuple[Translate, Translate] | None = None, **context: Any) -> Outcome:
    """Back-translate every row of ``pool``: per row its variant (when kept), then the row itself.

    ``translate``: (to the pivot, back) functions used instead of loading ``options.translator`` and
    ``options.back_translator``."""
    problems = options.problems()
    if problems:
        raise DeltatuneError(f"{WHERE}: " + "; ".join(problems))
    if translate is None and (options.translator is None or options.back_translator is None):
        raise missing_models(options)
    check_pool(pool, WHERE)
    if translate is None:
        assert options.translator is not None and options.back_translator is not None
        translate = (load_translator(options.translator, options, seed),
                     load_translator(options.back_translator, options, seed + 1))
    to_pivot, back = translate
    texts = pool.texts()
    returned: list[str] = []
    step = options.batch_size
    for start in range(0, len(texts), step):  # in chunks, so the progress bar moves
        returned += back(to_pivot(texts[start:start + step]))
        progress("backtranslate", min(start + step, len(texts)), len(texts))
    if len(returned) != len(texts):
        raise DeltatuneError(f"{WHERE}: the translators returned {len(returned)} texts for {len(texts)}")
    rows: list[dict[str, Any]] = []
    parents: list[int] = []
    dropped = 0
    for i, (row, text, new) in enumerate(zip(pool.rows, texts, returned, strict=True)):
        if new.strip() and not _same(new, text):
            rows.append(variant_row(row, pool.text_field, new.strip(), i, True))
            parents.append(i)
        else:
            dropped += 1
        rows.append(variant_row(row, pool.text_field, text, i, False))
        parents.append(i)
    info = {"originals": len(pool.rows), "variants": len(pool.rows) - dropped,
            "dropped_identical_or_empty": dropped, "translator": options.translator,
            "back_translator": options.back_translator}
    return Outcome(rows=rows, indices=parents, scores=None, info=info)
