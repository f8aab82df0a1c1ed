"""AdaLoRA (Zhang et al., ICLR 2023, arXiv 2303.10512): adaptive budget allocation over SVD-form deltas.

Each targeted matrix gets ΔW = s · P diag(Λ) Q with Q = ``A`` (r, in), Λ = ``E`` (r, 1), P = ``B`` (out, r)
and s = alpha / (ranknum + 1e-5), ranknum = the initial rank (constant: a pruned component still counts,
as in the official code and PEFT). Λ starts at 0, so training starts exactly at the base model.

The policy, after every optimizer step (PEFT's ``update_and_allocate``, with the 0-based step in progress):

1. smooths the sensitivity |w · ∂L/∂w| of every entry of P, Λ, Q (``_importance.SmoothedImportance``);
2. scores component i of matrix k as S = s(λ_ki) + mean_j s(Q_kij) + mean_j s(P_kji);
3. follows the budget b(t): b₀ = Σ initial ranks up to t_init, then a cubic decrease to
   b_T = target_r × #matrices at T − t_final, then b_T;
4. every ``delta_t`` steps of the middle phase zeroes the λ whose score is at or below the
   (b₀ − b(t))-th smallest; at T − t_final it fixes the final mask, re-applied after every later step.

The orthogonality regulariser γ · mean ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F is the policy's ``extra_loss``.

Artifact: per matrix the components whose λ is not 0 (zeroing a λ removes its rank-1 term exactly, so
this is lossless), i.e. tensors of the pruned shapes as PEFT saves them with its ``rank_pattern``; the
loaded form takes each matrix's final rank from the stored shapes. Training never resizes tensors (a
masked λ only stays at 0), so the optimizer and checkpoints need no restructuring; the smoothed
scores, the schedule and the final mask are the policy state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from deltatune.core.policy import Policy
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import sites_of
from deltatune.core.tuned import Tuned
from deltatune.errors import DeltatuneError
from deltatune.methods._importance import SmoothedImportance, orthogonality, sensitivity
from deltatune.methods._svd_triplet import SVDTriplet, svd_targets


@dataclass
class AdaLoraConfig:
    # Defaults: the official README example (QingruZhang/AdaLoRA) unless said otherwise; PEFT's
    # AdaLoraConfig differs where noted (pass PEFT's values to reproduce a PEFT run exactly).
    init_r: int = 12  # initial rank of every matrix (official and PEFT: 12)
    target_r: int = 8  # final average rank; b_T = target_r × #matrices (official and PEFT: 8)
    alpha: float = 16.0  # numerator of the scale alpha / (init_r + 1e-5) (official example 16; PEFT lora_alpha 8)
    # t_init / t_final: an int is a number of steps, a float in [0, 1) a share of the run. The official
    # example uses 500 / 1500 steps, its MNLI script 8000 / 50000 of ~86k steps; shares let one config
    # fit any run length [inferred]. PEFT: tinit = tfinal = 0.
    tinit: int | float = 0.1
    tfinal: int | float = 0.5  # final phase (fixed ranks) at the end: steps, or a share of the run
    delta_t: int = 10  # steps between two budget allocations (official example 10; PEFT deltaT 1)
    beta1: float = 0.85  # sensitivity EMA (official and PEFT)
    beta2: float = 0.85  # uncertainty EMA (official and PEFT)
    orth_reg_weight: float = 0.1  # γ of the orthogonality regulariser (official 0.1; PEFT 0.5)
    total_step: int | None = None  # T of the budget schedule; None: the run's length (required by PEFT)
    dropout: float = 0.0  # on the adapter branch (PEFT lora_dropout 0)
    # The paper adapts every weight matrix of each block (query, key, value, both FFN matrices and the
    # attention output); None: every Linear / GPT-2 Conv1D in the numbered blocks. PEFT: q and v only.
    targets: list[str] | None = None
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    exclude: list[str] | None = None  # name patterns left out (as in targets)

    def __post_init__(self) -> None:
        if self.init_r < 1 or self.target_r < 0 or self.target_r > self.init_r:
            raise ValueError(f"need 0 <= target_r <= init_r and init_r >= 1 (got init_r={self.init_r}, "
                             f"target_r={self.target_r})")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if value < 0 or (isinstance(value, float) and value >= 1):
                raise ValueError(f"{name}={value} must be a number of steps (int >= 0) or a share of the run in [0, 1)")
        if self.delta_t < 1:
            raise ValueError(f"delta_t={self.delta_t} must be >= 1")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight={self.orth_reg_weight} must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.total_step is not None and self.total_step < 1:
            raise ValueError(f"total_step={self.total_step} must be >= 1")


# -- the schedule -----------------------------------------------------------------------------------
def steps_of(value: int | float, total: int) -> int:
    """An int is steps; a float in [0, 1) is that share of the run (rounded down)."""
    return int(value) if isinstance(value, int) else int(math.floor(value * total))


def budget_at(step: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total: int,
              delta_t: int) -> tuple[int, bool]:
    """(budget, mask now?) at a 0-based step: PEFT's ``RankAllocator.budget_schedule``."""
    if step <= tinit:
        return init_bgt, False
    if step > total - tfinal:
        return target_bgt, True
    mul = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul ** 3) + target_bgt), step % delta_t == 0


