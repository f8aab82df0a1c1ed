"""PEFT interop for LoRA's PiSSA / OLoRA inits against PEFT 0.21.2: export in PEFT's converted form (a plain LoRA of
rank 2r for the original base), import of converted and unconverted adapters, and PEFT's LoraConfig given to attach."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch, output_of, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from test_lora_pissa_olora import train_a_bit

import deltatune as dt
from deltatune.core import registry
from deltatune.core.forms.lowrank import LowRank
from deltatune.methods._lowrank import ResidualLowRank

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {"llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]), "gpt2": (tiny_gpt2, ["c_attn", "mlp.c_proj"])}


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal within ``rel`` of the values' scale (logits of a few units)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def moved(model: torch.nn.Module, x: dict, make) -> None:
    assert (output_of(model, x) - output_of(make(), x)).abs().max() > 1e-2, "the factors moved the model"


def peft_trained(make, targets: list[str], init: str, initial_dir=None, **options) -> PeftModel:
    """PEFT's model with ``init`` (its base rewritten), its factors moved as training would; ``initial_dir``: the
    untrained adapter saved there first (PEFT's recipe for converting it later)."""
    peft_model = get_peft_model(make(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init,
                                                   fan_in_fan_out=make is tiny_gpt2, **options))
    if initial_dir is not None:
        peft_model.peft_config["default"].init_lora_weights = True  # as PEFT's docs do before saving the initial one
        peft_model.save_pretrained(initial_dir)
        peft_model.peft_config["default"].init_lora_weights = init
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return peft_model.eval()


# (model, init, lora options): OLoRA on Linear layers only (PEFT's olora_init mishandles GPT-2's Conv1D, see
# test_lora_pissa_olora.py); an embedding target stays a plain LoRA next to the residual ones; per-module patterns
EXPORT_CASES = [
    ("llama", "pissa", {}),
    ("llama", "olora", {}),
    ("llama", "pissa_niter_2", {}),
    ("gpt2", "pissa", {}),
    ("llama", "pissa", {"use_rslora": True, "alpha": 16}),
    ("llama", "olora", {"targets": ["q_proj", "v_proj", "embed_tokens"], "rank_pattern": {"v_proj": 2},
                        "alpha_pattern": {"q_proj": 3}}),
]


@pytest.mark.parametrize(("model", "init", "options"), EXPORT_CASES)
def test_export_loads_in_peft_on_the_original_base(model: str, init: str, options: dict, tmp_path) -> None:
    make, targets = MODELS[model]
    tuned = dt.attach(make(), "lora", **{"r": 4, "alpha": 8, "targets": targets, "init": init, **options})
    train_a_bit(tuned)
    x = batch()
    ours = output_of(tuned, x)
    moved(tuned, x, make)
    dt.export_peft(tuned, tmp_path / "a")
    loaded = PeftModel.from_pretrained(make(), tmp_path / "a").eval()
    close(output_of(loaded, x), ours)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True, "a plain LoRA for the original base"
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    for name, form in tuned.forms().items():  # rank 2r where A₀ joins A; an embedding keeps its plain LoRA
        suffix = "lora_embedding_A" if form.layout == "embedding" else "lora_A.weight"
        a = tensors[f"base_model.model.{name.removesuffix('.weight')}.{suffix}"]
        assert a.shape[0] == (2 * form.r if isinstance(form, ResidualLowRank) else form.r)
    if not options:  # PEFT's conversion: r -> 2r, lora_alpha -> 2·alpha
        assert (config["r"], config["lora_alpha"]) == (8, 16)
    if options.get("use_rslora"):  # alpha·√2 keeps alpha / √r
        assert config["lora_alpha"] == pytest.approx(16 * 2 ** 0.5, rel=1e-12)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_export_is_peft_s_own_conversion_and_that_imports_as_plain_lora(init: str, tmp_path) -> None:
    make, targets = tiny_llama, ["q_proj", "v_proj"]
    peft_model = peft_trained(make, targets, init, initial_dir=tmp_path / "initial")
    x = batch()
    expected = output_of(peft_model, x)
    moved(peft_model, x, make)
    peft_model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    theirs = load_file(tmp_path / "converted" / "adapter_model.safetensors")
    their_config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())

    # the same delta in deltatune (PEFT's trained factors, its initial ones as A₀, B₀) exports to PEFT's files
    tuned = dt.attach(make(), "lora", r=4, alpha=8, targets=targets, init=init)
    layers = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, form in tuned.forms().items():
            layer = layers[f"base_model.model.{name.removesuffix('.weight')}"]
            form.A.copy_(layer.lora_A["default"].weight)
            form.B.copy_(layer.lora_B["default"].weight)
    close(output_of(tuned, x), expected)
    dt.export_peft(tuned, tmp_path / "ours")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (their_config["r"], their_config["lora_alpha"]) == (8, 16)
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
        close(mine[key], value)

    # PEFT's converted adapter imports as a plain LoRA on the original base, giving PEFT's trained model
    imported = dt.import_peft(make(), tmp_path / "converted")
    assert all(type(f) is LowRank and f.r == 8 for f in imported.forms().values())
    close(output_of(imported, x), expected)


