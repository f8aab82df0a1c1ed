"""dt.merge_deltas: the merge rules on hand-made tensors, every weight-side form, the artifact, and LoRA pairs
against peft 0.21.2's add_weighted_adapter (the ΔW merges = PEFT's *_svd types, cat, and the factor-wise types)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import batch, output_of, random_lora, tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.core import artifact
from deltatune.core.forms.lowrank import LowRank
from deltatune.ops.merging import combine, drop, elect, merge_deltas, trim

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from peft.utils import merge_utils  # noqa: E402

Q0 = "model.layers.0.self_attn.q_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"
NORM = "model.layers.1.input_layernorm.weight"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits


# -- the rules on hand-made tensors ------------------------------------------------------------------------
T1 = torch.tensor([3.0, -1.0, 0.5, -2.0])
T2 = torch.tensor([-1.0, 2.0, 0.4, -3.0])


def test_trim_keeps_the_largest_magnitudes() -> None:
    assert trim(T1, 0.5).tolist() == [3.0, 0.0, 0.0, -2.0]
    assert trim(T2, 0.25).tolist() == [0.0, 0.0, 0.0, -3.0]
    assert torch.equal(trim(T1, 1.0), T1)


def test_ties_by_hand() -> None:
    # trimmed: [3, 0, 0, -2] and [0, 2, 0, -3]; summed [3, 2, 0, -5] elects + + + -; zeros never agree
    assert combine([T1, T2], [1.0, 1.0], "ties", 0.5).tolist() == [3.0, 2.0, 0.0, -2.5]
    # weights apply after the election (PEFT's order): (0.5·-2 + 2·-3) / 2 agreeing
    assert combine([T1, T2], [0.5, 2.0], "ties", 0.5).tolist() == [1.5, 4.0, 0.0, -3.5]
    # by mass 2.9 - 1 elects +, by count (one + one -) it is a tie that goes to +, and three to one elects -
    a, b, c = torch.tensor([2.9]), torch.tensor([-1.0]), torch.tensor([-0.1])
    assert combine([a, b], [1.0, 1.0], "ties", 1.0).tolist() == pytest.approx([2.9])
    assert combine([a, b, c, c], [1.0] * 4, "ties", 1.0, majority="frequency").tolist() == pytest.approx([-0.4])
    assert elect(torch.stack([a, b, c]), "total").flatten().tolist() == [True, False, False]


def test_task_arithmetic_and_magnitude_prune_by_hand() -> None:
    assert combine([T1, T2], [1.0, -0.5], "task_arithmetic", None).tolist() == pytest.approx([3.5, -2.0, 0.3, -0.5])
    assert combine([T1, T2], [1.0, 1.0], "magnitude_prune", 0.5).tolist() == [3.0, 2.0, 0.0, -5.0]


def test_dare_drops_with_probability_and_rescales() -> None:
    t = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    d = drop(t, 0.3, torch.Generator().manual_seed(5))
    kept = d != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01, "density is the kept fraction"
    assert torch.allclose(d[kept], t[kept] / 0.3), "kept entries are rescaled by 1/density"
    assert abs(d.mean().item() - t.mean().item()) < 0.02, "the rescale keeps the expectation"
    assert torch.equal(d, drop(t, 0.3, torch.Generator().manual_seed(5))), "the seed fixes the masks"
    # dare_linear = Σ w·drop(t); dare_ties = TIES' election and disjoint mean on the dropped tensors
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    d1, d2 = drop(T1, 0.5, g2), drop(T2, 0.5, g2)
    assert torch.equal(combine([T1, T2], [1.0, 2.0], "dare_linear", 0.5, g1), d1 + 2 * d2)
    g1 = torch.Generator().manual_seed(1)
    assert torch.equal(combine([T1, T2], [1.0, 1.0], "dare_ties", 0.5, g1), combine([d1, d2], [1.0, 1.0], "ties", 1.0))


# -- every weight-side form, the artifact ------------------------------------------------------------------
def _lora(path: Path, make=tiny_llama, seed: int = 1, **opts) -> dt.Tuned:
    """Save a LoRA with clearly non-zero random factors (B is zero at a real init)."""
    tuned = random_lora(make, seed, **{"targets": ["q_proj", "v_proj"], **opts})
    tuned.save(path)
    return tuned


def _dense_of(tuned: dt.Tuned) -> dict[str, torch.Tensor]:
    """ΔW per base tensor name of a tuned model's delta (its forms summed)."""
    names = {id(p): n.replace("parametrizations.", "").replace(".original", "")
             for n, p in tuned.model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for form in tuned.forms().values():
        n = names[id(form.base)]
        out[n] = out.get(n, 0) + form.delta_weight().detach().float()
    return out


def _with(make, deltas: dict[str, torch.Tensor]) -> nn.Module:
    model = make()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, d in deltas.items():
            params[n].add_(d)
    return model


def test_lora_sparse_and_dense_merge_per_tensor(tmp_path) -> None:
    """A LoRA, an LT-SFT sparse delta and a full fine-tune (dense, on a norm too) merged with TIES: each tensor's
    result is the rule applied to the ΔW of the deltas that touch it, and the artifact loads back as it."""
    _lora(tmp_path / "lora")
    sparse = dt.attach(tiny_llama(), "lt-sft")
    with torch.no_grad():
        sparse.forms()[Q0].delta.view(-1)[:40] = torch.linspace(-1, 1, 40)
    sparse.save(tmp_path / "sparse")
    full = dt.attach(tiny_llama(), "full", targets=[Q0, NORM])
    for name in (Q0, NORM):
        full.forms()[name].snapshot()
        with torch.no_grad():
            full.forms()[name].weight.add_(torch.randn_like(full.forms()[name].weight) * 0.1)

    paths = [tmp_path / "lora", tmp_path / "sparse", full]  # artifacts and a Tuned, as they come
    weights = [1.0, 0.5, 2.0]
    merged = merge_deltas(paths, tmp_path / "m", how="ties", weights=weights, density=0.3, base=tiny_llama())
    inputs = [_dense_of(dt.load(tiny_llama(), tmp_path / "lora")), _dense_of(dt.load(tiny_llama(), tmp_path / "sparse")),
              _dense_of(full)]
    expected = {}
    for name in dict(tiny_llama().named_parameters()):
        touching = [(w, d[name]) for w, d in zip(weights, inputs, strict=True) if name in d and d[name].any()]
        if touching:
            expected[name] = combine([d for _, d in touching], [w for w, _ in touching], "ties", 0.3)
    got = _dense_of(merged)
    assert got.keys() == expected.keys() == {Q0, NORM} | set(inputs[0])
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert len([k for k in expected if (expected[k] != 0).any()]) == len(expected)

    meta = artifact.read_meta(tmp_path / "m")
    assert meta["method"] == "full" and meta["merged_from"]["how"] == "ties"
    assert [s["method"] for s in meta["merged_from"]["sources"]] == ["lora", "lt-sft", "full"]
    x = batch()
    loaded = dt.load(tiny_llama(), tmp_path / "m")
    assert torch.allclose(output_of(loaded, x), output_of(_with(tiny_llama, expected), x), atol=1e-5, rtol=0)
    assert torch.equal(output_of(loaded, x), output_of(merged, x))
    with pytest.raises(dt.DeltatuneError, match="another base model"):
        dt.load(tiny_llama(seed=3), tmp_path / "m")


def test_task_arithmetic_of_two_loras_equals_both_composed(tmp_path) -> None:
    _lora(tmp_path / "a", seed=1)
    _lora(tmp_path / "b", seed=2, targets=["q_proj", "o_proj"])
    x = batch()
    merged = merge_deltas([tmp_path / "a", tmp_path / "b"], base=tiny_llama())
    both = dt.compose(tiny_llama(), [tmp_path / "a", tmp_path / "b"])
    assert torch.allclose(output_of(merged, x), output_of(both, x), atol=1e-5, rtol=0)
    cat = merge_deltas([tmp_path / "a", tmp_path / "b"], tmp_path / "cat", how="cat", base=tiny_llama())
    assert artifact.read_meta(tmp_path / "cat")["method"] == "lora"
    ranks = {n: f.r for n, f in cat.forms().items()}
    assert ranks[Q0] == 8 and ranks[V1] == 4, "cat keeps each layer at the sum of the ranks that touch it"
    assert torch.allclose(output_of(dt.load(tiny_llama(), tmp_path / "cat"), x), output_of(both, x), atol=1e-5, rtol=0)


def test_rank_truncation_is_the_best_rank_r_approximation(tmp_path) -> None:
    _lora(tmp_path / "a", seed=1)
    _lora(tmp_path / "b", seed=2)
    full = _dense_of(merge_deltas([tmp_path / "a", tmp_path / "b"], dense=True, base=tiny_llama()))
    low = merge_deltas([tmp_path / "a", tmp_path / "b"], tmp_path / "r3", rank=3, base=tiny_llama())
    for name, form in low.forms().items():
        u, s, vh = torch.linalg.svd(full[name])
        assert torch.allclose(form.delta_weight(), u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-6)
    assert {f.r for f in dt.load(tiny_llama(), tmp_path / "r3").forms().values()} == {3}


def _stored_bytes(path: Path) -> int:
    return artifact.read_meta(path)["sizes"]["stored_bytes"]


def test_loras_merge_low_rank_by_default_task_arithmetic_as_cat_with_the_dense_merges_delta(tmp_path) -> None:
    """The issue's case: LoRA inputs no longer give a dense artifact the size of the weights they touch. Task
    arithmetic is done as cat: the same ΔW as the dense merge, at the sum of the ranks, the inputs' size."""
    _lora(tmp_path / "a", seed=1)
    _lora(tmp_path / "b", seed=2, r=2, alpha=6)
    pair = [tmp_path / "a", tmp_path / "b"]
    low = merge_deltas(pair, tmp_path / "low", weights=[0.7, 1.3], base=tiny_llama())
    dense = merge_deltas(pair, tmp_path / "dense", weights=[0.7, 1.3], dense=True, base=tiny_llama())
    record = artifact.read_meta(tmp_path / "low")["merged_from"]
    assert record["result"] == "cat" and "--dense" in record["note"]
    assert "note" not in artifact.read_meta(tmp_path / "dense")["merged_from"], "an explicit choice needs no note"
    assert {f.r for f in low.forms().values()} == {6}
    want, got = _dense_of(dense), _dense_of(low)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6 * float(want[name].abs().max()), rtol=1e-5), name
    assert _stored_bytes(tmp_path / "low") == _stored_bytes(tmp_path / "a") + _stored_bytes(tmp_path / "b")
    assert _stored_bytes(tmp_path / "dense") > 2 * _stored_bytes(tmp_path / "low")


