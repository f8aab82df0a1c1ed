"""DoRA (Liu et al., 2024): the decomposition, its init, merge/unmerge, and parity with Hugging Face PEFT
(``LoraConfig(use_dora=True)``, the installed 0.21.2) for the init, the logits, the gradients and the adapter format.

Comparisons with PEFT run in fp32 and need max |ours - theirs| <= 1e-5."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import batch, loss_of, output_of, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.core.forms.lowrank import LowRank
from deltatune.methods.dora import PAPER_TARGETS, DoRA, DoraConfig

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TOL = 1e-5
PREFIX = "base_model.model."
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]  # Linear (square and not) + embedding
GPT2_TARGETS = ["c_attn", "c_fc", "wte"]  # GPT-2 Conv1D + embedding


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits


def base_model(arch: str) -> nn.Module:
    if arch == "llama":
        return tiny_llama(tied=False)
    model = tiny_gpt2()
    with torch.no_grad():  # GPT-2 starts with zero biases: make them visible (DoRA scales W0·x, not the bias)
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def targets_of(arch: str) -> list[str]:
    return LLAMA_TARGETS if arch == "llama" else GPT2_TARGETS


def peft_config(arch: str, **kw) -> LoraConfig:
    return LoraConfig(target_modules=targets_of(arch), use_dora=True, fan_in_fan_out=arch == "gpt2", **kw)


def make_peft(base: nn.Module, config: LoraConfig) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out is corrected per layer for the embedding
        return get_peft_model(base, config)


def peft_layers(pm: PeftModel) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def peft_tensors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, magnitude) of a PEFT LoRA layer, in deltatune's shapes (PEFT's embedding A/B are already those)."""
    if "default" in layer.lora_embedding_A:
        a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    else:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return a, b, layer.lora_magnitude_vector["default"].weight


def randomise(tuned: dt.Tuned, seed: int = 0) -> None:
    """'Trained' factors and magnitudes: clearly non-zero B and a magnitude moved off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in tuned.forms().values():
            f.A.copy_(torch.randn(f.A.shape, generator=g) * 0.3)
            f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.3)
            f.magnitude.mul_(1 + 0.2 * torch.randn(f.magnitude.shape, generator=g))


def copy_into_peft(tuned: dt.Tuned, pm: PeftModel) -> None:
    layers = peft_layers(pm)
    with torch.no_grad():
        for name, f in tuned.forms().items():
            for theirs, ours in zip(peft_tensors(layers[name.rsplit(".", 1)[0]]), (f.A, f.B, f.magnitude), strict=True):
                theirs.copy_(ours)


def logits(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return output_of(model, x).float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def reference_weight(f: DoRA, detach_norm: bool = True) -> torch.Tensor:
    """The paper's W' = m ⊙ V/‖V‖_c, V = W0 + s·B·A, in (out, in) orientation, written out independently."""
    w0 = f.base if f.layout == "linear" else f.base.T
    v = w0 + f.scale * f.B @ f.A
    norm = v.norm(dim=1, keepdim=True)
    return f.magnitude[:, None] * v / (norm.detach() if detach_norm else norm)


# -- the decomposition ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero_init_is_the_base_model_even_with_dropout_in_train_mode(arch: str) -> None:
    model = base_model(arch)
    x = batch()
    before = output_of(model, x)
    tuned = dt.attach(model, "dora", r=4, alpha=8, dropout=0.5, targets=targets_of(arch))
    tuned.train()
    assert torch.equal(output_of(tuned, x), before)


def test_magnitude_starts_at_the_column_norm() -> None:
    """m0 = ‖W0 + s·B·A‖ per output feature: rows of a Linear weight, columns of a Conv1D weight (in, out),
    and, as in PEFT, the vocabulary-wide norm of each hidden dimension of an embedding."""
    llama = dt.attach(tiny_llama(tied=False), "dora", r=2, alpha=4, targets=["q_proj", "embed_tokens"]).forms()
    q, emb = llama["model.layers.0.self_attn.q_proj.weight"], llama["model.embed_tokens.weight"]
    assert torch.allclose(q.magnitude, q.base.norm(dim=1), rtol=1e-6, atol=0)
    assert emb.magnitude.shape == (32,) and torch.allclose(emb.magnitude, emb.base.norm(dim=0), rtol=1e-6, atol=0)
    conv = dt.attach(tiny_gpt2(), "dora", r=2, targets=["c_attn"]).forms()["transformer.h.0.attn.c_attn.weight"]
    assert conv.layout == "conv1d" and conv.magnitude.shape == (96,)
    assert torch.allclose(conv.magnitude, conv.base.norm(dim=0), rtol=1e-6, atol=0)
    # random B (init=False): the norm of the adapted weight, so the delta starts at plain LoRA's
    rand = dt.attach(tiny_llama(), "dora", r=2, alpha=4, targets=["q_proj"], init=False).forms()
    f = rand["model.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(f.magnitude, (f.base + f.scale * f.B @ f.A).norm(dim=1), rtol=1e-6, atol=0)
    assert torch.allclose(f.delta_weight(), f.scale * f.B @ f.A, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_is_magnitude_times_unit_direction(arch: str) -> None:
    """Every adapted Linear / Conv1D computes x·W'ᵀ + b with the paper's W' (written out in the test)."""
    tuned = dt.attach(base_model(arch), "dora", r=3, alpha=6, targets=targets_of(arch)[:-1])
    randomise(tuned)
    tuned.eval()
    for name, f in tuned.forms().items():
        module = f.sites[0][0]
        x = torch.randn(2, 5, f.A.shape[1])
        want = x @ reference_weight(f).T + (0 if module.bias is None else module.bias)
        assert max_diff(module(x), want) <= TOL, name
        assert max_diff(f.output_delta(module, x), want - module.forward(x)) <= TOL, name
        dw = reference_weight(f) - (f.base if f.layout == "linear" else f.base.T)
        assert torch.allclose(f.delta_weight(), dw if f.layout == "linear" else dw.T, atol=1e-6, rtol=0), name


