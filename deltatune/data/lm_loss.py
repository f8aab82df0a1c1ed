"""Next-token losses that never build the (batch, sequence, vocabulary) logits.

A causal LM's head turns every position's hidden state into V logits: for SmolLM2 (V = 49,152) a batch of 4 × 128
tokens holds 100 MB of float32 logits, as much again for their gradient, and the softmax's copies on top; at long
context they fill memory before the activations do. The loss needs far less: for each *labelled* position, the
log-sum-exp over the vocabulary and the target's logit.

``token_nll`` runs the model with its output-embedding module (``lm_head``) swapped for a capture of its input, keeps
the hidden states of the labelled positions only, and computes their NLL in chunks of positions:

- an ``nn.Linear`` head, frozen (LoRA and most methods), trained in place (full fine-tuning) or with a delta on its
  weight (trainable tokens on a tied head), takes the fused path, as Liger's and Apple's cut-cross-entropy kernels
  do: each chunk's logits give the NLL and, in the same pass, its gradients with respect to the hidden state
  ((softmax − onehot) · W) and, when the head trains, to its weight and bias (summed over chunks), kept for the
  backward; the chunk's logits are freed at once. Its cost is the plain loss's (one head product forward, the
  backward's two);
- any other head (a quantized layer, hooks, a forward of its own) is called as a module on each chunk under
  activation checkpointing, so its logits are recomputed in the backward (one extra head product).

Liger and cut-cross-entropy are Triton kernels (GPU only) and take the head as a bare weight matrix, which cannot
carry a delta; this is their idea in plain PyTorch, exact up to summation order. Models whose forward changes the
logits after the head (Gemma 2's soft-capping, Cohere's and Granite's logit scales) are left to the plain loss
(``supported`` says which).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

# logits of one chunk: positions × vocabulary float32 values kept at once (64 MiB)
CHUNK_VALUES = 2**24

# configuration attributes of models that transform the head's output before returning it
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class TokenNLL(NamedTuple):
    """Per position (batch, sequence): the NLL of the next token (0 where it has no label); when asked (else None)
    whether the head's argmax is that token (False where no label) and the entropy of the next-token distribution
    (no gradient; 0 where no label)."""

    nll: torch.Tensor
    hit: torch.Tensor | None
    entropy: torch.Tensor | None = None


def _unwrap(model: nn.Module) -> nn.Module:
    from deltatune.data.tasks import _unwrap as unwrap

    return unwrap(model)


def output_head(model: nn.Module) -> tuple[nn.Module, str, nn.Module] | None:
    """(parent, attribute, head) of the model's output embeddings, or None when it has none it calls by attribute."""
    base = _unwrap(model)
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return None
    for module in base.modules():
        for attr, child in module.named_children():
            if child is head:
                return module, attr, head
    return None


def supported(model: nn.Module) -> bool:
    """Whether ``token_nll`` gives the model's own loss: a causal LM whose logits are its head's output as is."""
    base = _unwrap(model)
    config = getattr(base, "config", None)
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            return False
    # hooks on the head stay: an in-place form's pre-hook (settle W before use) runs for every chunk it computes
    return output_head(model) is not None


