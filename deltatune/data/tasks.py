"""Data formats for training: what a batch looks like and what the loss is, per kind of task.

``DataConfig`` (``deltatune.data.config``) names the data (a shipped set or a local file) and the format;
``load_for_task`` loads the model that fits it (a fresh classification head or not), its tokenizer and the
``Task``: the data read, split, subsampled and tokenized (``deltatune.data.rows``, ``deltatune.data.encode``),
with the ``collate`` / ``loss`` / ``evaluate`` the training loop uses. ``model_request`` and ``build_task`` are
its two halves, for a caller that loads the model itself.

Formats (``Task.kind``):

- ``text``: causal LM on raw text, the loss on every real token; ``packing`` concatenates the documents
  with EOS between them and cuts full ``max_length`` blocks (no padding; TRL's "wrapped" packing).
- ``chat``: conversations rendered with the chat template (``data.chat_template`` or the tokenizer's), the
  loss on assistant tokens only (the assistant's text and its end-of-turn token); rows in any of the formats
  of ``deltatune.data.rows.chat_formats``. TRL's plain-text ``prompt`` / ``completion`` rows are not
  templated (as TRL trains them): [BOS] prompt, completion EOS, the loss on the completion and EOS.
- ``classification-head``: a sequence-classification model (e.g. an encoder loaded with
  ``task="classification", num_labels=n``), cross-entropy over its logits.
- ``classification-generative``: a causal LM reads ``prompt`` and the class scores are the logits of the
  label words' first tokens at the last prompt position; batches are left-padded with explicit position
  ids, so each example sees the positions it would see alone.
- ``preference`` (``deltatune.data.preference``): pairs {prompt, chosen, rejected} for the DPO family;
  ``prompts`` (``deltatune.data.grpo``): prompts {prompt, ...} that GRPO samples completions for and scores with
  its reward functions (built with the run's ``train.objective``).
- ``seq2seq`` (``deltatune.data.seq2seq``): source -> target pairs for an encoder-decoder model (T5, BART), the
  model's own cross-entropy on the target tokens; evaluation adds exact match, token F1 and ROUGE-L of greedy
  generations.
- ``image-classification`` / ``audio-classification`` (``deltatune.data.vision`` / ``deltatune.data.audio``): images
  or waveforms (class folders, .npz, .parquet; the shipped ``digits`` / ``tones``) as the model's ``pixel_values``
  / ``input_values``, cross-entropy over its image / audio classification head, accuracy in evaluation.
- ``edit``: model editing requests ``{"prompt", "target"}`` (``target_new`` is read too): the target gets a
  leading space if it has none and the EOS token after it; prompt and target are tokenized separately and
  concatenated (joint tokenization can merge tokens across the boundary and shift the target), batches are
  left-padded with an existing token, and the loss is the mean NLL of each edit's target tokens (+EOS),
  averaged over the edits. Editing has no held-out part: training uses every edit (up to ``max_train``) and
  evaluation reports ``edit_success`` on the same edits (up to ``max_eval``).

Splits and subsamples are deterministic from ``seed`` (stratified for classification).

Several data sets (``data.mix``, a YAML list): each part is read, split, subsampled and encoded on its own;
the training examples are mixed by weight (``deltatune.data.rows.mix``) and the eval parts joined.

Packing (``data.packing``) for ``chat`` and label-word classification joins whole training examples (never
cut) into rows of up to ``max_length`` tokens, best-fit decreasing, each with its loss positions kept: the
assistant tokens of each conversation, the scored last position of each classification prompt. Within a row
each example is a document of its own: position ids restart at each one and the batch carries them instead of an
attention mask, from which transformers' mask functions build a block-diagonal causal mask (``Task.with_documents``;
models whose masks do not come from those functions keep the old behaviour: examples attend to each other and
positions run on). Text packing marks the documents in its blocks the same way. Evaluation stays one example per row, so its metrics do not depend on packing. A
classification head reads one label per sequence and cannot be packed.
"""


from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from deltatune import data
from deltatune.data import lm_loss, models, rows, steps
from deltatune.data.config import (
    DEFAULT_PROMPT,
    MEDIA_TASKS,
    SHIPPED_PROMPTS,
    TASKS,
    DataConfig,
    head_packing_error,
)
from deltatune.data.encode import (
    IGNORE_INDEX,
    PromptEncoder,
    blocks,
    check_template,
    documents,
    encode_chat,
    encode_completion,
    encode_edit,
    encode_texts,
    left_pad,
    pack_groups,
    pack_labelled,
    pad_id,
    restarting_positions,
    right_pad,
)
from deltatune.data.rows import split_indices
from deltatune.errors import DeltatuneError

