"""The ``seq2seq`` task: source -> target pairs for encoder-decoder models (T5, BART, ...).

Rows are ``{source, target}`` (``{input, output}`` and ``{prompt, completion}`` are read too:
``deltatune.data.rows.seq2seq_pairs``) in any file format the other tasks read. Each side is tokenized on its own
with the model's tokenizer and its special tokens, as transformers' seq2seq examples do (``text_target``): the
source cut to ``data.max_length`` tokens, the target to ``data.max_target_length`` (default ``data.max_length``),
the target ending in the EOS token (appended where the tokenizer adds none). Batches are right-padded per batch:
the source with an attention mask, the labels (the target ids) with -100; the decoder's inputs are the labels
shifted right behind the model's ``decoder_start_token_id`` (the model's own
``prepare_decoder_input_ids_from_labels``, what it does itself when given ``labels``). Padding never changes a
row: the encoder's padded keys are masked (self- and cross-attention) and the decoder's padding comes after the
row's target under its causal mask.

The loss is the model's seq2seq cross-entropy: the mean over the batch's target tokens (-100 left out), as
``model(..., labels=...).loss`` computes it, in float32.

Evaluation over the held-out split gives ``loss`` (the mean over every eval target token), ``perplexity`` and three
text metrics of greedy generations (``num_beams=1``, no sampling, at most ``data.max_new_tokens`` tokens, default
32; the rest of the model's generation config applies), made in batches with the delta attached and decoded without
special tokens, each the mean over the eval rows against the row's target text:

- ``exact_match``: 1 when prediction and target are equal after SQuAD's answer normalisation (lower case, no
  punctuation, no articles a / an / the, whitespace collapsed);
- ``token_f1``: SQuAD's token F1 of the normalised texts (bag-of-tokens overlap; 1 when both are empty);
- ``rouge_l``: ROUGE-L's F-measure (longest common subsequence, β = 1) over tokens lower-cased with every
  character outside a-z 0-9 a separator: ``rouge_score``'s default tokenizer without stemming, reimplemented here
  (the package is not a dependency).
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Any

import torch
import torch.nn.functional as F

from deltatune.data import models, rows
from deltatune.data.config import SEQ2SEQ_NEW_TOKENS, DataConfig
from deltatune.data.encode import IGNORE_INDEX, encode_seq2seq, right_pad
from deltatune.data.rows import split_indices
from deltatune.data.tasks import Task, _device_of, _per_part, _split_batch, _unwrap
from deltatune.errors import DeltatuneError

KIND = "seq2seq"


def model_problem(what: str) -> str:
    """The one-line refusal of a model that is not an encoder-decoder LM; ``what`` says what it is."""
    return (f"task 'seq2seq' trains an encoder-decoder language model (T5, BART), but {what}; use such a model "
            "(a save_pretrained folder of a ...ForConditionalGeneration), or for a decoder-only model data.task "
            "'chat' with prompt/completion rows")


# ---------------------------------------------------------------- text metrics


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation removed, the articles a / an / the removed,
    whitespace collapsed."""
    text = text.lower()
    text = "".join(c for c in text if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two texts are equal after ``normalize_answer``, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: the harmonic mean of precision and recall of the normalised texts' token multisets
    (1.0 when both are empty, 0.0 when only one is)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_tokens(text: str) -> list[str]:
    """``rouge_score``'s default tokenizer without stemming: lower case, every run of characters outside a-z 0-9 a
    separator."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L's F-measure (β = 1): LCS / len for precision (over the prediction) and recall (over the reference),
    their harmonic mean; 0.0 when either text has no token."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """``exact_match``, ``token_f1`` and ``rouge_l``, each the mean over the pairs."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(references)
    pairs = list(zip(predictions, references, strict=True))
    return {"exact_match": sum(exact_match(p, r) for p, r in pairs) / n,
            "token_f1": sum(token_f1(p, r) for p, r in pairs) / n,
            "rouge_l": sum(rouge_l(p, r) for p, r in pairs) / n}


# ---------------------------------------------------------------- the task


class Seq2SeqTask(Task):
    """Features hold ``input_ids`` (the source), ``labels`` (the target ids) and ``target`` (the target's text, the
    reference of the generation metrics)."""

    kind = KIND
    chunked_loss = False  # the decoder's logits come from the model's forward (train.chunked_loss: causal LMs)

    def __init__(self, cfg: DataConfig, tokenizer: Any, train: list[dict], eval: list[dict],
                 max_new_tokens: int = SEQ2SEQ_NEW_TOKENS) -> None:
        super().__init__(cfg, tokenizer, train, eval)
        self.max_new_tokens = max_new_tokens

    def chunked(self, model: torch.nn.Module) -> bool:
        return False

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = right_pad([f["input_ids"] for f in features], self.pad_id)
        width = max(len(f["labels"]) for f in features)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for i, f in enumerate(features):
            labels[i, : len(f["labels"])] = torch.tensor(f["labels"], dtype=torch.long)
        batch["labels"] = labels
        return batch

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's logits (batch, target width, vocab) under teacher forcing, and the labels."""
        inputs, labels = _split_batch(model, batch)
        prepare = getattr(_unwrap(model), "prepare_decoder_input_ids_from_labels", None)
        if prepare is None:
            inputs["labels"] = labels  # the model shifts them itself
        else:
            inputs["decoder_input_ids"] = prepare(labels=labels)
        return model(**inputs, use_cache=False).logits, labels

    def _sums(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels = self.logits(model, batch)
        total = F.cross_entropy(logits.flatten(0, 1).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                reduction="sum")
        return total, (labels != IGNORE_INDEX).sum()

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        total, count = self._sums(model, batch)
        return total / count.clamp(min=1), int(batch["attention_mask"].sum()) + int(count)

    def generate(self, model: torch.nn.Module, features: list[dict]) -> list[str]:
        """Greedy generations for the features' sources (one batch), decoded without special tokens."""
        device = _device_of(model)
        inputs = {k: v.to(device) for k, v in right_pad([f["input_ids"] for f in features], self.pad_id).items()}
        base = _unwrap(model)
        extra: dict[str, Any] = {}
        generation = getattr(base, "generation_config", None)
        if getattr(generation, "eos_token_id", None) is None and self.tokenizer.eos_token_id is not None:
            extra["eos_token_id"] = self.tokenizer.eos_token_id
        if getattr(generation, "pad_token_id", None) is None:
            extra["pad_token_id"] = self.pad_id
        out = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1, **extra)
        # an encoder-decoder's output starts with its decoder start token
        return self.tokenizer.batch_decode(out[:, 1:].tolist(), skip_special_tokens=True)

    def _evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, float]:
        total, count = 0.0, 0
        predictions, references = [], []
        for features in self._eval_batches(batch_size):
            s, n = self._sums(model, self.collate(features))
            total += float(s)
            count += int(n)
            predictions += self.generate(model, features)
            references += [f["target"] for f in features]
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
                **text_metrics(predictions, references)}


