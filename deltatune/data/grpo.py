"""GRPO (``train.objective: grpo``): online RL from prompts and reward functions, as TRL 1.x's ``GRPOTrainer``.

Rows ``{prompt, ...}`` (``data.task: prompts``, a local jsonl / csv / parquet file): the prompt is plain text
(tokenized as is, the tokenizer's own special tokens added, as TRL does) or a list of chat messages (rendered
with the chat template and its generation prompt). The other columns reach the reward functions as keyword
lists (``deltatune.data.rewards``). Each training step, for the batch's B prompts (``train.batch_size`` counts
prompts, not completions as TRL's ``per_device_train_batch_size`` does):

1. G = ``num_generations`` completions per prompt are sampled with ``model.generate`` (KV cache, left-padded
   prompts, temperature / top_p, no top-k, at most ``max_completion_length`` new tokens) from the global torch
   RNG, so the loop's saved RNG state makes a resumed run sample what the uninterrupted one sampled. Tokens
   after the first EOS (the tokenizer's and the generation config's) are masked, the EOS itself scored.
2. Each reward function scores every completion; the reward is their weighted sum, a function's None / NaN
   left out (nansum); a completion no function scored has no reward and no advantage. A function that raises is
   an error naming it and the row it failed on; a batch where no completion got any reward is an error (the
   loss would be a silent zero).
3. Advantages A_i = (r_i - mean of its group) / (std + 1e-4), the std Bessel-corrected (TRL's ``nanstd``) over
   the group (``scale_rewards: group``), the batch (``batch``), or no division (``none``, Dr. GRPO).
4. One forward over prompt + completion, with gradients, gives each completion token's log-prob (logits divided
   by the temperature, as TRL's fused head does); the old log-probs are these detached (one update per
   generation: ratio 1, the clip inactive, as TRL with ``num_iterations: 1``). Token loss
   -min(ρ A, clip(ρ, 1 - ε_low, 1 + ε_high) A), + β·k3 when ``beta`` > 0, k3 = exp(ref - logp) - (ref - logp) - 1
   against the reference: the base model, the same network with the delta taken off (``Tuned.delta_off``),
   computed before the policy's forward (an in-place form writes its tensors back when taken off).
5. Aggregation by ``loss_type``: grpo (mean over each sequence's tokens, then over sequences), bnpo (mean over
   the batch's tokens), dr_grpo (sum / (sequences x max_completion_length)), dapo (sum / the tokens of the whole
   accumulated batch in TRL; here the micro-batch's, see below).

Choices this module makes where TRL or the spec leave room (say so in reports):

- Sampling runs with the model in eval mode (no dropout): the completions come from the policy a user will
  serve, and the reward does not depend on dropout noise. TRL samples in train mode (``disable_dropout`` False
  by default); with one update per generation the loss is the same either way (old = current log-probs).
- Generation and its scoring happen per micro-batch (``train.grad_accum`` micro-batches each generate their
  own), not once per accumulated batch (TRL's ``steps_per_generation``). So ``dapo`` normalises by the
  micro-batch's completion tokens (what ``bnpo`` does); the two agree with TRL exactly at ``grad_accum: 1`` on
  one process. ``aggregate(..., num_items=...)`` takes the global count for a loop that gathers it.
- ``num_iterations`` > 1 (reusing one generation for several optimizer steps) is refused: the loop feeds a new
  batch each step, and a buffer of generations would have to enter checkpoints for an exact resume.
- ``max_completion_length`` keeps TRL's 512; ``examples/grpo.yaml`` sets a smaller one for a CPU.

The step's numbers stay in ``task.last_metrics`` (and ``take_metrics`` gives those of every micro-batch since its
last call, combined: the loop logs them with each step; TRL's names: ``reward``, ``reward_std``,
``frac_reward_zero_std``, ``rewards/<name>/mean|std``, ``kl`` when β > 0, ``entropy``, ``clip_ratio/low_mean``,
``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``completions/mean_length|min_length|max_length|
clipped_ratio|mean_terminated_length``; plus ``frac_reward_unscored``, completions no function scored), the
sampled completions in ``task.last_completions`` and the evaluation's greedy ones in
``task.last_eval_completions``. ``evaluate`` samples one greedy completion per eval prompt and reports the mean
reward (``reward``, ``rewards/<name>/mean``) and ``completions/mean_length``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from deltatune.core.policy import Policy
from deltatune.data import lm_loss
from deltatune.data import rewards as reward_fns
from deltatune.data import rows as data_rows
from deltatune.data.config import DataConfig
from deltatune.data.encode import check_template, left_pad
from deltatune.data.lm_loss import IGNORE_INDEX
from deltatune.data.tasks import Task, _accepts, _device_of, _Modes, _unwrap
from deltatune.errors import DeltatuneError

log = logging.getLogger(__name__)

LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)
KIND = "prompts"  # the data task GRPO reads (data.task: prompts)
# why a method that trains from forward passes cannot train GRPO (objectives.register(..., gradients=...))
WHY_GRADIENTS = "its loss is a surrogate whose value is zero at every step; only its gradient carries the rewards"


# ---------------------------------------------------------------- options


@dataclass
class GRPOOptions:
    """GRPO's options (``train.objective: {name: grpo, ...}``), TRL 1.x's ``GRPOConfig`` defaults."""

    num_generations: int = 8  # G: completions sampled per prompt, the group its advantages are normalised in
    max_completion_length: int = 512  # new tokens per completion at most (TRL's 512; a CPU run wants ~64-128)
    temperature: float = 1.0  # sampling temperature; the log-probs are of the logits divided by it, as TRL
    top_p: float = 1.0  # nucleus sampling mass (1.0: off)
    top_k: int = 0  # sample among the k likeliest tokens only (0: off, TRL's default)
    epsilon: float = 0.2  # ε_low: the ratio is clipped below at 1 - ε
    epsilon_high: float | None = None  # ε_high: clipped above at 1 + ε_high (None: ε; DAPO suggests 0.28)
    beta: float = 0.0  # KL coefficient (k3 against the base model, the delta taken off); 0: no reference pass
    scale_rewards: str = "group"  # "group": A = (r - group mean) / group std; "batch": the batch's std; "none": no division (Dr. GRPO)
    loss_type: str = "dapo"  # "dapo" | "grpo" | "bnpo" | "dr_grpo": how token losses are averaged (module docstring)
    rewards: list[Any] = field(default_factory=list)  # reward functions: exact | numeric | format | length | package.module:function, or {name: ..., option: ...}
    reward_weights: list[float] | None = None  # one weight per reward (None: all 1.0); the reward is the weighted sum
    num_iterations: int = 1  # optimizer steps per generation (only 1: ratio 1, TRL's default)
    mask_truncated_completions: bool = False  # a completion cut at max_completion_length (no EOS) takes no loss

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_choices()
        self._check_rewards()

    @property
    def epsilon_low(self) -> float:
        """TRL's name for the lower clip: ``epsilon``."""
        return self.epsilon

    @property
    def epsilon_upper(self) -> float:
        """The upper clip: ``epsilon_high``, else ``epsilon``."""
        return self.epsilon if self.epsilon_high is None else float(self.epsilon_high)

    def _check_numbers(self) -> None:
        def whole(key: str, least: int) -> None:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DeltatuneError(f"train.objective.{key}={value!r} must be a whole number of at least {least}")

        def real(key: str, ok: Any, what: str) -> None:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or not ok(value):
                raise DeltatuneError(f"train.objective.{key}={value!r} must be {what}")
            setattr(self, key, float(value))

        whole("num_generations", 2)  # one completion has no group to compare with
        whole("max_completion_length", 1)
        whole("top_k", 0)
        real("temperature", lambda v: v > 0, "a number above 0 (TRL 1.0)")
        real("top_p", lambda v: 0 < v <= 1, "in (0, 1] (1.0: off)")
        real("epsilon", lambda v: 0 <= v < 1, "in [0, 1) (TRL 0.2)")
        if self.epsilon_high is not None:
            real("epsilon_high", lambda v: v >= 0, "a number >= 0 or null (= epsilon)")
        real("beta", lambda v: v >= 0, "a number >= 0 (0: no KL term, TRL's default)")
        whole("num_iterations", 1)
        if self.num_iterations != 1:
            raise DeltatuneError(
                f"train.objective.num_iterations={self.num_iterations}: reusing one generation for several "
                "optimizer steps is not supported; set 1 (TRL's default: one update per generation)"
            )
        if not isinstance(self.mask_truncated_completions, bool):
            raise DeltatuneError(f"train.objective.mask_truncated_completions={self.mask_truncated_completions!r} "
                                 "must be true or false")

    def _check_choices(self) -> None:
        if self.scale_rewards not in SCALE_REWARDS:
            raise DeltatuneError(f"train.objective.scale_rewards={self.scale_rewards!r} is unknown; use one of "
                                 f"{', '.join(SCALE_REWARDS)}")
        if self.loss_type not in LOSS_TYPES:
            raise DeltatuneError(f"train.objective.loss_type={self.loss_type!r} is unknown; use one of "
                                 f"{', '.join(LOSS_TYPES)}")

    def _check_rewards(self) -> None:
        if isinstance(self.rewards, str | Mapping) or callable(self.rewards):
            self.rewards = [self.rewards]
        if not isinstance(self.rewards, list | tuple):
            raise DeltatuneError(f"train.objective.rewards={self.rewards!r} must be a list of reward functions")
        self.rewards = list(self.rewards)
        if not self.rewards:
            raise DeltatuneError(
                "train.objective grpo needs reward functions: set train.objective.rewards, e.g. [numeric] or "
                "[{name: format, pattern: '\\\\boxed\\{.+\\}'}] (docs/preference.md lists them)"
            )
        reward_fns.resolve_all(self.rewards)  # unknown names, bad options, imports: refused now, before loading
        weights = self.reward_weights
        if weights is None:
            return
        if not isinstance(weights, list | tuple) or len(weights) != len(self.rewards) or any(
                isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) for w in weights):
            raise DeltatuneError(
                f"train.objective.reward_weights={weights!r} must be a list of {len(self.rewards)} numbers, one "
                "per reward (or null: all 1.0)"
            )
        self.reward_weights = [float(w) for w in weights]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> GRPOOptions:
        """The options of an objective section (its ``name``, if there, must be grpo); unknown keys are an
        error listing the allowed ones."""
        values = dict(values or {})
        name = values.pop("name", "grpo")
        if name != "grpo":
            raise DeltatuneError(f"train.objective.name={name!r}: these are GRPO's options (name: grpo)")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise DeltatuneError(f"train.objective: unknown option {unknown[0]!r} for grpo; its options are "
                                 f"{', '.join(allowed)}")
        return cls(**values)

    def weights(self) -> list[float]:
        return self.reward_weights if self.reward_weights is not None else [1.0] * len(self.rewards)


