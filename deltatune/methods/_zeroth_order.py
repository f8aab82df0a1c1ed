"""The zeroth-order engine behind MeZO and Sparse MeZO (``mezo`` documents the algorithm and its choices): the
shared config, the delta it trains, z regenerated from seeds, the SPSA policy and the forward-time perturbation."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn

from deltatune.core import registry
from deltatune.core.forms.base import Form
from deltatune.core.forms.inplace import InPlace
from deltatune.core.policy import Policy
from deltatune.core.registry import Traits
from deltatune.core.targeting import select_parameters
from deltatune.errors import DeltatuneError
from deltatune.methods._common import base_on_quantized, build_base, dense_forms
from deltatune.methods._offloaded_w0 import OffloadedInPlace, offloaded_forms

if TYPE_CHECKING:
    from deltatune.core.tuned import Tuned

CHUNK = 1 << 22  # entries of z drawn at once (16 MiB in fp32): the temporary memory of a perturbation
MASK64 = (1 << 64) - 1
# the model itself trains (in place) unless the config names a base method whose parameters train instead.
# On a quantized base only the second: perturbing the base weights would need them as values (a full-precision
# copy), while a base method's tensors (LoRA factors, adapters) are perturbed as they are
_IN_PLACE_ON_QUANTIZED = ("without a base method it perturbs and steps the base weights in place, which "
                          "needs them in full precision; name a base method whose delta it trains, e.g. "
                          "base: lora")


def _on_quantized(cfg: ZerothOrderConfig) -> bool | str:
    return _IN_PLACE_ON_QUANTIZED if cfg.base is None else base_on_quantized(cfg.base, cfg.base_options)


ZEROTH_ORDER_TRAITS = Traits(gradient_free=True, full_model=lambda cfg: cfg.base is None,
                             quantized_base=_on_quantized)


@dataclass
class ZerothOrderConfig:
    """The options of every zeroth-order method (``mezo`` documents them; ``sparse_mezo`` adds its own)."""

    eps: float = 1e-3  # ε, the perturbation scale (official full-parameter value; its grid: LoRA 1e-2, prefix 1e-1)
    n_spsa: int = 1  # perturbations averaged per step (official: 1)
    seed: int = 0  # the generator of the per-step seeds (its state is checkpointed)
    base: str | None = None  # None: train the model's own tensors; else a method whose parameters MeZO trains
    base_options: dict[str, Any] = field(default_factory=dict)  # that method's options, e.g. {r: 8, alpha: 16}
    # without base: which tensors train (as in full); None trains every parameter
    targets: list[str] | None = None
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    types: list[str] | None = None  # module types kept: linear, conv1d, embedding, layernorm (None: all)
    exclude: list[str] | None = None  # name patterns left out (as in targets)
    # without base: where W0 (the artifact's reference) waits while W trains in place. "disk": a file per
    # tensor (the process holds the model only: inference's memory); "memory": a copy in host RAM
    keep_w0: Literal["disk", "memory"] = "disk"
    w0_dir: str | None = None  # the folder of those files (None: the system's temporary folder)

    def __post_init__(self) -> None:
        if self.keep_w0 not in ("disk", "memory"):
            raise ValueError(f"keep_w0={self.keep_w0!r} must be 'disk' or 'memory' (where W0 waits while W trains)")
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps} must be > 0 (the perturbation scale; MeZO uses 1e-3)")
        if self.n_spsa < 1:
            raise ValueError(f"n_spsa={self.n_spsa} must be >= 1 (perturbations per step)")
        if self.base in registry.names() and registry.get(self.base).has("gradient_free"):
            raise ValueError(f"base={self.base!r}: the base is the method whose parameters MeZO trains, e.g. 'lora'")
        if self.base is None and self.base_options:
            raise ValueError("base_options without base: name the method they belong to (base='lora')")
        chosen = [k for k in ("targets", "layers", "types", "exclude") if getattr(self, k) is not None]
        if self.base is not None and chosen:
            raise ValueError(f"{', '.join(chosen)} select the model's own tensors; with base={self.base!r} put the "
                             "base method's targets in base_options")


def zeroth_order_forms(model: nn.Module, cfg: ZerothOrderConfig, loading: bool) -> dict[str, Form]:
    """The delta a zeroth-order method trains: the model's own tensors (a dense delta, W0 kept off the device
    while training), or the forms of the base method."""
    if cfg.base is None:
        params = select_parameters(model, cfg.targets, layers=cfg.layers, types=cfg.types, exclude=cfg.exclude)
        if loading:
            return dict(dense_forms(model, params))
        return dict(offloaded_forms(model, params, cfg.keep_w0, cfg.w0_dir))
    base = build_base(model, cfg.base, cfg.base_options, loading)
    if type(base.policy) is not Policy:
        raise DeltatuneError(
            f"base={cfg.base!r} has its own policy ({type(base.policy).__name__}) that decides what trains and how; "
            "a zeroth-order method takes the whole step itself: use a base with a static policy, e.g. base='lora'"
        )
    return base.forms


# -- z, regenerated from seeds ------------------------------------------------------------------------------
def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def chunk_seed(seed: int, index: int, chunk: int) -> int:
    """The seed of z's chunk ``chunk`` of tensor ``index`` at a step with seed ``seed`` (a 64-bit hash)."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ index) ^ chunk)


