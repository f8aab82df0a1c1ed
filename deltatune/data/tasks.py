"""Data formats for training: what a batch looks like and what the loss is, per kind of task.

``DataConfig`` names the data (a shipped set or a local file) and the format; ``model_request`` says how
to load the model for it (a fresh classification head or not); ``build_task`` reads, splits, subsamples
and tokenizes the data into a ``Task`` whose ``collate`` / ``loss`` / ``evaluate`` the training loop uses.

Formats (``Task.kind``):

- ``text``: causal LM on raw text, the loss on every real token; ``packing`` concatenates the documents
  with EOS between them and cuts full ``max_length`` blocks (no padding).
- ``chat``: conversations rendered with the tokenizer's chat template, the loss on assistant tokens only
  (the assistant's text and its end-of-turn token).
- ``classification-head``: a sequence-classification model (e.g. an encoder loaded with
  ``task="classification", num_labels=n``), cross-entropy over its logits.
- ``classification-generative``: a causal LM reads ``prompt`` and the class scores are the logits of the
  label words' first tokens at the last prompt position; batches are left-padded with explicit position
  ids, so each example sees the positions it would see alone.
- ``edit``: model editing requests ``{"prompt", "target"}`` (``target_new`` is read too): the target gets a
  leading space if it has none and the EOS token after it; prompt and target are tokenized separately and
  concatenated (joint tokenization can merge tokens across the boundary and shift the target), batches are
  left-padded with an existing token, and the loss is the mean NLL of each edit's target tokens (+EOS),
  averaged over the edits. Editing has no held-out part: training uses every edit (up to ``max_train``) and
  evaluation reports ``edit_success`` on the same edits (up to ``max_eval``).

Splits and subsamples are deterministic from ``seed`` (stratified for classification).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from deltatune import data
from deltatune.errors import DeltatuneError

log = logging.getLogger(__name__)

TASKS = ("text", "chat", "classification", "edit")
KINDS = ("text", "chat", "classification-head", "classification-generative", "edit")
DEFAULT_PROMPT = "Text: {text}\nLabel:"
SHIPPED_PROMPTS = {"tweets": "Tweet: {text}\nSentiment:"}
IGNORE_INDEX = -100
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class DataConfig:
    """The ``data`` section of a run config (keys are named ``data.<key>`` in errors)."""

    name: str | None = None  # shipped data set: "tweets", "bbc"
    path: str | None = None  # local file: .jsonl, .json, .csv, .tsv, .parquet, or a datasets save_to_disk folder
    task: str = "classification"  # "text" | "chat" | "classification" | "edit"
    max_length: int = 128
    eval_fraction: float = 0.1
    seed: int = 0  # the split and subsample seed
    text_field: str = "text"
    label_field: str = "label"
    messages_field: str = "messages"  # chat: a list of {"role", "content"}; rows may have "prompt"/"response" instead
    labels: list[str] | None = None  # classification: keep only these labels, in this order
    prompt: str | None = None  # generative classification template with {text}
    max_train: int | None = None  # subsample sizes: stratified (classification) / the first n of the shuffled split
    max_eval: int | None = None
    packing: bool = False  # text: concatenate documents and cut into max_length blocks
    head: bool | None = None  # classification: None = a head for encoders, label words for causal LMs

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DeltatuneError(f"unknown task {self.task!r}; set data.task to one of {', '.join(TASKS)}")
        if self.name is not None and self.path is not None:
            raise DeltatuneError(self._source_problem())
        if self.name is not None and self.name not in data.SHIPPED:
            raise DeltatuneError(
                f"unknown data set {self.name!r}; shipped data sets are: {', '.join(data.names())} "
                "(set data.path for a local file)"
            )
        if self.name is not None and self.task in ("chat", "edit"):
            rows = "messages (or prompt/response)" if self.task == "chat" else "prompt/target"
            raise DeltatuneError(
                f"the shipped data set {self.name!r} holds labelled texts, not {self.task} data; for task "
                f"{self.task!r} set data.path to a file with {rows} rows"
            )
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise DeltatuneError(f"data.max_length={self.max_length!r} must be an integer of at least 2")
        if not 0.0 < self.eval_fraction < 1.0:
            raise DeltatuneError(f"data.eval_fraction={self.eval_fraction} must be between 0 and 1 (exclusive)")
        for key in ("max_train", "max_eval"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DeltatuneError(f"data.{key}={value!r} must be a positive integer or null (all)")
        classification_only = {"labels": self.labels is not None, "prompt": self.prompt is not None,
                               "head": self.head is not None}
        for key, given in classification_only.items():
            if given and self.task != "classification":
                raise DeltatuneError(f"data.{key} applies to task 'classification' only; remove it for task {self.task!r}")
        if self.packing and self.task != "text":
            raise DeltatuneError(f"data.packing applies to task 'text' only; remove it for task {self.task!r}")
        if self.labels is not None:
            self.labels = [data.label_name(x) for x in self.labels]
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
                raise DeltatuneError(f"data.labels={self.labels} must list at least two distinct labels")
        if self.prompt is not None and self.prompt.count("{text}") != 1:
            raise DeltatuneError(
                f"data.prompt={self.prompt!r} must contain {{text}} exactly once, where the text goes, "
                f"e.g. {DEFAULT_PROMPT!r}"
            )

    @staticmethod
    def _source_problem() -> str:
        return (
            f"set exactly one of data.name (a shipped data set: {', '.join(data.names())}) and data.path "
            f"(a {', '.join(data.FILE_TYPES)} file or a datasets save_to_disk folder)"
        )

    def problems(self) -> list[str]:
        """What is still missing (bad values already raise on construction, so DataConfig() itself works)."""
        return [self._source_problem()] if self.name is None and self.path is None else []

    def check(self) -> None:
        """Raise the first of problems(), if any."""
        for problem in self.problems():
            raise DeltatuneError(problem)

    def resolved_prompt(self) -> str:
        return self.prompt or SHIPPED_PROMPTS.get(self.name or "", DEFAULT_PROMPT)


# ---------------------------------------------------------------- models


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a Tuned, DDP / DataParallel or torch.compile wrapper."""
    from deltatune.core.tuned import Tuned

    for _ in range(8):
        if isinstance(model, Tuned):
            model = model.model
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def _is_causal(model: torch.nn.Module) -> bool:
    from deltatune.data.models import CAUSAL_SUFFIXES

    return type(model).__name__.endswith(CAUSAL_SUFFIXES)


