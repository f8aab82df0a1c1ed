"""LoRA on an MoE's fused 3-D expert stacks and its router (``target_parameters``, PEFT's ``ParamWrapper``) and on
convolutions (nn.Conv1d / Conv2d: ViT's and AST's patch embeddings), against PEFT 0.21.2's numbers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from conftest import (
    architecture_batch,
    close,
    eval_logits,
    peft_round_trip,
    randomised_peft,
    tiny_architecture,
)

import deltatune as dt
from deltatune.core.forms.lowrank import ConvLowRank, ParamLowRank
from deltatune.errors import DeltatuneError

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import ParamWrapper  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
MOE = {"qwen3_moe": [*EXPERTS, "mlp.gate.weight"], "mixtral": EXPERTS}  # Qwen3-MoE: the router's weight too


def peft_param_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's ΔW of every parameter its ParamWrappers adapt, by the parameter's name in the base model."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            path = name.removeprefix("base_model.model.").replace(".base_layer", "")
            out[f"{path}.{module.parameter_name}"] = module.get_delta_weight("default").detach()
    return out


def base_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- MoE: fused experts and the router


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_experts_and_router_equal_peft_target_parameters(model_type: str, tmp_path) -> None:
    base = tiny_architecture(model_type)
    x = architecture_batch(base)
    reference = randomised_peft(base, LoraConfig(r=2, lora_alpha=4, target_parameters=MOE[model_type]))
    theirs = peft_param_deltas(reference)
    # PEFT's selection, through deltatune's conversion of its config object: the parameters alone (PEFT's MoE
    # conversion leaves target_modules empty), one low-rank pair per expert
    own = dt.attach(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_parameters=MOE[model_type]))
    assert set(own.forms()) == set(theirs)
    assert all(isinstance(f, ParamLowRank) for f in own.forms().values())
    stack = own.forms()["model.layers.0.mlp.experts.gate_up_proj"]
    assert stack.layout == "experts" and stack.A.shape == (4, 2, 32) and stack.B.shape == (4, stack.B.shape[1], 2)

    # PEFT's saved adapter, imported, exported and reloaded by PEFT: logits equal at every stage
    config = peft_round_trip(base, reference, LoraConfig, "lora", x, tmp_path)
    assert config["target_modules"] == [] and len(config["target_parameters"]) == len(theirs)
    tuned = dt.import_peft(copy.deepcopy(base), tmp_path / "peft")
    forms = tuned.forms()
    assert set(forms) == set(theirs)
    for name, delta in theirs.items():  # the layout of each expert's pair is PEFT's
        assert close(forms[name].delta_weight().detach(), delta), name
    # PEFT's own nesting of two wrappers on one module: the first parameter is the inner one
    keys = json.dumps(sorted(peft_keys(tmp_path / "back")))
    assert "layers.0.mlp.experts.base_layer.lora_A.weight" in keys and "layers.0.mlp.experts.lora_A.weight" in keys


def peft_keys(folder) -> list[str]:
    from safetensors.torch import load_file

    return list(load_file(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_experts_merge_unmerge_save_load(model_type: str, tmp_path) -> None:
    base = tiny_architecture(model_type)
    x = architecture_batch(base)
    w0 = base_params(base)
    tuned = dt.attach(copy.deepcopy(base), "lora", r=2, alpha=4, init=False, targets=["q_proj"],
                      target_parameters=MOE[model_type])
    kinds = {type(f) for f in tuned.forms().values()}
    assert ParamLowRank in kinds and len(kinds) == 2  # the q_proj LoRA next to the parameters' forms
    unmerged = eval_logits(tuned, x)
    assert not close(unmerged, eval_logits(base, x), rtol=1e-2)
    tuned.merge()
    merged_w = tuned.model.get_parameter("model.layers.1.mlp.experts.down_proj")
    assert not torch.equal(merged_w, w0["model.layers.1.mlp.experts.down_proj"])
    assert close(eval_logits(tuned, x), unmerged)
    tuned.unmerge()
    assert close(eval_logits(tuned, x), unmerged)
    tuned.save(tmp_path / "a")
    tuned.detach()
    for name, value in base_params(tuned.model).items():  # W0 back to float rounding of W0 + ΔW − ΔW
        assert close(value, w0[name]), name
    loaded = dt.load(copy.deepcopy(base), tmp_path / "a")
    assert torch.equal(eval_logits(loaded, x), unmerged)
    # module and parameter layers in one PEFT adapter (rank_pattern on one of each), read back by PEFT and by us
    mixed = dt.attach(copy.deepcopy(base), "lora", r=2, alpha=4, init=False, targets=["q_proj"],
                      target_parameters=MOE[model_type], rank_pattern={"layers.1.self_attn.q_proj": 3,
                                                                       "layers.0.mlp.experts.down_proj": 1})
    expected = eval_logits(mixed, x)
    dt.export_peft(mixed, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert close(eval_logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft"), x), expected)
    back = dt.import_peft(copy.deepcopy(base), tmp_path / "peft")
    assert list(back.delta_state_dict()) == list(mixed.delta_state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.delta_state_dict().values(), mixed.delta_state_dict().values(),
                                                 strict=True))


def test_experts_train_and_delta_built_once_per_forward() -> None:
    base = tiny_architecture("qwen3_moe")
    base.config._experts_implementation = "eager"  # a Python loop that reads the stacks once per expert
    x = architecture_batch(base)
    tuned = dt.attach(base, "lora", r=2, alpha=4, init=False, target_parameters=EXPERTS)
    calls = {"n": 0}
    forms = tuned.forms()
    for form in forms.values():
        original = form.delta_weight

        def counted(original=original):
            calls["n"] += 1
            return original()
        form.delta_weight = counted
    tuned.model.train()
    out = tuned(**x, labels=x["input_ids"])
    assert calls["n"] == len(forms)  # the module's forward computed each ΔW once (parametrize.cached)
    out.loss.backward()
    for name, form in forms.items():
        assert form.A.grad is not None and form.A.grad.abs().sum() > 0, name
        assert form.B.grad is not None and form.B.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in tuned.model.parameters())  # the base stays frozen


class _TransposedExperts(nn.Module):
    """Experts stored (E, in, out), as transformers marks with ``is_transposed`` (PEFT reads the flag too)."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 8, 6) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,eio->bo", x, self.w)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = _TransposedExperts()
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.experts(x))


