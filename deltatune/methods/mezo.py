"""MeZO (Malladi et al., NeurIPS 2023, arXiv 2305.17333): fine-tuning from forward passes only, at the
memory of inference.

Each step estimates the derivative of the loss along one random Gaussian direction z with two forward
passes on the same batch (SPSA) and moves every trainable tensor along z by that scalar:

    g = (L(θ + εz) − L(θ − εz)) / 2ε,        θ ← θ − η (g·z + λθ)

z is never stored: it is regenerated from the step's seed whenever it is needed, one chunk of one tensor
at a time. The algorithm and defaults follow the official code (princeton-nlp/MeZO@552cb1b,
``large_models/trainer.py``, ``zo_perturb_parameters`` / ``zo_forward`` / ``zo_step`` / ``zo_update``):
ε = 1e-3 (full-parameter; its grid uses 1e-2 for LoRA, 1e-1 for prefixes), one perturbation per step, the
loss in eval mode (dropout off) without autograd, no gradient accumulation. The learning rate is the run's
``train.lr`` (the papers: 1e-6 / 1e-7 full-parameter, 1e-4 / 5e-5 LoRA, constant schedule). Differences,
each for a reason:

- **The perturbation is applied at forward time, not written into the weights.** The official code writes
  θ + εz, θ − εz and θ back in place (+εz, −2εz, +εz); in fp32 about half of the entries do not come back
  bit for bit, and in fp16 the drift makes the loss collapse (MeZO issue #42). Here a trainable tensor is
  never written during the estimate: a forward pre-hook on each module that holds it points the parameter
  at a temporary W + εz, and the module's forward hook points it back, so one module's perturbed tensor
  exists at a time and W is exact by construction. The tensors of another method's delta (``base``: LoRA
  factors, adapters; small) are pointed at perturbed copies for the whole forward. z is drawn twice for
  the estimate and once for the update (the official code draws it four times).
- **Seeds**: each step's seed comes from a dedicated generator whose state is in the policy state (a
  resumed run draws the same seeds; the global RNG is never reseeded, unlike the official
  ``torch.manual_seed``, which correlates data order and dropout with the perturbations). z of chunk c of
  tensor i is drawn from a generator seeded with a hash of (step seed, i, c): chunks of 2^22 entries
  bound the temporary memory whatever a tensor's size, and z is always drawn in fp32, so it does not
  depend on the tensor's dtype.
- **n-SPSA** (``n_spsa`` > 1, the paper's variant): n seeds, n estimates, then one update
  θ ← θ − η (Σ_k g_k z_k / n + λθ).
- **Weight decay** skips tensors with fewer than two dimensions (biases, LayerNorm / RMSNorm weights); the
  official code matches the names "bias", "layer_norm", "layernorm", "ln".
- The logged loss is the mean of L(θ + εz) and L(θ − εz) (the official code logs the first); a step whose
  estimate is not finite makes no update, and the loop stops on its loss.

What trains:

- ``dt.attach(model, "mezo")``: every parameter (or ``targets`` / ``layers`` / ``types`` / ``exclude``, as
  in ``full``), trained in place: the artifact is ``full``'s dense delta W − W0. W0 is written to a file
  on disk when a tensor is first updated (``OffloadedInPlace``; ``keep_w0: memory`` keeps it in host RAM
  instead), so the process holds the model, one module's perturbed tensor and one chunk of z: the memory
  of inference. The trained W is put on a point its artifact reproduces bit for bit (``InPlace.settle``)
  when the artifact is written, not after every step (that would read W0 back at every step).
- ``dt.attach(model, "mezo", base="lora", base_options={...})``: the parameters of another method (one
  with a static policy) trained with zeroth-order steps; the artifact is that method's.

Train with ``deltatune train`` (the native loop hands the step to ``policy.train_step``) or
``deltatune.train.hf.DeltaTuneTrainer``; in your own loop call ``tuned.policy.train_step(step, tuned, batch,
loss_fn, lr, weight_decay)`` once per step with ``loss_fn(batch) -> loss`` (no backward, no optimizer).

fp16 / bf16 trainable tensors: the estimate stays exact (nothing is written in place), but an update
η·g·z of about 1e-6 is far below the rounding step of a 16-bit weight and is mostly lost, so a warning
asks for fp32 weights (mixed precision through autocast is fine: the native loop computes in bf16 from
fp32 weights on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from deltatune.core.registry import Built, register
from deltatune.methods._zeroth_order import (
    ZEROTH_ORDER_TRAITS,
    MezoPolicy,
    ZerothOrderConfig,
    zeroth_order_forms,
)


@dataclass
class MezoConfig(ZerothOrderConfig):
    """MeZO's options: exactly the zeroth-order family's (``_zeroth_order.ZerothOrderConfig``)."""


@register("mezo", MezoConfig, "MeZO: zeroth-order SPSA steps from two forward passes, z regenerated from seeds "
          "(Malladi et al., 2023); the full model in place, or another method's parameters (base)",
          traits=ZEROTH_ORDER_TRAITS, family="zeroth-order")
def build(model: nn.Module, cfg: MezoConfig, *, loading: bool = False) -> Built:
    return Built(zeroth_order_forms(model, cfg, loading), MezoPolicy(cfg))