def _has_head(model: torch.nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


@functools.lru_cache(maxsize=64)
def _accepts(cls: type, name: str) -> bool:
    try:
        return name in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def model_request(cfg: DataConfig, model_name: str) -> dict[str, Any]:
    """Keyword arguments for ``deltatune.data.models.load(model_name, ...)`` so the model fits this data:
    ``{"task": "classification", "num_labels": n}`` when a classification head is used, else ``{}``."""
    cfg.check()
    from deltatune.data import models

    causal = models.natural_task(model_name) == "causal_lm"
    if cfg.task != "classification":
        if not causal:
            raise DeltatuneError(
                f"task {cfg.task!r} trains a causal language model, but {model_name!r} is not one; use a causal "
                "LM such as smollm2-135m, or set data.task to 'classification'"
            )
        return {}
    head = cfg.head if cfg.head is not None else not causal
    if not head:
        if not causal:
            raise DeltatuneError(
                f"data.head=false scores label words with a causal LM, but {model_name!r} is an encoder; "
                "set data.head to true (or leave it unset) to train a classification head"
            )
        return {}
    return {"task": "classification", "num_labels": len(_classification_data(cfg).label_names)}


# ---------------------------------------------------------------- loading and splitting


def _stamp(path: str) -> tuple[int, int]:
    try:
        st = Path(path).expanduser().stat()
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, stamp: tuple[int, int]) -> data.Records:
    return data.read_records(path)


def _records(cfg: DataConfig) -> data.Records:
    assert cfg.path is not None
    return _read_cached(cfg.path, _stamp(cfg.path))