def test_transposed_expert_stack_equals_peft(tmp_path) -> None:
    torch.manual_seed(0)
    base = _Net()
    x = torch.randn(5, 8)
    cfg = {"r": 2, "lora_alpha": 2, "target_modules": [], "target_parameters": ["experts.w"]}
    reference = randomised_peft(base, LoraConfig(**cfg))
    with torch.no_grad():
        expected = reference(x)
        assert not close(expected, base(x), rtol=1e-2)
    tuned = dt.attach(copy.deepcopy(base), LoraConfig(**cfg))
    form = tuned.forms()["experts.w"]
    assert form.transposed and form.A.shape == (3, 2, 8) and form.B.shape == (3, 6, 2)
    reference.save_pretrained(tmp_path / "peft")
    imported = dt.import_peft(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        assert close(imported(x), expected)
    assert close(imported.forms()["experts.w"].delta_weight().detach(), peft_param_deltas(reference)["experts.w"])


def test_router_module_points_to_target_parameters() -> None:
    base = tiny_architecture("qwen3_moe")
    with pytest.raises(DeltatuneError, match=r"target_parameters=\['<module>.weight'\]"):
        dt.attach(base, "lora", targets=["mlp.gate"])


def test_target_parameters_refusals() -> None:
    base = tiny_architecture("qwen3_moe")
    with pytest.raises(DeltatuneError, match="no input of its own to drop"):
        dt.attach(copy.deepcopy(base), "lora", dropout=0.1, target_parameters=EXPERTS)
    with pytest.raises(DeltatuneError, match="matches no parameter"):
        dt.attach(copy.deepcopy(base), "lora", target_parameters=["mlp.experts.gate_proj"])
    with pytest.raises(DeltatuneError, match="2-D weights and 3-D stacks"):
        dt.attach(copy.deepcopy(base), "lora", target_parameters=["input_layernorm.weight"])
    with pytest.raises(DeltatuneError, match="option of the lora method"):
        dt.attach(copy.deepcopy(base), "dora", target_parameters=EXPERTS)
    with pytest.raises(DeltatuneError, match="SVD or QR"):
        dt.attach(copy.deepcopy(base), "lora", init="pissa", target_parameters=EXPERTS)


# ---------------------------------------------------------------- convolutions


@pytest.mark.parametrize("model_type", ["vit", "audio-spectrogram-transformer"])
def test_patch_embedding_conv_equals_peft(model_type: str, tmp_path) -> None:
    base = tiny_architecture(model_type)
    x = architecture_batch(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["projection", "q_proj", "v_proj"])
    reference = randomised_peft(base, cfg)
    own = dt.attach(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["projection", "q_proj", "v_proj"]))
    conv = own.forms()["vit.embeddings.patch_embeddings.projection.weight" if model_type == "vit" else
                       "audio_spectrogram_transformer.embeddings.patch_embeddings.projection.weight"]
    assert isinstance(conv, ConvLowRank) and conv.A.dim() == 4 and conv.B.shape[2:] == (1, 1)
    peft_round_trip(base, reference, LoraConfig, "lora", x, tmp_path)
    tuned = dt.import_peft(copy.deepcopy(base), tmp_path / "peft")
    conv_name = next(n for n, f in tuned.forms().items() if isinstance(f, ConvLowRank))
    peft_layer = reference.get_submodule("base_model.model." + conv_name.removesuffix(".weight"))
    assert close(tuned.forms()[conv_name].delta_weight().detach(), peft_layer.get_delta_weight("default").detach())