# the names callers import from here; they live in config, encode and rows
__all__ = [
    "DEFAULT_PROMPT", "IGNORE_INDEX", "SHIPPED_PROMPTS", "TASKS", "ChatTask", "DataConfig", "EditTask",
    "GenerativeClassificationTask", "HeadClassificationTask", "Loaded", "LossTerms", "PromptEncoder", "Task",
    "TextTask", "build_task", "encode_chat", "encode_edit", "left_pad", "load_for_task", "model_request",
    "right_pad", "split_indices",
]

log = logging.getLogger(__name__)


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
    return type(model).__name__.endswith(models.CAUSAL_SUFFIXES)


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
    ``{"task": "classification", "num_labels": n}`` when a classification head is used, ``{"task": "seq2seq_lm"}``
    for task seq2seq, else ``{}``."""
    return _request(cfg, model_name, None)


def _request(cfg: DataConfig, model_name: str, labelled: list[data.TextDataset] | None) -> dict[str, Any]:
    cfg.check()
    if cfg.multitask is not None:
        raise DeltatuneError("data.multitask loads its model with one head per task, which deltatune.data.models.load "
                             "does not make; use deltatune.data.tasks.load_for_task")
    if cfg.task in MEDIA_TASKS:
        raise DeltatuneError(f"task {cfg.task!r} loads its model with an image / audio classification head that "
                             "deltatune.data.models.load does not make; use deltatune.data.tasks.load_for_task")
    natural = models.natural_task(model_name)
    causal = natural == "causal_lm"
    if cfg.task == "seq2seq":
        from deltatune.data.seq2seq import model_problem  # it builds on this module's Task

        if natural != "seq2seq_lm":
            raise DeltatuneError(model_problem(f"{model_name!r} loads as a {natural.replace('_', ' ')} model"))
        return {"task": "seq2seq_lm"}
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
    labelled = labelled if labelled is not None else rows.classification_parts(cfg)
    names = list(labelled[0].label_names)
    # the label names go into the model config (transformers derives neither map from the other), so artifacts,
    # merged models and `deltatune generate` name the class, not LABEL_0
    return {"task": "classification", "num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {name: i for i, name in enumerate(names)}}


class Loaded(NamedTuple):
    model: torch.nn.Module
    tokenizer: Any
    task: Task


def load_for_task(cfg: DataConfig, model_name: str, *, seed: int | None = None, objective: Any = None,
                  quantization: dict[str, Any] | None = None) -> Loaded:
    """The model that fits ``cfg`` (with a fresh classification head sized to its labels where the task uses
    one), its tokenizer and the task: what training, evaluation, the demo and the bench all start from.

    The data is read once: the labels that size the head and the examples the task encodes come from one
    read. ``seed`` seeds torch and ``random`` first, so a fresh head starts from the same weights in every
    run with that seed. ``objective`` is ``train.objective`` (a name, a mapping or its parsed options): the
    task ``prompts`` is built with GRPO's options (its reward functions), which it needs. ``quantization``: the
    run config's ``model`` mapping keys (``quantize``, ``double_quant``, ``compute_dtype`` by name): a quantized
    base (``deltatune.data.models.load``)."""
    cfg.check()
    if seed is not None:
        torch.manual_seed(seed)
        random.seed(seed)
    if cfg.multitask is not None:
        from deltatune.data.multitask import load_multitask  # it builds on this module's Task

        return load_multitask(cfg, model_name, quantization)
    if cfg.task in MEDIA_TASKS:
        if quantization:
            raise DeltatuneError(f"task {cfg.task!r} loads a full-precision image / audio classifier; remove "
                                 "model.quantize")
        if cfg.task == "image-classification":
            from deltatune.data.vision import load_image_task  # it builds on this module's Task

            model, media = load_image_task(cfg, model_name)
        else:
            from deltatune.data.audio import load_audio_task  # it builds on this module's Task

            model, media = load_audio_task(cfg, model_name)
        return Loaded(model, None, media)
    labelled = rows.classification_parts(cfg) if cfg.task == "classification" else None
    quant = dict(quantization or {})
    if "compute_dtype" in quant:
        quant["compute_dtype"] = getattr(torch, quant["compute_dtype"])
    model = models.load(model_name, **_request(cfg, model_name, labelled), **quant)
    tokenizer = models.load_tokenizer(model_name)
    return Loaded(model, tokenizer, _build(cfg, tokenizer, model, labelled, objective))


# ---------------------------------------------------------------- batching helpers


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def tokens(batch: dict[str, torch.Tensor]) -> int:
    """The batch's tokens, for throughput: the attention mask's, or every position of packed rows that carry
    document masks instead (their little padding counted too)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def masks_documents(model: torch.nn.Module) -> bool:
    """Whether the model builds its attention masks with transformers' mask functions, which turn position ids
    that restart per document into a block-diagonal causal mask when no attention mask is given."""
    import sys

    module = sys.modules.get(type(_unwrap(model)).__module__)
    try:
        return module is not None and "create_causal_mask(" in inspect.getsource(module)
    except (OSError, TypeError):
        return False