@functools.lru_cache(maxsize=4)
def _labelled_cached(
    name: str | None, path: str | None, stamp: tuple[int, int], text_field: str, label_field: str,
    labels: tuple[str, ...] | None,
) -> data.TextDataset:
    if name is not None:
        ds = data.load(name)
        return ds.keep_labels(list(labels)) if labels is not None else ds
    assert path is not None
    return data.labelled(
        _read_cached(path, stamp), text_field=text_field, label_field=label_field,
        labels=list(labels) if labels is not None else None, name=Path(path).name,
    )


def _classification_data(cfg: DataConfig) -> data.TextDataset:
    """The labelled data, filtered to data.labels; cached, so model_request + build_task read it once."""
    labels = tuple(cfg.labels) if cfg.labels is not None else None
    stamp = _stamp(cfg.path) if cfg.path is not None else (0, 0)
    return _labelled_cached(cfg.name, cfg.path, stamp, cfg.text_field, cfg.label_field, labels)


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices of a shuffle split, the same for the same seed on any machine."""
    k = int(n * eval_fraction + 0.5)
    if not 0 < k < n:
        raise DeltatuneError(
            f"data.eval_fraction={eval_fraction} of {n} rows leaves an empty train or eval part; "
            "use a fraction nearer 0.5 or more data"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[k:], order[:k]


def _cut(items: list, n: int | None) -> list:
    return items if n is None else items[:n]


# ---------------------------------------------------------------- batching helpers


def _pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _split_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    device = _device_of(model)
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return inputs, batch["labels"].to(device)


def right_pad(sequences: list[list[int]], pad_id: int, labels: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded input ids and attention mask; with ``labels``, those too, padded with -100."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
        if labels is not None:
            out["labels"][i, : len(s)] = torch.tensor(labels[i], dtype=torch.long)
    return out


def left_pad(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded input ids, attention mask and position ids (0 at each sequence's first real token).

    Llama-style models take positions from position_ids, not from the mask, so without them a padded
    example would see other positions than it sees alone."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


class _Modes:
    """Remember every submodule's train/eval flag and put them back (evaluate must not change them)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.modes = [(m, m.training) for m in model.modules()]

    def restore(self) -> None:
        for m, training in self.modes:
            m.training = training


# ---------------------------------------------------------------- tasks


class Task:
    """Tokenized train/eval features plus how to batch them, compute the loss and evaluate."""

    kind: str = ""

    def __init__(self, cfg: DataConfig, tokenizer: Any, train: list[dict], eval: list[dict],
                 label_names: list[str] | None = None) -> None:
        if not train or not eval:
            part = "train" if not train else "eval"
            raise DeltatuneError(
                f"the {part} part of the data is empty after tokenizing; use more data, a larger "
                "data.max_length or a larger data.eval_fraction"
            )
        self.config = cfg
        self.tokenizer = tokenizer
        self.train = train
        self.eval = eval
        self.label_names = label_names
        self.pad_id = _pad_id(tokenizer)

    def __repr__(self) -> str:
        labels = f", labels={self.label_names}" if self.label_names else ""
        return f"{type(self).__name__}(kind={self.kind!r}, train={len(self.train)}, eval={len(self.eval)}{labels})"

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """The mean loss of the batch (differentiable) and the number of non-pad tokens in it."""
        raise NotImplementedError

    def _evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, float]:
        raise NotImplementedError

    def _eval_batches(self, batch_size: int) -> list[list[dict]]:
        """The eval features in batches of similar length (less padding; the metrics do not depend on order)."""
        order = sorted(range(len(self.eval)), key=lambda i: len(self.eval[i]["input_ids"]))
        return [[self.eval[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]

    def evaluate(self, model: torch.nn.Module, batch_size: int = 16) -> dict[str, float]:
        """Metrics over the eval part without gradients: "loss", plus "perplexity" (text, chat) or "accuracy"
        (classification). The model's train/eval modes are the same afterwards."""
        if batch_size < 1:
            raise DeltatuneError(f"evaluation batch_size={batch_size} must be at least 1")
        modes = _Modes(model)
        model.eval()
        try:
            with torch.no_grad():
                return self._evaluate(model, batch_size)
        finally:
            modes.restore()


class _CausalLMTask(Task):
    """Next-token loss on the label positions (-100 elsewhere), mean over the target tokens."""

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [f["input_ids"] for f in features]
        return right_pad(seqs, self.pad_id, [f.get("labels", f["input_ids"]) for f in features])

    def _sums(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = _split_batch(model, batch)
        logits = model(**inputs, use_cache=False).logits
        # shift the targets, not the logits: slicing the (batch, seq, vocab) logits copies them, and its
        # backward allocates and fills a second full-size buffer (profiled in docs/benchmarks.md)
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
        total = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum",
        )
        return total, (targets != IGNORE_INDEX).sum()

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        total, count = self._sums(model, batch)
        return total / count.clamp(min=1), int(batch["attention_mask"].sum())

    def _evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, float]:
        total, count = 0.0, 0
        for features in self._eval_batches(batch_size):
            s, n = self._sums(model, self.collate(features))
            total += float(s)
            count += int(n)
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}


