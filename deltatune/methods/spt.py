"""SPT (He et al., ICCV 2023, arXiv 2303.08566): sensitivity-aware parameter-efficient fine-tuning.

SPT decides per task *where* a fixed budget of trainable parameters goes, in two stages:

1. **Sensitivity**: on the first C training batches (model in train mode, the task's own loss),
   every candidate weight gets s = Σ_batches (∂L/∂θ)². ``sensitivity`` computes it one tensor at a
   time: a post-accumulate-grad hook adds g² into the score and frees the gradient at once, so no
   dense gradient of the whole model is ever held (the scores themselves are one fp32 copy of the
   candidate weights, which a global top-τ needs).
2. **Allocation**: mark the global top-τ scores. A matrix W with n_W marked entries is tuned
   *structurally* (LoRA or a parallel adapter on W, P(W) parameters) when n_W ≥ P(W)/α, else exactly
   its n_W marked entries are tuned (a sparse delta); a vector (bias, norm weight) is tuned fully when
   n ≥ len/β, else on its marked entries. τ is chosen so that the real cost is the closest achievable
   to the budget (an exact bisection on the score threshold, not the official 0.02M grid), and the
   real count is recorded.

Then the frozen model trains the chosen forms (LoRA: y += DropPath(B·A·dropout(x)) with no α/r
scaling; adapter: y += DropPath(W_up·GELU(W_down·dropout(x))); sparse δ at the marked indices; dense
vectors).

SPT was published for ViT; here it applies to transformer LMs and encoders. Candidate matrices are
every Linear / GPT-2 Conv1D in the numbered blocks (``_common.block_matrices``; embeddings and the
output head stay out, as the paper leaves out patch_embed / pos_embed / head), candidate vectors every
1-d tensor in the blocks (biases, norm weights). There is no cls token, so the official "+768" is not
added: the recorded cost is the exact trainable count of the allocation (``modules_to_save``, e.g. a
fresh classification head, trains fully on top, like the paper's head, outside the budget).

Where the sensitivity comes from (the builder sees only the model and the config, and configs are
JSON / YAML), exactly one of:

- ``data``: a mapping in the format of the run's ``data`` section (``deltatune.data.tasks.DataConfig``).
  The builder tokenizes it with the model's own tokenizer (``tokenizer`` overrides the name) and runs
  the pass on ``sensitivity_batches`` batches before the delta exists, so the optimizer sees the final
  forms from step 0 and a run loses no steps to calibration. In YAML an alias reuses the run's
  section, overrides included: ``data: &data {...}`` and ``method: {name: spt, data: *data}``.
- ``sensitivity``: a safetensors file written by ``save_sensitivity`` (scores from
  ``sensitivity(model, batches, loss_fn)``), or in Python a dict name -> tensor (consumed: the
  config keeps only the allocation it led to), or ``"random"`` (seeded uniform scores: the ablation
  "random allocation under the same rule and budget", and a data-free way to exercise the method).

The builder writes the chosen structure into ``allocation`` (structured matrices, sparse tensors with
their sizes, fully tuned vectors, budget and cost); the sparse indices are the sparse forms' tensors.
So the artifact's config alone rebuilds exactly the same forms (``dt.load``) without data. The
policy is static; it keeps the allocation in its state so a resumed run whose recomputed sensitivity
fell differently at a tie still loads its checkpoint into the forms it trained.

Defaults follow the official code (ziplab/SPT): r = 8, α = 10 (the scripts; the function default
is 5), β = 5, C = 8 batches (``engine.py``; ``train_spt.py`` says 16) of 32, dropout 0.1 on the
structured branch's input and DropPath 0.1 on its output. Dropout and DropPath follow the train /
eval mode of the layer they are attached to. The sensitivity pass runs without autocast, in the
model's own precision (the official AMP run makes the scores depend on the AMP settings).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.core.forms.base import Form
from deltatune.core.forms.lowrank import LowRank
from deltatune.core.forms.sparse import Sparse
from deltatune.core.policy import Policy
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import layer_index, match_name, select_modules, select_parameters, sites_of
from deltatune.errors import DeltatuneError
from deltatune.methods._calibration import LossFn, data_config, task_batches
from deltatune.methods._common import block_matrices, dense_forms, from_rank0

log = logging.getLogger(__name__)

RANDOM = "random"  # the reserved value of ``sensitivity`` for seeded uniform scores


@dataclass
class SptConfig:
    structured: Literal["lora", "adapter"] = "lora"  # the structured module on sensitive matrices
    r: int = 8  # low_rank_dim of LoRA / the adapter's bottleneck
    alpha: float = 10.0  # a matrix is structured iff n_W >= P(W)/alpha (scripts: 10; get_sensitivity default: 5)
    beta: float = 5.0  # a vector is tuned fully iff n >= len/beta
    budget: int | None = None  # trainable parameters SPT allocates (structured + sparse + vectors)
    # or a fraction of all model parameters; 0.5% is ViT-B/16's 0.43M, mid-way in the official 0.2-1.0M sweep
    density: float = 0.005
    dropout: float = 0.1  # on the structured branch's input (official structured_drop)
    drop_path: float = 0.1  # DropPath on the structured branch's output (official StructuredTuningModule)
    targets: list[str] | None = None  # candidate matrices; None: every Linear / Conv1D in the blocks
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    exclude: list[str] | None = None  # module / parameter name patterns left out of the candidates
    vectors: bool = True  # biases and norm weights in the blocks are candidates too (official structured_vector)
    modules_to_save: list[str] | None = None  # trained fully outside the budget (a fresh classification head)
    # where the sensitivity comes from: a .safetensors file / a dict (Python) / "random", or data
    sensitivity: str | dict[str, Any] | None = None
    data: dict[str, Any] | None = None  # a run-config data section (deltatune.data.tasks.DataConfig keys)
    tokenizer: str | None = None  # for data: tokenizer name or folder; None: the model's own (config._name_or_path)
    sensitivity_batches: int = 8  # C: engine.py default (train_spt.py's default is 16)
    sensitivity_batch_size: int = 32  # official batch size of the sensitivity pass
    seed: int = 0  # the calibration batches' order, dropout during the pass, and "random" scores
    device: str = "auto"  # where the pass runs: auto (CUDA if available) | cpu | cuda | cuda:N
    allocation: dict[str, Any] | None = None  # written by the builder: the structure of the delta

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r={self.r} must be a positive integer")
        if self.alpha <= 0 or self.beta <= 0:
            raise ValueError(f"alpha={self.alpha} and beta={self.beta} must be positive")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget={self.budget} must be a positive number of parameters (or null: use density)")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density={self.density} must be in (0, 1]")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.drop_path < 1.0):
            raise ValueError(f"dropout={self.dropout} and drop_path={self.drop_path} must be in [0, 1)")
        if self.sensitivity_batches < 1 or self.sensitivity_batch_size < 1:
            raise ValueError("sensitivity_batches and sensitivity_batch_size must be >= 1")
        if self.sensitivity is not None and self.data is not None:
            raise ValueError("give either sensitivity (scores) or data (to compute them), not both")
        if self.data is not None:
            data_config(self.data)  # bad keys fail when the config is read, not after the model loaded
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"device={self.device!r} is not a device: use auto, cpu, cuda or cuda:N") from e


# ---------------------------------------------------------------- candidates and costs


@dataclass
class Candidate:
    """One tensor SPT may tune: ``full_cost`` parameters when tuned structurally (P(W) for a matrix,
    its length for a vector), which it is iff the marked count n satisfies n * divisor >= full_cost."""

    name: str
    shape: tuple[int, ...]
    full_cost: int
    divisor: float  # alpha (matrices) or beta (vectors)
    param: nn.Parameter | None = None
    module: nn.Module | None = None  # the Linear / Conv1D of a matrix

    @property
    def is_matrix(self) -> bool:
        return self.module is not None or len(self.shape) == 2

    def structured(self, n: int) -> bool:
        return n > 0 and n * self.divisor >= self.full_cost

    def cost(self, n: int) -> int:
        return self.full_cost if self.structured(n) else n


def structured_params(d_in: int, d_out: int, r: int, kind: str) -> int:
    """P(W): LoRA r(d_in + d_out); the adapter's W_down (r, d_in) + b (r) and W_up (d_out, r) + b (d_out),
    which is the paper's 2·r·d + r + d when d_in = d_out = d (the official formula uses d_out for both,
    undercounting fc1; this counts what trains)."""
    if kind == "lora":
        return r * (d_in + d_out)
    if kind == "adapter":
        return r * d_in + r + d_out * r + d_out
    raise DeltatuneError(f"structured={kind!r}: use 'lora' or 'adapter'")


def _in_out(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[0], w.shape[1]) if _is_conv1d(module) else (w.shape[1], w.shape[0])


def _saved_params(model: nn.Module, cfg: SptConfig) -> list[tuple[str, nn.Parameter]]:
    if not cfg.modules_to_save:
        return []
    return [(f"{n}.{pn}", p) for n, m in select_modules(model, cfg.modules_to_save) for pn, p in m.named_parameters()]


def candidates(model: nn.Module, cfg: SptConfig | None = None) -> list[Candidate]:
    """The matrices and vectors SPT may tune, in model order (``modules_to_save`` left out)."""
    cfg = cfg or SptConfig()
    saved = {id(p) for _, p in _saved_params(model, cfg)}
    out: list[Candidate] = []
    seen: set[int] = set()
    for name, module in block_matrices(model, cfg.targets, cfg.layers, cfg.exclude):
        p = module.weight
        if id(p) in saved or id(p) in seen:
            continue
        seen.add(id(p))
        d_in, d_out = _in_out(module)
        out.append(Candidate(f"{name}.weight", tuple(p.shape), structured_params(d_in, d_out, cfg.r, cfg.structured),
                             cfg.alpha, p, module))
    if cfg.vectors:
        excludes = cfg.exclude or []
        for name, p in select_parameters(model, None, layers=cfg.layers):
            owner = name.rsplit(".", 1)[0]
            if p.dim() != 1 or not p.is_floating_point() or layer_index(name) is None or id(p) in saved or id(p) in seen:
                continue
            if any(match_name(x, name) or match_name(x, owner) for x in excludes):
                continue
            seen.add(id(p))
            out.append(Candidate(name, tuple(p.shape), p.numel(), cfg.beta, p))
    if not out:
        raise DeltatuneError("spt found no candidate tensors: widen targets / layers / exclude")
    return out


# ---------------------------------------------------------------- stage 1: sensitivity


def sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    params: list[tuple[str, nn.Parameter]] | None = None,
) -> dict[str, torch.Tensor]:
    """s = Σ_batches (∂ loss_fn(model, batch) / ∂θ)² for each named parameter (default: SPT's candidates),
    fp32, in the parameter's own layout. The model runs in train mode (as the official pass); its modes,
    ``requires_grad`` flags and existing ``.grad`` are the same afterwards. Each gradient is added to its
    score as soon as autograd has it and then freed: gradients exist one layer at a time, never all at once."""
    if params is None:
        params = [(c.name, c.param) for c in candidates(model) if c.param is not None]
    unique: dict[int, tuple[str, nn.Parameter]] = {}
    for name, p in params:
        unique.setdefault(id(p), (name, p))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    grads = {id(p): p.grad for _, p in unique.values()}
    scores = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in unique.values()}
    hooks = []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for name, p in unique.values():
            p.grad = None
            p.requires_grad_(True)
            hooks.append(p.register_post_accumulate_grad_hook(_accumulate_into(scores[name])))
        model.train()
        count = 0
        for batch in batches:
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss.detach()).all():
                raise DeltatuneError(
                    f"the loss of sensitivity batch {count + 1} is {loss.item()}: the scores would be NaN. "
                    "Check the data and the model's dtype (the pass runs in the model's own precision)"
                )
            loss.backward()
            count += 1
        if count == 0:
            raise DeltatuneError("sensitivity got no batches: pass at least one")
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        for _, p in unique.values():
            p.grad = grads[id(p)]
        for m, training in modes:
            m.training = training
    return scores


def _accumulate_into(score: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def hook(p: torch.Tensor) -> None:
        g = p.grad.detach().to(torch.float32)
        score.addcmul_(g, g)
        p.grad = None  # this layer's gradient is spent: free it before the next layer's arrives

    return hook


def save_sensitivity(scores: dict[str, torch.Tensor], path: str | os.PathLike) -> str:
    """Write scores to a safetensors file that ``sensitivity=<path>`` reads; returns the path."""
    from deltatune.core import artifact

    artifact.save_tensor_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in scores.items()}, path)
    return os.fspath(path)


def load_sensitivity(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise DeltatuneError(
            f"sensitivity={os.fspath(path)!r} is not a file: give a .safetensors file written by "
            "deltatune.methods.spt.save_sensitivity, 'random', or set data to compute the scores"
        )
    return load_file(os.fspath(path))


def _pass_device(cfg: SptConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _scores_from_data(model: nn.Module, cfg: SptConfig, cands: list[Candidate]) -> dict[str, torch.Tensor]:
    assert cfg.data is not None
    batches, loss_fn = task_batches(model, cfg.data, tokenizer=cfg.tokenizer, batches=cfg.sensitivity_batches,
                                    batch_size=cfg.sensitivity_batch_size, seed=cfg.seed)
    home = next(model.parameters()).device
    device = _pass_device(cfg)
    forked = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    model.to(device)  # the pass runs where the training will (attach happens before the loop moves the model)
    try:
        with torch.random.fork_rng(devices=forked):  # dropout masks from the seed; the caller's RNG untouched
            torch.manual_seed(cfg.seed)
            scores = sensitivity(model, batches, loss_fn, [(c.name, c.param) for c in cands if c.param is not None])
    finally:
        model.to(home)
    _same_on_every_rank(scores)
    return scores


def _scores(model: nn.Module, cfg: SptConfig, cands: list[Candidate]) -> dict[str, torch.Tensor]:
    source = cfg.sensitivity
    if source is None and cfg.data is None:
        raise DeltatuneError(
            "spt allocates its budget by gradient sensitivity and needs data for it: set the method's data to a "
            "data section (in YAML `data: &data {...}` and `method: {name: spt, data: *data}`), or pass "
            "sensitivity=<file from deltatune.methods.spt.save_sensitivity> (or a dict of scores), or "
            "sensitivity='random' for a random allocation"
        )
    if cfg.data is not None:
        return _scores_from_data(model, cfg, cands)
    if source == RANDOM:
        g = torch.Generator().manual_seed(cfg.seed)
        return {c.name: torch.rand(c.shape, generator=g) for c in cands}
    scores = load_sensitivity(source) if isinstance(source, (str, os.PathLike)) else dict(source)
    if not all(isinstance(v, torch.Tensor) for v in scores.values()):
        raise DeltatuneError("sensitivity as a mapping must map parameter names to tensors (from spt.sensitivity)")
    missing = [c.name for c in cands if c.name not in scores]
    wrong = [c.name for c in cands if c.name in scores and tuple(scores[c.name].shape) != c.shape]
    if missing or wrong:
        raise DeltatuneError(
            "the sensitivity scores do not fit this model's candidates: "
            + (f"missing {missing[:5]} ({len(missing)} in all); " if missing else "")
            + (f"wrong shape for {wrong[:5]}; " if wrong else "")
            + "compute them on this model with the same targets / layers / exclude / vectors"
        )
    return {c.name: scores[c.name] for c in cands}


def _same_on_every_rank(scores: dict[str, torch.Tensor]) -> None:
    """Data parallelism: every rank must choose the same structure, so all take rank 0's measured scores."""
    for name in sorted(scores):
        scores[name] = from_rank0(scores[name])


# ---------------------------------------------------------------- stage 1b: allocation


def allocate(
    cands: list[Candidate], scores: dict[str, torch.Tensor], budget: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Mark the entries with score >= t for the threshold t whose allocation costs the closest to
    ``budget`` (ties to the cheaper one); decide each tensor's form. Returns the JSON allocation and the
    flat indices of the sparse tensors.

    Every achievable top-τ is considered (up to ties), not the official 0.02M grid. The cost is
    non-increasing in t (each tensor's cost is non-decreasing in its marked count), and for s >= 0 the
    float bit patterns order like the values, so t is found exactly by a two-level radix select over the
    bits: one histogram pass of the high 16 bits gives every tensor's count at 2^15 coarse thresholds,
    a second pass over the one bin where the cost crosses the budget gives the low 16 bits. Two passes
    over the scores instead of one per bisection step."""
    bits = []
    for c in cands:
        s = scores[c.name].detach().to(torch.float32).contiguous()
        if not torch.isfinite(s).all() or bool((s < 0).any()):
            raise DeltatuneError(f"sensitivity of {c.name} has negative or non-finite entries; scores are sums of g²")
        if bool(torch.signbit(s).any()):
            s = s.abs()  # -0.0 would order below every positive score
        bits.append(s.view(-1).view(torch.int32))
    full = torch.tensor([c.full_cost for c in cands], dtype=torch.float64)
    divisor = torch.tensor([c.divisor for c in cands], dtype=torch.float64)

    def costs(counts: torch.Tensor) -> torch.Tensor:
        """Total cost per column of ``counts`` (tensors x thresholds), as each Candidate.cost."""
        n = counts.to(torch.float64)
        structured = (n > 0) & (n * divisor[:, None] >= full[:, None])
        return torch.where(structured, full[:, None], n).sum(0)

    # level 1: counts at t = j << 16 for every j (column 2^15: nothing marked)
    high = torch.stack([torch.bincount(b >> 16, minlength=1 << 15).cpu() for b in bits])
    above = torch.cat([high.flip(1).cumsum(1).flip(1), torch.zeros(len(bits), 1, dtype=high.dtype)], 1)
    coarse = costs(above)
    j = int((coarse <= budget).nonzero()[0])  # the first coarse threshold within budget
    if j == 0:
        t, counts = 0, above[:, 0]
    else:
        # level 2: inside bin j - 1, counts at t = (j - 1) << 16 | low for every low
        low = torch.stack([torch.bincount(b[(b >> 16) == j - 1] & 0xFFFF, minlength=1 << 16).cpu() for b in bits])
        fine_counts = above[:, j:j + 1] + low.flip(1).cumsum(1).flip(1)
        fine = costs(fine_counts)
        k = int((fine <= budget).nonzero()[0])  # >= 1: at low = 0 the cost is coarse[j - 1] > budget
        if abs(float(fine[k - 1]) - budget) < abs(budget - float(fine[k])):
            k -= 1  # one step more is closer to the budget (ties stay under it)
        t, counts = ((j - 1) << 16) | k, fine_counts[:, k]
    structured, unstructured, vectors, indices = [], {}, [], {}
    total = 0
    for c, b, n in zip(cands, bits, counts.tolist(), strict=True):
        if n == 0:
            continue
        total += c.cost(n)
        if c.structured(n):
            (structured if c.is_matrix else vectors).append(c.name)
        else:
            unstructured[c.name] = n
            indices[c.name] = (b >= t).nonzero().view(-1)
    plan = {"structured": structured, "unstructured": unstructured, "vectors": vectors, "budget": int(budget),
            "cost": total}
    return plan, indices


# ---------------------------------------------------------------- stage 2: forms


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """DropPath (stochastic depth) on a branch: zero the whole branch for a sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class SptLoRA(LowRank):
    """SPT's LoRA branch: y += DropPath(B·A·dropout(x)), no α/r scaling (scale 1); mergeable as LoRA."""

    def __init__(self, module: nn.Module, r: int, dropout: float = 0.1, drop_path: float = 0.1) -> None:
        super().__init__(module, r, alpha=r)  # alpha = r: scale 1, as the official branch
        self.p_dropout, self.p_drop_path = float(dropout), float(drop_path)

    def output_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x.to(self.A.dtype), self.p_dropout, module.training)
        return drop_path(x @ self.A.T @ self.B.T, self.p_drop_path, module.training)


class ParallelAdapter(Form):
    """A parallel bottleneck next to a Linear / Conv1D: y += DropPath(W_up·GELU(W_down·dropout(x)) + b).

    Activation-side and non-linear, so it cannot be merged into weights. W_down keeps nn.Linear's
    Kaiming-uniform init and W_up (and its bias) start at zero, as the official code: the model starts at
    the base."""

    kind = "adapter"
    mergeable = False

    def __init__(self, module: nn.Module, r: int, dropout: float = 0.1, drop_path: float = 0.1) -> None:
        super().__init__()
        self._sites = [(module, "weight")]  # a plain list: the base module must not become a submodule
        w = module.weight
        d_in, d_out = _in_out(module)
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.down = nn.Linear(d_in, r, dtype=dtype, device=w.device)
        self.up = nn.Linear(r, d_out, dtype=dtype, device=w.device)
        with torch.no_grad():
            self.up.weight.zero_()
            self.up.bias.zero_()
        self.p_dropout, self.p_drop_path = float(dropout), float(drop_path)
        self._handle: Any = None

    def attach(self) -> None:
        if not self.attached:
            self._handle = self._sites[0][0].register_forward_hook(self._hook)
            self.attached = True

    def detach(self) -> None:
        if self.attached:
            self._handle.remove()
            self._handle = None
            self.attached = False

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = F.dropout(args[0].to(self.down.weight.dtype), self.p_dropout, module.training)
        delta = drop_path(self.up(F.gelu(self.down(x))), self.p_drop_path, module.training)
        return (output + delta).to(output.dtype)

    def base_tensors(self) -> dict[str, torch.Tensor]:
        return {"": self._sites[0][0].weight}

    def extra_repr(self) -> str:
        return f"r={self.down.out_features}, dropout={self.p_dropout}, drop_path={self.p_drop_path}"


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class _ParametrizedSparse(Sparse):
    """A sparse delta seen through a parametrisation (W0 + scatter) instead of sparse.py's own layer forward.

    For a GPT-2 Conv1D whose bias SPT tunes too: the bias's parametrisation renames the module's class
    (ParametrizedConv1D), which the sparse forward's layer-kind check does not recognise, and the
    attach / re-attach order after unmerge cannot keep the weight's forward in front of it."""

    def _functional(self) -> bool:
        return False


def _lookup(model: nn.Module, name: str) -> tuple[nn.Module, nn.Parameter]:
    owner, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
        param = getattr(module, attr)
    except AttributeError as e:
        raise DeltatuneError(
            f"the spt allocation names {name!r}, which this model does not have: the artifact was made for "
            "another architecture"
        ) from e
    if not isinstance(param, nn.Parameter):
        raise DeltatuneError(f"the spt allocation names {name!r}, which is not a parameter of this model")
    return module, param


def forms_for(
    model: nn.Module, cfg: SptConfig, allocation: dict[str, Any], indices: dict[str, torch.Tensor] | None = None
) -> dict[str, Form]:
    """The stage-2 forms of an allocation. Without ``indices`` the sparse forms get placeholder
    supports of the recorded sizes (an artifact or checkpoint then loads the real ones)."""
    forms: dict[str, Form] = {}
    for name in allocation["structured"]:
        module, _ = _lookup(model, name)
        if cfg.structured == "lora":
            forms[name] = SptLoRA(module, cfg.r, cfg.dropout, cfg.drop_path)
        else:
            forms[f"{name.rpartition('.')[0]}.adapter"] = ParallelAdapter(module, cfg.r, cfg.dropout, cfg.drop_path)
    tuned_vectors = set(allocation["vectors"]) | set(allocation["unstructured"])
    # in model order: a JSON round trip (sorted keys) must give the same forms in the same order
    position = {n: i for i, (n, _) in enumerate(model.named_parameters(remove_duplicate=False))}
    for name, k in sorted(allocation["unstructured"].items(), key=lambda item: position.get(item[0], -1)):
        module, param = _lookup(model, name)
        idx = indices[name] if indices is not None else torch.arange(int(k))
        owner = name.rpartition(".")[0]
        kind = _ParametrizedSparse if _is_conv1d(module) and f"{owner}.bias" in tuned_vectors else Sparse
        forms[name] = kind(sites_of(model, param), name, indices=idx)
    forms.update(dense_forms(model, [(n, _lookup(model, n)[1]) for n in allocation["vectors"]]))
    for name, form in dense_forms(model, _saved_params(model, cfg)).items():
        if name in forms:
            raise DeltatuneError(f"{name} is both allocated by spt and in modules_to_save: drop it from one")
        forms[name] = form
    return forms


class SptPolicy(Policy):
    """Static training; the allocation is its state, so a resume rebuilds the forms it checkpointed."""

    name = "spt"

    def __init__(self, allocation: dict[str, Any], rebuild: Callable[[dict[str, Any]], dict[str, Form]],
                 names: list[str]) -> None:
        self.allocation = allocation
        self._rebuild = rebuild
        self._names = list(names)  # the forms the allocation made: the delta may hold others (a fresh head)
        self._tuned: Any = None

    def setup(self, tuned: Any) -> None:
        self._tuned = tuned

    def state_dict(self) -> dict[str, Any]:
        return {"allocation": self.allocation}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        allocation = state.get("allocation")
        if allocation is None or allocation == self.allocation:
            return
        # called before the checkpoint's tensors load: put on the forms that checkpoint was trained with
        tuned = self._tuned
        for form in tuned.forms().values():
            form.detach()  # the new forms are built on the plain model (no parametrisations in the way)
        new = self._rebuild(allocation)
        tuned.replace_forms(new, remove=[n for n in self._names if n not in new and n in tuned.delta_names])
        for form in tuned.forms().values():
            form.attach()  # the forms it kept (a no-op for those replace_forms attached)
        tuned.method_config.allocation = allocation
        self.allocation = allocation
        self._names = list(new)


def _budget(model: nn.Module, cfg: SptConfig) -> int:
    if cfg.budget is not None:
        return int(cfg.budget)
    return max(1, int(cfg.density * sum(p.numel() for p in model.parameters())))


# why it cannot train on a quantized base (deltatune.core.quantized): said in its one-line refusal
QUANTIZED_BASE = (
    "its sensitivity scores are gradients of the base weights, which quantized layers do not compute"
)


@register("spt", SptConfig, "SPT: gradient-sensitivity budget allocation, LoRA/adapter on sensitive matrices and "
                            "sparse entries elsewhere (He et al., 2023)",
          traits=Traits(quantized_base=QUANTIZED_BASE), family="low-rank + sparse")
def build(model: nn.Module, cfg: SptConfig, *, loading: bool = False) -> Built:
    if loading:
        if cfg.allocation is None:
            raise DeltatuneError("this spt artifact's config has no allocation, so its forms cannot be rebuilt")
        allocation, indices = cfg.allocation, None
    else:
        cands = candidates(model, cfg)
        scores = _scores(model, cfg, cands)
        allocation, indices = allocate(cands, scores, _budget(model, cfg))
        del scores
        if allocation["cost"] == 0:
            raise DeltatuneError(
                f"spt allocated nothing with a budget of {allocation['budget']} parameters (no score is above zero "
                "or the budget is below one entry): raise budget / density or check the sensitivity data"
            )
        log.info("spt: budget %d, allocated %d (%d structured %s, %d sparse tensors, %d full vectors)",
                 allocation["budget"], allocation["cost"], len(allocation["structured"]), cfg.structured,
                 len(allocation["unstructured"]), len(allocation["vectors"]))
        cfg.allocation = allocation
        if not isinstance(cfg.sensitivity, str):
            cfg.sensitivity = None  # a dict of scores is consumed: the config keeps the allocation it led to
    forms = forms_for(model, cfg, allocation, indices)
    return Built(forms, SptPolicy(allocation, lambda a: forms_for(model, cfg, a), list(forms)))
