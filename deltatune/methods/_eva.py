"""EVA (Paischer et al., 2024, arXiv 2410.07170, "explained variance adaptation"): lora's ``init: eva``.

A data-driven LoRA init. The inputs of each target layer are collected over calibration batches and decomposed by
an incremental PCA (PEFT's ``utils/incremental_pca.IncrementalPCA``, low-rank SVD, seed 42), one per distinct input
(layers that read the same input, q / k / v, share it); a layer's components have converged when each of the first
rank ones keeps a cosine similarity ≥ ``tau`` with the previous batch's. The ranks are then redistributed by explained
variance: of all layers' components (at most round(r·rho) per layer), the budget Σ r (the ranks the targets would
have had) largest explained-variance ratios win, so a layer ends with 0 to round(r·rho) components. A = the first
rank right singular vectors (rows; ``whiten`` divides them by √σ), B = 0, so the model at init is the base model.
This follows PEFT's ``tuners/lora/eva.py`` (``get_eva_state_dict``: the same loop over the batches, cycled until
every layer has converged, the same tie handling) step for step, so on the same batches the ranks are PEFT's and A is
PEFT's up to float rounding (and the sign of a component). Once initialised the delta is a plain LoRA: the builder
writes the ranks (and, with ``adjust_scaling_factors``, alpha·rank/r) into the config's rank / alpha patterns,
a layer that got rank 0 carries no LoRA, and loading needs no calibration data.

Calibration data (``eva.data``): a run-config data section (tokenized with the model's tokenizer:
``methods/_calibration.py``), ``"random"`` (seeded random token ids: tests only), a list of token-id lists, or a list
of batches (mappings of tensors: input_ids, attention_mask, labels, as a PEFT user's dataloader gives; kept in memory,
never written to the artifact). Positions outside the attention mask, and with ``use_label_mask`` those whose label is
``label_mask_value``, are left out (PEFT's ``prepare_model_inputs_fn_language_modeling``).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from itertools import cycle
from typing import Any

import torch
import torch.nn as nn

from deltatune.errors import DeltatuneError
from deltatune.methods._calibration import data_config, padded_batches, task_batches
from deltatune.methods._common import from_rank0

log = logging.getLogger(__name__)

RANDOM = "random"
RHO_THRESHOLD = 1000  # PEFT: above it rho is capped at max(parameter dim) // r
LOWRANK_SEED = 42  # PEFT's SVDHook: IncrementalPCA(lowrank=True, lowrank_seed=42)


@dataclass
class EvaOptions:
    rho: float = 2.0  # a layer gets at most round(r·rho) components (PEFT's EvaConfig default); 1.0: no redistribution
    tau: float = 0.99  # cosine similarity of a component with the previous batch's at which it has converged
    use_label_mask: bool = True  # leave out positions whose label is label_mask_value (prompt, padding)
    label_mask_value: int = -100  # the label of positions left out with use_label_mask
    whiten: bool = False  # divide each component by the square root of its singular value
    adjust_scaling_factors: bool = True  # alpha·rank/r for a layer whose rank changed (PEFT's default)
    # calibration: a run-config data section, "random", a list of token-id lists, or a list of batches (in memory)
    data: Any = None
    samples: int = 64  # calibration samples (data section, random, token lists); rounded down to whole batches
    batch_size: int = 8  # samples per forward call
    random_length: int = 32  # tokens per sample for data="random"
    tokenizer: str | None = None  # for a data section: tokenizer name or folder; None: the model's own
    seed: int = 0  # the order of the calibration samples / the random tokens
    max_steps: int = 1000  # forward calls at most before the components must have converged
    device: str = "auto"  # where calibration runs: auto (CUDA if available) | cpu | cuda | cuda:N
    calibration: dict[str, Any] | None = None  # written by the builder: batches, forward calls, ranks

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise ValueError(f"eva.rho={self.rho} must be >= 1.0 (PEFT's EvaConfig)")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"eva.tau={self.tau} must be between 0.0 and 1.0")
        if min(self.samples, self.batch_size, self.random_length, self.max_steps) < 1:
            raise ValueError("eva.samples, eva.batch_size, eva.random_length and eva.max_steps must be >= 1")
        if isinstance(self.data, str) and self.data != RANDOM:
            raise ValueError(f"eva.data={self.data!r}: give a data section (a mapping like the run's data), 'random', "
                             "a list of token-id lists, or a list of batches")
        if isinstance(self.data, dict):
            data_config(self.data)


def eva_options(values: dict[str, Any] | None) -> dict[str, Any]:
    """The ``eva`` option block with every default filled in (ValueError naming a bad key)."""
    values = dict(values or {})
    known = {f for f in EvaOptions.__dataclass_fields__}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"eva has no option {unknown[0]!r}: it takes {', '.join(sorted(known))}")
    opts = EvaOptions(**values)
    data = opts.data
    out = asdict(EvaOptions(**{**values, "data": None}))
    out["data"] = data  # batches of tensors stay as given (asdict would copy them)
    return out


# ---------------------------------------------------------------- PEFT's IncrementalPCA (low-rank SVD)


class IncrementalPCA:
    """PEFT's ``utils/incremental_pca.IncrementalPCA`` with ``lowrank=True`` (after scikit-learn's): the same
    operations in the same order, so its components are PEFT's to float rounding."""

    def __init__(self, n_components: int, seed: int = LOWRANK_SEED, niter: int = 4) -> None:
        self.n_components = n_components
        self.q = 2 * n_components
        self.seed = seed
        self.niter = niter
        self.components_: torch.Tensor | None = None

    @staticmethod
    def _mean_and_var(x: torch.Tensor, last_mean: torch.Tensor | None, last_var: torch.Tensor | None,
                      last_count: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        if x.shape[0] == 0:
            return last_mean, last_var, last_count
        new_count = torch.tensor([x.shape[0]], device=x.device)
        count = last_count + new_count
        last_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if last_mean is None \
            else last_mean * last_count
        new_sum = x.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / count
        temp = x - new_sum / new_count
        correction = temp.sum(dim=0, dtype=torch.float64).square()
        temp.square_()
        new_unnormalized = temp.sum(dim=0, dtype=torch.float64)
        new_unnormalized -= correction / new_count
        if last_var is None:
            var = new_unnormalized / count
        else:
            ratio = last_count.double() / new_count
            var = (last_var * last_count + new_unnormalized
                   + ratio / count * (last_sum / ratio - new_sum).square()) / count
        return mean, var, count

    def _svd(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng():  # as PEFT: the draw is seeded, the caller's RNG untouched
            torch.manual_seed(self.seed)
            u, s, v = torch.svd_lowrank(x, q=self.q, niter=self.niter)
        return u, s, v.mH

    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.to(torch.float32).clone()
        n, features = x.shape
        if self.n_components > features:
            raise DeltatuneError(f"EVA asks for {self.n_components} components of a {features}-wide input: lower r or "
                                 "eva.rho")
        first = self.components_ is None
        if first:
            self.mean_, self.var_ = None, None
            self.n_samples_seen_ = torch.tensor([0], device=x.device)
        mean, var, total = self._mean_and_var(x, self.mean_, self.var_, self.n_samples_seen_)
        if first:
            x -= mean
        else:
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            factor = torch.sqrt((self.n_samples_seen_.double() / total) * n)
            correction = factor * (self.mean_ - batch_mean)
            x = torch.vstack((self.singular_values_.view((-1, 1)) * self.components_, x, correction))
        _, s, vt = self._svd(x)
        signs = torch.sign(vt[range(vt.shape[0]), torch.argmax(torch.abs(vt), dim=1)])  # _svd_flip on V's rows
        vt *= signs.view(-1, 1)
        self.n_samples_seen_ = total
        self.components_ = vt[: self.n_components]
        self.singular_values_ = s[: self.n_components]
        self.mean_, self.var_ = mean, var
        self.explained_variance_ratio_ = (s**2 / torch.sum(var * total))[: self.n_components]


class _SVDHook:
    """PEFT's ``SVDHook``: one incremental PCA step per forward call on the layer's chosen input rows, and which
    components have converged (cosine similarity ≥ tau with the previous step's)."""

    def __init__(self, name: str, n_components: int, tau: float) -> None:
        self.name = name
        self.n_components = n_components
        self.tau = tau
        self.svd = IncrementalPCA(n_components)
        self.converged = torch.zeros((n_components,), dtype=torch.bool)
        self.positions: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        states = _layer_rows(args, self.positions)
        if states.size(0) < self.n_components:  # PEFT skips such a step too
            log.info("eva: skipping a step of %s: %d positions, fewer than %d components", self.name,
                     states.size(0), self.n_components)
            return
        previous = None if self.svd.components_ is None else self.svd.components_.clone()
        self.svd.partial_fit(states)
        if previous is None:
            return
        components = self.svd.components_
        assert components is not None
        if components.dim() == 1:
            components, previous = components.reshape(1, -1), previous.reshape(1, -1)
        self.converged = torch.nn.functional.cosine_similarity(components, previous) >= self.tau


def _layer_rows(args: tuple, positions: torch.Tensor | None) -> torch.Tensor:
    """The layer input's rows at the chosen (batch, position) pairs, (n, features)."""
    x = args[0] if isinstance(args, tuple | list) else args
    if positions is not None and x.dim() == 3:
        return x[positions.T.unbind()]
    return x.reshape(-1, x.size(-1)) if x.dim() > 2 else x


def _positions(batch: Mapping[str, torch.Tensor], opts: dict[str, Any]) -> torch.Tensor:
    """PEFT's ``prepare_model_inputs_fn_language_modeling``: the (batch, position) pairs of the attention mask that
    are not left out by the label mask."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    if opts["use_label_mask"] and "labels" in batch and batch["labels"].shape == ids.shape:
        mask = torch.logical_and(mask, batch["labels"] != opts["label_mask_value"])
    return mask.nonzero()


def _digest(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    return f"{tuple(t.shape)}:{hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()}"


# ---------------------------------------------------------------- calibration batches


def calibration_batches(model: nn.Module, opts: dict[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    """The batches, and how to run one (None: ``model(**batch)``; a data section: the task's own forward)."""
    data = opts["data"]
    if data is None:
        raise DeltatuneError(
            "init eva decomposes the layers' inputs on calibration data and needs it: set eva.data to a data section "
            "(in YAML `data: &data {...}` and `eva: {data: *data}`), a list of batches (e.g. list(dataloader)), a list "
            "of token-id lists, or 'random' (tests only)"
        )
    if isinstance(data, dict):
        batches, loss_fn = task_batches(model, data, tokenizer=opts["tokenizer"],
                                        batches=max(1, opts["samples"] // opts["batch_size"]),
                                        batch_size=opts["batch_size"], seed=opts["seed"])
        return batches, loss_fn
    if data == RANDOM:
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
        if vocab < 1:
            raise DeltatuneError("eva.data='random' needs the model's config.vocab_size: give batches or a data section")
        g = torch.Generator().manual_seed(opts["seed"])
        seqs = torch.randint(0, vocab, (opts["samples"], opts["random_length"]), generator=g).tolist()
        return padded_batches(seqs, opts["batch_size"], drop_last=True), None
    items = list(data)
    if items and all(isinstance(b, Mapping) for b in items):
        if not all(isinstance(b.get("input_ids"), torch.Tensor) for b in items):
            raise DeltatuneError("eva.data batches must each hold an input_ids tensor (as a dataloader gives them)")
        return [dict(b) for b in items], None
    if items and all(isinstance(s, list | tuple) for s in items):
        return padded_batches([list(s) for s in items][: opts["samples"]], min(opts["batch_size"], len(items)),
                              drop_last=True), None
    raise DeltatuneError("eva.data is empty or of a kind EVA cannot read: give a data section, 'random', a list of "
                         "token-id lists, or a list of batches")


def _device(opts: dict[str, Any], home: torch.device) -> torch.device:
    if opts["device"] == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else home
    return torch.device(opts["device"])


# ---------------------------------------------------------------- the redistribution (PEFT's get_eva_state_dict)


def _rank_distribution(hooks: dict[str, _SVDHook], layer_hook: dict[str, str], equal: dict[str, str], budget: int,
                       max_components: dict[str, int]) -> dict[str, int]:
    exp_vars = {k: h.svd.explained_variance_ratio_[: max_components[k]] for k, h in hooks.items()}
    keys, values = zip(*[(k, c) for k, name in layer_hook.items() for c in exp_vars[name]], strict=True)
    idx = torch.stack(values).argsort(descending=True)
    counts = Counter([keys[i] for i in idx[:budget]])
    ranks = {k: counts.get(k, 0) for k in layer_hook}
    for k, k_hook in equal.items():  # the layer holding the shared PCA gets the largest of its group's ranks
        if ranks[k_hook] < ranks[k]:
            ranks[k_hook], ranks[k] = ranks[k], ranks[k_hook]
    return ranks


@torch.no_grad()
def eva_components(model: nn.Module, layers: list[tuple[str, nn.Module, int]], r: int, opts: dict[str, Any]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A's rows for each (name, module, rank before redistribution) in model order: (rank, in) tensors, rank 0 for a
    layer that gets no LoRA; and what the calibration did."""
    batches, loss_fn = calibration_batches(model, opts)

    def forward(batch: dict[str, Any]) -> None:
        if loss_fn is None:
            model(**batch)
        else:
            loss_fn(model, batch)

    rho = opts["rho"]
    if rho > RHO_THRESHOLD:
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // r)
    max_components = {name: round(rank * rho) for name, _, rank in layers}
    budget = sum(rank for _, _, rank in layers)
    home = next(model.parameters()).device
    device = _device(opts, home)
    training = model.training
    model.eval()
    model.to(device)
    handles: list[Any] = []
    try:
        moved = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
        # one forward to find layers with equal inputs: they share one PCA (PEFT's HashHook)
        digests: dict[str, str] = {}
        first = _positions(moved[0], opts)

        def digest_hook(name: str):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                digests.setdefault(name, _digest(_layer_rows(args, first)))
            return hook

        handles = [m.register_forward_hook(digest_hook(n)) for n, m, _ in layers]
        forward(moved[0])
        for h in handles:
            h.remove()
        handles = []
        missing = [n for n, _, _ in layers if n not in digests]
        if missing:
            raise DeltatuneError(f"{missing[0]} saw no calibration input ({len(missing)} layer(s) in all): leave it "
                                 "out of the targets or give calibration data that reaches it")
        groups: dict[str, list[str]] = {}
        for name, _, _ in layers:
            groups.setdefault(digests[name], []).append(name)
        equal = {other: g[0] for g in groups.values() if len(g) > 1 for other in g[1:]}
        for g in groups.values():
            top = max(max_components[n] for n in g)
            for n in g:
                max_components[n] = top
        modules = {n: m for n, m, _ in layers}
        hooks = {n: _SVDHook(n, max_components[n], opts["tau"]) for n, _, _ in layers if n not in equal}
        active = {n: modules[n].register_forward_hook(h) for n, h in hooks.items()}
        handles = list(active.values())
        layer_hook = {**{n: n for n in hooks}, **equal}
        converged = dict.fromkeys(hooks, False)
        ranks = dict(max_components)
        steps = 0
        for b in cycle(moved):
            positions = _positions(b, opts)
            for name, hook in hooks.items():
                now = bool(torch.all(hook.converged[: ranks[name]]))
                if not converged[name] and now:
                    active.pop(name).remove()
                    converged[name] = True
                    continue
                if converged[name] and not now:
                    active[name] = modules[name].register_forward_hook(hook)
                    handles.append(active[name])
                    converged[name] = False
                hook.positions = positions
            if all(converged.values()):
                break
            if steps >= opts["max_steps"]:
                left = [n for n, c in converged.items() if not c]
                raise DeltatuneError(
                    f"EVA's components of {left[0]} ({len(left)} layer(s) in all) did not converge in "
                    f"eva.max_steps={opts['max_steps']} forward calls over {len(moved)} batch(es): give more (or more "
                    "varied) calibration data, raise eva.max_steps, or lower eva.tau"
                )
            forward(b)
            steps += 1
            if any(h.svd.components_ is None for h in hooks.values()):
                continue
            ranks = _rank_distribution(hooks, layer_hook, equal, budget, max_components)
    finally:
        for h in handles:
            h.remove()
        model.to(home)
        model.train(training)
    out: dict[str, torch.Tensor] = {}
    for name, _, _ in layers:
        hook = hooks[layer_hook[name]]
        rank = ranks[name]
        assert hook.svd.components_ is not None and bool(torch.all(hook.converged[:rank]))
        u = hook.svd.components_[:rank].clone()
        if opts["whiten"]:
            u /= hook.svd.singular_values_[:rank].sqrt().reshape(-1, 1)
        out[name] = from_rank0(u.to(home))
    info = {"batches": len(moved), "forward_calls": steps + 1, "ranks": {n: int(t.shape[0]) for n, t in out.items()}}
    log.info("eva: %d forward calls over %d batches; ranks %s", steps + 1, len(moved), sorted(set(info["ranks"].values())))
    return out, info