class TextTask(_CausalLMTask):
    kind = "text"


class ChatTask(_CausalLMTask):
    kind = "chat"


class EditTask(Task):
    """Model editing: left-padded (prompt, target + EOS) pairs, the loss on the target tokens only.

    Features hold ``input_ids`` and ``labels`` (the ids on target tokens, -100 on the prompt). The loss is
    LocFT-BF's: each edit's mean token NLL over its target, then the mean over the edits, so a long target
    does not outweigh a short one."""

    kind = "edit"

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = left_pad([f["input_ids"] for f in features], self.pad_id)
        width = batch["input_ids"].shape[1]
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for i, f in enumerate(features):
            labels[i, width - len(f["labels"]):] = torch.tensor(f["labels"], dtype=torch.long)
        batch["labels"] = labels
        return batch

    def _per_edit(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per edit: mean target NLL, whether every target token is the argmax (EOS left out), and the
        share of target tokens that are (teacher forcing)."""
        inputs, labels = _split_batch(model, batch)
        logits = model(**inputs, use_cache=False).logits
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # position t predicts token t + 1
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                              reduction="none").view_as(targets)
        mask = targets != IGNORE_INDEX
        count = mask.sum(-1).clamp(min=1)
        mean_nll = (nll * mask).sum(-1) / count
        answer = mask.clone()  # the target's own tokens: the last target position predicts EOS
        answer[torch.arange(len(answer)), (mask.cumsum(-1) * mask).argmax(-1)] = False
        hit = (logits.argmax(-1) == targets) | ~answer
        n_answer = answer.sum(-1).clamp(min=1)
        return mean_nll, hit.all(-1), ((hit & answer).sum(-1) / n_answer)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        mean_nll, _, _ = self._per_edit(model, batch)
        return mean_nll.mean(), int(batch["attention_mask"].sum())

    def _evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, float]:
        nll, success, accuracy = 0.0, 0, 0.0
        for features in self._eval_batches(batch_size):
            n, ok, acc = self._per_edit(model, self.collate(features))
            nll += float(n.sum())
            success += int(ok.sum())
            accuracy += float(acc.sum())
        count = len(self.eval)
        return {"loss": nll / count, "edit_success": success / count, "token_accuracy": accuracy / count}


class HeadClassificationTask(Task):
    """A sequence-classification model: cross-entropy over its logits, right padding."""

    kind = "classification-head"

    pad = staticmethod(right_pad)  # a head reads the first token / pools: pad on the right

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.pad([f["input_ids"] for f in features], self.pad_id)
        batch["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
        return batch

    def scores(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class scores (batch, num_labels), float32."""
        inputs, _ = _split_batch(model, batch)
        return model(**inputs).logits.float()

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        scores = self.scores(model, batch)
        return F.cross_entropy(scores, batch["labels"].to(scores.device)), int(batch["attention_mask"].sum())

    def _evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, float]:
        total, correct, count = 0.0, 0, 0
        for features in self._eval_batches(batch_size):
            batch = self.collate(features)
            scores = self.scores(model, batch)
            y = batch["labels"].to(scores.device)
            total += float(F.cross_entropy(scores, y, reduction="sum"))
            correct += int((scores.argmax(-1) == y).sum())
            count += len(features)
        return {"loss": total / count, "accuracy": correct / count}