def test_embedding_forward_scales_each_hidden_dimension() -> None:
    tuned = dt.attach(tiny_llama(tied=False), "dora", r=2, alpha=4, targets=["embed_tokens"])
    randomise(tuned)
    f = tuned.forms()["model.embed_tokens.weight"]
    ids = batch()["input_ids"]
    v = f.base + f.scale * (f.B @ f.A).T  # (num, dim)
    want = (f.magnitude / v.norm(dim=0)) * v[ids]
    assert max_diff(f.sites[0][0](ids), want) <= TOL


def test_norm_is_detached_from_the_gradient() -> None:
    """Paper §4.3 and PEFT: ‖W0 + s·B·A‖ is a constant for backprop. The gradients of A, B, m equal those of the
    reference with a detached norm and differ from those with the norm in the graph."""
    tuned = dt.attach(tiny_llama(), "dora", r=3, alpha=6, targets=["q_proj"], dropout=0.0)
    randomise(tuned)
    f = tuned.forms()["model.layers.0.self_attn.q_proj.weight"]
    x = torch.randn(4, 32)
    target = torch.randn(4, 32)

    def grads(out: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad((out - target).pow(2).sum(), [f.A, f.B, f.magnitude]))

    ours = grads(f.sites[0][0](x))
    detached = grads(x @ reference_weight(f, detach_norm=True).T)
    attached = grads(x @ reference_weight(f, detach_norm=False).T)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(ours, detached, strict=True))
    assert not torch.allclose(ours[0], attached[0], atol=1e-5, rtol=1e-4)


def test_scale_and_trainable_count() -> None:
    tuned = dt.attach(tiny_llama(), "dora", r=4, alpha=16, targets=["q_proj", "k_proj"], use_rslora=True)
    assert all(f.scale == pytest.approx(16 / math.sqrt(4)) for f in tuned.forms().values())
    # per layer: q 32->32, k 32->16 (2 kv heads of 8); LoRA's r·(in+out) plus one magnitude per output
    assert tuned.num_trainable() == 3 * ((4 * (32 + 32) + 32) + (4 * (32 + 16) + 16))


def test_paper_defaults_and_lora_options() -> None:
    cfg = DoraConfig()
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.init) == (32, 64.0, 0.05, True)
    llama = dt.attach(tiny_llama(), "dora")
    assert {n.split(".")[-2] for n in llama.forms()} == set(PAPER_TARGETS)
    assert all(f.scale == 2.0 and f.dropout.p == 0.05 for f in llama.forms().values())
    gpt2 = dt.attach(tiny_gpt2(), "dora", r=2)  # no paper targets there: LoRA's (PEFT's) default, c_attn
    assert sorted(gpt2.forms()) == [f"transformer.h.{i}.attn.c_attn.weight" for i in range(3)]
    # LoRA's options carry over: patterns, bias, modules_to_save (dense deltas next to the DoRA ones)
    opts = dict(r=4, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, bias="lora_only")
    forms = dt.attach(tiny_llama(bias=True), "dora", **opts).forms()
    assert forms["model.layers.0.self_attn.v_proj.weight"].r == 2
    assert isinstance(forms["model.layers.0.self_attn.q_proj.weight"], DoRA)
    assert "model.layers.0.self_attn.q_proj.bias" in forms
    with pytest.raises(dt.DeltatuneError, match="r=0"):
        dt.attach(tiny_llama(), "dora", r=0)