def chunks(n: int) -> Iterator[tuple[int, int, int]]:
    """(chunk number, start, end) over n flat entries."""
    for c, start in enumerate(range(0, n, CHUNK)):
        yield c, start, min(n, start + CHUNK)


class Noise:
    """z one chunk at a time: N(0, 1) in fp32 from a generator seeded with ``chunk_seed``. One generator per
    device, reseeded for every chunk, so z depends on nothing but (step seed, tensor, chunk) and the device."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, seed: int, index: int, chunk: int, n: int, device: torch.device) -> torch.Tensor:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        g.manual_seed(chunk_seed(seed, index, chunk))
        return torch.randn(n, generator=g, device=device, dtype=torch.float32)


@dataclass
class Entry:
    """One delta tensor the policy may train: its position in the delta (part of z's seed), where it is read."""

    index: int
    name: str
    param: nn.Parameter
    form: Form
    modules: list[nn.Module] | None  # the model's modules holding it (perturbed per module); None: whole forward
    decay: bool  # weight decay applies (not to biases and norm weights)


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """What a zeroth-order policy gives the loop as its optimizer: no state, only the parameter groups whose
    learning rate the schedule sets. It never steps: the policy's ``train_step`` updates the parameters."""

    def __init__(self, params: list[nn.Parameter], lr: float, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        # torch's LR schedulers warn when the schedule advances before the optimizer ever stepped: this one
        # never steps, by design
        self._opt_called = True

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if any(p.grad is not None for group in self.param_groups for p in group["params"]):
            raise DeltatuneError(
                "a zeroth-order method got gradients: its steps come from forward passes in policy.train_step. "
                "Train with `deltatune train` or deltatune.train.hf.DeltaTuneTrainer, or call tuned.policy.train_step "
                "yourself instead of backward() and optimizer.step()"
            )


# -- the policy ----------------------------------------------------------------------------------------------
class MezoPolicy(Policy):
    """SPSA steps over the trainable tensors of the delta; subclasses restrict z with a mask (``mask``)."""

    name = "mezo"

    def __init__(self, cfg: ZerothOrderConfig) -> None:
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(cfg.seed)  # the per-step seeds
        self.noise = Noise()
        self.entries: list[Entry] = []
        self.last: list[tuple[int, float]] = []  # (seed, projected gradient g) of each perturbation of the last step
        self._started = False
        self._warned_unread = False

    # -- wiring ------------------------------------------------------------------------------------------------
    def setup(self, tuned: Tuned) -> None:
        owner = {id(p): (name, form) for name, form in tuned.forms().items() for p in form.parameters()}
        self.entries = []
        for i, p in enumerate(tuned.deltas.parameters()):  # a stable order: the index is part of z's seed
            name, form = owner[id(p)]
            modules = [m for m, _ in form.sites] if isinstance(form, InPlace) else None
            self.entries.append(Entry(i, name, p, form, modules, decay=p.dim() >= 2))

    def plan(self, total_steps: int, grad_accum: int) -> None:
        if grad_accum != 1:
            raise DeltatuneError(
                f"train.grad_accum={grad_accum}: {self.name} takes one batch per step (two forward passes estimate "
                "its gradient; the official code asserts no accumulation). Set train.grad_accum=1 and raise "
                "train.batch_size instead"
            )

    def make_optimizer(self, params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
        return ZerothOrderOptimizer(params, lr, weight_decay)

    def before_optimizer_step(self, step: int, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        if any(e.param.grad is not None for e in self.entries):  # a loop ran backward: it would not train MeZO
            raise DeltatuneError(
                f"{self.name} trains from forward passes (policy.train_step), but a training loop computed gradients "
                "for its parameters: use `deltatune train` or deltatune.train.hf.DeltaTuneTrainer, whose steps call "
                "policy.train_step"
            )

    # -- the step ----------------------------------------------------------------------------------------------
    def train_step(self, step: int, tuned: Tuned, batch: Any, loss_fn: Callable[[Any], torch.Tensor], lr: float,
                   weight_decay: float) -> float:
        live = [e for e in self.entries if e.param.requires_grad]
        if not self._started:
            self._start(live)
        seeds = [self.next_seed() for _ in range(self.cfg.n_spsa)]
        self.begin_step(live)
        estimates: list[float] = []
        losses: list[float] = []
        for seed in seeds:
            plus = self.perturbed_loss(tuned, live, batch, loss_fn, seed, self.cfg.eps)
            minus = self.perturbed_loss(tuned, live, batch, loss_fn, seed, -self.cfg.eps)
            estimates.append((plus - minus) / (2 * self.cfg.eps))
            losses += [plus, minus]
        self.last = list(zip(seeds, estimates, strict=True))
        if all(math.isfinite(g) for g in estimates):
            self.update(live, self.last, lr, weight_decay)
        return sum(losses) / len(losses)

    def next_seed(self) -> int:
        return int(torch.randint(0, 2**62, (), generator=self.generator))

    def _start(self, live: list[Entry]) -> None:
        self._started = True
        low = sorted({str(e.param.dtype) for e in live if e.param.dtype in (torch.float16, torch.bfloat16)})
        if low:
            warnings.warn(
                f"{self.name} trains {', '.join(low)} tensors: an update lr·g·z (about 1e-6) is mostly below their "
                "rounding step and lost. Load the model in float32 (mixed precision via autocast is fine)",
                stacklevel=3,
            )
        for e in live:
            if isinstance(e.form, OffloadedInPlace):
                e.form.settle_every_step = False  # settled when saved: W0 stays where it is kept

    def begin_step(self, live: list[Entry]) -> None:
        """Called once per step before the first perturbation (a mask's thresholds)."""

    def mask(self, entry: Entry, values: torch.Tensor) -> torch.Tensor | None:
        """The entries of a chunk of ``entry``'s unperturbed values that z may move; None: all of them."""
        return None

    def direction(self, seed: int, entry: Entry, chunk: int, values: torch.Tensor) -> torch.Tensor:
        """z (fp32, masked) for one chunk of ``entry`` whose unperturbed values are ``values``."""
        z = self.noise(seed, entry.index, chunk, values.numel(), values.device)
        m = self.mask(entry, values)
        return z if m is None else z.mul_(m)

    def perturbed(self, entry: Entry, seed: int, scale: float) -> torch.Tensor:
        """A new tensor W + scale·z; W itself is left as it is."""
        w = entry.param.detach()
        flat = w.reshape(-1)
        out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
        flat_out = out.view(-1)
        for c, a, b in chunks(flat.numel()):
            torch.add(flat[a:b], self.direction(seed, entry, c, flat[a:b]), alpha=scale, out=flat_out[a:b])
        return out

    def perturbed_loss(self, tuned: Tuned, live: list[Entry], batch: Any, loss_fn: Callable[[Any], torch.Tensor],
                       seed: int, scale: float) -> float:
        """L(θ + scale·z) in eval mode without autograd; the weights are untouched afterwards."""
        modes = [(m, m.training) for m in tuned.modules()]
        try:
            tuned.eval()
            with torch.no_grad(), _Perturbation(self, live, seed, scale) as perturbation:
                loss = float(loss_fn(batch))
            if perturbation.unread:
                self._warn_unread(perturbation.unread)
            return loss
        finally:
            for m, training in modes:
                m.training = training
            torch.clear_autocast_cache()  # autocast caches a parameter's cast by identity, not by its data

    def _warn_unread(self, unread: list[Entry]) -> None:
        if self._warned_unread:
            return
        self._warned_unread = True
        names = ", ".join(e.name for e in unread[:4]) + (", ..." if len(unread) > 4 else "")
        warnings.warn(
            f"{len(unread)} trainable tensors were not read through their modules in the loss's forward ({names}): "
            f"{self.name} perturbs a tensor when its module runs, so these get noise but no signal. Exclude them "
            "(exclude=[...]) if the loss does not use them",
            stacklevel=4,
        )

    def update(self, live: list[Entry], estimates: list[tuple[int, float]], lr: float, weight_decay: float) -> None:
        """θ ← θ − lr·(Σ_k g_k z_k / n + λθ), one chunk at a time (the mask from the chunk before it moves)."""
        n = len(estimates)
        with torch.no_grad():
            for e in live:
                if isinstance(e.form, InPlace):
                    e.form.snapshot()  # W0, before the first write (MeZO's forwards never build a gradient)
                w = e.param.detach()
                target = w if w.is_contiguous() else w.contiguous()
                flat = target.view(-1)
                for c, a, b in chunks(flat.numel()):
                    values = flat[a:b]
                    m = self.mask(e, values)
                    step: torch.Tensor | None = None
                    for seed, g in estimates:
                        z = self.noise(seed, e.index, c, b - a, values.device)
                        if m is not None:
                            z.mul_(m)
                        step = z.mul_(g / n) if step is None else step.add_(z, alpha=g / n)
                    assert step is not None
                    if weight_decay and e.decay:
                        step.add_(values if m is None else values * m, alpha=weight_decay)
                    values.sub_(step, alpha=lr)
                if target is not w:
                    w.copy_(target)

    # -- checkpoint --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].to(torch.uint8).cpu())


class _Perturbation:
    """While active, every trainable tensor reads as W + scale·z: the model's tensors through forward hooks on
    the modules that hold them (one module's perturbed tensor at a time; a tied tensor is perturbed again, with
    the same z, at each of its modules), the other delta tensors for the whole block."""

    def __init__(self, policy: MezoPolicy, live: list[Entry], seed: int, scale: float) -> None:
        self.policy, self.live, self.seed, self.scale = policy, live, seed, scale
        self.original: dict[int, torch.Tensor] = {}  # entry index -> its own data while it reads perturbed
        self.read: set[int] = set()
        self.handles: list[Any] = []
        self.unread: list[Entry] = []

    def __enter__(self) -> _Perturbation:
        by_module: dict[int, tuple[nn.Module, list[Entry]]] = {}
        try:
            for e in self.live:
                if e.modules is None:
                    self._swap_in(e)
                else:
                    for m in e.modules:
                        by_module.setdefault(id(m), (m, []))[1].append(e)
            for module, entries in by_module.values():
                swapped: list[list[Entry]] = []  # a stack: one list per active call of this module
                self.handles.append(module.register_forward_pre_hook(self._pre(entries, swapped)))
                self.handles.append(module.register_forward_hook(self._post(swapped), always_call=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def _swap_in(self, e: Entry) -> bool:
        if e.index in self.original:  # already perturbed (an enclosing module holds it too)
            return False
        self.original[e.index] = e.param.data
        e.param.data = self.policy.perturbed(e, self.seed, self.scale)
        self.read.add(e.index)
        return True

    def _swap_out(self, e: Entry) -> None:
        e.param.data = self.original.pop(e.index)

    def _pre(self, entries: list[Entry], swapped: list[list[Entry]]) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            swapped.append([e for e in entries if self._swap_in(e)])
        return hook

    def _post(self, swapped: list[list[Entry]]) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            for e in swapped.pop() if swapped else []:
                self._swap_out(e)
        return hook

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for e in self.live:
            if e.index in self.original:
                self._swap_out(e)
        self.unread = [e for e in self.live if e.modules is not None and e.index not in self.read]