class GenerativeClassificationTask(HeadClassificationTask):
    """A causal LM scores the label words' first tokens at the last prompt position; left padding."""

    kind = "classification-generative"

    def __init__(self, cfg: DataConfig, tokenizer: Any, train: list[dict], eval: list[dict],
                 label_names: list[str], encoder: PromptEncoder) -> None:
        super().__init__(cfg, tokenizer, train, eval, label_names)
        self.encoder = encoder
        self.prompt = encoder.prompt
        self.label_words = encoder.label_words
        self.label_token_ids = encoder.label_token_ids

    pad = staticmethod(left_pad)  # label words are scored at the last position: pad on the left

    def scores(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs, _ = _split_batch(model, batch)
        extra: dict[str, Any] = {"use_cache": False}
        if _accepts(type(_unwrap(model)), "logits_to_keep"):
            extra["logits_to_keep"] = 1  # the vocabulary-wide head runs on the last position only
        logits = model(**inputs, **extra).logits[:, -1, :]
        return logits.index_select(-1, self.label_token_ids.to(logits.device)).float()


# ---------------------------------------------------------------- encoding


def _bos(tokenizer: Any) -> list[int]:
    """[BOS] if the tokenizer puts one before a text by itself (Llama-2 style), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and plain[:1] != [bos] else []


class PromptEncoder:
    """Prompt building for generative classification: the text is truncated, never the prompt around it.

    The text's leading space goes with the text (as in the joint string) and the text is put on one line,
    so a newline in it cannot fake a new field of the prompt. The class scores are the logits of each
    label word's first token as it is tokenized right after the prompt (" negative" after "Sentiment:").
    Leading tokens that all label words share are moved into the prompt: SmolLM2 splits " 0" and " 1"
    into "Ġ" + digit, so the prompt ends in "Ġ" and the digits are scored. That shared part is the same
    for every class, so comparing the next-token scores still compares the classes.
    """

    def __init__(self, tokenizer: Any, prompt: str, label_names: list[str], max_length: int) -> None:
        self.prompt = prompt

        def ids(s: str) -> list[int]:
            return list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []

        self.ids = ids
        head, tail = prompt.split("{text}")
        self.space = " " if head.endswith(" ") else ""
        self.head = _bos(tokenizer) + ids(head.removesuffix(" "))
        tail_ids = ids(tail)
        sep = "" if prompt[-1:].isspace() else " "
        self.label_words = [sep + name for name in label_names]
        words = []  # each label word's tokens as they follow the prompt
        for word in self.label_words:
            joint = ids(tail + word)
            words.append(joint[len(tail_ids):] if joint[: len(tail_ids)] == tail_ids else ids(word))
        shared: list[int] = []  # leading tokens all label words share (" 0", " 1": "Ġ") go into the prompt
        while all(len(w) > len(shared) for w in words) and len({w[len(shared)] for w in words}) == 1:
            shared.append(words[0][len(shared)])
        self.tail = tail_ids + shared
        fixed = len(self.head) + len(self.tail)
        self.budget = max_length - fixed
        if self.budget < 1:
            raise DeltatuneError(
                f"data.max_length={max_length} leaves no room for the text: the prompt alone takes {fixed} "
                f"tokens; use data.max_length >= {fixed + 8} or a shorter data.prompt"
            )
        seen: dict[int, str] = {}
        firsts = []
        for word, tokens in zip(self.label_words, words, strict=True):
            if len(tokens) <= len(shared):
                raise DeltatuneError(
                    f"the label word {word!r} is where the other label words only begin, so it has no token of its "
                    "own to score; rename the labels in the data, or train a classification head (data.head: true)"
                )
            first = tokens[len(shared)]
            if first in seen:
                token = tokenizer.convert_ids_to_tokens(first)
                raise DeltatuneError(
                    f"the label words {seen[first]!r} and {word!r} start with the same token {token!r}, so their "
                    "scores cannot tell the classes apart; rename the labels in the data so each starts with a "
                    "word of its own, or train a classification head (data.head: true)"
                )
            seen[first] = word
            firsts.append(first)
        self.label_token_ids = torch.tensor(firsts, dtype=torch.long)

    def encode(self, text: str) -> list[int]:
        text = self.space + " ".join(str(text).split())
        return self.head + self.ids(text)[: self.budget] + self.tail


def encode_edit(tokenizer: Any, prompt: str, target: str, max_length: int) -> dict[str, list[int]] | None:
    """Ids and labels of one edit: [BOS] + prompt, then " target" + EOS, each tokenized on its own (joint
    tokenization may merge across the boundary). A prompt too long loses its start; None when the target
    alone does not fit."""
    if not target.startswith(" "):
        target = " " + target
    answer = list(tokenizer(target, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    context = _bos(tokenizer) + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    room = max_length - len(answer)
    if room < 1:
        return None
    context = context[-room:]
    return {"input_ids": context + answer, "labels": answer}


def _edits(records: data.Records) -> list[tuple[str, str]]:
    out = []
    for i, row in enumerate(records.rows):
        prompt, target = row.get("prompt"), row.get("target", row.get("target_new"))
        if not isinstance(prompt, str) or not isinstance(target, str) or not prompt or not target.strip():
            raise DeltatuneError(
                f"row {i + 1} of {records.source} is not an edit: task 'edit' needs a non-empty text in the fields "
                f"'prompt' and 'target' (or 'target_new'); its fields: {', '.join(map(str, row)) or 'none'}"
            )
        out.append((prompt, target))
    return out


def _build_edit(cfg: DataConfig, tokenizer: Any) -> EditTask:
    if tokenizer.eos_token_id is None:
        raise DeltatuneError("task 'edit' appends the EOS token to every target, but the tokenizer has none; "
                             "set tokenizer.eos_token")
    edits = _edits(_records(cfg))
    features = []
    for prompt, target in edits:
        f = encode_edit(tokenizer, prompt, target, cfg.max_length)
        if f is not None:
            features.append(f)
    if len(features) < len(edits):
        log.warning("dropped %d of %d edits whose target does not fit in data.max_length=%d tokens",
                    len(edits) - len(features), len(edits), cfg.max_length)
    # editing fits the edits themselves: every edit trains, and edit success is measured on them
    return EditTask(cfg, tokenizer, _cut(features, cfg.max_train), _cut(features, cfg.max_eval))


def _check_template(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise DeltatuneError(
            "task 'chat' renders conversations with the tokenizer's chat template, but this tokenizer has none; "
            "set tokenizer.chat_template (a Jinja template) or use task 'text'"
        )
    return template


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool, row: int) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raises its own errors (e.g. "roles must alternate")
        raise DeltatuneError(f"the chat template cannot render conversation {row + 1}: {e}; fix that row") from e


def encode_chat(tokenizer: Any, messages: list[dict], row: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and its labels: the ids on assistant tokens, -100 elsewhere.

    A template with {% generation %} markers says itself which tokens are the assistant's. Otherwise the
    assistant spans are found by rendering prefixes: the conversation up to each assistant turn with the
    generation prompt (where the turn starts) and including the turn (where it ends; trailing whitespace
    after the end-of-turn token is left out)."""
    template = _check_template(tokenizer)
    if _GENERATION_TAG.search(template):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(out["input_ids"])
        return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"], strict=True)]
    full = _render(tokenizer, messages, False, row)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], True, row) if i else ""
        end = _render(tokenizer, messages[: i + 1], False, row)
        if not (full.startswith(start) and full.startswith(end) and end.startswith(start)):
            raise DeltatuneError(
                f"the chat template renders the start of conversation {row + 1} differently from the whole "
                "conversation (it rewrites earlier turns), so the assistant tokens cannot be found by rendering "
                "prefixes; add {% generation %} ... {% endgeneration %} around the assistant content in "
                "tokenizer.chat_template"
            )
        spans.append((len(start), max(len(start), len(end.rstrip()))))
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        mask = [any(s < b and e > a for a, b in spans) for s, e in offsets]
    except (NotImplementedError, ValueError, TypeError):  # no offsets (slow tokenizer): count prefix tokens
        ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
        mask = [False] * len(ids)
        for a, b in spans:
            lo = len(tokenizer(full[:a], add_special_tokens=False)["input_ids"])
            hi = len(tokenizer(full[:b], add_special_tokens=False)["input_ids"])
            mask[lo:hi] = [True] * (hi - lo)
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]