def test_same_seed_same_factors_as_lora() -> None:
    torch.manual_seed(3)
    lo = dt.attach(tiny_llama(), "lora", r=4, targets=["q_proj"]).forms()
    torch.manual_seed(3)
    do = dt.attach(tiny_llama(), "dora", r=4, targets=["q_proj"]).forms()
    assert all(torch.equal(lo[n].A, do[n].A) for n in lo)


# -- merge -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("llama", True), ("gpt2", False)])
def test_merge_and_unmerge(arch: str, tied: bool) -> None:
    model = tiny_llama(tied=tied) if arch == "llama" else tiny_gpt2()
    x = batch()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = dt.attach(model, "dora", r=4, alpha=8, targets=targets_of(arch), dropout=0.0)
    randomise(tuned)
    want = output_of(tuned, x)
    plain = tuned.merge()
    assert not any("parametrizations" in k for k in plain.state_dict())
    assert max_diff(output_of(plain, x), want) <= TOL
    with pytest.raises(dt.DeltatuneError, match="already merged"):
        tuned.merge()
    tuned.unmerge()
    assert max_diff(output_of(tuned, x), want) <= TOL
    tuned.detach()
    for k, v in model.state_dict().items():
        assert torch.allclose(v, w0[k], atol=1e-6, rtol=1e-5), k


def test_train_save_load_is_bit_identical(tmp_path: Path) -> None:
    model = tiny_gpt2()
    x = batch()
    tuned = dt.attach(model, "dora", r=2, alpha=4, targets=["c_attn", "wte"], dropout=0.0)
    m0 = {n: f.magnitude.detach().clone() for n, f in tuned.forms().items()}
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        loss_of(tuned, x).backward()
        opt.step()
    assert all(not torch.equal(f.magnitude, m0[n]) for n, f in tuned.forms().items()), "m must train"
    tuned.save(tmp_path / "a")
    assert set(load_file(tmp_path / "a" / "delta.safetensors")) == {
        f"{n}.{t}" for n in tuned.forms() for t in ("A", "B", "magnitude")}
    loaded = dt.load(tiny_gpt2(), tmp_path / "a")
    assert torch.equal(output_of(loaded, x), output_of(tuned, x))


# -- parity with PEFT ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_parity_at_init(arch: str) -> None:
    """Same base and config: the magnitudes are PEFT's bit for bit and so are the logits (B = 0 in both)."""
    base = base_model(arch)
    ours = dt.attach(copy.deepcopy(base), "dora", r=4, alpha=8, dropout=0.0, targets=targets_of(arch))
    pm = make_peft(copy.deepcopy(base), peft_config(arch, r=4, lora_alpha=8))
    layers = peft_layers(pm)
    assert {n.rsplit(".", 1)[0] for n in ours.forms()} == set(layers)
    for name, f in ours.forms().items():
        _, b, m = peft_tensors(layers[name.rsplit(".", 1)[0]])
        assert torch.equal(f.magnitude, m), name
        assert torch.equal(f.B, b) if f.layout != "embedding" else f.B.shape == b.shape
    x = batch()
    assert torch.equal(logits(ours, x), logits(pm, x))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_parity_of_magnitude_init_with_random_factors(arch: str) -> None:
    """PEFT with init_lora_weights=False draws A and B; ours re-derives m from the same factors identically."""
    base = base_model(arch)
    pm = make_peft(copy.deepcopy(base), peft_config(arch, r=4, lora_alpha=8, init_lora_weights=False))
    ours = dt.attach(copy.deepcopy(base), "dora", r=4, alpha=8, dropout=0.0, targets=targets_of(arch), init=False)
    layers = peft_layers(pm)
    for name, f in ours.forms().items():
        a, b, m = peft_tensors(layers[name.rsplit(".", 1)[0]])
        with torch.no_grad():
            f.A.copy_(a)
            f.B.copy_(b)
        f.reset_magnitude()
        assert max_diff(f.magnitude, m) <= 1e-6, name
    x = batch()
    diff = max_diff(logits(ours, x), logits(pm, x))
    assert diff <= TOL, diff