@pytest.mark.parametrize(("model", "init"), [("llama", "pissa"), ("llama", "olora"), ("gpt2", "pissa")])
def test_an_unconverted_adapter_imports_on_the_original_base(model: str, init: str, tmp_path) -> None:
    make, targets = MODELS[model]
    peft_model = peft_trained(make, targets, init)
    x = batch()
    expected = output_of(peft_model, x)  # the trained factors on PEFT's rewritten base
    moved(peft_model, x, make)
    peft_model.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["init_lora_weights"] == init
    base = make()
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    imported = dt.import_peft(base, tmp_path / "a")
    forms = imported.forms()
    assert forms and all(isinstance(f, ResidualLowRank) and f.init == init for f in forms.values())
    close(output_of(imported, x), expected)
    imported.detach()
    assert all(torch.equal(v, w0[k]) for k, v in base.state_dict().items()), "the original base is never written"


def test_an_unconverted_randomised_pissa_adapter_is_refused(tmp_path) -> None:
    peft_model = peft_trained(tiny_llama, ["q_proj"], "pissa_niter_2")
    peft_model.save_pretrained(tmp_path / "a")
    model = tiny_llama()
    with pytest.raises(dt.DeltatuneError, match=r"rewrites the base weights.*randomised SVD.*path_initial_model_for_weight_conversion"):
        dt.import_peft(model, tmp_path / "a")
    assert not any("lora" in n for n, _ in model.named_modules()), "nothing stays attached"


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_attach_takes_peft_s_pissa_and_olora_config(init: str) -> None:
    targets = ["q_proj", "v_proj"]
    tuned = dt.attach(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init))
    forms = tuned.forms()
    assert forms and all(isinstance(f, ResidualLowRank) and f.init == init for f in forms.values())
    if init.startswith("pissa_niter"):
        return  # a randomised SVD: nothing to compare bit for bit
    # the factors PEFT's own init computes (it rewrites its copy of the base with them)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                         init_lora_weights=init))
    layers = dict(peft_model.named_modules())
    for name, form in forms.items():
        layer = layers[f"base_model.model.{name.removesuffix('.weight')}"]
        close(form.A0, layer.lora_A["default"].weight)
        close(form.B0, layer.lora_B["default"].weight)


def test_attach_refuses_pissa_with_dora_and_other_rewriting_inits() -> None:
    with pytest.raises(dt.DeltatuneError, match=r"init_lora_weights='pissa'.*without use_dora"):
        dt.attach(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa", use_dora=True))
    with pytest.raises(dt.DeltatuneError, match=r"init_lora_weights='lora_ga'"):
        dt.attach(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="lora_ga"))


def test_loraplus_lr_ratio_points_to_loraplus_ratio() -> None:
    assert registry.ALIASES["loraplus_lr_ratio"] == "loraplus_ratio"
    # from the method section, where PEFT users put it, to the train key (the alias, not a spelling guess)
    assert registry.suggestion("loraplus_lr_ratio", ["loraplus_ratio", "lr", "loraplus_lr_embedding"]) == \
        "loraplus_ratio"

