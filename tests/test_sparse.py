"""The sparse form: parity with the dense computation, no dense gradient kept, exact merge, sums."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import batch, loss_of, output_of, tiny_llama
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.core.forms.sparse import Sparse, random_indices, sparse_sum, split_budget


def _layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A frozen base layer and an input for it."""
    torch.manual_seed(0)
    if kind == "linear":
        module, x = nn.Linear(7, 5), torch.randn(3, 4, 7, requires_grad=True)
    elif kind == "conv1d":
        module, x = Conv1D(5, 7), torch.randn(3, 4, 7, requires_grad=True)
    else:
        module, x = nn.Embedding(11, 6, padding_idx=0), torch.randint(0, 11, (3, 4))
    return module.requires_grad_(False), x


def _dense(module: nn.Module, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The module's own operation with weight ``w`` and ``bias`` (an embedding has none)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, w, bias)
    if isinstance(module, nn.Embedding):
        return F.embedding(x, w, module.padding_idx)
    return x @ w + bias


def _assert_sums_close(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, terms: int) -> None:
    """Equal up to the rounding of a float sum in any order: |error| <= terms·eps·Σ|term| per entry (the classic
    bound), where ``magnitude`` is that Σ|term|. A fixed absolute tolerance fails on large sums whenever the
    summation order differs (e.g. with the thread count), as the sampled matmul's does from the dense one's."""
    bound = terms * torch.finfo(actual.dtype).eps * magnitude
    error = (actual - expected).abs()
    assert bool((error <= bound).all()), f"max error {error.max().item():.3g} beyond the rounding bound"


@pytest.mark.parametrize("observed", [False, True], ids=["sampled-grad", "dense-grad"])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_forward_and_gradients_equal_the_dense_computation(kind: str, observed: bool) -> None:
    """Two backward paths: the sampled matmul (only k entries), and the dense per-layer gradient a
    selection phase observes."""
    module, x = _layer(kind)
    form = Sparse([(module, "weight")], "weight", 12)
    form.attach()
    if observed:
        form.grad_observer = lambda f, g: None
    with torch.no_grad():
        form.values.normal_()
    y = module(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    w = (module.weight.detach() + form.delta_weight().detach()).requires_grad_()
    x_ref = x.detach().clone().requires_grad_() if x.is_floating_point() else x
    bias = getattr(module, "bias", None)
    y_ref = _dense(module, x_ref, w, bias)  # autograd through the dense weight: the reference
    (y_ref * g).sum().backward()
    # the same computation on absolute values gives each entry's Σ|term|, the scale of its rounding error
    w_abs = w.detach().abs().requires_grad_()
    x_abs = x.detach().abs().requires_grad_() if x.is_floating_point() else x
    y_abs = _dense(module, x_abs, w_abs, None if bias is None else bias.abs())
    (y_abs * g.abs()).sum().backward()
    rows = x.shape[0] * x.shape[1]  # the weight gradient sums over every input row
    _assert_sums_close(y, y_ref, y_abs.detach(), terms=max(w.shape) + 1)  # a row of W (+ the bias)
    _assert_sums_close(form.values.grad, w.grad.reshape(-1)[form.indices.long()],
                       w_abs.grad.reshape(-1)[form.indices.long()], terms=rows)
    if x.is_floating_point():
        _assert_sums_close(x.grad, x_ref.grad, x_abs.grad, terms=max(w.shape))
    assert module.weight.grad is None, "the base weight gets no gradient"


def test_no_dense_weight_gradient_survives_backward() -> None:
    """The per-layer dense gradient is seen by the observer during backward and is gone afterwards."""
    module, x = _layer("linear")
    form = Sparse([(module, "weight")], "weight", 6)
    form.attach()
    seen = []
    form.grad_observer = lambda f, g: seen.append(g.shape)
    module(x).sum().backward()
    assert seen == [module.weight.shape]
    assert all(p.grad is None for p in module.parameters())
    # between forward and backward the layer keeps W0 itself (no copy), never a materialised W0 + Δ
    big = [t for t in module(x).grad_fn.saved_tensors if t.shape == module.weight.shape]
    assert big and all(t.data_ptr() == module.weight.data_ptr() for t in big)


def test_merge_then_unmerge_restores_the_base_bit_for_bit() -> None:
    module, x = _layer("linear")
    w0 = module.weight.detach().clone()
    form = Sparse([(module, "weight")], "weight", 10)
    form.attach()
    with torch.no_grad():
        form.values.normal_()
    y = module(x)
    form.merge()
    assert "forward" not in module.__dict__, "merged: the plain module computes"
    magnitude = _dense(module, x.abs(), module.weight.abs(), module.bias.abs())
    _assert_sums_close(module(x), y, magnitude.detach(), terms=module.in_features + 1)
    form.unmerge()
    assert torch.equal(module.weight, w0)
    assert torch.equal(module(x), y)


def test_indices_are_unique_int32_and_checked_on_load() -> None:
    idx = random_indices(1000, 100, torch.Generator().manual_seed(0))
    assert idx.dtype == torch.int32 and torch.unique(idx).numel() == 100
    module, _ = _layer("linear")
    form = Sparse([(module, "weight")], "weight", 4)
    with pytest.raises(dt.DeltatuneError, match="repeat"):
        form.load_stored({"indices": torch.tensor([1, 1], dtype=torch.int32), "values": torch.zeros(2)})
    with pytest.raises(dt.DeltatuneError, match="outside"):
        form.load_stored({"indices": torch.tensor([35], dtype=torch.int32), "values": torch.zeros(1)})
    form.load_stored({"indices": torch.tensor([3, 9, 20], dtype=torch.int32), "values": torch.ones(3)})
    assert form.k == 3 and form.stored_bytes() == 3 * (4 + 4)


def test_budget_split_is_proportional_and_exact() -> None:
    sizes = [100, 300, 600, 7]
    shares = split_budget(50, sizes)
    assert sum(shares) == 50
    for s, n in zip(shares, sizes, strict=True):
        assert abs(s - 50 * n / sum(sizes)) < 1


def test_two_sparse_deltas_add_to_their_union() -> None:
    a_idx, a_val = torch.tensor([1, 4, 7], dtype=torch.int32), torch.tensor([1.0, 2.0, 3.0])
    b_idx, b_val = torch.tensor([4, 8], dtype=torch.int32), torch.tensor([10.0, 20.0])
    idx, val = sparse_sum(a_idx, a_val, b_idx, b_val)
    assert idx.tolist() == [1, 4, 7, 8] and val.tolist() == [1.0, 12.0, 3.0, 20.0]
    assert idx.dtype == torch.int32


def test_sparse_delta_on_tied_embeddings_applies_at_both_sites() -> None:
    model = tiny_llama(tied=True)
    x = batch()
    emb = model.model.embed_tokens
    from deltatune.core.targeting import sites_of

    form = Sparse(sites_of(model, emb.weight), "weight", 50)
    form.attach()
    with torch.no_grad():
        form.values.normal_()
    got = output_of(model, x)
    form.detach()
    with torch.no_grad():
        emb.weight.add_(form.delta_weight())
    assert torch.allclose(got, output_of(model, x), atol=1e-5, rtol=0)
    assert loss_of(model, x).isfinite()
