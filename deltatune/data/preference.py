"""Preference tuning: the ``preference`` task and the DPO family's losses (DPO, IPO, SimPO, ORPO), computed as
TRL 1.x computes them (``shared/methods/preference.md``; ``docs/preference.md``).

Rows are ``{prompt, chosen, rejected}`` (``deltatune.data.rows.preferences``): plain texts, or chat messages
(``prompt`` a list of messages, each completion an assistant message or a list of them) rendered with the chat
template (``data.chat_template`` or the tokenizer's). The prompt and each completion are tokenized on their own and
joined, so no token straddles the boundary and the compared tokens are exactly the completion's: a plain
completion gets the EOS token after it ([BOS] prompt, completion EOS, as TRL's plain rows); a chat completion is
the assistant turn as the template renders it after the prompt's generation prompt, up to its end-of-turn token
(the tokens the chat task learns; trailing whitespace after it left out). A batch of n pairs is [chosen; rejected]
(2n rows, right-padded), each cut to ``data.max_length`` from the end (TRL's "keep_start"); a pair whose prompt
alone fills ``max_length`` has nothing to compare and is dropped with a warning. The log-probability of a
completion is the sum over its tokens of log π(y_t | x, y_<t), read from the logits one position before each
token (prompt and padding never enter).

A shipped labelled set (``data: {name: tweets, task: preference}``) becomes preference pairs built from its labels:
the prompt is the label-word classification prompt of ``task: classification`` (``data.prompt``, else the set's
own, "Tweet: {text}\\nSentiment:"), the chosen completion the right label word (" positive") and the rejected one
a wrong label word, each + EOS; with more than two labels the wrong one is drawn per row with ``data.seed``. The
split and subsample are those of the classification task on the same data (stratified, same seed), so a
preference-tuned delta can be scored by label-word accuracy on exactly the held-out texts.

Objectives (``train.objective``, registered in ``deltatune.data.objectives``; TRL's defaults):

- ``dpo``: L = −log σ(β Δ), Δ = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)] (summed log-probs),
  the mean over pairs; β 0.1 (DPOTrainer, loss_type "sigmoid").
- ``ipo``: L = (Δ̄ − 1/(2β))², each of the two log-ratios divided by its completion's length (DPOTrainer's "ipo").
- ``simpo``: L = −log σ(β ā_w − β ā_l − γ), ā the mean token log-prob, no reference (CPOTrainer's "simpo", with its
  label smoothing). TRL's CPOConfig defaults ``cpo_alpha`` to 1.0, which adds the chosen completion's NLL
  ("CPO-SimPO"); here ``cpo_alpha`` defaults to 0.0, pure SimPO, as the SimPO paper and TRL's docs define it.
- ``orpo``: L = NLL(chosen) − λ·mean log σ(log odds), log odds = (ā_w − ā_l) − [log(1 − e^ā_w) − log(1 − e^ā_l)]
  in float32, λ = ``beta`` 0.1, no reference. The NLL is the chosen completion's mean token NLL: TRL 1.16's
  ORPOTrainer also counts the prompt's tokens in it; here, as in the ORPO paper, only the completion's (the
  preference task takes no loss on prompts).

Rewards and metrics are TRL's names and definitions: ``rewards/chosen`` / ``rewards/rejected`` (β × the
log-ratio for DPO and IPO; β × the mean log-prob for SimPO and ORPO), ``rewards/accuracies`` (chosen > rejected,
strictly), ``rewards/margins``, ``logps/chosen`` / ``logps/rejected`` (the log-probs the loss uses: sums for DPO
and IPO, means for SimPO and ORPO), and ``nll_loss`` (SimPO, ORPO), ``log_odds_ratio`` / ``log_odds_chosen``
(ORPO). Evaluation gives ``loss`` and the same metrics over the eval pairs (each a mean over pairs, the loss a
mean of batch losses weighted by pairs); its headline is ``rewards/accuracies``.

The reference policy is the base model, exactly, with no second model. For a delta that sits beside the base
weights (``Tuned.switchable``) its log-probs come from the same model with the delta taken off for that forward
(``Tuned.delta_off``), without gradients and in eval mode (no dropout, whatever ``disable_dropout`` says: the
reference is the base model's deterministic output). For a delta trained in place (full fine-tuning, LISA, HFT)
taking it off copies whole tensors, so ``prepare_reference`` computes the reference log-probs of every training and
eval pair once, before training, and the run keeps them in ``<output>/reference/`` (safetensors, written
atomically, reused on resume after checking the number of pairs and a hash of the tokenized pairs, ``max_length``,
the base model's fingerprint and the precision; a file that does not match is an error). ``disable_dropout``
(TRL's default True) sets every dropout module's probability to 0 for the run, so that the policy equals the
reference at step 0 (the DPO loss is then log 2).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from deltatune.core import artifact
from deltatune.core.tuned import carried_by
from deltatune.data import encode, lm_loss, rows
from deltatune.data.config import DataConfig
from deltatune.data.encode import IGNORE_INDEX, PromptEncoder, check_template, encode_completion, right_pad
from deltatune.data.rows import split_indices
from deltatune.data.tasks import Task, _device_of, _Modes, _per_part, _unwrap
from deltatune.errors import DeltatuneError

log = logging.getLogger(__name__)

FEATURE_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids", "ref")  # what a pair holds (TRL's names + "ref")
REFERENCE_DIR = "reference"  # the run folder's sub-folder (sub-folders survive the artifact's swap)
REFERENCE_FILE = "reference-logps.safetensors"
REFERENCE_META = "reference.json"
HEADLINE = "rewards/accuracies"


# ---------------------------------------------------------------- log-probs


class Logps(NamedTuple):
    """Per pair: the summed completion log-probs of the chosen and rejected sequences and their token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @property
    def chosen_mean(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)