def _split_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    device = _device_of(model)
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return inputs, batch["labels"].to(device)



class _Modes:
    """Remember every submodule's train/eval flag and put them back (evaluate must not change them)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.modes = [(m, m.training) for m in model.modules()]

    def restore(self) -> None:
        for m, training in self.modes:
            m.training = training


# ---------------------------------------------------------------- training-time loss terms
#
# train.mixup and train.contrastive (Obadinma et al. 2023, shared/methods/augmentation.md): two terms a
# classification task adds to its loss while it trains, with any method. Both act on the sentence representation
# the classifier reads, taken by a forward pre-hook on the head module during one forward pass:
#   - a head model: the input of its ``classifier`` / ``score`` module (BERT / MiniLM: the pooled output after
#     its dropout; a head that reads every position: the position it pools, the first token, or for a
#     decoder's ``score`` the last non-pad token, as transformers finds it);
#   - label-word classification with a causal LM: the input of ``lm_head`` at the scored (last) position.
# Mixup in representation space (the spec: "mix after the encoder", so prefixes see unmixed inputs) replaces row
# i's representation by λ·h_i + (1−λ)·h_π(i) and the loss by λ·CE(y_i) + (1−λ)·CE(y_π(i)), λ ~ Beta(α, α), π a
# random permutation of the batch. λ and π come from torch's generator, which the run seeds with train.seed and
# every checkpoint saves: runs repeat, and a resumed run draws what the uninterrupted one drew. The contrastive
# term is SupCon (Khosla et al. 2020) over the L2-normalised representations before mixing: CE + w·SCL.


def mixup_cross_entropy(scores: torch.Tensor, labels: torch.Tensor, partners: torch.Tensor,
                        lam: float) -> torch.Tensor:
    """λ·CE(scores, labels) + (1−λ)·CE(scores, partners): cross-entropy against the mixed one-hot labels."""
    return lam * F.cross_entropy(scores, labels) + (1.0 - lam) * F.cross_entropy(scores, partners)


def supervised_contrastive(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon's L_out over one view per example: for anchor i with positives P(i) (the other rows of its
    class), ℓ_i = −(1/|P(i)|) Σ_{p∈P(i)} log[exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ)], z = features
    L2-normalised; the mean over the anchors that have a positive (0 when none has). Computed in float32."""
    z = F.normalize(features.float(), dim=-1)
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels.view(-1, 1) == labels.view(1, -1)) & ~self_mask
    count = positives.sum(1)
    anchors = count > 0
    if not bool(anchors.any()):
        return z.sum() * 0.0  # no anchor has a positive: nothing to pull together (still part of the graph)
    summed = log_prob.masked_fill(~positives, 0.0).sum(1)
    return -(summed[anchors] / count[anchors]).mean()


@dataclass(frozen=True)
class LossTerms:
    """``train.mixup`` (α of Beta(α, α); 0: off), ``train.contrastive`` (its weight w; 0: off) and
    ``train.contrastive_temperature`` (τ): what a classification task adds to its loss while training."""

    mixup: float = 0.0
    contrastive: float = 0.0
    temperature: float = 0.1

    @property
    def active(self) -> bool:
        return self.mixup > 0 or self.contrastive > 0

    def draw(self, n: int) -> tuple[float, torch.Tensor] | None:
        """λ ~ Beta(α, α) and each row's partner (a permutation of the n rows), from torch's generator; None
        without mixup."""
        if self.mixup <= 0:
            return None
        alpha = torch.tensor(float(self.mixup))
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        return lam, torch.randperm(n)

    @contextlib.contextmanager
    def around(self, head: torch.nn.Module, positions: torch.Tensor | int,
               n: int) -> Iterator[Representation]:
        """Within the block, forward passes mix (with mixup) and record the input of ``head`` for a batch of n
        rows; ``positions``: the position each row is read at when the head reads every position."""
        seen = Representation(self, positions, self.draw(n))
        handle = head.register_forward_pre_hook(seen.hook, prepend=True)  # before an adapter's own pre-hook
        try:
            yield seen
        finally:
            handle.remove()


