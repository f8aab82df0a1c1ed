"""KaSA: knowledge-aware singular-value adaptation (Wang et al., ICLR 2025, arXiv 2412.06071).

Two changes to LoRA on each targeted matrix W (out, in):

1. *Truncation*: the base loses its ``d`` smallest singular components (``d = r`` by default),
   W_world = W − U_d Σ_d V_dᵀ, recomputed in fp32 from the original W whenever the delta is built
   (attach and load alike: it is deterministic, so it is never stored).
2. *SVD-form update*: ΔW = s·B·diag(Δσ)·A with a learnable r-vector Δσ between LoRA's factors
   (A Kaiming, B zero, Δσ ~ N(0, 1)), trained with an L2 penalty on Δσ (β) and an orthogonality
   penalty on A, B (γ), added to the task loss through the policy's ``extra_loss``.

Unlike PEFT, which overwrites the base weight with W_world, the base tensor is never written: the
dropped component is part of the delta (fixed rank-d factors, kept in memory, not in the artifact),
y = W x − U_d Σ_d V_dᵀ x + s·B(Δσ ⊙ A(dropout(x))). So detaching the delta gives back the original
model exactly, unmerge restores the original W (not W_world), and the artifact fingerprints the
original base. The extra cost is one rank-d product per layer, as small as the LoRA branch.

On a quantized base (``deltatune.core.quantized``) the truncation is taken from the dequantized weight, the
values the layer computes with, and needs nothing else: the rank-d factors are all that is kept of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from deltatune.core.forms.base import Form
from deltatune.core.forms.lowrank import LowRank, layout_of
from deltatune.core.policy import Policy
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import select_modules, sites_of
from deltatune.core.tuned import Tuned
from deltatune.errors import DeltatuneError
from deltatune.methods._lowrank import add_trained_extras, default_targets, pattern_value
from deltatune.methods.lora import LoraConfig

Truncation = Literal["min", "in_features", "none"]
Gram = Literal["rank", "full"]
Reduction = Literal["sum", "mean"]


@dataclass
class KasaConfig(LoraConfig):
    # The official GLUE runs (juyongjiang/KaSA main.py): r=8, alpha=16, dropout 0, beta=1e-4, gamma=1e-3;
    # PEFT's KasaConfig has the same beta/gamma defaults.
    r: int = 8
    alpha: float = 16.0  # scale = alpha / r (PEFT's own lora_alpha default is 8; KaSA's runs use 2r)
    dropout: float = 0.0  # on the adapter branch only, as in LoRA
    beta: float = 1e-4  # weight of the L2 penalty on the learnable singular values, Σ_layers ‖Δσ‖²
    gamma: float = 1e-3  # weight of the orthogonality penalty, Σ_layers ‖BᵀB − I‖_F + ‖AAᵀ − I‖_F
    # Which components the truncation drops; the official code and PEFT disagree:
    # "min" (default, follows the PEFT port and the paper's text): the r smallest of min(in, out) components.
    # "in_features" (the official code): keep in_features − r components, so a wide layer (in > out, e.g.
    #   LLaMA's down_proj) loses only max(0, r − (in − out)) components, none once in − out >= r.
    # "none": no truncation (the paper's ablation without it); the delta then starts at the base model.
    truncation: Truncation = "min"
    # The orthogonality penalty's Gram matrices; the official code and PEFT disagree:
    # "rank" (default, follows the paper's Eq. 11 and PEFT): r×r BᵀB and AAᵀ, zero for orthonormal factors.
    # "full" (the official main.py): AᵀA (in×in) and BBᵀ (out×out), rank <= r, so the penalty never goes
    #   below √(in − r) + √(out − r); for reproducing the published runs only (and memory-hungry on big layers).
    gram: Gram = "rank"
    # How the per-layer penalties combine: "sum" (default, follows PEFT's _get_kasa_loss) or "mean" (the
    # official main.py divides β·L2 + γ·L3 by the number of KaSA layers). β, γ do not carry over between the two.
    reduction: Reduction = "sum"
    # LoRA's other options (targets: None = the architecture's q/v projections, PEFT's defaults as in the official
    # runs; layers, types, exclude, use_rslora, init, bias, rank_pattern, alpha_pattern, modules_to_save) as in LoraConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 0 or self.gamma < 0:
            raise ValueError(f"beta={self.beta} and gamma={self.gamma} must be >= 0 (0 turns a penalty off)")


def dropped_count(out_features: int, in_features: int, r: int, truncation: Truncation) -> int:
    """How many of the smallest singular components the truncation removes from an (out, in) matrix."""
    k = min(out_features, in_features)
    if truncation == "none":
        return 0
    if truncation == "min":
        if r >= k:
            raise DeltatuneError(
                f"KaSA with r={r} would truncate every singular component of a {out_features}x{in_features} matrix: "
                f"r must be below min(in, out) = {k}. Lower r, or narrow the targets"
            )
        return r
    if r >= in_features:
        raise DeltatuneError(
            f"KaSA's truncation='in_features' keeps in_features − r components, none for r={r} on a layer with "
            f"{in_features} inputs: lower r or use truncation='min'"
        )
    return max(0, k - (in_features - r))


def truncated_factors(matrix: torch.Tensor, dropped: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``dropped`` smallest singular components of an (out, in) matrix as U_d·Σ_d (out, d) and V_dᵀ
    (d, in), from a thin SVD in fp32 (never in half precision). They are unique when σ_{k−d} > σ_{k−d+1},
    so rebuilding them from the same base gives the same truncation."""
    w = matrix.detach()
    w = w if w.dtype == torch.float64 else w.float()
    if dropped == 0:
        return w.new_zeros(w.shape[0], 0), w.new_zeros(0, w.shape[1])
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    keep = s.numel() - dropped
    return (u[:, keep:] * s[keep:]).contiguous(), vh[keep:, :].contiguous()