@pytest.mark.parametrize(("how", "density"), [("ties", 0.3), ("dare_ties", 0.5)])
def test_loras_merge_low_rank_by_default_ties_as_the_best_approximation_at_the_total_rank(tmp_path, how,
                                                                                         density) -> None:
    """TIES / DARE on LoRAs: the merged ΔW (trimmed, so of full rank) kept as its truncated SVD at the inputs'
    total rank, the best approximation of that rank (Eckart–Young: the error is the tail of its spectrum)."""
    _lora(tmp_path / "a", seed=1)
    _lora(tmp_path / "b", seed=2, r=2, alpha=6)
    pair = [tmp_path / "a", tmp_path / "b"]
    low = merge_deltas(pair, tmp_path / "low", how=how, density=density, seed=3, base=tiny_llama())
    full = _dense_of(merge_deltas(pair, how=how, density=density, seed=3, dense=True, base=tiny_llama()))
    record = artifact.read_meta(tmp_path / "low")["merged_from"]
    assert record["result"] == "svd" and "rank-6" in record["note"] and "--dense" in record["note"]
    got = _dense_of(low)
    assert got.keys() == full.keys()
    for name, merged in full.items():
        s = torch.linalg.svdvals(merged)
        assert int((s > 1e-4 * s[0]).sum()) > 6, "the trimmed merge is not itself of rank 6: the test would be void"
        error = torch.linalg.matrix_norm(got[name] - merged)
        assert error == pytest.approx(float(s[6:].pow(2).sum().sqrt()), rel=1e-4), name
    assert {f.r for f in dt.load(tiny_llama(), tmp_path / "low").forms().values()} == {6}
    assert _stored_bytes(tmp_path / "low") == _stored_bytes(tmp_path / "a") + _stored_bytes(tmp_path / "b")


