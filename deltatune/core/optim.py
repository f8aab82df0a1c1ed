"""Optimizers the policies need beyond torch's own.

- ``ElementAdamW``: AdamW whose bias correction counts steps per element (``age``), so an entry that
  started training later (a regrown sparse slot) is corrected for its own number of updates, and a
  policy may seed its moments (SpIEL seeds regrown slots from accumulated gradients). With all ages
  equal it is exactly ``torch.optim.AdamW``.
- ``SM3`` (Anil et al., 2019): second-moment accumulators per row and per column instead of per
  entry. For a sparse delta the rows/columns are those of the base matrix (``layout`` gives them for
  each step), so the accumulators also score entries that are not trained yet (SpIEL-MA).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

Layout = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor, int, int] | None"]


class ElementAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def fresh_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if "age" not in state or state["age"].shape != p.shape:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["age"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.fresh_state(p)
                m, v, age = state["exp_avg"], state["exp_avg_sq"], state["age"]
                g = p.grad
                age.add_(1)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                # the order of torch's AdamW, with per-element corrections (computed in float64 like its scalars)
                bc1 = 1 - torch.pow(beta1, age.double())
                bc2_sqrt = (1 - torch.pow(beta2, age.double())).sqrt()
                denom = (v.sqrt() / bc2_sqrt.to(v.dtype)).add_(group["eps"])
                p.add_((m / denom) * (-group["lr"] / bc1).to(p.dtype))
        return loss


class SM3(torch.optim.Optimizer):
    """SM3 without momentum: ν = min(row acc, col acc) + g²; accumulators ← max(acc, ν); p −= lr·g/√(ν+eps).

    ``layout(p)`` returns (rows, cols, n_rows, n_cols) for a sparse vector of entries of a matrix; for
    other tensors the cover is one accumulator per index of each dimension (a vector: Adagrad)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, eps: float = 1e-8, weight_decay: float = 0.0,
                 layout: Layout | None = None) -> None:
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})
        self.layout = layout or (lambda _p: None)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                where = self.layout(p)
                if where is not None:
                    rows, cols, n_rows, n_cols = where
                    if "row" not in state:
                        state["row"] = torch.zeros(n_rows, dtype=torch.float32, device=p.device)
                        state["col"] = torch.zeros(n_cols, dtype=torch.float32, device=p.device)
                    r, c = state["row"], state["col"]
                    nu = torch.minimum(r[rows], c[cols]) + g.float() ** 2
                    r.scatter_reduce_(0, rows, nu, "amax")
                    c.scatter_reduce_(0, cols, nu, "amax")
                else:
                    accs = [state.setdefault(f"acc{d}", torch.zeros(n, dtype=torch.float32, device=p.device))
                            for d, n in enumerate(p.shape or (1,))]
                    nu = g.float() ** 2 + _min_over_cover(accs, p.shape)
                    for d, acc in enumerate(accs):
                        other = [i for i in range(nu.dim()) if i != d]
                        acc.copy_(torch.maximum(acc, nu.amax(dim=other) if other else nu.reshape(acc.shape)))
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((g.float() / (nu + group["eps"]).sqrt()).to(p.dtype), alpha=-group["lr"])
        return loss


def _min_over_cover(accs: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    if not shape:
        return accs[0].reshape(())
    out = None
    for d, acc in enumerate(accs):
        view = [1] * len(shape)
        view[d] = shape[d]
        a = acc.view(view)
        out = a if out is None else torch.minimum(out, a)
    return out.expand(shape)