class _Capture(nn.Module):
    """Stands in for the head during the body's forward: records the hidden states and returns a zero-stride
    stand-in of the logits' shape (no memory), which the caller never reads."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], self.vocab)


@contextlib.contextmanager
def _head_captured(model: nn.Module) -> Iterator[tuple[_Capture, nn.Module]]:
    found = output_head(model)
    if found is None:
        raise ValueError(f"{type(_unwrap(model)).__name__} has no output embeddings to capture")
    parent, attr, head = found
    # out_features, not weight.shape: a quantized layer's weight is stored packed
    vocab = int(getattr(head, "out_features", 0) or getattr(_unwrap(model).config, "vocab_size", 0) or 1)
    capture = _Capture(vocab)
    parent._modules[attr] = capture  # not setattr: a head registered as a Parameter-holding module stays as is
    try:
        yield capture, head
    finally:
        parent._modules[attr] = head


def _linear_head(head: nn.Module) -> bool:
    """A head the fused path can take: an ``nn.Linear`` whose forward is exactly ``F.linear(h, weight, bias)``:
    plain, or with its weight parametrised (a delta on the weight: W0 + ΔW is read once per batch); no hooks but
    those that only ready the weight (``prepares_weight``: an in-place form settling W, run once by the caller), no
    forward of its own (a sparse form replaces the instance's forward: the fused path would read W0 and drop the
    delta), not a quantized layer (another class, with its own forward)."""
    cls = type(head)
    linear = (cls.__bases__[0] if parametrize.is_parametrized(head) else cls) is nn.Linear
    return (linear and not head._forward_hooks and "forward" not in head.__dict__
            and all(getattr(hook, "prepares_weight", False) for hook in head._forward_pre_hooks.values()))


class _FusedLinearNLL(torch.autograd.Function):
    """NLL of each row of ``hidden`` under ``hidden @ weight.T + bias``, chunk by chunk, with the gradients made in
    the forward pass, as Liger's and cut-cross-entropy's kernels do: with respect to ``hidden`` and, when the head's
    weight (bias) is trained or carries a delta, to it. The head-side gradients are sums over rows, so they are kept
    for the usual case of a loss that weighs every labelled position alike (a mean or a sum); a loss that weighs
    positions differently (per-sequence log-probabilities in the preference losses) has them recomputed chunk by
    chunk in the backward, which is what a checkpointed head costs."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, want: tuple[bool, bool, bool], temperature: float,
                entropy: bool, hits: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        hit = torch.empty(hidden.shape[0] if hits else 0, dtype=torch.bool, device=hidden.device)
        ent = torch.empty(hidden.shape[0] if entropy else 0, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want[1] else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if want[2] and bias is not None else None
        want_grad, head = any(want), want[1] or want[2]
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + chunk]
            logits = _scaled(F.linear(h, weight, bias).float(), temperature)
            if entropy:
                ent[start:start + chunk] = _entropy(logits)
            if hits:  # an argmax is as slow as the rest of the softmax: only where a metric reads it
                hit[start:start + chunk] = logits.argmax(-1) == t
            # under grad the chunk's logits become softmax − onehot in place (the NLL read on the way)
            nll[start:start + chunk] = _nll_in_place(logits, t, want_grad)
            if want_grad:
                if temperature != 1.0:
                    logits.div_(temperature)
                _accumulate(logits, h, weight, grad_h, grad_w, grad_b, start)
            del logits
        ctx.chunk = chunk
        ctx.temperature = temperature
        ctx.head = head
        device = hidden.device.type  # the recompute runs under the forward's autocast (bf16 logits on CUDA)
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        # the head's inputs are kept only for the recompute of a non-uniform loss; the weight is the parameter (or
        # the parametrised W0 + ΔW, which the plain loss keeps for its backward as well)
        ctx.save_for_backward(grad_h, grad_w, grad_b, *((hidden, weight, bias, targets) if head else ()))
        ctx.mark_non_differentiable(hit, ent)
        return nll, hit, ent

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor, _grad_hit: Any, _grad_ent: Any) -> tuple[Any, ...]:
        none = (None,) * 7  # targets, chunk, want, temperature, entropy, hits and one of the three below
        grad_h, grad_w, grad_b, *inputs = ctx.saved_tensors
        if not ctx.needs_input_grad[0] and not ctx.head:
            return None, None, *none
        if grad_h is None and grad_w is None and grad_b is None:
            raise RuntimeError("the fused loss ran without gradients to keep; call it with grad enabled")
        scale = grad_nll.unsqueeze(-1)
        gh = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        gw = gb = None
        if ctx.head:
            hidden, weight, bias, targets = inputs
            if bool((grad_nll == grad_nll[0]).all()):  # a mean or a sum: the kept sums, scaled
                c = grad_nll[0]
                gw = (grad_w * c).to(weight.dtype) if grad_w is not None else None
                gb = (grad_b * c).to(bias.dtype) if grad_b is not None else None
            else:  # positions weighed differently: the head-side sums again, each row weighed
                gw = torch.zeros_like(weight, dtype=torch.float32) if grad_w is not None else None
                gb = torch.zeros_like(bias, dtype=torch.float32) if grad_b is not None else None
                for start in range(0, hidden.shape[0], ctx.chunk):
                    h, t = hidden[start:start + ctx.chunk], targets[start:start + ctx.chunk]
                    device, dtype, enabled = ctx.autocast
                    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                        d = _softmax_minus_onehot(_scaled(F.linear(h, weight, bias).float(), ctx.temperature), t,
                                                  ctx.temperature)
                    d *= grad_nll[start:start + ctx.chunk].unsqueeze(-1)
                    _accumulate(d, h, weight, None, gw, gb, start)
                gw = gw.to(weight.dtype) if gw is not None else None
                gb = gb.to(bias.dtype) if gb is not None else None
        return gh, gw, gb, *none[1:]


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The logits divided by the sampling temperature (GRPO's log-probs are of logits / T, as TRL's)."""
    return logits if temperature == 1.0 else logits / temperature


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logp = torch.log_softmax(logits, dim=-1)
        return -(logp.exp() * logp).sum(-1)


def _nll_in_place(logits: torch.Tensor, targets: torch.Tensor, grad: bool) -> torch.Tensor:
    """Each row's NLL of its target; with ``grad``, ``logits`` are left holding softmax − onehot (d nll / d logits),
    made in place (without, exp(x − max)). One max, one exp and one sum over the vocabulary: ``cross_entropy`` then
    ``softmax`` would take two log-sum-exps and two fresh chunk-sized tensors (scripts/loss_pass_check.py). The
    same arithmetic as ``log_softmax`` (x − max − log Σ exp(x − max)), so equal to it up to rounding."""
    rows = torch.arange(len(targets), device=targets.device)
    top = logits.amax(-1)  # not max(-1): its indices make it several times slower
    target = logits[rows, targets]
    total = logits.sub_(top.unsqueeze(-1)).exp_().sum(-1)
    nll = total.log() - (target - top)
    if grad:
        logits.div_(total.unsqueeze(-1))
        logits[rows, targets] -= 1.0
    return nll


def _softmax_minus_onehot(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """d nll / d (the head's output) of each row, from the (temperature-scaled) logits, in place of them."""
    _nll_in_place(logits, targets, grad=True)
    return logits if temperature == 1.0 else logits.div_(temperature)


def _accumulate(d: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, grad_h: torch.Tensor | None,
                grad_w: torch.Tensor | None, grad_b: torch.Tensor | None, start: int) -> None:
    """One chunk's share of the gradients: rows of d·W for the hidden states, dᵀ·h summed into the weight's."""
    if grad_h is not None:
        grad_h[start:start + len(d)] = d.to(weight.dtype) @ weight.detach()
    if grad_w is not None:
        grad_w += d.t() @ h.detach().float()
    if grad_b is not None:
        grad_b += d.sum(0)


def _module_chunk(head: nn.Module, h: torch.Tensor, t: torch.Tensor, temperature: float,
                  entropy: bool, hits: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = _scaled(head(h).float(), temperature)
    nll = F.cross_entropy(logits, t, reduction="none")
    ent = _entropy(logits) if entropy else logits.new_empty(0)
    return nll, (logits.argmax(-1) == t) if hits else t.new_empty(0, dtype=torch.bool), ent


def _module_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int, temperature: float,
                entropy: bool, hits: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Any head called as a module on each chunk; under grad, checkpointed (its logits recomputed in backward)."""
    parts = []
    grad = torch.is_grad_enabled()
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if grad:
            parts.append(checkpoint(_module_chunk, head, h, t, temperature, entropy, hits, use_reentrant=False))
        else:
            parts.append(_module_chunk(head, h, t, temperature, entropy, hits))
    nll, hit, ent = (torch.cat(column) for column in zip(*parts, strict=True))
    return nll, hit, ent


def chunk_size(vocab: int) -> int:
    return max(1, CHUNK_VALUES // max(vocab, 1))


def token_nll(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, *,
              chunk: int | None = None, temperature: float = 1.0, entropy: bool = False, hits: bool = False,
              **forward: Any) -> TokenNLL:
    """The next-token NLL at every position of ``labels`` (position t scores token t + 1; IGNORE_INDEX: none),
    (batch, sequence), float32, differentiable; with ``hits``, whether each position's argmax is its target.
    ``inputs`` and ``forward`` go to the model (``use_cache=False`` added). A form that prepends virtual tokens
    (prefix / prompt tuning) gives the body more positions than ``labels`` has: the last ``labels.shape[1]`` are the
    real ones, as with the plain loss.
    ``temperature``: the NLL of softmax(logits / T) (GRPO's sampling temperature); ``entropy``: also each labelled
    position's entropy of that distribution (no gradient)."""
    with _head_captured(model) as (capture, head):
        model(**inputs, use_cache=False, **forward)
    hidden = capture.hidden
    if hidden is None:
        raise ValueError("the model's forward never called its output embeddings")
    hidden = hidden[:, -labels.shape[1]:]
    labels = labels.to(hidden.device)
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    where = (targets != IGNORE_INDEX).flatten().nonzero().squeeze(-1)
    chosen = hidden.flatten(0, 1).index_select(0, where)
    wanted = targets.flatten().index_select(0, where)
    vocab = capture.vocab
    size = chunk or chunk_size(vocab)
    nll = torch.zeros(targets.numel(), dtype=torch.float32, device=hidden.device)
    # the hits and entropies only when asked for (empty otherwise, never read)
    hit = torch.zeros(targets.numel() if hits else 0, dtype=torch.bool, device=hidden.device)
    ent = torch.zeros(targets.numel() if entropy else 0, dtype=torch.float32, device=hidden.device)
    if where.numel():
        if _linear_head(head):
            for hook in list(head._forward_pre_hooks.values()):  # readying the weight, as a call would
                hook(head, (chosen,))
            weight, bias = head.weight, head.bias  # read once: a parametrised weight is W0 + ΔW, built here
            grad = torch.is_grad_enabled()
            want = (grad and chosen.requires_grad, grad and weight.requires_grad,
                    grad and bias is not None and bias.requires_grad)
            picked, hit_of, ents = _FusedLinearNLL.apply(chosen, weight, bias, wanted, size, want, temperature,
                                                         entropy, hits)
        else:
            picked, hit_of, ents = _module_nll(head, chosen, wanted, size, temperature, entropy, hits)
        nll = nll.index_put((where,), picked)
        if hits:
            hit = hit.index_put((where,), hit_of)
        if entropy:
            ent = ent.index_put((where,), ents)
    return TokenNLL(nll.view_as(targets), hit.view_as(targets) if hits else None,
                    ent.view_as(targets) if entropy else None)


def head_at(model: nn.Module, inputs: dict[str, torch.Tensor], positions: torch.Tensor,
            columns: torch.Tensor, **forward: Any) -> torch.Tensor:
    """The head's logits restricted to ``columns`` (e.g. label words' tokens) at ``positions`` (rows, k) of each
    row: (rows, k, len(columns)), float32. Only those hidden states go through the head."""
    with _head_captured(model) as (capture, head):
        model(**inputs, use_cache=False, **forward)
    hidden = capture.hidden
    if hidden is None:
        raise ValueError("the model's forward never called its output embeddings")
    positions = positions.to(hidden.device)
    picked = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return head(picked).index_select(-1, columns.to(hidden.device)).float()