def test_bad_options_are_refused(tmp_path) -> None:
    _lora(tmp_path / "a")
    a = tmp_path / "a"
    with pytest.raises(dt.DeltatuneError, match="needs density"):
        merge_deltas([a, a], how="ties", base=tiny_llama())
    with pytest.raises(dt.DeltatuneError, match=r"\(0, 1\]"):
        merge_deltas([a, a], how="dare_ties", density=0.0, base=tiny_llama())
    with pytest.raises(dt.DeltatuneError, match="one weight per delta"):
        merge_deltas([a, a], weights=[1.0], base=tiny_llama())
    with pytest.raises(dt.DeltatuneError, match="not a merge"):
        merge_deltas([a, a], how="mean", base=tiny_llama())
    with pytest.raises(dt.DeltatuneError, match="list of deltas"):
        merge_deltas(a, base=tiny_llama())
    with pytest.raises(dt.DeltatuneError, match="which base model"):
        merge_deltas([a, a])  # a tiny model has no name to load it by
    with pytest.raises(dt.DeltatuneError, match="another base model"):
        merge_deltas([a, a], base=tiny_llama(seed=4))
    full = dt.attach(tiny_llama(), "full", targets=[NORM])
    full.forms()[NORM].snapshot()
    with torch.no_grad():
        full.forms()[NORM].weight.add_(0.1)
    with pytest.raises(dt.DeltatuneError, match="needs LoRA deltas"):
        merge_deltas([a, full], how="cat", base=tiny_llama())
    with pytest.raises(dt.DeltatuneError, match="needs the weight matrix"):
        merge_deltas([a, full], rank=2, base=tiny_llama())
    with pytest.raises(dt.DeltatuneError, match="changes activations"):
        merge_deltas([a, dt.attach(tiny_llama(), "adapter")], base=tiny_llama())
    busy = tiny_llama()
    dt.load(busy, a)
    with pytest.raises(dt.DeltatuneError, match="without a delta attached"):
        merge_deltas([a, a], base=busy)
    _lora(tmp_path / "emb", targets=["embed_tokens"])  # tied: LoRA changes the lookup only
    with pytest.raises(dt.DeltatuneError, match="tied"):
        merge_deltas([tmp_path / "emb", a], dense=True, base=tiny_llama())
    with pytest.raises(dt.DeltatuneError, match="dense=True asks for the full-rank"):
        merge_deltas([a, a], dense=True, rank=2, base=tiny_llama())
    tied = merge_deltas([tmp_path / "emb", a], how="cat", base=tiny_llama())  # low-rank keeps the tie as LoRA does
    assert torch.allclose(output_of(tied, batch()), output_of(dt.compose(tiny_llama(), [tmp_path / "emb", a]), batch()),
                          atol=1e-5, rtol=0)