def completion_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the sum of log π(y_t | y_<t) over the labelled (completion) tokens and how many there are. The logit
    at position t scores token t + 1: the labels are shifted, not the logits (no copy of the vocabulary-wide
    tensor). Positions without a label (prompt, padding) contribute exactly 0."""
    logits = logits[:, -labels.shape[1]:]  # a form that prepends virtual tokens: keep the real positions (as TRL)
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none").view_as(targets)
    return -nll.sum(-1), (targets != IGNORE_INDEX).sum(-1)


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunked: bool = True) -> Logps:
    """The completion log-probs of a [chosen; rejected] batch under ``model`` (one forward pass); ``chunked``:
    from the hidden states in chunks of completion positions, never the whole logits (``train.chunked_loss``;
    exact up to summation order), where the model allows it."""
    device = _device_of(model)
    labels = batch["labels"].to(device)
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    if chunked and lm_loss.supported(model):
        nll = lm_loss.token_nll(model, inputs, labels).nll
        sums, counts = -nll.sum(-1), (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    else:
        sums, counts = completion_logps(model(**inputs, use_cache=False).logits, labels)
    n = labels.shape[0] // 2
    return Logps(sums[:n], sums[n:], counts[:n], counts[n:])


@contextlib.contextmanager
def reference_model(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The reference policy while the body runs: the base model with the delta that ``model`` carries taken off
    (``Tuned.delta_off``; the model itself when it carries none), in eval mode, without gradients."""
    base = _unwrap(model)
    holder = carried_by(base)
    if holder is not None and not hasattr(holder, "delta_off"):
        raise DeltatuneError(
            f"the reference policy is the base model, but this model carries a {type(holder).__name__} that cannot "
            "be taken off for a forward pass; train one delta (a Tuned from dt.attach)"
        )
    off = holder.delta_off() if holder is not None else contextlib.nullcontext(base)
    with torch.no_grad(), off as reference:
        modes = _Modes(reference)
        reference.eval()
        try:
            yield reference
        finally:
            modes.restore()