@pytest.mark.parametrize(("arch", "rslora"), [("llama", False), ("gpt2", False), ("llama", True)])
def test_peft_parity_with_the_same_trained_factors(arch: str, rslora: bool) -> None:
    """Same A, B, m in both: the same logits, and one backward step gives the same gradients (PEFT detaches the
    norm as we do)."""
    base = base_model(arch)
    ours = dt.attach(copy.deepcopy(base), "dora", r=4, alpha=8, dropout=0.0, targets=targets_of(arch),
                     use_rslora=rslora)
    pm = make_peft(copy.deepcopy(base), peft_config(arch, r=4, lora_alpha=8, use_rslora=rslora))
    randomise(ours)
    copy_into_peft(ours, pm)
    x = batch()
    theirs_logits = logits(pm, x)
    assert max_diff(logits(ours, x), logits(base, x)) > 1e-3, "the delta must move the logits"
    assert max_diff(logits(ours, x), theirs_logits) <= TOL
    loss_of(ours, x).backward()
    loss_of(pm, x).backward()
    layers = peft_layers(pm)
    for name, f in ours.forms().items():
        for theirs, mine in zip(peft_tensors(layers[name.rsplit(".", 1)[0]]), (f.A, f.B, f.magnitude), strict=True):
            assert max_diff(mine.grad, theirs.grad) <= TOL, name


def test_peft_parity_dropout_in_train_mode() -> None:
    """With dropout active PEFT recomputes W0·x on the dropped-out input; same dropout masks, same output."""
    base = tiny_llama()
    ours = dt.attach(copy.deepcopy(base), "dora", r=4, alpha=8, dropout=0.3, targets=["q_proj"])
    pm = make_peft(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj"],
                                                   use_dora=True))
    randomise(ours)
    copy_into_peft(ours, pm)
    x = batch()
    ours.train()
    pm.train()
    torch.manual_seed(5)
    a = output_of(ours, x)
    torch.manual_seed(5)
    b = output_of(pm, x)
    assert max_diff(a, b) <= TOL
    assert max_diff(a, logits(ours, x)) > 1e-4, "dropout must be active in train mode"


# -- PEFT adapter format ---------------------------------------------------------------------------------------

def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((folder / "adapter_config.json").read_text()), load_file(folder / "adapter_model.safetensors")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_loads_in_peft(arch: str, tmp_path: Path) -> None:
    base = base_model(arch)
    fresh = copy.deepcopy(base)
    tuned = dt.attach(base, "dora", r=4, alpha=8, dropout=0.0, targets=targets_of(arch))
    randomise(tuned)
    dt.export_peft(tuned, tmp_path / "a")
    config, tensors = read_adapter(tmp_path / "a")
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    for name, f in tuned.forms().items():
        assert torch.equal(tensors[f"{PREFIX}{name.rsplit('.', 1)[0]}.lora_magnitude_vector"], f.magnitude)
    assert len(tensors) == 3 * len(tuned.forms())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(fresh, str(tmp_path / "a"))
    x = batch()
    assert max_diff(logits(tuned, x), logits(pm, x)) <= TOL


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_import_peft_dora_adapter(arch: str, tmp_path: Path) -> None:
    base = base_model(arch)
    pm = make_peft(copy.deepcopy(base), peft_config(arch, r=4, lora_alpha=8, init_lora_weights=False))
    with torch.no_grad():
        for _, _, m in map(peft_tensors, peft_layers(pm).values()):
            m.mul_(1.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path / "a"))
    x = batch()
    theirs = logits(pm, x)
    tuned = dt.import_peft(base, tmp_path / "a")
    assert tuned.method.name == "dora" and all(isinstance(f, DoRA) for f in tuned.forms().values())
    assert max_diff(logits(tuned, x), theirs) <= TOL
    # and back: the same tensors and config
    dt.export_peft(tuned, tmp_path / "b")
    (ca, ta), (cb, tb) = read_adapter(tmp_path / "a"), read_adapter(tmp_path / "b")
    assert {k: v for k, v in ta.items() if "base_layer" not in k}.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in tb)
    assert cb["use_dora"] is True and cb["r"] == ca["r"] and cb["lora_alpha"] == ca["lora_alpha"]