# -- against PEFT's add_weighted_adapter ------------------------------------------------------------------
def _peft_merged(base: nn.Module, tmp_path: Path, tuneds: list[dt.Tuned], weights: list[float], kind: str,
                 **options) -> PeftModel:
    dirs = []
    for i, t in enumerate(tuneds):
        dirs.append(tmp_path / f"peft{i}")
        dt.export_peft(t, dirs[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name="a0")
        for i, d in enumerate(dirs[1:], 1):
            pm.load_adapter(str(d), adapter_name=f"a{i}")
        pm.add_weighted_adapter([f"a{i}" for i in range(len(dirs))], weights, "merged", combination_type=kind,
                                **options)
    pm.set_adapter("merged")
    return pm.eval()


def _seeded_peft_masks(monkeypatch, seed: int) -> None:
    """PEFT draws DARE's masks from torch's global generator after its new adapter's initialisation drew from it;
    draw them from a generator seeded as merge_deltas seeds its own, so both use the same masks."""
    g = torch.Generator().manual_seed(seed)

    def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
        pruned = tensor * torch.bernoulli(torch.full_like(input=tensor, fill_value=density), generator=g)
        return pruned / density if rescale else pruned

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)


# ΔW merges at full rank: every targeted matrix is 32 x 32 (q_proj, o_proj), so PEFT's SVD to svd_rank=32
# truncates nothing and its merged model is W0 + the merged ΔW, up to the SVD's rounding
DELTA_CASES = [
    ("task_arithmetic", "svd", None),
    ("ties", "ties_svd", 0.3),
    ("dare_linear", "dare_linear_svd", 0.5),
    ("dare_ties", "dare_ties_svd", 0.4),
    ("magnitude_prune", "magnitude_prune_svd", 0.3),
]