@pytest.mark.parametrize("model_type", ["vit", "audio-spectrogram-transformer"])
def test_conv_merge_unmerge_save_load(model_type: str, tmp_path) -> None:
    base = tiny_architecture(model_type)
    x = architecture_batch(base)
    w0 = base_params(base)
    tuned = dt.attach(copy.deepcopy(base), "lora", r=4, alpha=8, init=False, targets=["projection"])
    unmerged = eval_logits(tuned, x)
    assert not close(unmerged, eval_logits(base, x), rtol=1e-2)
    tuned.merge()
    assert close(eval_logits(tuned, x), unmerged)
    tuned.unmerge()
    assert close(eval_logits(tuned, x), unmerged)
    tuned.save(tmp_path / "a")
    tuned.detach()
    for name, value in base_params(tuned.model).items():
        assert close(value, w0[name]), name
    loaded = dt.load(copy.deepcopy(base), tmp_path / "a")
    assert torch.equal(eval_logits(loaded, x), unmerged)


class _ConvNet(nn.Module):
    """A conv encoder: Conv1d with stride and padding, a 1×1 Conv2d (PEFT's special case in get_delta_weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, kernel_size=3, stride=2, padding=1)
        self.point = nn.Conv2d(6, 5, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))  # (b, 6, t)
        return self.point(h.unsqueeze(-1)).flatten(1)


def test_conv1d_and_pointwise_conv2d_equal_peft(tmp_path) -> None:
    torch.manual_seed(0)
    base = _ConvNet()
    x = torch.randn(3, 4, 11)
    reference = randomised_peft(base, LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "point"]))
    with torch.no_grad():
        expected = reference(x)
    reference.save_pretrained(tmp_path / "peft")
    tuned = dt.import_peft(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        assert close(tuned(x), expected)
    for name in ("conv", "point"):
        ours = tuned.forms()[f"{name}.weight"].delta_weight().detach()
        assert close(ours, reference.get_submodule(f"base_model.model.{name}").get_delta_weight("default"))
    tuned.merge()  # ΔW of the output path's convolutions
    with torch.no_grad():
        assert close(tuned(x), expected)
    tuned.unmerge()
    dt.export_peft(tuned, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back")
    with torch.no_grad():
        assert close(again(x), expected)


def test_conv_refusals() -> None:
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(DeltatuneError, match="groups=2"):
        dt.attach(grouped, "lora", targets=["0"])
    vit = tiny_architecture("vit")
    with pytest.raises(DeltatuneError, match="adapts Linear, GPT-2 Conv1D and Embedding layers only"):
        dt.attach(copy.deepcopy(vit), "dora", targets=["projection"])
    with pytest.raises(DeltatuneError, match="SVD or QR"):
        dt.attach(copy.deepcopy(vit), "lora", init="olora", targets=["projection"])


def test_dilated_conv_trains_here_but_does_not_export(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv1d(3, 4, kernel_size=3, dilation=2, padding=2))
    x = torch.randn(2, 3, 9)
    tuned = dt.attach(base, "lora", r=2, alpha=2, init=False, targets=["0"])
    with torch.no_grad():
        before = tuned(x)
    tuned.merge()
    with torch.no_grad():
        assert close(tuned(x), before)  # the output path convolves as the base does (dilation included)
    tuned.unmerge()
    with pytest.raises(DeltatuneError, match="ignores dilation"):
        dt.export_peft(tuned, tmp_path / "out")


def test_get_peft_model_conv_layout_is_ours() -> None:
    """PEFT's conv LoRA tensors are the shapes deltatune stores (no reshaping on export / import)."""
    base = tiny_architecture("vit")
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, target_modules=["projection"]))
    name = "vit.embeddings.patch_embeddings.projection"
    layer = pm.get_submodule(f"base_model.model.{name}")
    form = dt.attach(copy.deepcopy(base), "lora", r=3, targets=["projection"]).forms()[f"{name}.weight"]
    assert form.A.shape == layer.lora_A["default"].weight.shape
    assert form.B.shape == layer.lora_B["default"].weight.shape