def test_round_trip_bit_identical(tmp_path: Path) -> None:
    base = tiny_llama(tied=False)
    fresh = copy.deepcopy(base)
    tuned = dt.attach(base, "dora", r=4, alpha=8, targets=LLAMA_TARGETS, use_rslora=True, rank_pattern={"v_proj": 2})
    randomise(tuned)
    dt.export_peft(tuned, tmp_path / "a")
    back = dt.import_peft(fresh, tmp_path / "a")
    x = batch()
    assert torch.equal(logits(tuned, x), logits(back, x))
    fa, fb = tuned.forms(), back.forms()
    assert fa.keys() == fb.keys()
    for n in fa:
        assert (fa[n].r, fa[n].scale) == (fb[n].r, fb[n].scale)
        assert all(torch.equal(getattr(fa[n], t), getattr(fb[n], t)) for t in ("A", "B", "magnitude"))


def test_import_accepts_in_memory_key_names(tmp_path: Path) -> None:
    base = tiny_llama()
    tuned = dt.attach(copy.deepcopy(base), "dora", r=2, targets=["q_proj"], init=False)
    dt.export_peft(tuned, tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    renamed = {k.replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight"): v
               for k, v in load_file(file).items()}
    save_file(renamed, file, metadata={"format": "pt"})
    back = dt.import_peft(base, tmp_path / "a")
    assert torch.equal(logits(back, batch()), logits(tuned, batch()))


def test_format_errors(tmp_path: Path) -> None:
    base = tiny_llama()
    dt.export_peft(dt.attach(copy.deepcopy(base), "dora", r=2, targets=["q_proj"]), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_dora": False}))
    with pytest.raises(dt.DeltatuneError, match="use_dora: false"):
        dt.import_peft(base, tmp_path / "a")
    dt.export_peft(dt.attach(copy.deepcopy(base), "lora", r=2, targets=["q_proj"]), tmp_path / "b")
    path = tmp_path / "b" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_dora": True}))
    with pytest.raises(dt.DeltatuneError, match="no lora_magnitude_vector"):
        dt.import_peft(base, tmp_path / "b")
    # one adapter, one use_dora flag: a delta mixing LoRA and DoRA modules has no PEFT form
    mixed = dt.attach(copy.deepcopy(base), "lora", r=2, targets=["q_proj"])
    name = "model.layers.0.self_attn.q_proj.weight"
    low = mixed.forms()[name]
    assert type(low) is LowRank
    mixed.replace_forms({name: DoRA(low.sites[0][0], 2, 8.0)})
    with pytest.raises(dt.DeltatuneError, match="mixes LoRA and DoRA"):
        dt.export_peft(mixed, tmp_path / "c")


def test_half_precision_base_keeps_fp32_factors_and_starts_at_the_base() -> None:
    model = tiny_llama().to(torch.bfloat16)
    x = batch()
    before = output_of(model, x)
    tuned = dt.attach(model, "dora", r=2, targets=["q_proj", "embed_tokens"])
    assert all(f.magnitude.dtype == f.A.dtype == torch.float32 for f in tuned.forms().values())
    assert torch.equal(output_of(tuned, x), before)


def test_composes_with_another_delta_of_the_same_weight() -> None:
    """dt.compose adds weight deltas: DoRA's ΔW = m/‖V‖ ⊙ V − W0 next to a LoRA on the same modules gives the
    model with W0 + ΔW_dora + ΔW_lora, attached and merged (DoRA first: its ΔW is computed from W0)."""
    x = batch()
    dora = dt.attach(tiny_llama(), "dora", r=2, alpha=4, targets=["q_proj", "embed_tokens"], dropout=0.0)
    randomise(dora)
    lora = dt.attach(tiny_llama(), "lora", r=2, alpha=4, targets=["q_proj", "embed_tokens"], init=False)
    deltas = [{n: f.delta_weight().detach().clone() for n, f in t.forms().items()} for t in (dora, lora)]
    reference = tiny_llama()
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for delta in deltas:
            for name, d in delta.items():
                params[name].add_(d)
    reference.lm_head.weight = nn.Parameter(tiny_llama().lm_head.weight.detach().clone())  # deltas hit the lookup
    want = output_of(reference, x)
    after = dt.compose(tiny_llama(), [lora, dora])  # DoRA's hook then sees W0·x + the LoRA term
    assert max_diff(output_of(after, x), want) <= TOL
    mixed = dt.compose(tiny_llama(), [dora, lora])
    assert max_diff(output_of(mixed, x), want) <= TOL
    assert max_diff(output_of(mixed.merge(), x), want) <= TOL
    mixed.unmerge()
    assert max_diff(output_of(mixed, x), want) <= TOL