def _conversations(records: data.Records, cfg: DataConfig) -> list[list[dict]]:
    """Each row's messages: the messages field (a list, or its JSON text in a CSV), else prompt/response."""
    out = []
    for i, row in enumerate(records.rows):
        messages = row.get(cfg.messages_field)
        if messages is None:
            if row.get("prompt") is None or row.get("response") is None:
                raise DeltatuneError(
                    f"row {i + 1} of {records.source} has neither a {cfg.messages_field!r} field (a list of "
                    f"{{role, content}}) nor 'prompt' and 'response' fields (its fields: {', '.join(map(str, row))}); "
                    "set data.messages_field to the field that holds the messages"
                )
            messages = [{"role": "user", "content": str(row["prompt"])},
                        {"role": "assistant", "content": str(row["response"])}]
            if row.get("system"):
                messages.insert(0, {"role": "system", "content": str(row["system"])})
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as e:
                raise DeltatuneError(
                    f"row {i + 1} of {records.source}: field {cfg.messages_field!r} is text but not JSON ({e}); "
                    'write it as a JSON list like [{"role": "user", "content": "..."}, ...]'
                ) from e
        good = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        if not good:
            raise DeltatuneError(
                f"row {i + 1} of {records.source}: field {cfg.messages_field!r} must be a non-empty list of "
                f"{{\"role\": ..., \"content\": <text>}} messages, got {str(messages)[:120]}"
            )
        if not any(m["role"] == "assistant" for m in messages):
            raise DeltatuneError(
                f"row {i + 1} of {records.source} has no assistant message; chat training learns the "
                "assistant's turns, so every conversation needs at least one"
            )
        out.append([dict(m) for m in messages])
    return out