def grpo_refusal(policy: Policy, method: str | None = None) -> str | None:
    """Why a method cannot train with GRPO, or None: a policy that takes whole steps itself (zeroth-order: SPSA
    from two forward passes) never runs the loss's backward, and GRPO's clipped surrogate has no value that
    such a step could estimate (its value is 0 at ratio 1 whatever the advantages; only its gradient
    carries the signal)."""
    if type(policy).train_step is Policy.train_step:
        return None
    who = repr(method) if method else "this method"
    return (f"train.objective grpo needs gradients ({WHY_GRADIENTS}), but {who} trains from forward passes (its "
            "policy takes the whole step); use a method that trains by gradients")


# ---------------------------------------------------------------- the pieces of the loss (tested one by one)


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """The Bessel-corrected standard deviation ignoring NaNs (TRL's ``nanstd``): NaN with fewer than 2 values."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.full_like(variance, math.nan))
    std = torch.sqrt(variance * correction)
    return std if keepdim else std.squeeze(dim)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, the std each was scaled by) for rewards laid out group after group (G consecutive
    completions of one prompt), as TRL's ``sum_then_normalize``. A NaN reward (unscored) stays out of its
    group's mean and std, and its advantage is 0; so is every advantage of a group whose rewards are equal."""
    groups = rewards.view(-1, num_generations)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif scale_rewards in ("group", "none"):  # "none": the group std only says which groups are all equal
        std = nanstd(groups, dim=1).repeat_interleave(num_generations)
    else:
        raise DeltatuneError(f"scale_rewards={scale_rewards!r} is unknown; use one of {', '.join(SCALE_REWARDS)}")
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0), std