# -- the policy -------------------------------------------------------------------------------------
class AdaLoraPolicy(Policy):
    """Importance smoothing, the cubic budget and λ masking after every optimizer step (module docstring)."""

    name = "adalora"

    def __init__(self, cfg: AdaLoraConfig, names: list[str]) -> None:
        self.cfg = cfg
        self.names = names
        self.importance = SmoothedImportance(cfg.beta1, cfg.beta2)
        self.schedule: tuple[int, int, int] | None = None  # (T, t_init, t_final)
        self.rank_pattern: dict[str, torch.Tensor] | None = None  # keep-flags per matrix after the last mask
        self._restored = False
        self._tuned: Tuned | None = None

    def setup(self, tuned: Tuned) -> None:
        self._tuned = tuned

    def _forms(self) -> dict[str, SVDTriplet]:
        if self._tuned is None:
            raise DeltatuneError("adalora: the policy has no model yet; attach it with dt.attach")
        forms = self._tuned.forms()
        return {n: forms[n] for n in self.names}

    @property
    def init_bgt(self) -> int:
        return sum(f.r for f in self._forms().values())

    @property
    def target_bgt(self) -> int:
        return self.cfg.target_r * len(self.names)

    def plan(self, total_steps: int, grad_accum: int) -> None:
        if self._restored:  # a resumed run keeps its schedule (train.steps may grow)
            return
        total = self.cfg.total_step or total_steps
        tinit, tfinal = steps_of(self.cfg.tinit, total), steps_of(self.cfg.tfinal, total)
        if tinit >= total - tfinal:
            raise DeltatuneError(
                f"adalora: t_init={tinit} and t_final={tfinal} leave no budgeting phase in {total} steps "
                "(need t_init < total_step - t_final): lower tinit / tfinal or train longer"
            )
        self.schedule = (total, tinit, tfinal)

    def budget(self, step: int) -> tuple[int, bool]:
        total, tinit, tfinal = self._schedule()
        return budget_at(step, self.init_bgt, self.target_bgt, tinit, tfinal, total, self.cfg.delta_t)

    def _schedule(self) -> tuple[int, int, int]:
        if self.schedule is None:
            raise DeltatuneError("adalora: call tuned.policy.plan(total_steps, grad_accum) before training "
                                 "(dt.train and the Trainer bridge do it)")
        return self.schedule

    # -- the steps ------------------------------------------------------------------------------
    def after_optimizer_step(self, step: int, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        """PEFT's ``AdaLoraModel.update_and_allocate(step)``: the optimizer has stepped, gradients remain."""
        total, _, tfinal = self._schedule()
        if step < total - tfinal:
            self.update_importance()
            budget, mask = self.budget(step)
            if mask:
                self.mask_to_budget(budget)
        elif step == total - tfinal:
            self.mask_to_budget(self.target_bgt)  # the final mask, on the scores as they stand
            self.importance.reset()  # not needed any more (PEFT frees them too)
        else:
            self.apply_rank_pattern()

    def update_importance(self) -> None:
        for name, form in self._forms().items():
            for t in ("A", "E", "B"):
                ipt = sensitivity(getattr(form, t))
                if ipt is not None:  # no gradient this step (a skipped step): the EMAs wait
                    self.importance.update(f"{name}.{t}", ipt)

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """S per component of each matrix (PEFT's ``mask_to_budget``, same arithmetic order)."""
        out = {}
        for name in self._forms():
            keys = [f"{name}.{t}" for t in ("A", "E", "B")]
            if not all(k in self.importance for k in keys):
                raise DeltatuneError(f"adalora: no importance for {name} yet; scores need one step with gradients")
            s_a, s_e, s_b = (self.importance.score(k) for k in keys)
            ab = torch.cat([s_a.mean(dim=1, keepdim=True), s_b.mean(dim=0).view(-1, 1)], dim=1)
            out[name] = s_e.view(-1) + ab.sum(dim=1)
        return out

    def mask_to_budget(self, budget: int) -> dict[str, torch.Tensor]:
        """Zero the λ of every component scoring at or below the (b₀ − budget)-th smallest score."""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        if k <= 0:  # nothing to prune yet (PEFT would fail in kthvalue with k = 0)
            keep = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
        else:
            all_scores = torch.cat([s.reshape(-1).float().cpu() for s in scores.values()])
            threshold = torch.kthvalue(all_scores, k)[0].item()
            keep = {n: ~(s <= threshold) for n, s in scores.items()}
        self.rank_pattern = keep
        self.apply_rank_pattern()
        return keep

    def apply_rank_pattern(self) -> None:
        if self.rank_pattern is None:
            return
        with torch.no_grad():
            for name, form in self._forms().items():
                form.E.masked_fill_(~self.rank_pattern[name].to(form.E.device).view(-1, 1), 0.0)

    def extra_loss(self, tuned: Tuned) -> torch.Tensor | None:
        if self.cfg.orth_reg_weight == 0:
            return None
        forms = self._forms().values()
        penalty = orthogonality([f.A for f in forms], [f.B for f in forms])
        return None if penalty is None else self.cfg.orth_reg_weight * penalty

    def ranks(self) -> dict[str, int]:
        """The current rank of each matrix: components whose λ is not 0."""
        return {n: int(f.kept().sum()) for n, f in self._forms().items()}

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"schedule": list(self.schedule) if self.schedule else None,
                                 "importance": self.importance.state_dict()}
        if self.rank_pattern is not None:
            state["rank_pattern"] = {n: m.to(torch.uint8) for n, m in self.rank_pattern.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sched = state.get("schedule")
        self.schedule = tuple(int(v) for v in sched) if sched else None  # type: ignore[assignment]
        self._restored = self.schedule is not None
        self.importance.load_state_dict(state.get("importance", {}))
        pattern = state.get("rank_pattern")
        self.rank_pattern = {n: m.bool() for n, m in pattern.items()} if pattern is not None else None


# -- the method -------------------------------------------------------------------------------------
@register("adalora", AdaLoraConfig,
          "AdaLoRA: SVD-form ΔW = PΛQ, λ pruned by smoothed sensitivity on a cubic budget (PEFT-compatible)",
          traits=Traits(quantized_base=True), family="low-rank")
def build(model: nn.Module, cfg: AdaLoraConfig, *, loading: bool = False) -> Built:
    forms: dict[str, SVDTriplet] = {}
    for name, module in svd_targets(model, cfg.targets, cfg.layers, cfg.exclude):
        form = SVDTriplet(module, cfg.init_r, cfg.alpha, dropout=cfg.dropout,
                          tied=[s for s in sites_of(model, module.weight) if s[0] is not module])
        if not loading:  # a loaded form takes its pruned shapes from the artifact
            form.init_like_peft()
        forms[f"{name}.weight"] = form
    if loading:
        return Built(dict(forms))
    return Built(dict(forms), AdaLoraPolicy(cfg, list(forms)))