def live_reference(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's summed completion log-probs of a batch (chosen, rejected), from the same forward logic."""
    with reference_model(model) as reference:
        logps = sequence_logps(reference, batch, chunked)
    return logps.chosen, logps.rejected


# ---------------------------------------------------------------- objectives


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                    rejected_logps: torch.Tensor) -> dict[str, float]:
    """TRL's reward metrics of a batch (each a mean over its pairs)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": float(chosen_rewards.mean()),
        "rewards/rejected": float(rejected_rewards.mean()),
        "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
        "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
        "logps/chosen": float(chosen_logps.detach().float().mean()),
        "logps/rejected": float(rejected_logps.detach().float().mean()),
    }


def _chosen_nll(policy: Logps) -> torch.Tensor:
    """The chosen completions' mean token NLL over the batch (TRL's ``CrossEntropyLoss`` on the chosen half)."""
    return -policy.chosen.sum() / policy.chosen_tokens.sum().clamp(min=1)


class PreferenceObjective:
    """What every objective of the DPO family gives: ``compute(policy, reference)`` -> (loss, metrics)."""

    needs_reference: ClassVar[bool] = True
    beta: float
    disable_dropout: bool

    def __post_init__(self) -> None:  # the subclasses are dataclasses: their __init__ calls it
        self._check()

    def _check(self) -> None:
        if not (_number(self.beta) and self.beta > 0):
            raise DeltatuneError(f"beta={self.beta!r} must be a finite number > 0")

    def compute(self, policy: Logps, reference: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def _ratios(self, policy: Logps, reference: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if reference is None:
            raise DeltatuneError(f"{type(self).__name__} compares the policy with a reference, but none was given")
        ref_chosen, ref_rejected = (r.to(policy.chosen.device, policy.chosen.dtype) for r in reference)
        return policy.chosen - ref_chosen, policy.rejected - ref_rejected


@dataclass
class DPO(PreferenceObjective):
    """DPO (Rafailov et al. 2023): −log σ(β Δ) over summed log-ratios; TRL's DPOTrainer, loss_type "sigmoid"."""

    beta: float = 0.1  # β: how far the policy may move from the reference (TRL's DPOConfig default)
    disable_dropout: bool = True  # set every dropout to 0 for the run, so policy = reference at step 0 (TRL's default)


    def compute(self, policy: Logps, reference: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        chosen_ratio, rejected_ratio = self._ratios(policy, reference)
        losses = -F.logsigmoid(self.beta * (chosen_ratio - rejected_ratio))
        return losses.mean(), _reward_metrics(self.beta * chosen_ratio, self.beta * rejected_ratio, policy.chosen,
                                              policy.rejected)


@dataclass
class IPO(PreferenceObjective):
    """IPO (Azar et al. 2023): (Δ̄ − 1/(2β))², the log-ratios averaged per token; TRL's DPOTrainer, "ipo"."""

    beta: float = 0.1  # τ of the paper: the target margin of the per-token log-ratios is 1/(2β)
    disable_dropout: bool = True  # set every dropout to 0 for the run, so policy = reference at step 0 (TRL's default)


    def compute(self, policy: Logps, reference: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        chosen_ratio, rejected_ratio = self._ratios(policy, reference)
        delta = (chosen_ratio / policy.chosen_tokens.clamp(min=1)
                 - rejected_ratio / policy.rejected_tokens.clamp(min=1))
        losses = (delta - 1 / (2 * self.beta)) ** 2
        return losses.mean(), _reward_metrics(self.beta * chosen_ratio, self.beta * rejected_ratio, policy.chosen,
                                              policy.rejected)


@dataclass
class SimPO(PreferenceObjective):
    """SimPO (Meng et al. 2024): −log σ(β ā_w − β ā_l − γ), mean token log-probs, no reference; TRL's CPOTrainer,
    loss_type "simpo". ``cpo_alpha`` 0 (pure SimPO), not CPOConfig's 1.0 (which adds the chosen NLL: CPO-SimPO)."""

    needs_reference: ClassVar[bool] = False
    beta: float = 0.1  # β: the scale of the reward β·ā (TRL's CPOConfig default; the paper uses about 2-2.5)
    simpo_gamma: float = 0.5  # γ: the target reward margin (TRL's CPOConfig default)
    cpo_alpha: float = 0.0  # weight of the chosen completion's NLL; 0: pure SimPO (TRL's CPOConfig: 1.0, CPO-SimPO)
    label_smoothing: float = 0.0  # ε: the share of pairs taken as mislabelled (conservative loss); 0: off
    disable_dropout: bool = True  # set every dropout to 0 for the run (TRL's default)

    def __post_init__(self) -> None:
        self._check()
        if not _number(self.simpo_gamma):
            raise DeltatuneError(f"simpo_gamma={self.simpo_gamma!r} must be a finite number")
        if not (_number(self.cpo_alpha) and self.cpo_alpha >= 0):
            raise DeltatuneError(f"cpo_alpha={self.cpo_alpha!r} must be a finite number >= 0 (0: pure SimPO)")
        if not (_number(self.label_smoothing) and 0 <= self.label_smoothing < 0.5):
            raise DeltatuneError(f"label_smoothing={self.label_smoothing!r} must be in [0, 0.5)")

    def compute(self, policy: Logps, reference: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = policy.chosen_mean, policy.rejected_mean
        logits = chosen - rejected - self.simpo_gamma / self.beta
        eps = self.label_smoothing
        losses = -F.logsigmoid(self.beta * logits) * (1 - eps) - F.logsigmoid(-self.beta * logits) * eps
        nll = _chosen_nll(policy)
        loss = losses.mean() + self.cpo_alpha * nll if self.cpo_alpha else losses.mean()
        metrics = _reward_metrics(self.beta * chosen, self.beta * rejected, chosen, rejected)
        metrics["nll_loss"] = float(nll.detach())
        return loss, metrics


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x ≤ 0, without cancellation (branch at −ln 2, as TRL's ORPO)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@dataclass
class ORPO(PreferenceObjective):
    """ORPO (Hong et al. 2024): NLL(chosen) − λ·log σ(log odds ratio), mean token log-probs, no reference; TRL's
    ORPOTrainer (its NLL also counts the prompt's tokens; here only the completion's, as the paper)."""

    needs_reference: ClassVar[bool] = False
    beta: float = 0.1  # λ: the weight of the odds-ratio term next to the NLL (TRL's ORPOConfig default)
    disable_dropout: bool = True  # set every dropout to 0 for the run (TRL's default)


    def compute(self, policy: Logps, reference: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = policy.chosen_mean.float(), policy.rejected_mean.float()
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        nll = _chosen_nll(policy)
        loss = nll - self.beta * ratio.mean()
        metrics = _reward_metrics(self.beta * chosen, self.beta * rejected, chosen, rejected)
        metrics.update({"nll_loss": float(nll.detach()), "log_odds_ratio": float(ratio.detach().mean()),
                        "log_odds_chosen": float(log_odds.detach().mean())})
        return loss, metrics


def preference_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], objective: PreferenceObjective,
                    chunked: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective's loss (differentiable) and metrics on one [chosen; rejected] batch. The reference comes from
    the batch (``ref_logps``, precomputed) or from the base model now (``live_reference``), before the policy's
    forward so that no graph is held while it runs."""
    reference = None
    if objective.needs_reference:
        precomputed = batch.get("ref_logps")
        reference = ((precomputed[:, 0], precomputed[:, 1]) if precomputed is not None
                     else live_reference(model, batch, chunked))
    return objective.compute(sequence_logps(model, batch, chunked), reference)


def disable_dropout(model: torch.nn.Module) -> int:
    """Set the probability of every ``nn.Dropout`` in ``model`` (the delta's modules too) to 0, as TRL's
    ``disable_dropout_in_model``; returns how many there were."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
            count += 1
    return count


# ---------------------------------------------------------------- encoding


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _plain_pair(tokenizer: Any, x: rows.PreferenceExample) -> dict[str, list[int]]:
    """[BOS] prompt, then each completion + EOS, tokenized on their own (``encode_completion``)."""
    out: dict[str, list[int]] = {}
    for side, completion in (("chosen_ids", x.chosen), ("rejected_ids", x.rejected)):
        ids, labels = encode_completion(tokenizer, str(x.prompt), str(completion))
        start = len(ids) - sum(1 for t in labels if t != IGNORE_INDEX)
        out["prompt_ids"], out[side] = ids[:start], ids[start:]
    return out


def _chat_completion(tokenizer: Any, x: rows.PreferenceExample, completion: list[dict], prompt_text: str,
                     row: int, template: str | None) -> list[int]:
    """The tokens the template renders for ``completion`` after the prompt's generation prompt, up to its
    end-of-turn token."""
    full = encode._render(tokenizer, list(x.prompt) + completion, False, row, template)
    if not full.startswith(prompt_text):
        raise DeltatuneError(
            f"the chat template renders the prompt of pair {row + 1} differently alone (with the generation prompt) "
            "and followed by its completion, so the completion's tokens cannot be told apart; use a template that "
            "renders earlier turns the same way (data.chat_template)"
        )
    return _ids(tokenizer, full[len(prompt_text):].rstrip())


def encode_pair(tokenizer: Any, x: rows.PreferenceExample, row: int, template: str | None = None
                ) -> dict[str, list[int]]:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` of one row (TRL's names), uncut."""
    if not x.conversational:
        return _plain_pair(tokenizer, x)
    prompt_text = encode._render(tokenizer, list(x.prompt), True, row, template)
    return {"prompt_ids": _ids(tokenizer, prompt_text),
            "chosen_ids": _chat_completion(tokenizer, x, list(x.chosen), prompt_text, row, template),
            "rejected_ids": _chat_completion(tokenizer, x, list(x.rejected), prompt_text, row, template)}


class LabelPairs:
    """Preference pairs from labelled texts: the label-word classification prompt (``PromptEncoder``, the text cut
    so that the longest label word and EOS still fit in ``max_length``), the right label word as the chosen
    completion and a wrong one as the rejected, each + EOS; the words tokenized as they follow the prompt."""

    def __init__(self, tokenizer: Any, prompt: str, label_names: list[str], max_length: int) -> None:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DeltatuneError("preference pairs end each completion with the EOS token, but the tokenizer has "
                                 "none; set tokenizer.eos_token")
        tail = prompt.split("{text}")[1]
        sep = "" if prompt[-1:].isspace() else " "
        tail_ids = _ids(tokenizer, tail)
        words = []
        for name in label_names:  # as PromptEncoder tokenizes a label word after the prompt
            joint = _ids(tokenizer, tail + sep + name)
            words.append(joint[len(tail_ids):] if joint[: len(tail_ids)] == tail_ids else _ids(tokenizer, sep + name))
        self.encoder = PromptEncoder(tokenizer, prompt, label_names, max_length - max(map(len, words)) - 1)
        shared = len(self.encoder.tail) - len(tail_ids)  # leading tokens of every label word, moved into the prompt
        self.completions = [w[shared:] + [int(eos)] for w in words]

    def pair(self, text: str, label: int, rng: random.Random) -> dict[str, list[int]]:
        wrong = [k for k in range(len(self.completions)) if k != label]
        rejected = wrong[0] if len(wrong) == 1 else rng.choice(wrong)
        return {"prompt_ids": self.encoder.encode(text), "chosen_ids": list(self.completions[label]),
                "rejected_ids": list(self.completions[rejected])}


def _labelled_part(cfg: DataConfig, part: DataConfig, tokenizer: Any) -> tuple[list[dict], list[dict]]:
    """A shipped labelled set as pairs, split and subsampled as the classification task splits it."""
    ds = rows.classification_data(part)
    train, held = ds.split(part.eval_fraction, seed=part.seed)
    if part.max_train is not None and part.max_train < len(train):
        train = train.subset(part.max_train, seed=part.seed)
    if part.max_eval is not None and part.max_eval < len(held):
        held = held.subset(part.max_eval, seed=part.seed)
    pairs = LabelPairs(tokenizer, cfg.resolved_prompt(), list(ds.label_names), cfg.max_length)
    rng = random.Random(part.seed)
    return tuple(  # type: ignore[return-value]
        [pairs.pair(t, y, rng) for t, y in zip(x.texts, x.labels, strict=True)] for x in (train, held)
    )


def _file_part(part: DataConfig, tokenizer: Any, template: str | None) -> tuple[list[dict], list[dict]]:
    """A file's ``{prompt, chosen, rejected}`` rows, split and cut as the chat task does."""
    examples = rows.preferences(rows.records(part))
    train_idx, eval_idx = split_indices(len(examples), part.eval_fraction, part.seed)
    if any(x.conversational for x in examples):
        check_template(tokenizer, template)
    return tuple(  # type: ignore[return-value]
        [encode_pair(tokenizer, examples[i], i, template) for i in rows.cut(idx, n)]
        for idx, n in ((train_idx, part.max_train), (eval_idx, part.max_eval))
    )


def _fitting(features: list[dict], max_length: int, part: str) -> list[dict]:
    """The pairs that keep at least one completion token within ``max_length`` (TRL drops the others too)."""
    kept = [f for f in features if len(f["prompt_ids"]) < max_length]
    if len(kept) < len(features):
        log.warning("dropped %d of %d %s pairs whose prompt alone fills data.max_length=%d tokens",
                    len(features) - len(kept), len(features), part, max_length)
    return kept


def _check_some_differ(features: list[dict], max_length: int) -> None:
    """Refuse training pairs whose chosen and rejected sequences are the same everywhere: the loss would be a
    constant (a few equal pairs are allowed; they only add a constant)."""
    def cut(f: dict, side: str) -> list[int]:
        return (f["prompt_ids"] + f[side])[:max_length]

    if features and all(cut(f, "chosen_ids") == cut(f, "rejected_ids") for f in features):
        raise DeltatuneError(
            f"in every one of the {len(features)} training pairs the chosen and rejected completions are the same "
            f"(within data.max_length={max_length} tokens), so the preference loss is a constant and nothing can "
            "train; check the 'chosen' and 'rejected' fields of the data (or raise data.max_length)"
        )


def build_preference(cfg: DataConfig, tokenizer: Any) -> PreferenceTask:
    """The preference task of ``cfg``: pairs from a file, or built from a shipped labelled set's labels."""
    template = cfg.resolved_chat_template()

    def encode_part(_: int, part: DataConfig) -> tuple[list, list]:
        if part.pairs_from_labels:
            return _labelled_part(cfg, part, tokenizer)
        return _file_part(part, tokenizer, template)

    train, held = _per_part(cfg, encode_part)
    train, held = _fitting(train, cfg.max_length, "training"), _fitting(held, cfg.max_length, "eval")
    _check_some_differ(train, cfg.max_length)
    return PreferenceTask(cfg, tokenizer, train, held, chat_template=template)


# ---------------------------------------------------------------- the task


class PreferenceTask(Task):
    """Pairs ``{prompt_ids, chosen_ids, rejected_ids}`` (+ ``ref``: the reference's two summed log-probs, once
    ``prepare_reference`` computed them); batches [chosen; rejected], the loss of ``objective`` (DPO by default;
    ``use_objective`` sets the run's)."""

    kind = "preference"

    def __init__(self, cfg: DataConfig, tokenizer: Any, train: list[dict], eval: list[dict],
                 chat_template: str | None = None) -> None:
        super().__init__(cfg, tokenizer, train, eval)
        self.chat_template = chat_template
        self.objective: PreferenceObjective = DPO()
        self._seen: list[dict[str, float]] = []

    def use_objective(self, objective: PreferenceObjective) -> None:
        if not isinstance(objective, PreferenceObjective):
            raise DeltatuneError(
                f"task 'preference' trains with a preference objective (dpo, ipo, simpo, orpo), not "
                f"{type(objective).__name__}; set train.objective"
            )
        self.objective = objective

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """[chosen; rejected]: 2n right-padded rows cut to ``max_length``, labels on the completion tokens only;
        ``ref_logps`` (n, 2) when every pair has precomputed reference log-probs."""
        limit = self.config.max_length
        seqs, labels = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for f in features:
                seqs.append((f["prompt_ids"] + f[side])[:limit])
                labels.append(([IGNORE_INDEX] * len(f["prompt_ids"]) + f[side])[:limit])
        batch = right_pad(seqs, self.pad_id, labels)
        if all("ref" in f for f in features):
            batch["ref_logps"] = torch.tensor([f["ref"] for f in features], dtype=torch.float32)
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        loss, metrics = preference_loss(model, batch, self.objective, self.chunked_loss)
        self._seen.append(metrics)
        return loss, int(batch["attention_mask"].sum())

    def take_metrics(self) -> dict[str, float]:
        """The mean of each metric over the batches ``loss`` saw since the last call (one training step)."""
        seen, self._seen = self._seen, []
        if not seen:
            return {}
        return {k: sum(m[k] for m in seen) / len(seen) for k in seen[0]}

    def _eval_batches(self, batch_size: int) -> list[list[dict]]:
        def length(f: dict) -> int:
            return len(f["prompt_ids"]) + max(len(f["chosen_ids"]), len(f["rejected_ids"]))

        order = sorted(range(len(self.eval)), key=lambda i: length(self.eval[i]))
        return [[self.eval[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]

    def _evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, float]:
        batches = [self.collate(features) for features in self._eval_batches(batch_size)]
        references: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(batches)
        if self.objective.needs_reference:
            live = [i for i, b in enumerate(batches) if "ref_logps" not in b]
            if live:  # one switch to the base model for every batch that needs it
                with reference_model(model) as reference:
                    for i in live:
                        logps = sequence_logps(reference, batches[i], self.chunked_loss)
                        references[i] = (logps.chosen, logps.rejected)
            for i, b in enumerate(batches):
                if "ref_logps" in b:
                    references[i] = (b["ref_logps"][:, 0], b["ref_logps"][:, 1])
        totals: dict[str, float] = {}
        for batch, reference in zip(batches, references, strict=True):
            loss, metrics = self.objective.compute(sequence_logps(model, batch, self.chunked_loss), reference)
            pairs = batch["input_ids"].shape[0] // 2
            for key, value in {"loss": float(loss), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + value * pairs
        out = {k: v / len(self.eval) for k, v in totals.items()}
        return {"loss": out.pop("loss"), HEADLINE: out.pop(HEADLINE), **out}

    # -- the reference of a delta trained in place -------------------------------------------------------------
    def prepare_reference(self, tuned: Any, folder: str | Path | None, *, resume: bool = False, write: bool = True,
                          batch_size: int = 16, precision: str = "fp32",
                          autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                          ) -> str | None:
        """For an objective with a reference and a delta that ``delta_off`` cannot switch cheaply (trained in
        place): the reference log-probs of every training and eval pair, computed once from the base model (under
        ``autocast``, as the loss runs) and kept in the pairs (``ref``), so batches carry them. With ``folder`` they
        are written there (``write``: one process of several writes), or on ``resume`` read back after checking
        that they belong to these pairs, this ``max_length``, base model and ``precision`` (a resumed run whose
        file is missing computes them again: the delta is not restored yet, the model is still the base). Returns
        what was done, None when nothing was needed."""
        if not self.objective.needs_reference or getattr(tuned, "switchable", True):
            return None
        key = self.reference_key(tuned, precision)
        path = Path(folder) if folder is not None else None
        if resume and path is not None and (path / REFERENCE_META).is_file():
            values = read_reference(path, key, {"train": len(self.train), "eval": len(self.eval)})
            done = f"read the reference log-probs from {path}"
        else:
            with autocast():
                values = {"train": self.compute_reference(tuned, self.train, batch_size),
                          "eval": self.compute_reference(tuned, self.eval, batch_size)}
            done = "computed the reference log-probs of every pair"
            if path is not None and write:
                write_reference(path, values, key)
                done += f" into {path}"
        for part, features in (("train", self.train), ("eval", self.eval)):
            for f, value in zip(features, values[part].tolist(), strict=True):
                f["ref"] = value
        log.info("%s (the delta trains in place: the base model is not kept beside it)", done)
        return done

    def compute_reference(self, model: torch.nn.Module, features: list[dict], batch_size: int) -> torch.Tensor:
        """The reference's summed completion log-probs (n, 2) of ``features``, in their order."""
        return reference_logps(model, features, self.collate, batch_size)

    def reference_key(self, tuned: Any, precision: str) -> str:
        """A hash of what the reference log-probs depend on: the tokenized pairs in order, ``max_length``, the base
        model (its fingerprint) and the precision they were computed in."""
        h = hashlib.sha256()
        fingerprint = tuned.fingerprint() if hasattr(tuned, "fingerprint") else {}
        h.update(json.dumps({"max_length": self.config.max_length, "precision": precision, "base": fingerprint},
                            sort_keys=True, default=str).encode())
        for part in (self.train, self.eval):
            h.update(b"|part|")
            for f in part:
                h.update(json.dumps([f[k] for k in FEATURE_KEYS[:3]]).encode())
        return h.hexdigest()


def reference_logps(model: torch.nn.Module, features: list[dict], collate: Callable[[list[dict]], dict],
                    batch_size: int) -> torch.Tensor:
    """The reference's summed completion log-probs (n, 2: chosen, rejected) of the pairs ``features``, in their
    order, batched by ``collate``; the delta ``model`` carries is taken off once for all of them."""
    out = []
    with reference_model(model) as reference:
        for s in range(0, len(features), batch_size):
            batch = collate([{k: f[k] for k in FEATURE_KEYS[:3]} for f in features[s:s + batch_size]])
            logps = sequence_logps(reference, batch)
            out.append(torch.stack([logps.chosen, logps.rejected], dim=1).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, 2))


def write_reference(folder: Path, values: dict[str, torch.Tensor], key: str) -> None:
    """The reference log-probs into ``folder`` (its own sub-folder of the run: swapped in atomically)."""
    meta = {"key": key, "rows": {part: int(v.shape[0]) for part, v in values.items()},
            "columns": ["chosen", "rejected"], "what": "summed completion log-probs of the base model"}
    artifact.write_tensor_dir(folder, dict(values), REFERENCE_FILE, {REFERENCE_META: meta},
                              checksum_into=REFERENCE_META, carry=False)


def read_reference(folder: Path, key: str, counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """The reference log-probs ``write_reference`` wrote, after checking that they belong to this run's pairs."""
    from safetensors.torch import load_file

    meta = json.loads((folder / REFERENCE_META).read_text())
    stale = (f"{folder / REFERENCE_FILE} holds the reference log-probs of other pairs ({meta.get('rows')} pairs; "
             f"this run has {counts})")
    if meta.get("rows") != counts or meta.get("key") != key:
        detail = "" if meta.get("rows") != counts else ", tokenized or cut otherwise, or of another base model"
        raise DeltatuneError(
            f"{stale}{detail}: the data, data.max_length, the model or the precision changed since they were "
            f"computed; resume with what the run started with, or delete {folder} to compute them again"
        )
    artifact.check_file(folder / REFERENCE_FILE, meta.get("files", {}).get(REFERENCE_FILE, {}), REFERENCE_META)
    tensors = load_file(str(folder / REFERENCE_FILE))
    return {part: tensors[part] for part in counts}