def clipped_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                       epsilon_low: float, epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss -min(ρ A, clip(ρ, 1 - ε_low, 1 + ε_high) A), ρ), ρ = exp(logp - old logp); ``advantages``
    per sequence (broadcast over its tokens) or per token."""
    if advantages.dim() == logps.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages), ratio


def k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(π || π_ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0, 0 at equality);
    its mean over tokens sampled from π is unbiased."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int,
              num_items: float | torch.Tensor | None = None) -> torch.Tensor:
    """The batch's loss from per-token losses (sequences x tokens) and the mask of scored tokens, by
    ``loss_type``; ``num_items`` (dapo): the scored tokens of the whole accumulated batch, else this batch's."""
    mask = mask.to(per_token.dtype)
    total = per_token * mask
    if loss_type == "grpo":
        return (total.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return total.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return total.sum() / (per_token.shape[0] * max_completion_length)
    if loss_type == "dapo":
        count = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=per_token.dtype)
        return total.sum() / count.clamp(min=1.0)
    raise DeltatuneError(f"loss_type={loss_type!r} is unknown; use one of {', '.join(LOSS_TYPES)}")


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, terminated): 1 up to and including each row's first EOS (every token when it has none), and
    whether the row has an EOS (False: cut at the length limit)."""
    if not eos_ids:
        ones = torch.ones_like(completion_ids, dtype=torch.long)
        return ones, torch.zeros(completion_ids.shape[0], dtype=torch.bool, device=completion_ids.device)
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    terminated = is_eos.any(dim=1)
    first = torch.full((completion_ids.shape[0],), completion_ids.shape[1], dtype=torch.long,
                       device=completion_ids.device)
    first[terminated] = is_eos.int().argmax(dim=1)[terminated]
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device).expand_as(completion_ids)
    return (positions <= first.unsqueeze(1)).long(), terminated


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.to(x.dtype)
    return float((x * m).sum() / m.sum().clamp(min=1.0))


# ---------------------------------------------------------------- rows and prompts


def _as_messages(value: Any) -> list[dict] | None:
    """A prompt that is a list of chat messages (also JSON text of one, as a csv cell holds it), else None."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, list) and value and all(isinstance(m, Mapping) and "role" in m and "content" in m
                                                 for m in value):
        return [dict(m) for m in value]
    return None