def kasa_penalty(delta: KasaDelta, beta: float, gamma: float, gram: Gram) -> torch.Tensor:
    """β·‖Δσ‖² + γ·(‖Gram(B) − I‖_F + ‖Gram(A) − I‖_F) for one layer, in fp32."""
    a, b, diag = delta.A.float(), delta.B.float(), delta.diag.float()
    if gram == "rank":
        gram_b, gram_a = b.T @ b, a @ a.T  # (r, r): ΔUᵀΔU and ΔVᵀΔV
    else:
        gram_a, gram_b = a.T @ a, b @ b.T  # (in, in) and (out, out), the official code's form
    eye_a = torch.eye(gram_a.shape[0], device=a.device, dtype=a.dtype)
    eye_b = torch.eye(gram_b.shape[0], device=b.device, dtype=b.dtype)
    ortho = torch.linalg.norm(gram_b - eye_b) + torch.linalg.norm(gram_a - eye_a)
    return beta * diag.pow(2).sum() + gamma * ortho


class KasaDelta(LowRank):
    """ΔW = s·B·diag(Δσ)·A − U_d·Σ_d·V_dᵀ on a Linear or GPT-2 Conv1D weight. The second term is the
    truncation: fixed, rebuilt from the base at every build, never stored."""

    kind = "kasa"

    def __init__(
        self,
        module: nn.Module,
        r: int,
        alpha: float,
        *,
        truncation: Truncation = "min",
        use_rslora: bool = False,
        dropout: float = 0.0,
        init: str | bool = True,
        tied: list[tuple[nn.Module, str]] | None = None,
    ) -> None:
        if layout_of(module) == "embedding":
            raise DeltatuneError(
                "KaSA truncates weight matrices of Linear / GPT-2 Conv1D layers, not embeddings: narrow the targets"
            )
        super().__init__(module, r, alpha, use_rslora=use_rslora, dropout=dropout, init=init, tied=tied)
        # PEFT draws Δσ right after the factors, with randn (B = 0, so its values do not move the output at step 0)
        self.diag = nn.Parameter(torch.randn(self.r, dtype=self.A.dtype, device=self.A.device))
        w0 = self.dense_base()  # a quantized base: the dequantized matrix, dropped once the SVD is taken
        matrix = w0 if self.layout == "linear" else w0.T  # (out, in) either way
        self.dropped = dropped_count(matrix.shape[0], matrix.shape[1], self.r, truncation)
        us, vh = truncated_factors(matrix, self.dropped)
        # buffers so they follow .to(device); left out of the artifact (see stored_tensors)
        self.register_buffer("dropped_us", us, persistent=False)
        self.register_buffer("dropped_vh", vh, persistent=False)

    def reset(self, init: str | bool = True) -> None:
        """PEFT builds lora_A and lora_B as nn.Linear layers, each drawing its default Kaiming init, and then
        re-initialises them: drawing the same numbers in the same order gives PEFT's factors bit for bit under
        the same seed (a few r·(in + out) draws)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
            if init is False:
                return  # PEFT's init_lora_weights=False keeps both defaults: the delta is non-zero (tests only)
            if init is True or init == "kaiming":
                nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(self.A, std=1 / self.r)
            else:
                raise DeltatuneError(f"init={init!r} is not a KaSA init: use True, 'gaussian' or False")
            nn.init.zeros_(self.B)

    # -- the artifact holds A, B, Δσ only ----------------------------------------------------
    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters()}

    def stored_tensors_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters()]

    # -- effect ------------------------------------------------------------------------------
    def truncation_weight(self) -> torch.Tensor:
        """U_d·Σ_d·V_dᵀ, (out, in): what the truncation takes away from the base."""
        return self.dropped_us @ self.dropped_vh

    def delta_weight(self) -> torch.Tensor:
        update = ((self.B * self.diag) @ self.A) * self.scale
        dw = update - self.truncation_weight().to(update.dtype)
        return dw if self.layout == "linear" else dw.T

    def output_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # PEFT's order of operations: B((A·dropout(x)) ⊙ Δσ)·s
        after_a = self.dropout(x.to(self.A.dtype)) @ self.A.T
        out = ((after_a * self.diag) @ self.B.T) * self.scale
        if self.dropped:
            xd = x.to(self.dropped_vh.dtype)  # the truncation applies to the undropped input
            out = out - ((xd @ self.dropped_vh.T) @ self.dropped_us.T).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropped={self.dropped}"


class KasaPolicy(Policy):
    """Static training plus KaSA's two regularisers (paper Eq. 9–11)."""

    name = "kasa"

    def __init__(self, beta: float, gamma: float, gram: Gram, reduction: Reduction) -> None:
        self.beta, self.gamma, self.gram, self.reduction = beta, gamma, gram, reduction

    def extra_loss(self, tuned: Tuned) -> torch.Tensor | None:
        deltas = [f for f in tuned.forms().values() if isinstance(f, KasaDelta) and f.diag.requires_grad]
        if not deltas or (self.beta == 0 and self.gamma == 0):
            return None
        device_type = deltas[0].A.device.type
        with torch.autocast(device_type, enabled=False):  # Gram matrices in fp32 even under mixed precision
            total = sum(kasa_penalty(f, self.beta, self.gamma, self.gram) for f in deltas)
        assert isinstance(total, torch.Tensor)
        return total / len(deltas) if self.reduction == "mean" else total


