"""The ``data`` section of a run config: which data (a shipped set or a local file) and which task format.

Bad values raise on construction, each naming its key (``data.<key>``) and what is allowed; ``problems()``
says what is still missing (a source), so ``DataConfig()`` itself works as a starting point.

Several data sets in one run: ``DataConfig(mix=[{...}, {...}])`` (a YAML list under ``data:``). Each part is a
data section of its own with an optional ``weight``; the keys that shape the run as a whole (``SHARED``: the
task, max_length, packing, ...) are set once, in any part or beside ``mix``, and a part that does not set one
takes it from there; two different values of one of them are an error naming both parts. A weight w makes a
part contribute round(w x n) training examples, n its training examples after ``max_train``: whole copies
for the integer part of w, and a seeded sample without replacement for the rest (w = 0.5 takes half of them,
w = 2 each twice). Every weight 1.0 is plain concatenation, as axolotl's ``datasets:`` list; for shares
p_i of a total N, set w_i = p_i N / n_i. Evaluation uses every part's eval split, unweighted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune import data
from deltatune.errors import DeltatuneError

TASKS = ("text", "chat", "classification", "edit", "preference", "prompts", "seq2seq", "image-classification",
         "audio-classification")
MEDIA_TASKS = ("image-classification", "audio-classification")  # deltatune.data.vision / deltatune.data.audio
DEFAULT_PROMPT = "Text: {text}\nLabel:"
SHIPPED_PROMPTS = {"tweets": "Tweet: {text}\nSentiment:"}
# keys that shape the run as a whole: one value for every part of a mix
STEP_KEYS = ("select", "prune", "curate", "augment")  # the data steps (deltatune.data.steps.ORDER)
SHARED = ("task", "max_length", "packing", "head", "seed", "labels", "prompt", "chat_template", "max_target_length",
          "max_new_tokens")
SEQ2SEQ_ONLY = ("max_target_length", "max_new_tokens")  # keys of task seq2seq alone
SEQ2SEQ_NEW_TOKENS = 32  # seq2seq evaluation: greedy generation's length limit when data.max_new_tokens is null


@dataclass
class DataConfig:
    """The ``data`` section of a run config (keys are named ``data.<key>`` in errors)."""

    name: str | None = None  # shipped data set: "tweets", "bbc" (texts), "digits" (images), "tones" (audio)
    path: str | None = None  # local file (.jsonl .json .csv .tsv .parquet .txt), a .txt folder or a save_to_disk folder
    # "text" | "chat" | "classification" | "edit" | "preference" | "prompts" (GRPO's) | "seq2seq" (source -> target, for
    # encoder-decoder models such as T5 and BART) | "image-classification" (ViT / Swin) | "audio-classification" (AST):
    # a folder of class folders, an .npz or a .parquet of arrays + labels (docs/vision-audio.md)
    task: str = "classification"
    max_length: int = 128  # tokens per example (longer ones are cut; a packed row holds this many; seq2seq: the source)
    eval_fraction: float = 0.1  # the share of rows held out for evaluation
    seed: int = 0  # the split and subsample seed
    text_field: str = "text"  # the field with the text (text and classification tasks)
    label_field: str = "label"  # classification: the field with the class (names or integers)
    messages_field: str = "messages"  # chat: the field of {role, content} lists (ShareGPT, Alpaca, TRL rows: found too)
    labels: list[str] | None = None  # classification: keep only these labels, in this order
    prompt: str | None = None  # generative classification template with {text}
    max_train: int | None = None  # subsample sizes: stratified (classification) / the first n of the shuffled split
    max_eval: int | None = None  # at most this many eval examples (null: the whole eval split)
    packing: bool = False  # join examples into rows of max_length tokens (text, chat, label-word classification)
    # classification: None = a head for encoders, label words for causal LMs; a fresh head trains fully whatever
    # the method (next to its own delta)
    head: bool | None = None
    chat_template: str | None = None  # chat, preference, prompts: a Jinja template, or a .jinja file, used instead of the tokenizer's
    max_target_length: int | None = None  # seq2seq: target tokens per example, longer ones cut (null: data.max_length)
    max_new_tokens: int | None = None  # seq2seq evaluation: the most tokens greedy generation makes per example (null: 32)
    weight: float = 1.0  # in a list of data sets: this part gives weight x its training examples
    mix: list[Any] | None = None  # several data sets in one run: a list of data sections (a YAML list under data:)
    # several classification tasks in one run, one head each and one shared delta (a task-conditioned method generates
    # each task's adapters from it): a list of data sections (docs/polyhistor.md)
    multitask: list[Any] | None = None
    # data steps on the training part, after the split and before max_train, in this order (docs/data.md); each a
    # mapping {method: ..., options}, its result cached by its manifest's key
    select: dict[str, Any] | None = None  # a subset chosen for a target: {method: gotd, budget: 0.1, target: t.jsonl}
    prune: dict[str, Any] | None = None  # a small subset that keeps what training needs: {method: dealrec, budget: 0.02}
    curate: dict[str, Any] | None = None  # an SFT set made by a generator + verifier: {method: dart, strategy: prop2diff}
    augment: dict[str, Any] | None = None  # label-keeping variants of every row: {method: eda, num_aug: 4}

    def __post_init__(self) -> None:
        if self.multitask is not None:
            from deltatune.data.multitask import resolve_parts  # it builds on this module

            self.multitask = resolve_parts(self)
        if self.mix is not None:
            self._resolve_mix()
        if self.task not in TASKS:
            raise DeltatuneError(f"unknown task {self.task!r}; set data.task to one of {', '.join(TASKS)}")
        if self.name is not None and self.path is not None:
            raise DeltatuneError(self._source_problem())
        if self.name is not None and self.name not in data.SHIPPED:
            raise DeltatuneError(
                f"unknown data set {self.name!r}; shipped data sets are: {', '.join(data.names())} "
                "(set data.path for a local file)"
            )
        if self.name is not None:
            self._check_shipped_kind()
        if self.name is not None and self.task == "prompts":
            raise DeltatuneError(
                f"the shipped data set {self.name!r} holds labelled texts, not prompts; for task 'prompts' (GRPO) "
                "set data.path to a file with rows {prompt, ...} (the other columns reach the reward functions)"
            )
        if self.name is not None and self.task == "seq2seq":
            raise DeltatuneError(
                f"the shipped data set {self.name!r} holds labelled texts, not source/target pairs; for task 'seq2seq' "
                "set data.path to a file with rows {source, target}"
            )
        if self.name is not None and self.task in ("chat", "edit"):
            rows = "chat (messages, ShareGPT, Alpaca or prompt/completion)" if self.task == "chat" else "prompt/target"
            raise DeltatuneError(
                f"the shipped data set {self.name!r} holds labelled texts, not {self.task} data; for task "
                f"{self.task!r} set data.path to a file with {rows} rows"
            )
        if isinstance(self.weight, bool) or not isinstance(self.weight, int | float) or not (
            math.isfinite(self.weight) and self.weight > 0
        ):
            raise DeltatuneError(f"data.weight={self.weight!r} must be a positive number (1.0: every example once)")
        self.weight = float(self.weight)  # `weight: 2` in YAML: the same config as 2.0 (a resumed run compares them)
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise DeltatuneError(f"data.max_length={self.max_length!r} must be an integer of at least 2")
        if not 0.0 < self.eval_fraction < 1.0:
            raise DeltatuneError(f"data.eval_fraction={self.eval_fraction} must be between 0 and 1 (exclusive)")
        for key in ("max_train", "max_eval"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DeltatuneError(f"data.{key}={value!r} must be a positive integer or null (all)")
        for key in SEQ2SEQ_ONLY:
            value = getattr(self, key)
            if value is None:
                continue
            if self.task != "seq2seq":
                raise DeltatuneError(f"data.{key} applies to task 'seq2seq' only; remove it for task {self.task!r}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DeltatuneError(f"data.{key}={value!r} must be a positive integer or null (the default)")
        classification_only = {"labels": self.labels is not None, "prompt": self.prompt is not None,
                               "head": self.head is not None}
        for key, given in classification_only.items():
            if given and key != "head" and self.pairs_from_labels:
                continue  # preference pairs built from a labelled set: its labels and prompt
            if given and key == "labels" and self.task in MEDIA_TASKS:
                continue  # the classes to keep, in this order
            if given and self.task != "classification":
                also = " (and to task 'preference' on a labelled data set)" if key != "head" else ""
                raise DeltatuneError(f"data.{key} applies to task 'classification' only{also}; remove it for task "
                                     f"{self.task!r}")
        if self.chat_template is not None and self.task not in ("chat", "preference", "prompts"):
            raise DeltatuneError(f"data.chat_template applies to task 'chat' only (and to the chat rows of tasks "
                                 f"'preference' and 'prompts'); remove it for task {self.task!r}")
        if self.chat_template is not None and (not isinstance(self.chat_template, str) or not self.chat_template.strip()):
            raise DeltatuneError(
                f"data.chat_template={self.chat_template!r} must be a Jinja template or the path of a .jinja file"
            )
        for step in STEP_KEYS:
            if getattr(self, step) is not None:
                from deltatune.data.steps import check_inline

                check_inline(step, getattr(self, step))
                if self.task == "edit":
                    raise DeltatuneError(f"data.{step} does not apply to task 'edit' (every edit trains); remove it")
                if self.task == "preference":
                    raise DeltatuneError(f"data.{step} does not apply to task 'preference' (the steps keep single "
                                         "examples, not pairs); remove it")
                if self.task == "prompts":
                    raise DeltatuneError(f"data.{step} does not apply to task 'prompts' (the steps keep labelled "
                                         "examples, not prompts for sampling); remove it")
                if self.task == "seq2seq":
                    raise DeltatuneError(f"data.{step} does not apply to task 'seq2seq' (the steps keep labelled "
                                         "texts, not source/target pairs); remove it")
                if self.task in MEDIA_TASKS:
                    raise DeltatuneError(f"data.{step} does not apply to task {self.task!r} (the steps keep labelled "
                                         "texts, not images or audio); remove it")
        if self.packing and self.task in ("edit", "preference", "prompts", "seq2seq", *MEDIA_TASKS):
            what = {"edit": "one edit per row", "preference": "a chosen and a rejected sequence per pair",
                    "prompts": "each prompt is sampled on its own",
                    "seq2seq": "the encoder reads one source per row", "image-classification": "one image per row",
                    "audio-classification": "one clip per row"}[self.task]
            raise DeltatuneError(f"data.packing does not apply to task {self.task!r} ({what}); remove it")
        if self.packing and self.task == "classification" and self.head is True:
            raise DeltatuneError(_HEAD_PACKING)
        if self.labels is not None:
            self.labels = [data.label_name(x) for x in self.labels]
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
                raise DeltatuneError(f"data.labels={self.labels} must list at least two distinct labels")
        if self.prompt is not None and self.prompt.count("{text}") != 1:
            raise DeltatuneError(
                f"data.prompt={self.prompt!r} must contain {{text}} exactly once, where the text goes, "
                f"e.g. {DEFAULT_PROMPT!r}"
            )

    def _check_shipped_kind(self) -> None:
        """A shipped set of images or audio goes with its task only, and a text set with the text tasks."""
        from deltatune.data.sets import KIND_TASKS

        kind = data.SHIPPED[str(self.name)].kind
        if kind != "text" and self.task != KIND_TASKS[kind]:
            raise DeltatuneError(f"the shipped data set {self.name!r} holds {kind}s; set data.task: {KIND_TASKS[kind]}")
        if kind == "text" and self.task in MEDIA_TASKS:
            media = [n for n, item in data.SHIPPED.items() if KIND_TASKS[item.kind] == self.task]
            raise DeltatuneError(f"the shipped data set {self.name!r} holds texts; task {self.task!r} reads "
                                 f"{', '.join(media)} or data.path (a folder of class folders, .npz or .parquet)")

    def _resolve_mix(self) -> None:
        """Build the parts, give each the shared keys, check they agree, and take them at the top level."""
        if not isinstance(self.mix, list) or not self.mix:
            raise DeltatuneError(f"data.mix={self.mix!r} must be a non-empty list of data sections")
        if self.name is not None or self.path is not None:
            raise DeltatuneError(
                "a list of data sets names its sources in its parts; set data[i].path or data[i].name in each part "
                "and not beside the list"
            )
        if self.weight != 1.0:
            raise DeltatuneError("data.weight belongs in a part of the list (data[i].weight), not beside it")
        defaults = DataConfig.__dataclass_fields__
        # what each source sets: the keys a mapping names; a DataConfig's values that are not the default
        top = {k: getattr(self, k) for k in SHARED if getattr(self, k) != defaults[k].default}
        given: list[dict[str, Any]] = []
        for i, item in enumerate(self.mix):
            if isinstance(item, DataConfig):
                if item.mix is not None:
                    raise DeltatuneError(f"data[{i}] is itself a list of data sets; list every part at one level")
                given.append({k: getattr(item, k) for k in SHARED if getattr(item, k) != defaults[k].default})
            elif isinstance(item, dict):
                if item.get("mix") is not None:
                    raise DeltatuneError(f"data[{i}] is itself a list of data sets; list every part at one level")
                given.append({k: item[k] for k in SHARED if k in item})
            else:
                raise DeltatuneError(f"data[{i}]={item!r} must be a data section (a mapping with path or name, ...)")
        shared = dict(top)
        where = {k: "data" for k in top}
        for i, values in enumerate(given):
            for key, value in values.items():
                if key in shared and shared[key] != value:
                    raise DeltatuneError(
                        f"{where[key]}.{key}={shared[key]!r} and data[{i}].{key}={value!r} differ; {key} applies to "
                        f"the whole run, so set it once (in one part) or the same in every part"
                    )
                shared.setdefault(key, value)
                where.setdefault(key, f"data[{i}]")
        self.mix = [self._part(i, item, shared) for i, item in enumerate(self.mix)]
        for key in SHARED:
            setattr(self, key, getattr(self.mix[0], key))

    @staticmethod
    def _part(i: int, item: DataConfig | dict, shared: dict[str, Any]) -> DataConfig:
        try:
            if isinstance(item, DataConfig):
                return dataclasses.replace(item, **shared)
            return DataConfig(**{**shared, **item})
        except TypeError as e:  # an unknown key
            names = [f.name for f in dataclasses.fields(DataConfig)]
            unknown = [k for k in item if k not in names] if isinstance(item, dict) else []
            raise DeltatuneError(
                f"data[{i}]: unknown key {unknown[0] if unknown else e!r}; a part takes the keys of a data section "
                f"({', '.join(n for n in names if n != 'mix')})"
            ) from e
        except DeltatuneError as e:
            raise DeltatuneError(part_message(str(e), i)) from e

    def parts(self) -> list[DataConfig]:
        """The data sets of the run: the parts of a mix, else this section alone."""
        if self.multitask is not None:
            return list(self.multitask)
        return list(self.mix) if self.mix is not None else [self]

    def paths(self) -> list[str]:
        """Every local file or folder the run reads (what a run's output must not replace)."""
        return [p.path for p in self.parts() if p.path is not None]

    @staticmethod
    def _source_problem() -> str:
        return (
            f"set exactly one of data.name (a shipped data set: {', '.join(data.names())}) and data.path "
            f"(a {', '.join(data.FILE_TYPES)} file or a datasets save_to_disk folder)"
        )

    def problems(self) -> list[str]:
        """What is still missing (bad values already raise on construction, so DataConfig() itself works)."""
        if self.mix is not None:
            return [part_message(p, i) for i, part in enumerate(self.mix) for p in part._missing()]
        if self.multitask is not None:
            return [f"data.multitask[{i}]: {p}" for i, part in enumerate(self.multitask) for p in part._missing()]
        out = self._missing()
        if self.weight != 1.0:  # a part is a DataConfig too, so only the top level can tell that it is not one
            out.append(f"data.weight={self.weight!r} applies to a part of a list of data sets only; remove it, or "
                       "list several data sets under data:")
        return out

    def _missing(self) -> list[str]:
        return [self._source_problem()] if self.name is None and self.path is None else []

    def check(self) -> None:
        """Raise the first of problems(), if any."""
        for problem in self.problems():
            raise DeltatuneError(problem)

    @property
    def pairs_from_labels(self) -> bool:
        """Task 'preference' on labelled data, whose pairs are built from the labels: a shipped set (``name``), or a
        labelled file (text, label) whose ``labels`` are given, as the dev pools of the learning-rate searches are."""
        return self.task == "preference" and (self.name is not None or self.labels is not None)

    def resolved_prompt(self) -> str:
        """The label-word prompt: data.prompt, else the shipped set's own, else the default (a mix: its first part's)."""
        first = self.parts()[0]
        return self.prompt or SHIPPED_PROMPTS.get(first.name or "", DEFAULT_PROMPT)

    def resolved_chat_template(self) -> str | None:
        """data.chat_template's text: the value itself, or the contents of the .jinja file it names."""
        value = self.chat_template
        if value is None or not value.strip().endswith(".jinja") or "{" in value:
            return value
        path = Path(value.strip()).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except OSError as e:
            raise DeltatuneError(
                f"data.chat_template={value!r} names a .jinja file that cannot be read ({e.strerror}); give an "
                "existing file or the Jinja template itself"
            ) from e


_HEAD_PACKING = (
    "data.packing cannot pack examples for a classification head (one label per sequence); set data.packing: "
    "false, or score label words with a causal LM (data.head: false)"
)


def head_packing_error() -> DeltatuneError:
    return DeltatuneError(_HEAD_PACKING)


@functools.cache
def _key_pattern() -> re.Pattern[str]:
    """``data.<key>`` for every key, not inside a file name (``/x/data.path``, ``mydata.text``)."""
    keys = "|".join(f.name for f in dataclasses.fields(DataConfig))
    return re.compile(rf"(?<![\w/.\\-])data\.({keys})\b")


def part_message(message: str, i: int) -> str:
    """A part's message with its keys named ``data[i].<key>`` (and the part named when no key is)."""
    renamed = _key_pattern().sub(lambda m: f"data[{i}].{m.group(1)}", message)
    return renamed if renamed != message else f"data[{i}]: {message}"