def encode_prompt(tokenizer: Any, prompt: Any, row: int, template: str | None = None) -> list[int]:
    """A prompt's token ids as the model sees it before its completion: chat messages rendered with the chat
    template and its generation prompt, plain text tokenized with the tokenizer's special tokens (TRL)."""
    messages = _as_messages(prompt)
    if messages is None:
        if not isinstance(prompt, str) or not prompt:
            raise DeltatuneError(f"row {row + 1}: the prompt {prompt!r} is neither text nor a list of chat messages "
                                 "({role, content}); fix that row")
        return list(tokenizer(prompt)["input_ids"])
    check_template(tokenizer, template)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             chat_template=template)
    except Exception as e:  # jinja raises its own errors
        raise DeltatuneError(f"the chat template cannot render the prompt of row {row + 1}: {e}; fix that row") from e
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _read_part(part: DataConfig, tokenizer: Any, template: str | None, table: list[dict], offset: int
               ) -> tuple[list[dict], list[dict]]:
    """(train, eval) features ``{"input_ids", "row"}`` of one data part, its rows appended to ``table``."""
    if part.path is None:
        raise DeltatuneError(
            "data.task prompts reads rows {prompt, ...} from a local file: set data.path (the shipped data sets "
            "hold labelled texts, not prompts)"
        )
    records = data_rows.records(part)
    if not records.has("prompt"):
        raise records.missing("prompt", "data.path", "each row's prompt (rows {prompt, ...})")
    features, dropped = [], 0
    for i, row in enumerate(records.rows):
        if row.get("prompt") is None:
            raise records.missing("prompt", "data.path", "each row's prompt", row=i)
        ids = encode_prompt(tokenizer, row["prompt"], i, template)
        table.append(row)
        if len(ids) > part.max_length:  # a cut prompt loses its end (the question, the generation prompt)
            dropped += 1
            continue
        features.append({"input_ids": ids, "row": offset + i})
    if dropped:
        log.warning("dropped %d of %d prompts longer than data.max_length=%d tokens", dropped, len(records.rows),
                    part.max_length)
    train_idx, eval_idx = data_rows.split_indices(len(features), part.eval_fraction, part.seed)
    train = [features[i] for i in data_rows.cut(train_idx, part.max_train)]
    return train, [features[i] for i in data_rows.cut(eval_idx, part.max_eval)]


def build_prompts_task(cfg: DataConfig, tokenizer: Any, options: GRPOOptions) -> GRPOTask:
    """The GRPO task of a data section (rows {prompt, ...}): read, split, subsampled, prompts tokenized; the
    reward functions resolved and checked against the rows' columns."""
    template = cfg.resolved_chat_template() if cfg.chat_template is not None else None
    table: list[dict] = []
    trains, evals = [], []
    for i, part in enumerate(cfg.parts()):
        try:
            train, held = _read_part(part, tokenizer, template, table, len(table))
        except DeltatuneError as e:
            raise data_rows.in_part(e, cfg, i) from e
        trains.append(train)
        evals.append(held)
    if cfg.mix is None:
        train, held = trains[0], evals[0]
    else:
        train = data_rows.mix(trains, [p.weight for p in cfg.parts()], cfg.seed)
        held = [x for part in evals for x in part]
    return GRPOTask(cfg, tokenizer, train, held, table, options, chat_template=template)


# ---------------------------------------------------------------- the task


