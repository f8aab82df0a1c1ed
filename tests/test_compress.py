"""ComPEFT compression: density rule, ternary values, bit-packed codec and its size,
and compressed artifacts that load, merge and compose like any other, for low-rank, dense and sparse sources."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import batch, loss_of, output_of, tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.core import artifact
from deltatune.errors import DeltatuneError
from deltatune.methods._bitpack import (
    decode,
    decode_positions,
    encode,
    encode_positions,
    expected_rice_bits,
    packed_bytes,
    rice_parameter,
    rice_size,
)
from deltatune.methods.compeft import PackedDense, PackedLowRank, PackedSparse
from deltatune.ops.compress import Piece, compress, select, top_n


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _pieces(*sizes: int, seed: int = 0) -> list[Piece]:
    g = torch.Generator().manual_seed(seed)
    return [Piece(f"t{i}", torch.randn(n, generator=g), n) for i, n in enumerate(sizes)]


# -- the density rule ------------------------------------------------------------------------------------------------
def test_strict_top_n_keeps_exactly_floor_density_d_and_the_largest() -> None:
    pieces = _pieces(50_000, 30_000, 20_000)  # d = 10^5, continuous values
    kept = select(pieces, 0.2, 1.0, "global", "ternary")
    assert sum(v[0].numel() for v in kept.values()) == 20_000  # the official kthvalue rule would keep 20 001
    tau = torch.cat([p.values for p in pieces])
    offsets = {"t0": 0, "t1": 50_000, "t2": 80_000}
    chosen = torch.cat([kept[k][0] + offsets[k] for k in sorted(kept)])
    mask = torch.zeros(tau.numel(), dtype=torch.bool)
    mask[chosen] = True
    assert tau.abs()[mask].min() > tau.abs()[~mask].max(), "the kept entries are the largest in magnitude"
    # density as written: 0.29 of 100 is 29 (⌊0.29·100⌋ in binary floating point would be 28)
    assert sum(v[0].numel() for v in select(_pieces(100), 0.29, 1.0, "global", "ternary").values()) == 29


def test_ties_at_the_threshold_go_to_the_first_tensors_and_positions_and_zeros_are_never_kept() -> None:
    a = torch.tensor([1.0, 0.5, -0.5, 0.0, 0.5])
    b = torch.tensor([-0.5, 2.0, 0.0, 0.0, 0.0])
    assert [t.tolist() for t in top_n([a, b], 4)] == [[0, 1, 2], [1]]
    assert [t.tolist() for t in top_n([a, b], 5)] == [[0, 1, 2, 4], [1]]
    assert [t.tolist() for t in top_n([a, b], 10)] == [[0, 1, 2, 4], [0, 1]], "only the 6 non-zeros"
    assert [t.numel() for t in top_n([torch.zeros(8)], 3)] == [0]


# -- the values ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_kept_values_are_alpha_std_with_the_sign_of_tau(scope: str) -> None:
    pieces = _pieces(3000, 1000, seed=1)
    with torch.no_grad():
        pieces[1].values.mul_(5)  # tensors of different spread: the scopes then differ
    kept = select(pieces, 0.2, 2.5, scope, "ternary")
    for piece in pieces:
        pos, values = kept[piece.key]
        group = [piece.values] if scope == "tensor" else [p.values for p in pieces]
        c = 2.5 * torch.cat(group).double().std()
        assert torch.allclose(values.abs().double(), c.expand(values.numel()), rtol=1e-6, atol=0)
        assert torch.equal(torch.sign(values), torch.sign(piece.values[pos]))
        if scope == "tensor":
            assert pos.numel() == math.floor(0.2 * piece.values.numel())
        # zeros exactly where |τ| is below the smallest kept magnitude
        dropped = torch.ones(piece.values.numel(), dtype=torch.bool)
        dropped[pos] = False
        if scope == "tensor":
            assert piece.values.abs()[dropped].max() < piece.values.abs()[pos].min()
    if scope == "global":
        assert len({float(v[1].abs()[0]) for v in kept.values()}) == 1, "one scale for the whole task vector"
        assert kept["t1"][0].numel() > kept["t0"][0].numel(), "the global top-k favours the wider tensor"


# -- codec, sizes, density 1.0, pruning only -------------------------------------------------------------------------
@pytest.mark.parametrize(("numel", "density", "encoding"), [(10_007, 0.001, "rice"), (10_007, 0.1, "rice"),
                                                              (10_007, 0.6, "bitmap"), (13, 1.0, "bitmap")])
def test_positions_round_trip_bit_exact_with_the_smaller_encoding(numel: int, density: float, encoding: str) -> None:
    g = torch.Generator().manual_seed(3)
    pos = torch.nonzero(torch.rand(numel, generator=g) < density).view(-1)
    pos = torch.unique(torch.cat([pos, torch.tensor([0, numel - 1])]))  # both ends of the tensor
    payload, record = encode_positions(pos, numel)
    assert record["encoding"] == encoding and payload.dtype == torch.uint8
    assert torch.equal(decode_positions(payload, numel, record), pos)
    gaps = torch.diff(pos, prepend=torch.tensor([-1])).numpy() - 1
    rice = rice_size(gaps, record["rice_bits"]) if encoding == "rice" else None
    assert record["bits"] == (rice if encoding == "rice" else numel)
    assert payload.numel() == (record["bits"] + 7) // 8
    b_star = rice_parameter(pos.numel() / numel)
    assert record["bits"] <= min(numel, rice_size(gaps, b_star)), "never larger than the bitmap or the b* code"


def test_a_single_position_and_an_empty_set_round_trip() -> None:
    for pos in (torch.tensor([4_999]), torch.empty(0, dtype=torch.long)):
        payload, record = encode_positions(pos, 5_000)
        assert torch.equal(decode_positions(payload, 5_000, record), pos)


def test_golomb_size_of_a_bernoulli_mask_is_within_2_percent_of_the_formula() -> None:
    p, numel = 0.1, 1_000_000
    assert rice_parameter(p) == 3  # p = 0.1: b = 3
    g = torch.Generator().manual_seed(0)
    pos = torch.nonzero(torch.rand(numel, generator=g) < p).view(-1)
    _, record = encode_positions(pos, numel, rice_bits=3)
    per_position = record["bits"] / pos.numel()
    assert abs(per_position - expected_rice_bits(p, 3)) / expected_rice_bits(p, 3) < 0.02
    assert abs(expected_rice_bits(p, 3) + 1 - 5.76) < 0.01, "≈5.76 bits per kept entry with its sign"


@pytest.mark.parametrize("mode", ["ternary", "pruned"])
def test_payload_round_trip_and_size_formula(mode: str) -> None:
    g = torch.Generator().manual_seed(5)
    pos = torch.randperm(4_001, generator=g)[:333].sort().values
    values = torch.randn(333, generator=g)
    if mode == "ternary":
        values = torch.where(values < 0, -0.125, 0.125)
    stored, record = encode(pos, values, 4_001, mode)
    assert all(t.dtype == (torch.float32 if n in ("scale", "values") else torch.uint8) for n, t in stored.items())
    idx, back = decode(stored, 4_001, record, mode)
    assert torch.equal(idx, pos) and torch.equal(back, values)
    assert sum(t.numel() * t.element_size() for t in stored.values()) == packed_bytes(record, mode)
    signs = (333 + 7) // 8 + 4 if mode == "ternary" else 4 * 333
    assert packed_bytes(record, mode) == (record["bits"] + 7) // 8 + signs


def test_density_one_keeps_every_nonzero_entry_ternarised_and_pruned_mode_keeps_tau() -> None:
    pieces = _pieces(500)
    pieces[0].values[::7] = 0.0
    nonzero = torch.nonzero(pieces[0].values).view(-1)
    pos, values = select(pieces, 1.0, 1.0, "global", "ternary")["t0"]
    assert torch.equal(pos, nonzero) and values.abs().unique().numel() == 1
    pos, values = select(pieces, 0.3, 1.0, "global", "pruned")["t0"]
    assert pos.numel() == 150 and torch.equal(values, pieces[0].values[pos])


def test_damaged_payloads_are_refused() -> None:
    payload, record = encode_positions(torch.tensor([1, 5, 9]), 100)
    with pytest.raises(DeltatuneError, match="damaged"):
        decode_positions(payload[:-1], 100, record)
    with pytest.raises(DeltatuneError, match="damaged"):
        decode_positions(payload, 100, {**record, "k": 7})
    with pytest.raises(DeltatuneError, match="one non-zero scale"):
        encode(torch.tensor([1, 2]), torch.tensor([0.5, 0.25]), 10, "ternary")


# -- the reference: ComPEFT by hand on the materialised ΔW -----------------------------------------------------------
def _by_hand(deltas: dict[str, torch.Tensor], density: float, scale: float) -> dict[str, torch.Tensor]:
    """Global strict top-n of |ΔW| over the sorted names, each kept entry sign(ΔW)·scale."""
    names = sorted(deltas)
    flat = torch.cat([deltas[n].reshape(-1) for n in names])
    kept = flat.abs().topk(int(density * flat.numel())).indices
    out = torch.zeros_like(flat)
    out[kept] = torch.sign(flat[kept]) * scale
    pieces = out.split([deltas[n].numel() for n in names])
    return {n: p.view(deltas[n].shape) for n, p in zip(names, pieces, strict=True)}


def _with_weights(make, deltas: dict[str, torch.Tensor]) -> nn.Module:
    model = make()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, d in deltas.items():
            params[name].add_(d)
    return model


def _scale_of(path: Path) -> float:
    _, tensors = artifact.read_artifact(path)
    scales = {float(t) for k, t in tensors.items() if k.endswith(".scale")}
    assert len(scales) == 1
    return scales.pop()


def _lora(path: Path) -> dict[str, torch.Tensor]:
    tuned = dt.attach(tiny_llama(), "lora", r=4, alpha=8, init=False)
    with torch.no_grad():
        for form in tuned.forms().values():
            form.B.mul_(10)
    tuned.save(path)
    return {n: f.delta_weight().detach().clone() for n, f in tuned.forms().items()}


def test_lora_compressed_loads_as_base_plus_the_ternary_reconstruction(tmp_path: Path) -> None:
    deltas = _lora(tmp_path / "lora")
    out = compress(tmp_path / "lora", tmp_path / "c", base=tiny_llama(), lowrank="delta")
    scale = _scale_of(out)
    d_all = torch.cat([d.reshape(-1) for d in deltas.values()])
    assert scale == pytest.approx(float(d_all.double().std()), rel=1e-6)
    recon = _by_hand(deltas, 0.2, scale)

    model = tiny_llama()
    w0, x = _state(model), batch()
    loaded = dt.load(model, out)
    forms = loaded.forms()
    assert all(isinstance(f, PackedSparse) for f in forms.values()) and forms.keys() == deltas.keys()
    for name, form in forms.items():
        assert torch.equal(form.delta_weight(), recon[name]), "decompress(compress(Δ)) is the reconstruction, exactly"
    reference = output_of(_with_weights(tiny_llama, recon), x)
    attached = output_of(loaded, x)
    assert torch.allclose(attached, reference, atol=1e-6, rtol=0)
    merged = loaded.merge()
    assert torch.allclose(output_of(merged, x), reference, atol=1e-6, rtol=0)
    loaded.unmerge()
    assert all(torch.equal(v, w0[k]) for k, v in loaded.detach().state_dict().items()), "unmerge restores W0 exactly"


def test_compressed_artifact_sizes_match_the_bit_packing_formula_and_save_back_bit_for_bit(tmp_path: Path) -> None:
    _lora(tmp_path / "lora")
    out = compress(tmp_path / "lora", tmp_path / "c", base=tiny_llama(), density=0.05, lowrank="delta")
    meta, tensors = artifact.read_artifact(out)
    records = meta["config"]["tensors"]
    formula = sum(packed_bytes(r, "ternary") for r in records.values())
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert meta["sizes"]["stored_bytes"] == stored == formula
    original = artifact.read_meta(tmp_path / "lora")["sizes"]["stored_bytes"]
    assert meta["sizes"]["original_bytes"] == meta["config"]["source_bytes"] == original
    assert all(t.dtype == torch.uint8 for k, t in tensors.items() if not k.endswith(".scale"))
    blob = (out / artifact.TENSOR_FILE).read_bytes()
    header = struct.unpack("<Q", blob[:8])[0]
    assert len(blob) == 8 + header + stored, "the file is the safetensors header plus exactly the packed bytes"
    assert meta["compression"]["kept"] == sum(r["k"] for r in records.values())
    assert meta["compression"]["ratio"] == pytest.approx(meta["sizes"]["original_bytes"] / stored)

    loaded = dt.load(tiny_llama(), out)
    assert loaded.stored_bytes() == stored and loaded.num_trainable() == 0
    loaded.save(tmp_path / "again")
    meta2, tensors2 = artifact.read_artifact(tmp_path / "again")
    assert tensors2.keys() == tensors.keys() and all(torch.equal(tensors[k], tensors2[k]) for k in tensors)
    assert meta2["config"] == meta["config"] and meta2["fingerprint"] == meta["fingerprint"]


def test_compressed_delta_composes_with_another_artifact_and_reverts_exactly(tmp_path: Path) -> None:
    deltas = _lora(tmp_path / "lora")
    out = compress(tmp_path / "lora", tmp_path / "c", base=tiny_llama(), lowrank="delta")
    recon = _by_hand(deltas, 0.2, _scale_of(out))
    other = dt.attach(tiny_llama(), "spiel", density=0.05)
    with torch.no_grad():
        for form in other.forms().values():
            form.values.normal_(0, 0.1)
    other.save(tmp_path / "spiel")
    other_deltas = {n: f.delta_weight().detach().clone() for n, f in other.forms().items()}

    model = tiny_llama()
    w0, x, before = _state(model), batch(), output_of(model, batch())
    both = dt.compose(model, [out, tmp_path / "spiel"])
    summed = {n: recon.get(n, 0) + other_deltas.get(n, 0) for n in {*recon, *other_deltas}}
    assert torch.allclose(output_of(both, x), output_of(_with_weights(tiny_llama, summed), x), atol=1e-5, rtol=0)
    both.merge()
    both.unmerge()
    both.revert("spiel")
    assert torch.allclose(output_of(both, x), output_of(_with_weights(tiny_llama, recon), x), atol=1e-6, rtol=0)
    both.revert(0)
    assert torch.equal(output_of(both, x), before)
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("make", "options"), [(tiny_gpt2, {"layers": "1:"}), (tiny_llama, {})],
                         ids=["gpt2-conv1d", "llama-tied-embedding"])
def test_dense_source_full_fine_tuning(make, options: dict, tmp_path: Path) -> None:
    tuned = dt.attach(make(), "full", **options)
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        loss_of(tuned, batch()).backward()
        opt.step()
    tuned.save(tmp_path / "full")
    source = dt.load(make(), tmp_path / "full")
    deltas = {n: f.delta_weight().detach().clone() for n, f in source.forms().items()}
    out = compress(tmp_path / "full", tmp_path / "c", base=make(), density=0.1, alpha=2.0)
    scale = _scale_of(out)
    d_all = torch.cat([d.reshape(-1) for d in deltas.values()])
    assert scale == pytest.approx(2.0 * float(d_all.double().std()), rel=1e-6)
    recon = _by_hand(deltas, 0.1, scale)
    model = make()
    w0, x = _state(model), batch()
    loaded = dt.load(model, out)
    for name, form in loaded.forms().items():
        assert torch.equal(form.delta_weight().float(), recon[name])
    assert sum(int((r != 0).sum()) for r in recon.values()) == int(0.1 * d_all.numel())
    assert torch.allclose(output_of(loaded, x), output_of(_with_weights(make, recon), x), atol=1e-5, rtol=0)
    loaded.merge()
    loaded.unmerge()
    assert all(torch.equal(v, w0[k]) for k, v in loaded.detach().state_dict().items())


def test_dense_source_bitfit_keeps_most_entries_as_a_dense_form(tmp_path: Path) -> None:
    tuned = dt.attach(tiny_gpt2(), "bitfit")
    with torch.no_grad():
        for form in tuned.forms().values():
            form.delta.normal_(0, 0.1)
    tuned.save(tmp_path / "bitfit")
    deltas = {n: f.delta.detach().clone() for n, f in tuned.forms().items()}
    out = compress(tmp_path / "bitfit", tmp_path / "c", base=tiny_gpt2(), density=0.9, scope="tensor")
    model = tiny_gpt2()
    w0, x = _state(model), batch()
    loaded = dt.load(model, out)
    forms = loaded.forms()
    assert forms.keys() == deltas.keys() and all(isinstance(f, PackedDense) for f in forms.values())
    ref = {}
    for name, d in deltas.items():  # per tensor: its own top-n and σ
        ref.update(_by_hand({name: d}, 0.9, float(d.double().std())))
        assert torch.allclose(forms[name].delta_weight(), ref[name], rtol=1e-6, atol=0)
        assert int((forms[name].delta_weight() != 0).sum()) == math.floor(0.9 * d.numel())
    assert torch.allclose(output_of(loaded, x), output_of(_with_weights(tiny_gpt2, ref), x), atol=1e-5, rtol=0)
    loaded.merge()
    loaded.unmerge()
    assert all(torch.equal(v, w0[k]) for k, v in loaded.detach().state_dict().items())


def test_sparse_source_spiel_compresses_its_values_only(tmp_path: Path) -> None:
    tuned = dt.attach(tiny_llama(), "spiel", density=0.05)
    with torch.no_grad():
        for form in tuned.forms().values():
            form.values.normal_(0, 0.1)
    tuned.save(tmp_path / "spiel")
    support = {n: (f.indices.long().clone(), f.values.detach().clone()) for n, f in tuned.forms().items()}
    total = sum(i.numel() for i, _ in support.values())
    out = compress(tmp_path / "spiel", tmp_path / "c", base=tiny_llama(), density=0.25)
    meta = artifact.read_meta(out)
    assert meta["compression"]["entries"] == total, "d is the sparse delta's own entries, not the weights' size"
    assert meta["compression"]["kept"] == math.floor(0.25 * total)
    scale = _scale_of(out)
    assert scale == pytest.approx(float(torch.cat([v for _, v in support.values()]).double().std()), rel=1e-6)
    model = tiny_llama()
    w0, x = _state(model), batch()
    loaded = dt.load(model, out)
    recon = {}
    for name, form in loaded.forms().items():
        idx, vals = support[name]
        assert torch.isin(form.indices.long(), idx).all(), "kept positions lie in the source's support"
        where = torch.searchsorted(idx, form.indices.long())
        assert torch.equal(torch.sign(form.values), torch.sign(vals[where]))
        recon[name] = form.delta_weight().detach()
    assert torch.allclose(output_of(loaded, x), output_of(_with_weights(tiny_llama, recon), x), atol=1e-6, rtol=0)
    loaded.merge()
    loaded.unmerge()
    assert all(torch.equal(v, w0[k]) for k, v in loaded.detach().state_dict().items())


def test_sum_source_dsee_compresses_the_summed_delta_weight(tmp_path: Path) -> None:
    tuned = dt.attach(tiny_llama(), "dsee", r=4, alpha=8, num_sparse=8, outer_iters=3)
    with torch.no_grad():
        for param in tuned.deltas.parameters():
            param.normal_(0, 0.1)
    tuned.save(tmp_path / "dsee")
    deltas: dict[str, torch.Tensor] = {}
    for name, form in tuned.forms().items():  # low-rank + sparse on one weight: one ΔW
        key = name.rsplit(".", 1)[0] if name.endswith((".sparse", ".lowrank")) else name
        deltas[key] = deltas.get(key, 0) + form.delta_weight().detach()
    # DSEE's idle mask-only forms on the other matrices have no entries: a sparse delta adds only its own
    deltas = {k: d for k, d in deltas.items() if d.any()}
    out = compress(tmp_path / "dsee", tmp_path / "c", base=tiny_llama())
    assert artifact.read_meta(out)["compression"]["entries"] == sum(d.numel() for d in deltas.values())
    recon = _by_hand(deltas, 0.2, _scale_of(out))
    loaded = dt.load(tiny_llama(), out)
    assert loaded.forms().keys() == {k for k, r in recon.items() if r.any()}
    for name, form in loaded.forms().items():
        assert torch.equal(form.delta_weight(), recon[name])


def test_lowrank_factors_mode_keeps_a_low_rank_form_with_ternary_factors(tmp_path: Path) -> None:
    tuned = dt.attach(tiny_gpt2(), "lora", r=4, alpha=8, init=False, targets=["c_attn", "wte"])  # wte is tied
    with torch.no_grad():
        for form in tuned.forms().values():
            form.A.normal_()
            form.B.normal_()
    tuned.save(tmp_path / "lora")
    with pytest.raises(DeltatuneError, match="lowrank='factors'"):
        compress(tmp_path / "lora", tmp_path / "c", base=tiny_gpt2(), lowrank="delta")
    # a LoRA's default: its factors (here with one top-k over all of them, which _by_hand reproduces)
    out = compress(tmp_path / "lora", tmp_path / "c", base=tiny_gpt2(), scope="global")
    factors = {f"{n}.{p}": getattr(f, p).detach() for n, f in tuned.forms().items() for p in ("A", "B")}
    recon = _by_hand(factors, 0.2, _scale_of(out))
    model = tiny_gpt2()
    w0, x = _state(model), batch()
    loaded = dt.load(model, out)
    expected = dt.attach(tiny_gpt2(), "lora", r=4, alpha=8, targets=["c_attn", "wte"])
    with torch.no_grad():
        for name, form in loaded.forms().items():
            assert isinstance(form, PackedLowRank)
            assert torch.equal(form.A, recon[f"{name}.A"]) and torch.equal(form.B, recon[f"{name}.B"])
            expected.forms()[name].A.copy_(recon[f"{name}.A"])
            expected.forms()[name].B.copy_(recon[f"{name}.B"])
    assert torch.allclose(output_of(loaded, x), output_of(expected, x), atol=1e-6, rtol=0)
    loaded.merge()
    loaded.unmerge()  # a low-rank merge is a float add / subtract: W0 back to float tolerance
    assert all(torch.allclose(v, w0[k], atol=1e-6, rtol=0) for k, v in loaded.detach().state_dict().items())


def test_a_lora_compresses_its_factors_by_default_far_smaller_than_its_delta_and_says_so(tmp_path: Path) -> None:
    """The issue's case: ComPEFT of a LoRA's ΔW keeps a fraction of in·out entries and barely shrinks it; its
    factors hold r·(in+out), so the default (factors) keeps that fraction of far fewer entries."""
    _lora(tmp_path / "lora")
    factors = compress(tmp_path / "lora", tmp_path / "f", base=tiny_llama())
    delta = compress(tmp_path / "lora", tmp_path / "d", base=tiny_llama(), lowrank="delta")
    f_meta, d_meta = artifact.read_meta(factors), artifact.read_meta(delta)
    shapes = [r["shape"] for r in f_meta["config"]["tensors"].values()]
    assert {r["form"] for r in f_meta["config"]["tensors"].values()} == {"lowrank"}
    assert f_meta["compression"]["entries"] == sum(4 * (o + i) for o, i in shapes)  # r = 4
    assert d_meta["compression"]["entries"] == sum(o * i for o, i in shapes)
    # per tensor by default for factors: each of A (r × in) and B (out × r) keeps its own 20 %
    assert f_meta["compression"]["kept"] == sum(math.floor(0.2 * 4 * i) + math.floor(0.2 * 4 * o) for o, i in shapes)
    assert f_meta["config"]["scope"] == "tensor" and "--scope global" in f_meta["compression"]["note"]
    f_bytes, d_bytes = f_meta["sizes"]["stored_bytes"], d_meta["sizes"]["stored_bytes"]
    assert f_bytes * 2 < d_bytes, (f_bytes, d_bytes)
    assert f_meta["compression"]["ratio"] > 2 * d_meta["compression"]["ratio"]
    assert "--lowrank delta" in f_meta["compression"]["note"], "the output says what was chosen and the other way"
    assert "note" not in d_meta["compression"], "an explicit choice needs no note"
    dt.attach(tiny_llama(), "full", targets=["model.layers.0.mlp.up_proj.weight"]).save(tmp_path / "full")
    dense = artifact.read_meta(compress(tmp_path / "full", tmp_path / "fc", base=tiny_llama()))
    assert dense["config"]["lowrank"] == "delta" and "note" not in dense["compression"]


def test_a_zero_delta_compresses_to_an_empty_one_and_the_model_is_unchanged(tmp_path: Path) -> None:
    dt.attach(tiny_llama(), "lora", r=4).save(tmp_path / "lora")  # B = 0: ΔW = 0
    out = compress(tmp_path / "lora", tmp_path / "c", base=tiny_llama())
    model = tiny_llama()
    before = output_of(model, batch())
    loaded = dt.load(model, out)
    assert loaded.forms() == {} and torch.equal(output_of(loaded, batch()), before)


# -- bad input --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "message"), [
    ({"density": 0.0}, "density=0.0 must be in"), ({"density": 1.5}, "density=1.5"), ({"density": True}, "density"),
    ({"alpha": 0}, "alpha=0 must be a positive number"), ({"scope": "layer"}, "scope='layer' must be one of global, tensor"),
    ({"values": "stc"}, "values='stc'"),
])
def test_bad_options_are_refused_before_anything_loads(options: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(DeltatuneError, match=message):
        compress(tmp_path / "missing", tmp_path / "c", **options)


def test_activation_side_compressed_and_untrained_inputs_are_refused(tmp_path: Path) -> None:
    dt.attach(tiny_llama(), "adapter", r=4).save(tmp_path / "adapter")
    with pytest.raises(DeltatuneError, match="changes activations, not weights"):
        compress(tmp_path / "adapter", tmp_path / "c", base=tiny_llama())
    _lora(tmp_path / "lora")
    out = compress(tmp_path / "lora", tmp_path / "c", base=tiny_llama())
    with pytest.raises(DeltatuneError, match="already ComPEFT-compressed"):
        compress(out, tmp_path / "c2", base=tiny_llama())
    with pytest.raises(DeltatuneError, match="not trained"):
        dt.attach(tiny_llama(), "compeft")
    with pytest.raises(DeltatuneError, match="another base model"):
        dt.load(tiny_llama(seed=1), out)
    with pytest.raises(DeltatuneError, match="another base model"):
        compress(tmp_path / "lora", tmp_path / "c3", base=tiny_llama(seed=1))
    assert json.loads((out / artifact.META_FILE).read_text())["config"]["source_method"] == "lora"


def test_a_briefly_trained_lora_never_compresses_to_nothing(tmp_path: Path) -> None:
    """After a short run B is far smaller than A (it starts at zero): one top-k over all factors keeps none of B,
    and a factor pair without B changes nothing. The default keeps a share of each tensor; the global scope
    says which tensors it lost (a first-day run of 6 steps on SmolLM2 compressed to 0 bytes before)."""
    tuned = dt.attach(tiny_llama(), "lora", r=4)
    with torch.no_grad():
        for form in tuned.forms().values():
            form.B.normal_(std=1e-4)  # a few small steps away from zero; A keeps its Kaiming init
    tuned.save(tmp_path / "lora")
    x = batch()
    base_out = output_of(tiny_llama(), x)
    out = compress(tmp_path / "lora", tmp_path / "c", base=tiny_llama())
    meta = artifact.read_meta(out)
    assert set(meta["config"]["tensors"]) == set(tuned.forms()), "every tensor keeps a share"
    assert meta["sizes"]["stored_bytes"] > 0
    assert not torch.equal(output_of(dt.load(tiny_llama(), out), x), base_out)
    with pytest.warns(UserWarning, match=r"changed tensors keep nothing .*--scope tensor"):
        compress(tmp_path / "lora", tmp_path / "g", base=tiny_llama(), scope="global")