def _texts(cfg: DataConfig) -> list[str]:
    if cfg.name is not None:
        return data.load(cfg.name).texts
    return [str(t) for t in _records(cfg).column(cfg.text_field, "data.text_field", "the text")]


def _encode_text(tokenizer: Any, texts: list[str], cfg: DataConfig) -> list[dict]:
    if not cfg.packing:
        features = []
        for text in texts:
            ids = list(tokenizer(text, truncation=True, max_length=cfg.max_length)["input_ids"])
            if len(ids) >= 2:  # one token has nothing to predict
                features.append({"input_ids": ids})
        if len(features) < len(texts):
            log.warning("dropped %d texts shorter than 2 tokens", len(texts) - len(features))
        return features
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DeltatuneError(
            "data.packing separates documents with the EOS token, but the tokenizer has none; "
            "set tokenizer.eos_token or data.packing: false"
        )
    stream: list[int] = []
    for text in texts:
        stream += list(tokenizer(text, verbose=False)["input_ids"]) + [eos]
    n = cfg.max_length
    return [{"input_ids": stream[s:s + n]} for s in range(0, len(stream) - n + 1, n)]


# ---------------------------------------------------------------- build


def build_task(cfg: DataConfig, tokenizer: Any, model: torch.nn.Module) -> Task:
    """Read, split, subsample and tokenize the data for ``model`` (plain, or wrapped in Tuned)."""
    cfg.check()
    base = _unwrap(model)
    if cfg.task == "classification":
        return _build_classification(cfg, tokenizer, base)
    if not _is_causal(base):
        raise DeltatuneError(
            f"task {cfg.task!r} trains a causal language model, but the model is a {type(base).__name__}; "
            "use a causal LM such as smollm2-135m, or set data.task to 'classification'"
        )
    if cfg.task == "text":
        texts = _texts(cfg)
        train_idx, eval_idx = split_indices(len(texts), cfg.eval_fraction, cfg.seed)
        train_texts = [texts[i] for i in _cut(train_idx, cfg.max_train)]
        eval_texts = [texts[i] for i in _cut(eval_idx, cfg.max_eval)]
        train, eval = _encode_text(tokenizer, train_texts, cfg), _encode_text(tokenizer, eval_texts, cfg)
        if cfg.packing and not (train and eval):
            raise DeltatuneError(
                f"data.packing cuts blocks of data.max_length={cfg.max_length} tokens, but the "
                f"{'train' if not train else 'eval'} part has fewer tokens than that; lower data.max_length, "
                "use more data or set data.packing: false"
            )
        return TextTask(cfg, tokenizer, train, eval)
    if cfg.task == "edit":
        return _build_edit(cfg, tokenizer)
    records = _records(cfg)
    conversations = _conversations(records, cfg)
    _check_template(tokenizer)
    train_idx, eval_idx = split_indices(len(conversations), cfg.eval_fraction, cfg.seed)
    parts = []
    for idx in (_cut(train_idx, cfg.max_train), _cut(eval_idx, cfg.max_eval)):
        features = []
        for i in idx:
            ids, labels = encode_chat(tokenizer, conversations[i], row=i)
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            if any(t != IGNORE_INDEX for t in labels[1:]):
                features.append({"input_ids": ids, "labels": labels})
        if len(features) < len(idx):
            log.warning(
                "dropped %d of %d conversations with no assistant token in the first data.max_length=%d tokens",
                len(idx) - len(features), len(idx), cfg.max_length,
            )
        parts.append(features)
    return ChatTask(cfg, tokenizer, parts[0], parts[1])