@dataclass
class Rollout:
    """One batch's sampled completions and what the loss needs of them (rows = prompts x G, group by group)."""

    rows: list[int]  # the data row of each completion
    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # (N, C), pad after the first EOS
    completion_mask: torch.Tensor  # (N, C): the scored tokens (up to and including EOS)
    terminated: torch.Tensor  # (N,) bool: ended with EOS
    lengths: torch.Tensor  # (N,) tokens generated up to and including EOS (before mask_truncated_completions)
    texts: list[str]
    per_function: torch.Tensor  # (N, F) float32, NaN where a function gave no reward
    rewards: torch.Tensor  # (N,) weighted sum, NaN where no function scored
    advantages: torch.Tensor  # (N,)
    std: torch.Tensor  # (N,) the std each advantage was scaled by (its group's, or the batch's)

    def inputs(self) -> dict[str, torch.Tensor]:
        """The forward inputs of prompt + completion: attention on real tokens, positions counted from each
        row's first real token (as ``generate`` counts them for left-padded prompts)."""
        ids = torch.cat([self.prompt_ids, self.completion_ids], dim=1)
        mask = torch.cat([self.prompt_mask, self.completion_mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


class GRPOTask(Task):
    """Prompts in, sampled completions scored by reward functions, GRPO's clipped surrogate as the loss."""

    kind = KIND

    def __init__(self, cfg: DataConfig, tokenizer: Any, train: list[dict], eval: list[dict], rows: list[dict],
                 options: GRPOOptions, chat_template: str | None = None) -> None:
        super().__init__(cfg, tokenizer, train, eval)
        self.rows = rows
        self.chat_template = chat_template
        self.columns = sorted({k for r in rows for k in r if k != "prompt"})
        self.use_objective(options)
        self.last_metrics: dict[str, float] = {}
        self._seen: list[dict[str, float]] = []
        self.last_completions: list[dict[str, Any]] = []
        self._completions_seen: list[dict[str, Any]] = []
        self.step_completions: list[dict[str, Any]] = []  # every micro-batch's of the step take_metrics closed
        self.last_eval_completions: list[dict[str, Any]] = []
        self.last_rollout: Rollout | None = None
        self._warned_unswitchable = False
        self._warned_flat = False

    def use_objective(self, options: Any) -> None:
        """Train with these GRPO options from now on: the reward functions resolved and checked against the rows'
        columns (the run's ``train.objective``; the loop and ``DeltaTuneTrainer`` set it)."""
        if not isinstance(options, GRPOOptions):
            raise DeltatuneError(f"data.task 'prompts' trains with train.objective grpo, not "
                                 f"{type(options).__name__}; set train.objective: {{name: grpo, rewards: [...]}}")
        found = reward_fns.resolve_all(options.rewards)
        for reward in found:
            reward.check_columns(self.columns)
        self.options, self.rewards = options, found
        self.weights = torch.tensor(options.weights(), dtype=torch.float32)

    def take_metrics(self) -> dict[str, float]:
        """The step's metrics over the micro-batches ``loss`` saw since the last call: the mean of each (NaN ones
        left out), the minimum / maximum of the completions' min / max lengths. The step's completions (those of
        all its micro-batches) move to ``step_completions``, which the run's ``logs/completions.jsonl`` reads."""
        seen, self._seen = self._seen, []
        self.step_completions, self._completions_seen = self._completions_seen, []
        if not seen:
            return {}
        out = {}
        for key in seen[0]:
            values = [m[key] for m in seen if key in m and math.isfinite(m[key])]
            if not values:
                out[key] = math.nan
            elif key.endswith("/min_length"):
                out[key] = min(values)
            elif key.endswith("/max_length"):
                out[key] = max(values)
            else:
                out[key] = sum(values) / len(values)
        return out

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Left-padded prompts (generation appends on the right) and each prompt's data row."""
        batch = left_pad([f["input_ids"] for f in features], self.pad_id)
        batch["row"] = torch.tensor([f["row"] for f in features], dtype=torch.long)
        return batch

    # -- sampling -------------------------------------------------------------------------------
    def eos_ids(self, model: torch.nn.Module) -> list[int]:
        """Every token that ends a completion: the tokenizer's EOS and the generation config's (TRL)."""
        ids: list[int] = []
        config = getattr(_unwrap(model), "generation_config", None)
        for value in (self.tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
            for v in (value if isinstance(value, list | tuple) else [value]):
                if isinstance(v, int) and v not in ids:
                    ids.append(v)
        return ids

    @staticmethod
    def _holders(model: torch.nn.Module) -> list[torch.nn.Module]:
        """The modules whose train/eval mode the forward passes see: the model given and the Tuned carrying the
        delta (its forms are not submodules of the base model)."""
        from deltatune.core.tuned import carried_by

        out = [model]
        holder = carried_by(_unwrap(model))
        if isinstance(holder, torch.nn.Module) and holder is not model:
            out.append(holder)
        return out

    def generate(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], n: int, greedy: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt ids, prompt mask, completion ids, completion mask) of ``n`` completions per prompt, prompts
        repeated group by group; sampled from the global torch RNG (or greedy), in eval mode, without gradients.
        Tokens after each completion's first EOS are set to the pad id."""
        o = self.options
        base = _unwrap(model)
        device = _device_of(base)
        ids = batch["input_ids"].to(device).repeat_interleave(n, dim=0)
        mask = batch["attention_mask"].to(device).repeat_interleave(n, dim=0)
        eos = self.eos_ids(model)
        sampling = {"do_sample": False} if greedy else {
            "do_sample": True, "temperature": o.temperature, "top_p": o.top_p, "top_k": o.top_k, "min_p": None}
        modes = [_Modes(m) for m in self._holders(model)]
        try:
            for m in self._holders(model):
                m.eval()
            with torch.no_grad():
                out = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=o.max_completion_length,
                                    pad_token_id=self.pad_id, eos_token_id=eos or None, repetition_penalty=1.0,
                                    use_cache=True, **sampling)
        finally:
            for saved in modes:
                saved.restore()
        completion = out[:, ids.shape[1]:]
        cmask, _ = completion_mask(completion, eos)
        completion = completion.masked_fill(cmask == 0, self.pad_id)
        return ids, mask, completion, cmask

    def decode(self, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """The text of each completion's scored tokens (special tokens such as EOS left out)."""
        return [self.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
                for row, m in zip(completion_ids.cpu(), mask.cpu(), strict=True)]

    # -- rewards --------------------------------------------------------------------------------
    def _prompt_of(self, row: int) -> Any:
        prompt = self.rows[row]["prompt"]
        messages = _as_messages(prompt)
        return messages if messages is not None else prompt

    def score(self, rows: list[int], texts: list[str], completion_ids: list[list[int]]) -> torch.Tensor:
        """(N, F) rewards of N completions by every reward function, NaN where one gave none. A function that
        raises is an error naming it and the first row it fails on alone."""
        prompts = [self._prompt_of(r) for r in rows]
        chat = [isinstance(p, list) for p in prompts]
        completions = [[{"role": "assistant", "content": t}] if c else t for t, c in zip(texts, chat, strict=True)]
        available: dict[str, Any] = {"prompts": prompts, "completions": completions,
                                     "completion_ids": completion_ids}
        for column in self.columns:
            available[column] = [self.rows[r].get(column) for r in rows]
        out = torch.full((len(rows), len(self.rewards)), math.nan, dtype=torch.float32)
        for j, reward in enumerate(self.rewards):
            try:
                given = reward.fn(**reward.arguments(available))
            except Exception as e:  # user code (or a built-in refusing a row): find the row and say so
                raise self._failure(reward, available, rows, e) from e
            out[:, j] = torch.tensor(reward_fns.checked_rewards(reward.name, given, len(rows)), dtype=torch.float32)
        return out

    def _failure(self, reward: reward_fns.Reward, available: dict[str, Any], rows: list[int],
                 error: Exception) -> DeltatuneError:
        """The error for a reward function that raised: the first row it fails on when called on that row's
        completion alone (the batch as a whole if every single call works)."""
        for i, row in enumerate(rows):
            single = {k: v[i:i + 1] for k, v in available.items()}
            try:
                reward.fn(**reward.arguments(single))
            except Exception as e:
                prompt = str(self.rows[row].get("prompt"))[:80]
                return DeltatuneError(
                    f"reward function {reward.name!r} failed on row {row + 1} of the data (prompt {prompt!r}, "
                    f"completion {str(available['completions'][i])[:80]!r}): {type(e).__name__}: {e}; fix the "
                    "function or that row"
                )
        return DeltatuneError(f"reward function {reward.name!r} failed on a batch of rows "
                              f"{sorted({r + 1 for r in rows})}: {type(error).__name__}: {error}")

    def combine(self, per_function: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The weighted sum over functions, NaN ones left out (nansum); NaN where no function scored. Every
        completion unscored is an error (the loss would be a silent zero)."""
        unscored = torch.isnan(per_function).all(dim=1)
        if bool(unscored.all()):
            names = ", ".join(r.name for r in self.rewards)
            raise DeltatuneError(
                f"no reward function ({names}) gave a reward (every one returned None or NaN) for any completion of "
                f"the rows {sorted({r + 1 for r in rows})}: there is nothing to learn from; check the functions "
                "on these rows (a missing answer column, a pattern that never applies)"
            )
        rewards = (per_function * self.weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscored] = math.nan
        return rewards

    def rollout(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Rollout:
        """Sample G completions per prompt, score them, and their advantages."""
        o = self.options
        prompt_ids, prompt_mask, completion, cmask = self.generate(model, batch, o.num_generations)
        rows = [int(r) for r in batch["row"].repeat_interleave(o.num_generations)]
        texts = self.decode(completion, cmask)
        ids_list = [row[m.bool()].tolist() for row, m in zip(completion.cpu(), cmask.cpu(), strict=True)]
        per_function = self.score(rows, texts, ids_list)
        rewards = self.combine(per_function, rows)
        advantages, std = group_advantages(rewards, o.num_generations, o.scale_rewards)
        terminated = completion_mask(completion, self.eos_ids(model))[1]
        lengths = cmask.sum(-1)
        if o.mask_truncated_completions:
            cmask = cmask * terminated.unsqueeze(1).long()
        return Rollout(rows, prompt_ids, prompt_mask, completion, cmask, terminated, lengths, texts, per_function,
                       rewards, advantages, std)

    # -- log-probs ------------------------------------------------------------------------------
    def token_logps(self, model: torch.nn.Module, rollout: Rollout, entropy: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each completion token's log-prob under ``model`` (logits / temperature), (N, C), and optionally the
        per-token entropy (no gradient). The vocabulary-wide head runs on the completion positions only."""
        inputs = {k: v.to(_device_of(model)) for k, v in rollout.inputs().items()}
        width = rollout.completion_ids.shape[1]
        extra: dict[str, Any] = {}
        if _accepts(type(_unwrap(model)), "logits_to_keep"):
            extra["logits_to_keep"] = width + 1
        if self.chunked(model):  # train.chunked_loss: from the hidden states in chunks, never (N, C, V) logits
            # the last prompt position and the completion's: position j scores completion token j
            labels = F.pad(rollout.completion_ids.to(_device_of(model)), (1, 0), value=IGNORE_INDEX)
            out = lm_loss.token_nll(model, inputs, labels, temperature=self.options.temperature, entropy=entropy,
                                    **extra)
            return -out.nll[:, :width], (out.entropy[:, :width] if out.entropy is not None else None)
        logits = model(**inputs, use_cache=False, **extra).logits[:, -width - 1:-1, :]
        logp_all = torch.log_softmax(logits.float() / self.options.temperature, dim=-1)
        targets = rollout.completion_ids.to(logp_all.device).unsqueeze(-1)
        logps = logp_all.gather(-1, targets).squeeze(-1)
        ent = None
        if entropy:
            with torch.no_grad():
                detached = logp_all.detach()
                ent = -(detached.exp() * detached).sum(-1)
        return logps, ent

    def reference_logps(self, model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
        """The completion tokens' log-probs under the base model: the delta taken off for this forward
        (``Tuned.delta_off``), eval mode, no gradients."""
        from deltatune.core.tuned import carried_by

        base = _unwrap(model)
        holder = carried_by(base)
        if holder is None or not hasattr(holder, "delta_off"):
            raise DeltatuneError(
                "train.objective.beta > 0 compares the policy with the base model (the delta taken off), but this "
                "model carries no attached delta that can be taken off; attach one (dt.attach) or set beta: 0"
            )
        if not getattr(holder, "switchable", True) and not self._warned_unswitchable:
            log.warning("GRPO's KL reference: this delta trains the weights in place, so taking it off copies the "
                        "base weights back at every step (slower; beta: 0 avoids it)")
            self._warned_unswitchable = True
        modes = _Modes(base)
        try:
            with holder.delta_off() as reference, torch.no_grad():
                reference.eval()
                logps, _ = self.token_logps(reference, rollout)
        finally:
            modes.restore()
        return logps

    # -- the loss -------------------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """GRPO's loss for one batch of prompts (differentiable) and the batch's real tokens (prompts and scored
        completion tokens). The step's metrics go to ``last_metrics``, its completions to
        ``last_completions``."""
        o = self.options
        rollout = self.rollout(model, batch)
        ref = self.reference_logps(model, rollout) if o.beta != 0 else None  # before the policy's graph exists
        logps, entropy = self.token_logps(model, rollout, entropy=True)
        mask = rollout.completion_mask.to(logps.device)
        advantages = rollout.advantages.to(logps.device)
        per_token, ratio = clipped_token_loss(logps, logps.detach(), advantages, o.epsilon_low, o.epsilon_upper)
        kl = None
        if ref is not None:
            kl = k3(logps, ref.to(logps.device))
            per_token = per_token + o.beta * kl
        loss = aggregate(per_token, mask, o.loss_type, o.max_completion_length)
        self.last_rollout = rollout
        self.last_metrics = self._metrics(rollout, ratio.detach(), advantages, mask, entropy, kl)
        self._seen.append(self.last_metrics)
        if self.last_metrics["frac_reward_zero_std"] == 1.0 and not self._warned_flat:
            log.warning("GRPO: every group of completions got equal rewards in this batch, so every advantage is 0 "
                        "and the step learns nothing (logged as frac_reward_zero_std; said once)")
            self._warned_flat = True
        self.last_completions = self._samples(rollout)
        self._completions_seen += self.last_completions
        tokens = int(rollout.prompt_mask.sum()) + int(rollout.completion_mask.sum())
        return loss, tokens

    def _metrics(self, r: Rollout, ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 entropy: torch.Tensor | None, kl: torch.Tensor | None) -> dict[str, float]:
        """TRL's per-step metrics (names as TRL logs them)."""
        out: dict[str, float] = {}
        for j, reward in enumerate(self.rewards):
            column = r.per_function[:, j]
            out[f"rewards/{reward.name}/mean"] = float(torch.nanmean(column))
            out[f"rewards/{reward.name}/std"] = float(nanstd(column))
        out["reward"] = float(torch.nanmean(r.rewards))
        out["reward_std"] = float(nanstd(r.rewards))
        out["frac_reward_zero_std"] = float(torch.isclose(r.std, torch.zeros_like(r.std)).float().mean())
        out["frac_reward_unscored"] = float(torch.isnan(r.rewards).float().mean())
        if kl is not None:
            out["kl"] = masked_mean(kl.detach(), mask)
        if entropy is not None:
            out["entropy"] = masked_mean(entropy, mask)
        adv = advantages.unsqueeze(-1)
        low = (ratio < 1 - self.options.epsilon_low) & (adv < 0)
        high = (ratio > 1 + self.options.epsilon_upper) & (adv > 0)
        out["clip_ratio/low_mean"] = masked_mean(low.float(), mask)
        out["clip_ratio/high_mean"] = masked_mean(high.float(), mask)
        out["clip_ratio/region_mean"] = masked_mean((low | high).float(), mask)
        out.update(length_metrics(r.lengths, r.terminated))
        return out

    def _samples(self, r: Rollout) -> list[dict[str, Any]]:
        return [{"row": row, "prompt": self.rows[row]["prompt"], "completion": text, "reward": float(reward),
                 "advantage": float(adv),
                 "rewards": {f.name: float(v) for f, v in zip(self.rewards, values.tolist(), strict=True)}}
                for row, text, reward, adv, values in zip(r.rows, r.texts, r.rewards.tolist(),
                                                          r.advantages.tolist(), r.per_function, strict=True)]

    # -- evaluation -----------------------------------------------------------------------------
    def _evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, float]:
        """Mean reward of one greedy completion per eval prompt (``reward``, ``rewards/<name>/mean``) and the
        completions' mean length; the completions go to ``last_eval_completions``."""
        per_function, rewards, lengths, samples = [], [], [], []
        for features in self._eval_batches(batch_size):
            scores, summed, length, done = self._greedy_scores(model, self.collate(features))
            per_function.append(scores)
            rewards.append(summed)
            lengths.append(length)
            samples += done
        self.last_eval_completions = samples
        return self._eval_metrics(torch.cat(per_function), torch.cat(rewards), torch.cat(lengths))

    def evaluate_batch(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """``evaluate``'s metrics on one collated batch of prompts (``DeltaTuneTrainer``'s evaluation, batch by
        batch); its completions go to ``last_eval_completions``."""
        with torch.no_grad():
            scores, summed, lengths, self.last_eval_completions = self._greedy_scores(model, batch)
        return self._eval_metrics(scores, summed, lengths)

    def _greedy_scores(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
        """One greedy completion per prompt of ``batch``: its rewards per function, their weighted sum (NaN where
        none scored), its length, and the samples."""
        _, _, completion, cmask = self.generate(model, batch, 1, greedy=True)
        rows = [int(r) for r in batch["row"]]
        texts = self.decode(completion, cmask)
        ids_list = [row[m.bool()].tolist() for row, m in zip(completion.cpu(), cmask.cpu(), strict=True)]
        scores = self.score(rows, texts, ids_list)
        summed = (scores * self.weights.unsqueeze(0)).nansum(dim=1)
        summed[torch.isnan(scores).all(dim=1)] = math.nan
        samples = [{"row": row, "prompt": self.rows[row]["prompt"], "completion": text, "reward": float(s)}
                   for row, text, s in zip(rows, texts, summed.tolist(), strict=True)]
        return scores, summed, cmask.sum(-1).float().cpu(), samples

    def _eval_metrics(self, scores: torch.Tensor, summed: torch.Tensor, lengths: torch.Tensor) -> dict[str, float]:
        out = {"reward": float(torch.nanmean(summed))}
        for j, reward in enumerate(self.rewards):
            out[f"rewards/{reward.name}/mean"] = float(torch.nanmean(scores[:, j]))
        out["completions/mean_length"] = float(lengths.mean())
        return out


def length_metrics(lengths: torch.Tensor, terminated: torch.Tensor) -> dict[str, float]:
    """TRL's completion-length metrics: lengths of the scored tokens (EOS included), the share cut at the limit,
    and the mean length of those that ended with EOS (0 when none did)."""
    lengths = lengths.float().cpu()
    terminated = terminated.cpu()
    ended = lengths[terminated]
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float((~terminated).float().mean()),
        "completions/mean_terminated_length": float(ended.mean()) if len(ended) else 0.0,
    }