# ---------------------------------------------------------------- build


def _check_model(base: torch.nn.Module, tokenizer: Any) -> None:
    config = getattr(base, "config", None)
    name = type(base).__name__
    if not models.is_seq2seq(name, config):
        raise DeltatuneError(model_problem(f"the model is a {name}"))
    generation = getattr(base, "generation_config", None)
    start = getattr(config, "decoder_start_token_id", None)
    if start is None and getattr(generation, "decoder_start_token_id", None) is None:
        raise DeltatuneError(
            f"the {name} has no decoder_start_token_id, so its decoder has no first input; set "
            "config.decoder_start_token_id in the model folder (T5: the pad id; BART: the EOS id)"
        )
    if getattr(config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id  # the decoder inputs' filler behind each target


def build_seq2seq(cfg: DataConfig, tokenizer: Any, base: torch.nn.Module) -> Seq2SeqTask:
    """Read, split, subsample and tokenize the (source, target) rows for the encoder-decoder ``base``."""
    _check_model(base, tokenizer)
    target_length = cfg.max_target_length or cfg.max_length

    def encode(_: int, part: DataConfig) -> tuple[list, list]:
        pairs = rows.seq2seq_pairs(rows.records(part))
        train_idx, eval_idx = split_indices(len(pairs), part.eval_fraction, part.seed)
        out = []
        for idx in (rows.cut(train_idx, part.max_train), rows.cut(eval_idx, part.max_eval)):
            features = []
            for i in idx:
                source, target = pairs[i]
                f: dict[str, Any] = encode_seq2seq(tokenizer, source, target, cfg.max_length, target_length)
                if f["input_ids"] and f["labels"]:
                    features.append({**f, "target": target})
            out.append(features)
        return out[0], out[1]

    train, held = _per_part(cfg, encode)
    return Seq2SeqTask(cfg, tokenizer, train, held, cfg.max_new_tokens or SEQ2SEQ_NEW_TOKENS)