class Representation:
    """What the head's pre-hook saw in one forward pass, and the loss computed from it."""

    def __init__(self, terms: LossTerms, positions: torch.Tensor | int,
                 mix: tuple[float, torch.Tensor] | None) -> None:
        self.terms, self.positions, self.mix = terms, positions, mix
        self.features: torch.Tensor | None = None  # (batch, hidden), before mixing

    def _rows(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(h.shape[0], device=h.device)
        positions = torch.as_tensor(self.positions, device=h.device).expand(h.shape[0]) % h.shape[1]
        return rows, positions

    def hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        h = args[0]
        if h.dim() == 2:
            features = h
        else:
            rows, positions = self._rows(h)
            features = h[rows, positions]
        self.features = features
        if self.mix is None:
            return None
        lam, perm = self.mix
        mixed = lam * features + (1.0 - lam) * features[perm.to(h.device)]
        if h.dim() == 2:
            return (mixed, *args[1:])
        return (h.index_put((rows, positions), mixed), *args[1:])

    def loss(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The task's cross-entropy with the terms: mixed-label CE under mixup, + w·SupCon."""
        if self.features is None:
            raise DeltatuneError(
                "train.mixup / train.contrastive read the input of the model's classification head, but "
                "the forward pass never reached it (a method whose logits come from a head of its own); set "
                "both to 0"
            )
        if self.mix is None:
            loss = F.cross_entropy(scores, labels)
        else:
            lam, perm = self.mix
            loss = mixup_cross_entropy(scores, labels, labels[perm.to(labels.device)], lam)
        if self.terms.contrastive > 0:
            features = self.features.to(scores.device)
            scl = supervised_contrastive(features, labels, self.terms.temperature)
            loss = loss + self.terms.contrastive * scl
        return loss


def classification_head(model: torch.nn.Module) -> torch.nn.Module:
    """The module that turns a sequence-classification model's representation into class scores."""
    base = _unwrap(model)
    for name in ("classifier", "score"):
        head = getattr(base, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise DeltatuneError(
        f"train.mixup / train.contrastive read the input of the classification head (a `classifier` or "
        f"`score` module), but {type(base).__name__} has neither; set both to 0"
    )


def head_positions(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor | int:
    """Where a head that reads every position pools: a decoder's ``score`` the rightmost non-pad token (as
    transformers finds it), any other head the first token. Unused for a head that reads a pooled vector."""
    base = _unwrap(model)
    if not isinstance(getattr(base, "score", None), torch.nn.Module):
        return 0
    pad = getattr(base.config, "pad_token_id", None)
    ids = inputs.get("input_ids")
    if pad is None or ids is None:
        return -1
    non_pad = (ids != pad).to(torch.int64)
    return (torch.arange(ids.shape[-1], device=ids.device) * non_pad).argmax(-1)


def loss_terms_problem(task_kind: str, packed: bool) -> str | None:
    """Why the loss terms cannot apply to a task, or None."""
    if not task_kind.startswith("classification"):
        return (f"train.mixup and train.contrastive are classification losses, but the task is "
                f"{task_kind!r}; set both to 0 or use data.task: classification")
    if packed:
        return "train.mixup and train.contrastive read one example per row; set data.packing: false"
    return None


# ---------------------------------------------------------------- tasks


class Task:
    """Tokenized train/eval features plus how to batch them, compute the loss and evaluate."""

    kind: str = ""
    loss_terms: LossTerms | None = None  # train.mixup / train.contrastive while training (use_loss_terms)
    # train.chunked_loss: next-token losses from the hidden states in chunks, never the full logits
    # (deltatune.data.lm_loss), where the model's logits are its head's output as is
    chunked_loss: bool = True
    # packed rows keep each document to itself: position ids restarting per document and no attention mask
    # (set at build time when the model's masks follow such position ids: ``masks_documents``)
    document_masks: bool = False

    def chunked(self, model: torch.nn.Module) -> bool:
        return self.chunked_loss and lm_loss.supported(model)

    def with_documents(self, batch: dict[str, torch.Tensor], features: list[dict]) -> dict[str, torch.Tensor]:
        """A right-padded batch of packed rows with document masks: each row's restarting position ids (the
        padding a document of its own) in place of the attention mask, from which transformers' mask functions
        build a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``), so no token attends
        across documents and each sees the positions it would see alone."""
        if not self.document_masks or "position_ids" not in features[0]:
            return batch
        width = batch["input_ids"].shape[1]
        positions = torch.zeros_like(batch["input_ids"])
        for i, f in enumerate(features):
            n = len(f["position_ids"])
            positions[i, :n] = torch.tensor(f["position_ids"], dtype=torch.long)
            positions[i, n:] = torch.arange(width - n)
        batch["position_ids"] = positions
        del batch["attention_mask"]
        return batch

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
        self.pad_id = pad_id(tokenizer)

    def __repr__(self) -> str:
        labels = f", labels={self.label_names}" if self.label_names else ""
        return f"{type(self).__name__}(kind={self.kind!r}, train={len(self.train)}, eval={len(self.eval)}{labels})"

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """The mean loss of the batch (differentiable) and the number of non-pad tokens in it."""
        raise NotImplementedError

    def use_loss_terms(self, terms: LossTerms | None) -> None:
        """Add ``terms`` (mixup, contrastive) to ``loss`` from now on (None or inactive: plain loss); refused
        with the reason for a task they do not fit."""
        if terms is not None and terms.active:
            problem = loss_terms_problem(self.kind, any("ends" in f for f in self.train[:1]))
            if problem is not None:
                raise DeltatuneError(problem)
        self.loss_terms = terms if terms is not None and terms.active else None

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
        return self.with_documents(right_pad(seqs, self.pad_id, [f.get("labels", f["input_ids"]) for f in features]),
                                   features)

    def _sums(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = _split_batch(model, batch)
        if self.chunked(model):
            nll = lm_loss.token_nll(model, inputs, labels).nll
            return nll.sum(), (labels[:, 1:] != IGNORE_INDEX).sum()
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
        return total / count.clamp(min=1), tokens(batch)

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
    """``chat_template``: data.chat_template's text when it overrides the tokenizer's (generation after
    training must render prompts with it too), else None."""

    kind = "chat"

    def __init__(self, cfg: DataConfig, tokenizer: Any, train: list[dict], eval: list[dict],
                 chat_template: str | None = None) -> None:
        super().__init__(cfg, tokenizer, train, eval)
        self.chat_template = chat_template


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
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # position t predicts token t + 1
        if self.chunked(model):
            nll, argmax_hit, _ = lm_loss.token_nll(model, inputs, labels, hits=True)
        else:
            logits = model(**inputs, use_cache=False).logits
            nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                  reduction="none").view_as(targets)
            argmax_hit = logits.argmax(-1) == targets
        mask = targets != IGNORE_INDEX
        count = mask.sum(-1).clamp(min=1)
        mean_nll = (nll * mask).sum(-1) / count
        answer = mask.clone()  # the target's own tokens: the last target position predicts EOS
        answer[torch.arange(len(answer)), (mask.cumsum(-1) * mask).argmax(-1)] = False
        hit = argmax_hit | ~answer
        n_answer = answer.sum(-1).clamp(min=1)
        return mean_nll, hit.all(-1), ((hit & answer).sum(-1) / n_answer)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        mean_nll, _, _ = self._per_edit(model, batch)
        return mean_nll.mean(), tokens(batch)

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
        if self.loss_terms is not None:
            head, positions = self.representation_site(model, batch)
            with self.loss_terms.around(head, positions, len(batch["labels"])) as seen:
                scores = self.scores(model, batch)
            return seen.loss(scores, batch["labels"].to(scores.device)), tokens(batch)
        scores = self.scores(model, batch)
        return F.cross_entropy(scores, batch["labels"].to(scores.device)), tokens(batch)

    def representation_site(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
                            ) -> tuple[torch.nn.Module, torch.Tensor | int]:
        """The module whose input is the sentence representation, and the position each row is read at."""
        return classification_head(model), head_positions(model, batch)

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

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if "ends" not in features[0]:
            return super().collate(features)
        # packed rows: right padding, and per row the positions where its examples end and their classes
        batch = self.with_documents(right_pad([f["input_ids"] for f in features], self.pad_id), features)
        width = max(len(f["ends"]) for f in features)
        batch["score_positions"] = torch.zeros((len(features), width), dtype=torch.long)
        batch["labels"] = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for i, f in enumerate(features):
            batch["score_positions"][i, : len(f["ends"])] = torch.tensor(f["ends"], dtype=torch.long)
            batch["labels"][i, : len(f["ends"])] = torch.tensor(f["classes"], dtype=torch.long)
        return batch

    def representation_site(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
                            ) -> tuple[torch.nn.Module, torch.Tensor | int]:
        """``lm_head``'s input at the scored position: the last one (prompts are left-padded)."""
        return _unwrap(model).get_output_embeddings(), -1

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        if "score_positions" not in batch:
            return super().loss(model, batch)
        scores = self.scores(model, batch)  # (rows, examples per row, classes)
        labels = batch["labels"].to(scores.device)
        return (F.cross_entropy(scores.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX),
                tokens(batch))

    def scores(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class scores (batch, num_labels), float32; for packed rows (rows, examples, num_labels)."""
        if "score_positions" in batch:
            inputs, _ = _split_batch(model, {k: v for k, v in batch.items() if k != "score_positions"})
            if self.chunked(model):  # the head runs on the scored positions only
                return lm_loss.head_at(model, inputs, batch["score_positions"], self.label_token_ids)
            logits = model(**inputs, use_cache=False).logits
            positions = batch["score_positions"].to(logits.device)
            classes = logits.index_select(-1, self.label_token_ids.to(logits.device))
            return classes.gather(1, positions.unsqueeze(-1).expand(-1, -1, classes.shape[-1])).float()
        inputs, _ = _split_batch(model, batch)
        extra: dict[str, Any] = {"use_cache": False}
        if _accepts(type(_unwrap(model)), "logits_to_keep"):
            extra["logits_to_keep"] = 1  # the vocabulary-wide head runs on the last position only
        logits = model(**inputs, **extra).logits[:, -1, :]
        return logits.index_select(-1, self.label_token_ids.to(logits.device)).float()



# ---------------------------------------------------------------- build


def build_task(cfg: DataConfig, tokenizer: Any, model: torch.nn.Module, objective: Any = None) -> Task:
    """Read, split, subsample and tokenize the data for ``model`` (plain, or wrapped in Tuned). ``objective``:
    ``train.objective`` (a name, a mapping or its parsed options), which the task ``prompts`` needs (GRPO's
    reward functions)."""
    return _build(cfg, tokenizer, model, None, objective)


def _objective_options(cfg: DataConfig, objective: Any) -> Any:
    """The options of the objective the data task needs (GRPO's for ``prompts``): given parsed, or parsed from
    ``train.objective``'s value; refused when missing or made for another task."""
    from deltatune.data import objectives  # it imports the task modules built on this one

    if objective is None:
        raise DeltatuneError(
            f"data.task {cfg.task!r} trains with train.objective grpo and its reward functions; give the objective "
            "(train.objective: {name: grpo, rewards: [...]}, or build_task(..., objective=...))"
        )
    if not isinstance(objective, str | dict):
        return objective
    found, options = objectives.parse(objective)
    problem = objectives.task_problem(found, cfg.task)
    if problem is not None:
        raise DeltatuneError(problem)
    return options


def _build(cfg: DataConfig, tokenizer: Any, model: torch.nn.Module, labelled: list[data.TextDataset] | None,
           objective: Any = None) -> Task:
    cfg.check()
    if cfg.multitask is not None:
        from deltatune.data.multitask import build_multitask  # it builds on this module's Task

        return build_multitask(cfg, tokenizer, model)
    base = _unwrap(model)
    task = _build_task(cfg, tokenizer, base, labelled, objective)
    task.document_masks = bool(cfg.packing) and masks_documents(base)
    return task


def _build_task(cfg: DataConfig, tokenizer: Any, base: torch.nn.Module, labelled: list[data.TextDataset] | None,
                objective: Any) -> Task:
    if cfg.task == "classification":
        return _build_classification(cfg, tokenizer, base,
                                     labelled if labelled is not None else rows.classification_parts(cfg))
    if cfg.task == "seq2seq":
        from deltatune.data.seq2seq import build_seq2seq  # it builds on this module's Task

        return build_seq2seq(cfg, tokenizer, base)
    if cfg.task == "image-classification":
        from deltatune.data.vision import build_image_task  # it builds on this module's Task

        return build_image_task(cfg, base)
    if cfg.task == "audio-classification":
        from deltatune.data.audio import build_audio_task  # it builds on this module's Task

        return build_audio_task(cfg, base)
    if not _is_causal(base):
        raise DeltatuneError(
            f"task {cfg.task!r} trains a causal language model, but the model is a {type(base).__name__}; "
            "use a causal LM such as smollm2-135m, or set data.task to 'classification'"
        )
    if cfg.task == "text":
        return _build_text(cfg, tokenizer, _model_name(base))
    if cfg.task == "edit":
        return _build_edit(cfg, tokenizer)
    if cfg.task == "preference":
        from deltatune.data.preference import build_preference  # it builds on this module's Task

        return build_preference(cfg, tokenizer)
    if cfg.task == "prompts":
        from deltatune.data.grpo import build_prompts_task  # it builds on this module's Task

        return build_prompts_task(cfg, tokenizer, _objective_options(cfg, objective))
    return _build_chat(cfg, tokenizer, _model_name(base))


def _per_part(cfg: DataConfig, encode: Any) -> tuple[list, list]:
    """``encode(i, part) -> (train, eval)`` for every part; the train parts mixed by weight, the eval parts joined.
    A part's errors name its keys ``data[i].<key>``."""
    trains, evals = [], []
    for i, part in enumerate(cfg.parts()):
        try:
            train, held = encode(i, part)
        except DeltatuneError as e:
            raise rows.in_part(e, cfg, i) from e
        trains.append(train)
        evals.append(held)
    if cfg.mix is None:
        return trains[0], evals[0]
    return rows.mix(trains, [p.weight for p in cfg.parts()], cfg.seed), [x for held in evals for x in held]


def _build_text(cfg: DataConfig, tokenizer: Any, model_name: str | None = None) -> TextTask:
    def encode(_: int, part: DataConfig) -> tuple[list, list]:
        texts = rows.texts(part)
        train_idx, eval_idx = split_indices(len(texts), part.eval_fraction, part.seed)
        train = [texts[i] for i in train_idx]
        if steps.inline_steps(part):  # the data steps see the training part only
            pool = steps.Pool([{"text": t} for t in train], "text", None, task="text", source=part.name or str(part.path))
            train = [str(r["text"]) for r in steps.apply_inline(part, pool, model=model_name)]
        train = rows.cut(train, part.max_train)
        held = [texts[i] for i in rows.cut(eval_idx, part.max_eval)]
        if cfg.packing:  # documents now, mixed by weight, cut into blocks below
            return documents(tokenizer, train), documents(tokenizer, held)
        return (encode_texts(tokenizer, train, cfg.max_length, False),
                encode_texts(tokenizer, held, cfg.max_length, False))

    train, held = _per_part(cfg, encode)
    if cfg.packing:
        train, held = blocks(train, cfg.max_length), blocks(held, cfg.max_length)
        if not (train and held):
            raise DeltatuneError(
                f"data.packing cuts blocks of data.max_length={cfg.max_length} tokens, but the "
                f"{'train' if not train else 'eval'} part has fewer tokens than that; lower data.max_length, "
                "use more data or set data.packing: false"
            )
    return TextTask(cfg, tokenizer, train, held)


def _encode_chat_example(tokenizer: Any, example: rows.ChatExample, row: int, template: str | None
                         ) -> tuple[list[int], list[int]]:
    if example.messages is None:
        assert example.prompt is not None and example.completion is not None
        return encode_completion(tokenizer, example.prompt, example.completion)
    return encode_chat(tokenizer, example.messages, row=row, template=template, learn_from=example.learn_from)


def _build_chat(cfg: DataConfig, tokenizer: Any, model_name: str | None = None) -> ChatTask:
    template = cfg.resolved_chat_template()

    def encode(_: int, part: DataConfig) -> tuple[list, list]:
        table = rows.records(part)
        examples = rows.conversations(table, part)
        train_idx, eval_idx = split_indices(len(examples), part.eval_fraction, part.seed)
        if steps.inline_steps(part):  # the data steps see the training part's rows only; their rows come after
            pool = steps.Pool([table.rows[i] for i in train_idx], part.text_field, None, task="chat",
                              source=str(part.path))
            made = steps.apply_inline(part, pool, model=model_name)
            table = data.files.Records(table.source, [table.rows[i] for i in eval_idx] + made,
                                       sorted({f for r in made for f in r} | set(table.fields)), table.class_labels)
            examples = rows.conversations(table, part)
            train_idx, eval_idx = list(range(len(eval_idx), len(table.rows))), list(range(len(eval_idx)))
        if any(x.messages is not None for x in examples):
            check_template(tokenizer, template)
        out = []
        for idx in (rows.cut(train_idx, part.max_train), rows.cut(eval_idx, part.max_eval)):
            features = []
            for i in idx:
                ids, labels = _encode_chat_example(tokenizer, examples[i], i, template)
                ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
                if any(t != IGNORE_INDEX for t in labels[1:]):
                    features.append({"input_ids": ids, "labels": labels})
            if len(features) < len(idx):
                log.warning(
                    "dropped %d of %d conversations with no assistant token in the first data.max_length=%d tokens",
                    len(idx) - len(features), len(idx), cfg.max_length,
                )
            out.append(features)
        return out[0], out[1]

    train, held = _per_part(cfg, encode)
    if cfg.packing:
        train = pack_labelled(train, cfg.max_length)
    return ChatTask(cfg, tokenizer, train, held, chat_template=template)


def _model_name(model: torch.nn.Module | None) -> str | None:
    """The name a data step loads the run's model by (a shipped name or a folder), if it has one."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name or None


def _split_labelled(part: DataConfig, ds: data.TextDataset, model: str | None = None
                    ) -> tuple[data.TextDataset, data.TextDataset]:
    train, held = ds.split(part.eval_fraction, seed=part.seed)
    train = steps.apply_labelled(part, train, model=model)  # the data steps see the training part only
    if part.max_train is not None and part.max_train < len(train):
        train = train.subset(part.max_train, seed=part.seed)
    if part.max_eval is not None and part.max_eval < len(held):
        held = held.subset(part.max_eval, seed=part.seed)
    return train, held


def _build_classification(cfg: DataConfig, tokenizer: Any, base: torch.nn.Module,
                          labelled: list[data.TextDataset]) -> Task:
    names = list(labelled[0].label_names)
    causal, has_head = _is_causal(base), _has_head(base)
    head = cfg.head if cfg.head is not None else not causal
    load_hint = (
        f"load it with deltatune.data.tasks.load_for_task(cfg, name), i.e. with task='classification', "
        f"num_labels={len(names)}"
    )
    if head:
        if cfg.packing:
            raise head_packing_error()
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

        def encode_head(text: str) -> list[int]:
            return list(tokenizer(text, truncation=True, max_length=cfg.max_length)["input_ids"])

        train, held = _per_part(cfg, lambda i, part: _encoded(labelled[i], part, encode_head, _model_name(base)))
        return HeadClassificationTask(cfg, tokenizer, train, held, names)
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
    train, held = _per_part(cfg, lambda i, part: _encoded(labelled[i], part, encoder.encode, _model_name(base)))
    if cfg.packing:
        train = _pack_prompts(train, cfg.max_length)
    return GenerativeClassificationTask(cfg, tokenizer, train, held, names, encoder)


def _encoded(ds: data.TextDataset, part: DataConfig, encode: Any, model: str | None = None
             ) -> tuple[list[dict], list[dict]]:
    """(train, eval) features ``{"input_ids", "label"}`` of one part's labelled data."""
    return tuple(  # type: ignore[return-value]
        [{"input_ids": encode(t), "label": y} for t, y in zip(x.texts, x.labels, strict=True)]
        for x in _split_labelled(part, ds, model)
    )


def _pack_prompts(features: list[dict], max_length: int) -> list[dict]:
    """Label-word prompts joined into rows: each row's ids, the position where each of its prompts ends (its
    scored position) and that prompt's class."""
    out = []
    for group in pack_groups([len(f["input_ids"]) for f in features], max_length):
        ids: list[int] = []
        ends, classes = [], []
        for i in group:
            ids += features[i]["input_ids"]
            ends.append(len(ids) - 1)
            classes.append(features[i]["label"])
        positions = restarting_positions([len(features[i]["input_ids"]) for i in group])
        out.append({"input_ids": ids, "ends": ends, "classes": classes, "position_ids": positions})
    return out


def _build_edit(cfg: DataConfig, tokenizer: Any) -> EditTask:
    if tokenizer.eos_token_id is None:
        raise DeltatuneError("task 'edit' appends the EOS token to every target, but the tokenizer has none; "
                             "set tokenizer.eos_token")

    def encode(_: int, part: DataConfig) -> tuple[list, list]:
        edits = rows.edits(rows.records(part))
        features = []
        for prompt, target in edits:
            f = encode_edit(tokenizer, prompt, target, cfg.max_length)
            if f is not None:
                features.append(f)
        if len(features) < len(edits):
            log.warning("dropped %d of %d edits whose target does not fit in data.max_length=%d tokens",
                        len(edits) - len(features), len(edits), cfg.max_length)
        # editing fits the edits themselves: every edit trains, and edit success is measured on them
        return rows.cut(features, part.max_train), rows.cut(features, part.max_eval)

    train, held = _per_part(cfg, encode)
    return EditTask(cfg, tokenizer, train, held)