def _build_classification(cfg: DataConfig, tokenizer: Any, base: torch.nn.Module) -> Task:
    ds = _classification_data(cfg)
    train, held = ds.split(cfg.eval_fraction, seed=cfg.seed)
    if cfg.max_train is not None and cfg.max_train < len(train):
        train = train.subset(cfg.max_train, seed=cfg.seed)
    if cfg.max_eval is not None and cfg.max_eval < len(held):
        held = held.subset(cfg.max_eval, seed=cfg.seed)
    names = list(ds.label_names)
    causal, has_head = _is_causal(base), _has_head(base)
    head = cfg.head if cfg.head is not None else not causal
    load_hint = (
        f"load it with deltatune.data.models.load(name, **deltatune.data.tasks.model_request(cfg, name)), i.e. "
        f"task='classification', num_labels={len(names)}"
    )
    if head:
        if not has_head:
            raise DeltatuneError(
                f"classification with a head needs a model with one, but this {type(base).__name__} has no head; "
                f"{load_hint}"
            )
        num_labels = getattr(base.config, "num_labels", None)
        if num_labels != len(names):
            raise DeltatuneError(
                f"the model's classification head has {num_labels} outputs but the data has {len(names)} labels "
                f"({', '.join(names)}); {load_hint}"
            )
        if getattr(base.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
            base.config.pad_token_id = tokenizer.pad_token_id  # decoder heads find the last token by it

        def encode(text: str) -> list[int]:
            return list(tokenizer(text, truncation=True, max_length=cfg.max_length)["input_ids"])

        features = [[{"input_ids": encode(t), "label": y} for t, y in zip(part.texts, part.labels, strict=True)]
                    for part in (train, held)]
        return HeadClassificationTask(cfg, tokenizer, features[0], features[1], names)
    if has_head:
        raise DeltatuneError(
            f"data.head=false scores label words, but the model is a {type(base).__name__} with a classification "
            "head; load it without task='classification' or set data.head: true"
        )
    if not causal:
        raise DeltatuneError(
            f"a {type(base).__name__} can neither score label words (that needs a causal LM) nor classify (it has no "
            f"head); {load_hint}"
        )
    encoder = PromptEncoder(tokenizer, cfg.resolved_prompt(), names, cfg.max_length)
    features = [[{"input_ids": encoder.encode(t), "label": y} for t, y in zip(part.texts, part.labels, strict=True)]
                for part in (train, held)]
    return GenerativeClassificationTask(cfg, tokenizer, features[0], features[1], names, encoder)