@pytest.mark.parametrize(("how", "kind", "density"), DELTA_CASES)
def test_delta_merges_equal_peft_svd_types_at_full_rank(tmp_path, monkeypatch, how, kind, density) -> None:
    opts = {"targets": ["q_proj", "o_proj"]}
    a, b = _lora(tmp_path / "a", seed=1, **opts), _lora(tmp_path / "b", seed=2, r=2, alpha=6, **opts)
    weights = [0.7, 1.3]
    _seeded_peft_masks(monkeypatch, seed=11)
    theirs = _peft_merged(tiny_llama(), tmp_path, [a, b], weights, kind, svd_rank=32, density=density)
    ours = merge_deltas([tmp_path / "a", tmp_path / "b"], tmp_path / "m", how=how, weights=weights, density=density,
                        seed=11, dense=True, base=tiny_llama())  # PEFT's svd_rank=32: full rank
    x = batch()
    diff = (output_of(ours, x) - output_of(theirs, x)).abs().max().item()
    moved = (output_of(ours, x) - output_of(tiny_llama(), x)).abs().max().item()
    print(f"{how} vs PEFT {kind}: max |Δlogits| {diff:.2g} (the merge moves them by {moved:.2g})")
    assert moved > 1e-2 and diff <= 2e-5


@pytest.mark.parametrize(("how", "kind", "density"), [("ties", "ties_svd", 0.3), ("dare_ties", "dare_ties_svd", 0.5)])
def test_rank_truncated_merges_equal_peft_svd_types(tmp_path, monkeypatch, how, kind, density) -> None:
    """PEFT's default svd_rank is the largest input rank: rank=4 here; GPT-2's Conv1D (fan_in_fan_out) too."""
    for make, targets in ((tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn", "c_proj"])):
        sub = tmp_path / make.__name__
        a = _lora(sub / "a", make, seed=1, targets=targets)
        b = _lora(sub / "b", make, seed=2, targets=targets)
        _seeded_peft_masks(monkeypatch, seed=3)
        theirs = _peft_merged(make(), sub, [a, b], [1.0, 0.5], kind, density=density)
        ours = merge_deltas([sub / "a", sub / "b"], sub / "m", how=how, weights=[1.0, 0.5], density=density, seed=3,
                            rank=4, base=make())
        x = batch()
        loaded = output_of(dt.load(make(), sub / "m"), x)
        assert torch.equal(loaded, output_of(ours, x))
        diff = (loaded - output_of(theirs, x)).abs().max().item()
        assert diff <= 2e-5, (make.__name__, diff)


def _peft_factors(pm: PeftModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer

    inner = pm.base_model.model
    return {f"{n}.weight": (m.lora_A["merged"].weight.detach(), m.lora_B["merged"].weight.detach())
            for n, m in inner.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize(("how", "kind", "density"), [
    ("task_arithmetic", "linear", None), ("ties", "ties", 0.5), ("dare_linear", "dare_linear", 0.6),
    ("dare_ties", "dare_ties", 0.5), ("magnitude_prune", "magnitude_prune", 0.4), ("cat", "cat", None)])
def test_factor_merges_and_cat_have_peft_factors(tmp_path, monkeypatch, how, kind, density) -> None:
    """PEFT's non-SVD types and cat: the merged LoRA factors are PEFT's, bit for bit (a negative weight too)."""
    a = _lora(tmp_path / "a", tiny_gpt2, seed=1, targets=["c_attn"])
    b = _lora(tmp_path / "b", tiny_gpt2, seed=2, targets=["c_attn"], alpha=3)
    weights = [0.8, -0.6]
    _seeded_peft_masks(monkeypatch, seed=5)
    theirs = _peft_merged(tiny_gpt2(), tmp_path, [a, b], weights, kind, density=density)
    space = "delta" if how == "cat" else "factors"
    ours = merge_deltas([tmp_path / "a", tmp_path / "b"], how=how, weights=weights, density=density, seed=5,
                        space=space, base=tiny_gpt2())
    peft_ab = _peft_factors(theirs)
    forms = ours.forms()
    assert forms.keys() == peft_ab.keys()
    for name, (pa, pb) in peft_ab.items():
        form = forms[name]
        assert isinstance(form, LowRank) and form.scale == 1.0
        assert torch.equal(form.A.detach(), pa) and torch.equal(form.B.detach(), pb), name
    x = batch()
    assert torch.allclose(output_of(ours, x), output_of(theirs, x), atol=1e-5, rtol=0)


def test_factor_space_needs_equal_ranks(tmp_path) -> None:
    _lora(tmp_path / "a", r=4)
    _lora(tmp_path / "b", r=2)
    with pytest.raises(dt.DeltatuneError, match="equal ranks"):
        merge_deltas([tmp_path / "a", tmp_path / "b"], space="factors", base=tiny_llama())