# the truncation removes singular directions of W when the delta attaches (the paper's knowledge-aware
# truncation; with "in_features" none on a wide matrix): a fresh delta starts at the truncated base, by design
@register("kasa", KasaConfig, "KaSA: truncate the r smallest singular components of W, SVD-form ΔW = s·B·diag(Δσ)·A",
          traits=Traits(starts_at_base=lambda cfg: cfg.truncation == "none", quantized_base=True),
          family="low-rank")
def build(model: nn.Module, cfg: KasaConfig, *, loading: bool = False) -> Built:
    targets = cfg.targets or default_targets(model)
    modules = select_modules(model, targets, layers=cfg.layers, types=cfg.types, exclude=cfg.exclude)
    if not modules:
        raise DeltatuneError(f"KaSA targets {targets} match no module of {type(model).__name__}: check the names")
    forms: dict[str, Form] = {}
    for name, module in modules:
        r = int(pattern_value(cfg.rank_pattern, name, cfg.r))
        alpha = pattern_value(cfg.alpha_pattern, name, cfg.alpha)
        try:
            forms[f"{name}.weight"] = KasaDelta(
                module, r, alpha, truncation=cfg.truncation, use_rslora=cfg.use_rslora, dropout=cfg.dropout,
                init=cfg.init, tied=[s for s in sites_of(model, module.weight) if s[0] is not module],
            )
        except DeltatuneError as e:
            raise DeltatuneError(f"{name}: {e}") from e
    add_trained_extras(model, modules, cfg.bias, cfg.modules_to_save, forms, "KaSA")
    return Built(forms, KasaPolicy(cfg.beta, cfg.gamma, cfg.gram, cfg.reduction))
