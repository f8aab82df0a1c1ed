"""PEFT interop: deltatune LoRA -> PEFT adapter folder -> PeftModel, PEFT adapter -> deltatune, round trips.

Every comparison runs in fp32 and needs max |logits_ours - logits_peft| <= 1e-5. Adapters are randomised (B, and
for embeddings A, are zero at init) so that a dropped or mis-scaled tensor would show up in the logits; each case
also checks that the delta moves the logits well above the tolerance.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.core.forms.dense import Dense
from deltatune.core.forms.lowrank import LowRank

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

TOL = 1e-5
PREFIX = "base_model.model."


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits


# -- tiny models ------------------------------------------------------------------------------------------

def llama_config(**kw) -> LlamaConfig:
    sizes = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    return LlamaConfig(**{**sizes, **kw})


def tiny_llama(tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(tie_word_embeddings=tied)).eval()


def tiny_llama_cls(seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(llama_config(num_labels=3, pad_token_id=0)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # GPT-2 initialises biases to zero: make them non-zero so bias deltas are visible
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def input_ids(seed: int = 1, vocab: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # start at 1: token 0 is the pad token of the classification model, which must find its last real token
    return torch.randint(1, vocab, (2, 9), generator=g)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def randomise_deltatune(tuned: dt.Tuned, seed: int = 0) -> None:
    """Give every LoRA factor and dense delta a clearly non-zero random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for form in tuned.forms().values():
            if isinstance(form, LowRank):
                form.A.copy_(torch.randn(form.A.shape, generator=g) * 0.3)
                form.B.copy_(torch.randn(form.B.shape, generator=g) * 0.3)
            elif isinstance(form, Dense):
                form.delta.copy_(torch.randn(form.delta.shape, generator=g) * 0.1)


def randomise_peft(model: nn.Module, seed: int = 0) -> None:
    """Randomise PEFT's trainable tensors: LoRA factors, modules_to_save copies, trainable biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif p.requires_grad:  # modules_to_save copies and biases under bias="all"
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def load_in_peft(base: nn.Module, folder: Path, strict_warnings: bool = True) -> PeftModel:
    with warnings.catch_warnings():
        if strict_warnings:  # PEFT warns about unknown config keys and missing adapter keys
            warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        return PeftModel.from_pretrained(base, str(folder)).eval()


def export_and_compare(
    tuned: dt.Tuned, fresh: nn.Module, out: Path, ids: torch.Tensor, strict_warnings: bool = True
) -> PeftModel:
    """Export ``tuned``, load it with PEFT onto ``fresh`` (an untouched copy of the base), compare logits."""
    base_logits = logits(fresh, ids)
    ours = logits(tuned, ids)
    assert max_diff(ours, base_logits) > 1e-3, "the delta must move the logits for the comparison to mean anything"
    dt.export_peft(tuned, out)
    theirs_model = load_in_peft(fresh, out, strict_warnings)
    theirs = logits(theirs_model, ids)
    diff = max_diff(ours, theirs)
    print(f"export -> PEFT max abs diff {diff:.3g}")
    assert diff <= TOL, diff
    return theirs_model


def peft_modules(peft_model: PeftModel) -> set[str]:
    """Module paths (inside the HF model) that PEFT put a LoRA layer on."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model.base_model.model
    return {n for n, m in inner.named_modules() if isinstance(m, LoraLayer)}


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((folder / "adapter_config.json").read_text()), load_file(folder / "adapter_model.safetensors")


# -- 1. deltatune -> PEFT -----------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_export_llama_qv(tmp_path, tied):
    base = tiny_llama(tied)
    fresh = copy.deepcopy(base)
    tuned = dt.attach(base, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"], init=False)
    randomise_deltatune(tuned)
    pm = export_and_compare(tuned, fresh, tmp_path / "a", input_ids())

    config, tensors = read_adapter(tmp_path / "a")
    mods = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    expected = {}
    for m in mods:
        out = 32 if m.endswith("q_proj") else 16  # 2 kv heads of dim 8
        expected[f"{PREFIX}{m}.lora_A.weight"] = (8, 32)
        expected[f"{PREFIX}{m}.lora_B.weight"] = (out, 8)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    forms = tuned.forms()
    for m in mods:
        assert torch.equal(tensors[f"{PREFIX}{m}.lora_A.weight"], forms[f"{m}.weight"].A)
        assert torch.equal(tensors[f"{PREFIX}{m}.lora_B.weight"], forms[f"{m}.weight"].B)
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert sorted(config["target_modules"]) == sorted(mods)
    assert config["fan_in_fan_out"] is False
    assert config["use_rslora"] is False and config["use_dora"] is False
    assert config["bias"] == "none" and config["modules_to_save"] is None
    assert config["init_lora_weights"] is True
    assert peft_modules(pm) == set(mods)
    # the safetensors metadata PEFT writes
    from safetensors import safe_open

    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_export_gpt2_conv1d_fan_in_fan_out(tmp_path):
    base = tiny_gpt2()
    fresh = copy.deepcopy(base)
    tuned = dt.attach(base, "lora", r=4, alpha=8, targets=["c_attn"], init=False)
    assert all(f.layout == "conv1d" for f in tuned.forms().values())
    randomise_deltatune(tuned)
    pm = export_and_compare(tuned, fresh, tmp_path / "a", input_ids())
    config, tensors = read_adapter(tmp_path / "a")
    assert config["fan_in_fan_out"] is True
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert tuple(tensors[f"{PREFIX}transformer.h.0.attn.c_attn.lora_A.weight"].shape) == (4, 32)
    assert tuple(tensors[f"{PREFIX}transformer.h.0.attn.c_attn.lora_B.weight"].shape) == (96, 4)
    assert len(tensors) == 4
    assert peft_modules(pm) == {f"transformer.h.{i}.attn.c_attn" for i in range(2)}


def test_export_rslora(tmp_path):
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    tuned = dt.attach(base, "lora", r=4, alpha=8, targets=["q_proj", "v_proj"], use_rslora=True, init=False)
    randomise_deltatune(tuned)
    assert all(f.scale == pytest.approx(8 / math.sqrt(4)) for f in tuned.forms().values())
    pm = export_and_compare(tuned, fresh, tmp_path / "a", input_ids())
    config, _ = read_adapter(tmp_path / "a")
    assert config["use_rslora"] is True
    lora = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert lora.scaling["default"] == pytest.approx(4.0)


def test_export_rank_and_alpha_pattern(tmp_path):
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    tuned = dt.attach(
        base, "lora", r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], init=False,
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"down_proj": 3},
    )
    randomise_deltatune(tuned)
    pm = export_and_compare(tuned, fresh, tmp_path / "a", input_ids())
    config, tensors = read_adapter(tmp_path / "a")
    assert config["r"] == 4 and config["lora_alpha"] == 8
    ours = {n.removesuffix(".weight"): (f.r, f.alpha, f.scale) for n, f in tuned.forms().items()}
    assert ours["model.layers.0.self_attn.v_proj"][0] == 2
    assert ours["model.layers.1.self_attn.q_proj"][0] == 6
    assert ours["model.layers.0.mlp.down_proj"][1] == 3
    for name, (r, _alpha, scale) in ours.items():
        layer = pm.base_model.model.get_submodule(name)
        assert layer.r["default"] == r, name
        assert layer.scaling["default"] == pytest.approx(scale), name
        assert tuple(tensors[f"{PREFIX}{name}.lora_A.weight"].shape)[0] == r


def test_export_embedding_untied(tmp_path):
    base = tiny_llama(tied=False)
    fresh = copy.deepcopy(base)
    tuned = dt.attach(base, "lora", r=4, alpha=8, targets=["embed_tokens", "q_proj"], init=False)
    assert tuned.forms()["model.embed_tokens.weight"].layout == "embedding"
    randomise_deltatune(tuned)
    pm = export_and_compare(tuned, fresh, tmp_path / "a", input_ids())
    _, tensors = read_adapter(tmp_path / "a")
    assert tuple(tensors[f"{PREFIX}model.embed_tokens.lora_embedding_A"].shape) == (4, 128)
    assert tuple(tensors[f"{PREFIX}model.embed_tokens.lora_embedding_B"].shape) == (32, 4)
    assert f"{PREFIX}model.embed_tokens.lora_A.weight" not in tensors
    assert "model.embed_tokens" in peft_modules(pm)


def test_export_embedding_tied(tmp_path):
    """LoRA on a tied input embedding changes the input side only, in PEFT and in deltatune."""
    base = tiny_llama(tied=True)
    fresh = copy.deepcopy(base)
    tuned = dt.attach(base, "lora", r=4, alpha=8, targets=["embed_tokens"], init=False)
    randomise_deltatune(tuned)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ensure_weight_tying")  # PEFT's notice, same semantics
        export_and_compare(tuned, fresh, tmp_path / "a", input_ids(), strict_warnings=False)


def test_export_gpt2_conv1d_and_linear(tmp_path):
    """One adapter on Conv1D (c_attn) and Linear (lm_head) layers: PEFT fixes fan_in_fan_out per layer."""
    base = tiny_gpt2()
    fresh = copy.deepcopy(base)
    tuned = dt.attach(base, "lora", r=4, alpha=8, targets=["c_attn", "lm_head"], init=False)
    assert {f.layout for f in tuned.forms().values()} == {"conv1d", "linear"}
    randomise_deltatune(tuned)
    with warnings.catch_warnings():  # PEFT's notices: it flips fan_in_fan_out per layer; lm_head is tied to wte
        warnings.filterwarnings("ignore", message="fan_in_fan_out")
        warnings.filterwarnings("ignore", message=".*ensure_weight_tying")
        export_and_compare(tuned, fresh, tmp_path / "a", input_ids(), strict_warnings=False)


def test_export_tied_modules_to_save(tmp_path):
    """modules_to_save on a tied lm_head: deltatune trains the shared tensor, so PEFT must get both sites."""
    base = tiny_llama(tied=True)
    fresh = copy.deepcopy(base)
    tuned = dt.attach(base, "lora", r=4, alpha=8, targets=["q_proj"], modules_to_save=["lm_head"], init=False)
    randomise_deltatune(tuned)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ensure_weight_tying")
        export_and_compare(tuned, fresh, tmp_path / "a", input_ids(), strict_warnings=False)
    config, tensors = read_adapter(tmp_path / "a")
    assert config["modules_to_save"] == ["lm_head", "model.embed_tokens"]
    assert torch.equal(tensors[f"{PREFIX}lm_head.weight"], tensors[f"{PREFIX}model.embed_tokens.weight"])


def test_export_distilbert_endswith_modules_to_save(tmp_path):
    """PEFT wraps every module whose name ends with a modules_to_save entry ("pre_classifier" for "classifier")
    and then needs a saved value for each of them."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=3,
                           max_position_embeddings=64)
    base = DistilBertForSequenceClassification(cfg).eval()
    fresh = copy.deepcopy(base)
    tuned = dt.attach(base, "lora", r=4, alpha=8, targets=["q_lin", "v_lin"], modules_to_save=["classifier"],
                      init=False)
    randomise_deltatune(tuned)
    export_and_compare(tuned, fresh, tmp_path / "a", input_ids())
    _, tensors = read_adapter(tmp_path / "a")
    assert torch.equal(tensors[f"{PREFIX}pre_classifier.weight"], fresh.pre_classifier.weight)


def test_export_seq_cls_without_modules_to_save(tmp_path):
    """PEFT adds its own modules_to_save (score, classifier) for SEQ_CLS: an untrained head must stay the base."""
    base = tiny_llama_cls()
    fresh = copy.deepcopy(base)
    tuned = dt.attach(base, "lora", r=4, alpha=8, targets=["q_proj", "v_proj"], init=False)
    randomise_deltatune(tuned)
    export_and_compare(tuned, fresh, tmp_path / "a", input_ids())


def test_export_gpt2_embedding(tmp_path):
    """GPT-2 ties wte and lm_head: LoRA on wte changes the input embedding only (as in PEFT)."""
    base = tiny_gpt2()
    fresh = copy.deepcopy(base)
    tuned = dt.attach(base, "lora", r=4, alpha=8, targets=["wte"], init=False)
    randomise_deltatune(tuned)
    export_and_compare(tuned, fresh, tmp_path / "a", input_ids())


def test_export_gpt2_bias_all(tmp_path):
    base = tiny_gpt2()
    fresh = copy.deepcopy(base)
    tuned = dt.attach(base, "lora", r=4, alpha=8, targets=["c_attn"], bias="all", init=False)
    randomise_deltatune(tuned)
    n_biases = sum(1 for n, _ in fresh.named_parameters() if n.endswith(".bias"))
    assert sum(isinstance(f, Dense) for f in tuned.forms().values()) == n_biases
    export_and_compare(tuned, fresh, tmp_path / "a", input_ids())
    config, tensors = read_adapter(tmp_path / "a")
    assert config["bias"] == "all"
    biases = [k for k in tensors if k.endswith(".bias")]
    assert len(biases) == n_biases
    # PEFT stores the bias of a LoRA-wrapped module under its base_layer
    assert f"{PREFIX}transformer.h.0.attn.c_attn.base_layer.bias" in tensors
    assert f"{PREFIX}transformer.h.0.mlp.c_fc.bias" in tensors


def test_export_gpt2_bias_lora_only(tmp_path):
    base = tiny_gpt2()
    fresh = copy.deepcopy(base)
    tuned = dt.attach(base, "lora", r=4, alpha=8, targets=["c_attn"], bias="lora_only", init=False)
    randomise_deltatune(tuned)
    export_and_compare(tuned, fresh, tmp_path / "a", input_ids())
    config, tensors = read_adapter(tmp_path / "a")
    assert config["bias"] == "lora_only"
    assert sorted(k for k in tensors if k.endswith(".bias")) == [
        f"{PREFIX}transformer.h.{i}.attn.c_attn.base_layer.bias" for i in range(2)
    ]


def test_export_seq_cls_modules_to_save(tmp_path):
    base = tiny_llama_cls()
    fresh = copy.deepcopy(base)
    tuned = dt.attach(base, "lora", r=4, alpha=8, targets=["q_proj", "v_proj"], modules_to_save=["score"], init=False)
    randomise_deltatune(tuned)
    pm = export_and_compare(tuned, fresh, tmp_path / "a", input_ids())
    config, tensors = read_adapter(tmp_path / "a")
    assert config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["score"]
    assert tuple(tensors[f"{PREFIX}score.weight"].shape) == (3, 32)
    assert "score" not in peft_modules(pm)


def test_export_seq_cls_modules_to_save_and_bias(tmp_path):
    """bias="all" next to modules_to_save: biases must not turn LoRA targets into modules_to_save."""
    torch.manual_seed(0)
    from transformers import GPT2ForSequenceClassification

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, num_labels=3, pad_token_id=0)
    base = GPT2ForSequenceClassification(cfg).eval()
    fresh = copy.deepcopy(base)
    tuned = dt.attach(base, "lora", r=4, alpha=8, targets=["c_attn"], bias="all", modules_to_save=["score"],
                      init=False)
    randomise_deltatune(tuned)
    pm = export_and_compare(tuned, fresh, tmp_path / "a", input_ids())
    config, _ = read_adapter(tmp_path / "a")
    assert config["modules_to_save"] == ["score"] and config["bias"] == "all"
    assert peft_modules(pm) == {f"transformer.h.{i}.attn.c_attn" for i in range(2)}


def test_export_no_unknown_config_keys(tmp_path):
    """PEFT warns about config keys it does not know: the export must not trigger that warning."""
    tuned = dt.attach(tiny_llama(), "lora", r=2, targets=["q_proj"])
    dt.export_peft(tuned, tmp_path / "a")
    config, _ = read_adapter(tmp_path / "a")
    known = set(LoraConfig.__dataclass_fields__)
    assert set(config) <= known, set(config) - known


# -- 2. PEFT -> deltatune -----------------------------------------------------------------------------------

def make_peft_adapter(base: nn.Module, config: LoraConfig, out: Path, ids: torch.Tensor) -> torch.Tensor:
    """Save a randomised PEFT adapter for a copy of ``base``; return the PeftModel's logits."""
    pm = get_peft_model(copy.deepcopy(base), config)
    randomise_peft(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_embedding_layers notices
        pm.save_pretrained(str(out))
    theirs = logits(pm, ids)
    assert max_diff(theirs, logits(base, ids)) > 1e-3
    return theirs


def import_and_compare(base: nn.Module, folder: Path, theirs: torch.Tensor, ids: torch.Tensor) -> dt.Tuned:
    tuned = dt.import_peft(base, folder)
    diff = max_diff(logits(tuned, ids), theirs)
    print(f"PEFT -> import max abs diff {diff:.3g}")
    assert diff <= TOL, diff
    return tuned


def test_import_llama_qv(tmp_path):
    base, ids = tiny_llama(), input_ids()
    theirs = make_peft_adapter(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                               tmp_path / "a", ids)
    tuned = import_and_compare(base, tmp_path / "a", theirs, ids)
    forms = tuned.forms()
    assert sorted(forms) == sorted(f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj"))
    assert all(f.r == 8 and f.scale == 2.0 for f in forms.values())


def test_import_llama_tied(tmp_path):
    base, ids = tiny_llama(tied=True), input_ids()
    theirs = make_peft_adapter(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]), tmp_path / "a", ids)
    import_and_compare(base, tmp_path / "a", theirs, ids)


def test_import_gpt2_fan_in_fan_out(tmp_path):
    base, ids = tiny_gpt2(), input_ids()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = make_peft_adapter(base, cfg, tmp_path / "a", ids)
    tuned = import_and_compare(base, tmp_path / "a", theirs, ids)
    assert all(f.layout == "conv1d" for f in tuned.forms().values())
    assert len(tuned.forms()) == 6  # c_attn, attn.c_proj, mlp.c_proj per block


def test_import_regex_target_modules(tmp_path):
    base, ids = tiny_llama(), input_ids()
    regex = r".*layers\.1\.(self_attn\.(q|k)_proj|mlp\.up_proj)"
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=regex)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    expected = peft_modules(pm)
    assert expected == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.mlp.up_proj"}
    # the same regex through deltatune's own targeting ("re:" = fullmatch) picks the same modules
    own = dt.attach(copy.deepcopy(base), "lora", targets=[f"re:{regex}"])
    theirs = make_peft_adapter(base, cfg, tmp_path / "a", ids)
    tuned = import_and_compare(base, tmp_path / "a", theirs, ids)
    assert {n.removesuffix(".weight") for n in tuned.forms()} == expected
    assert {n.removesuffix(".weight") for n in own.forms()} == expected


def test_import_rslora(tmp_path):
    base, ids = tiny_llama(), input_ids()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)
    theirs = make_peft_adapter(base, cfg, tmp_path / "a", ids)
    tuned = import_and_compare(base, tmp_path / "a", theirs, ids)
    assert all(f.use_rslora and f.scale == pytest.approx(4.0) for f in tuned.forms().values())


def test_import_rank_and_alpha_pattern(tmp_path):
    base, ids = tiny_llama(), input_ids()
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"o_proj": 3, "^model.layers.0.self_attn.q_proj": 5},
    )
    pm = get_peft_model(copy.deepcopy(base), cfg)
    expected = {n: (m.r["default"], m.scaling["default"]) for n, m in pm.base_model.model.named_modules()
                if hasattr(m, "scaling") and isinstance(getattr(m, "r", None), dict)}
    theirs = make_peft_adapter(base, cfg, tmp_path / "a", ids)
    tuned = import_and_compare(base, tmp_path / "a", theirs, ids)
    ours = {n.removesuffix(".weight"): (f.r, f.scale) for n, f in tuned.forms().items()}
    assert ours.keys() == expected.keys()
    for name, (r, scale) in expected.items():
        assert ours[name][0] == r and ours[name][1] == pytest.approx(scale), name
    assert len({r for r, _ in ours.values()}) == 3 and len({s for _, s in ours.values()}) >= 3


def test_import_rank_and_alpha_pattern_rslora(tmp_path):
    base, ids = tiny_llama(), input_ids()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                     rank_pattern={"v_proj": 9}, alpha_pattern={"q_proj": 2})
    theirs = make_peft_adapter(base, cfg, tmp_path / "a", ids)
    import_and_compare(base, tmp_path / "a", theirs, ids)


def test_import_unknown_config_keys_and_minimal_config(tmp_path):
    base, ids = tiny_llama(), input_ids()
    theirs = make_peft_adapter(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                               tmp_path / "a", ids)
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update({"some_future_option": {"nested": [1, 2]}, "runtime_config": {"ephemeral_gpu_offload": False},
                   "target_parameters": None, "peft_version": "9.9.9"})
    path.write_text(json.dumps(config))
    import_and_compare(copy.deepcopy(base), tmp_path / "a", theirs, ids)
    # the other extreme: only the keys that matter
    path.write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    import_and_compare(copy.deepcopy(base), tmp_path / "a", theirs, ids)


def test_import_gpt2_bias_all(tmp_path):
    base, ids = tiny_gpt2(), input_ids()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias="all")
    theirs = make_peft_adapter(base, cfg, tmp_path / "a", ids)
    _, tensors = read_adapter(tmp_path / "a")
    assert f"{PREFIX}transformer.h.0.attn.c_attn.base_layer.bias" in tensors  # PEFT's name for a wrapped bias
    n_biases = sum(1 for n, _ in base.named_parameters() if n.endswith(".bias"))
    tuned = import_and_compare(base, tmp_path / "a", theirs, ids)
    dense = [f for f in tuned.forms().values() if isinstance(f, Dense)]
    assert len(dense) == n_biases and all(bool(f.delta.any()) for f in dense)


def test_import_gpt2_bias_lora_only(tmp_path):
    base, ids = tiny_gpt2(), input_ids()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only")
    theirs = make_peft_adapter(base, cfg, tmp_path / "a", ids)
    import_and_compare(base, tmp_path / "a", theirs, ids)


def test_import_seq_cls_modules_to_save(tmp_path):
    base, ids = tiny_llama_cls(), input_ids()
    cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
    theirs = make_peft_adapter(base, cfg, tmp_path / "a", ids)
    tuned = import_and_compare(base, tmp_path / "a", theirs, ids)
    assert isinstance(tuned.forms()["score.weight"], Dense)


def test_import_tied_modules_to_save(tmp_path):
    """lm_head tied to embed_tokens: with ensure_weight_tying PEFT trains both sites, as deltatune does."""
    base, ids = tiny_llama(tied=True), input_ids()
    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True)
    theirs = make_peft_adapter(base, cfg, tmp_path / "a", ids)
    import_and_compare(base, tmp_path / "a", theirs, ids)


def test_error_import_tied_modules_to_save_one_site(tmp_path):
    """Without ensure_weight_tying PEFT trains a copy of lm_head only: deltatune refuses rather than differ."""
    base, ids = tiny_llama(tied=True), input_ids()
    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ensure_weight_tying")
        make_peft_adapter(base, cfg, tmp_path / "a", ids)
    before = logits(base, ids)
    with pytest.raises(dt.DeltatuneError, match="ensure_weight_tying"):
        dt.import_peft(base, tmp_path / "a")
    assert torch.equal(logits(base, ids), before)  # nothing left attached


def test_import_distilbert_seq_cls(tmp_path):
    """PEFT's SEQ_CLS adds "classifier" to modules_to_save, which also wraps "pre_classifier"."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=3,
                           max_position_embeddings=64)
    base, ids = DistilBertForSequenceClassification(cfg).eval(), input_ids()
    theirs = make_peft_adapter(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_lin", "v_lin"]),
                               tmp_path / "a", ids)
    tuned = import_and_compare(base, tmp_path / "a", theirs, ids)
    assert {"classifier.weight", "pre_classifier.weight"} <= set(tuned.forms())


def test_import_embedding(tmp_path):
    """PEFT also saves the (unchanged) base embedding when embed_tokens is a target: it must not get in the way."""
    base, ids = tiny_llama(), input_ids()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    theirs = make_peft_adapter(base, cfg, tmp_path / "a", ids)
    _, tensors = read_adapter(tmp_path / "a")
    assert f"{PREFIX}model.embed_tokens.base_layer.weight" in tensors
    tuned = import_and_compare(base, tmp_path / "a", theirs, ids)
    assert tuned.forms()["model.embed_tokens.weight"].layout == "embedding"


def test_import_legacy_key_forms(tmp_path):
    """Keys with the adapter name left in and old-style modules_to_save keys still import."""
    base, ids = tiny_llama_cls(), input_ids()
    cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["score"])
    theirs = make_peft_adapter(base, cfg, tmp_path / "a", ids)
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(file)
    renamed = {}
    for k, v in tensors.items():
        k = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        k = k.replace("score.weight", "score.modules_to_save.default.weight")
        renamed[k] = v
    save_file(renamed, file, metadata={"format": "pt"})
    import_and_compare(base, tmp_path / "a", theirs, ids)


# -- 3. deltatune -> PEFT -> deltatune ----------------------------------------------------------------------

def assert_same_delta(a: dt.Tuned, b: dt.Tuned) -> None:
    fa, fb = a.forms(), b.forms()
    assert fa.keys() == fb.keys()
    for name in fa:
        x, y = fa[name], fb[name]
        assert type(x) is type(y), name
        if isinstance(x, LowRank):
            assert (x.layout, x.r, x.alpha, x.use_rslora, x.scale) == (y.layout, y.r, y.alpha, y.use_rslora, y.scale)
            assert torch.equal(x.A, y.A) and torch.equal(x.B, y.B), name
        else:  # PEFT stores trained values; compare the weights the model sees
            assert torch.equal(x.base + x.delta, y.base + y.delta), name


@pytest.mark.parametrize("case", ["llama", "gpt2", "cls"])
def test_round_trip_bit_identical(tmp_path, case):
    ids = input_ids()
    if case == "llama":
        base = tiny_llama()
        opts = dict(r=4, alpha=8, targets=["embed_tokens", "q_proj", "v_proj", "up_proj"], use_rslora=True,
                    rank_pattern={"up_proj": 2}, alpha_pattern={"v_proj": 5})
    elif case == "gpt2":
        base = tiny_gpt2()
        opts = dict(r=3, alpha=6, targets=["c_attn"], bias="all")
    else:
        base = tiny_llama_cls()
        opts = dict(r=4, alpha=16, targets=["q_proj", "v_proj"], modules_to_save=["score"])
    fresh = copy.deepcopy(base)
    tuned = dt.attach(base, "lora", init=False, **opts)
    randomise_deltatune(tuned)
    dt.export_peft(tuned, tmp_path / "a")
    back = dt.import_peft(fresh, tmp_path / "a")
    assert_same_delta(tuned, back)
    assert torch.equal(logits(tuned, ids), logits(back, ids))
    # and exporting the import again writes the same tensors
    dt.export_peft(back, tmp_path / "b")
    (ca, ta), (cb, tb) = read_adapter(tmp_path / "a"), read_adapter(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert {k: v for k, v in ca.items() if k != "lora_dropout"} == {k: v for k, v in cb.items() if k != "lora_dropout"}


# -- 4. errors ---------------------------------------------------------------------------------------------

def test_error_non_lora_adapter(tmp_path):
    base = tiny_llama()
    dt.export_peft(dt.attach(copy.deepcopy(base), "lora", r=2, targets=["q_proj"]), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "peft_type": "OFT"}))
    with pytest.raises(dt.DeltatuneError, match="'OFT' adapter; deltatune imports PEFT's LORA, IA3, LOHA, LOKR, TRAINABLE_TOKENS, VERA"):
        dt.import_peft(base, tmp_path / "a")
    # a type deltatune imports, with another type's tensors
    path.write_text(json.dumps({**json.loads(path.read_text()), "peft_type": "IA3"}))
    with pytest.raises(dt.DeltatuneError, match="holds no IA3 tensors"):
        dt.import_peft(base, tmp_path / "a")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"init_lora_weights": "pissa_niter_4"}, "rewrites the base weights"),
        ({"init_lora_weights": "corda"}, "rewrites the base weights"),  # pissa / olora: tests/test_peft_pissa.py
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"alora_invocation_tokens": [5, 6]}, "aLoRA"),
    ],
)
def test_error_unsupported_lora_options(tmp_path, change, message):
    base = tiny_llama()
    dt.export_peft(dt.attach(copy.deepcopy(base), "lora", r=2, targets=["q_proj"]), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(dt.DeltatuneError, match=message):
        dt.import_peft(base, tmp_path / "a")


def test_error_only_pickled_weights(tmp_path):
    base = tiny_llama()
    dt.export_peft(dt.attach(copy.deepcopy(base), "lora", r=2, targets=["q_proj"]), tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    torch.save(load_file(weights), tmp_path / "a" / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(dt.DeltatuneError, match="adapter_model.bin.*safetensors"):
        dt.import_peft(base, tmp_path / "a")


def test_error_missing_folder_and_config(tmp_path):
    with pytest.raises(dt.DeltatuneError, match="adapter_config.json is missing"):
        dt.import_peft(tiny_llama(), tmp_path)


def test_error_export_full(tmp_path):
    tuned = dt.attach(tiny_llama(), "full")
    with pytest.raises(dt.DeltatuneError, match="no PEFT LoRA equivalent"):
        dt.export_peft(tuned, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_error_export_merged(tmp_path):
    tuned = dt.attach(tiny_llama(), "lora", r=2, targets=["q_proj"])
    tuned.merge()
    with pytest.raises(dt.DeltatuneError, match="unmerge"):
        dt.export_peft(tuned, tmp_path / "a")


def test_error_import_changed_base_embedding(tmp_path):
    """An adapter whose saved base embedding differs from the model's would change the base: refuse it."""
    base, ids = tiny_llama(), input_ids()
    make_peft_adapter(base, LoraConfig(r=4, target_modules=["embed_tokens"]), tmp_path / "a", ids)
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors[f"{PREFIX}model.embed_tokens.base_layer.weight"] += 1.0
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(dt.DeltatuneError, match="embed_tokens"):
        dt.import_peft(base, tmp_path / "a")


def test_a_refused_import_leaves_the_carried_delta_on(tmp_path):
    """As dt.load: an adapter refused after its LoRA was built puts the delta the model carried back on."""
    base, ids = tiny_llama(), input_ids()
    make_peft_adapter(base, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a", ids)
    file = tmp_path / "a" / "adapter_model.safetensors"
    # linear LoRA tensors saved for the embedding: found only once the embedding's LoRA form exists
    q_proj = f"{PREFIX}model.layers.0.self_attn.q_proj."
    tensors = {k.replace(q_proj, f"{PREFIX}model.embed_tokens."): v for k, v in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "pt"})
    torch.manual_seed(0)
    carried = dt.attach(base, "lora", r=2, targets=["q_proj"], init=False)
    with torch.no_grad():
        before = carried(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the import detaches the carried delta first, and says so
        with pytest.raises(dt.DeltatuneError, match="embed_tokens"):
            dt.import_peft(base, tmp_path / "a")
    assert carried.attached
    with torch.no_grad():
        torch.testing.assert_close(carried(input_ids=ids).logits, before)  # float32 defaults: scale with the logits


def test_error_import_wrong_base(tmp_path):
    base, ids = tiny_llama(), input_ids()
    make_peft_adapter(base, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a", ids)
    with pytest.raises(dt.DeltatuneError, match="another base model"):
        dt.import_peft(tiny_gpt2(), tmp_path / "a")
    with pytest.raises(dt.DeltatuneError, match="shape"):  # same module names, other sizes
        torch.manual_seed(0)
        dt.import_peft(LlamaForCausalLM(llama_config(hidden_size=64)), tmp_path / "a")


# -- 5. the shipped SmolLM2 --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_own():
    """This module's own SmolLM2 (it gets a delta attached): loaded once, the PEFT base is a deep copy."""
    if not hasattr(dt.models, "load"):
        pytest.skip("deltatune.data.models has no load() yet")
    return dt.models.load("smollm2-135m")


def test_smollm2_round_trip(tmp_path, smollm2_own):
    model = smollm2_own
    fresh = copy.deepcopy(model)
    ids = torch.tensor([[1, 504, 3458, 314, 3737, 28, 2, 1156]])
    base_logits = logits(fresh, ids)
    tuned = dt.attach(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    try:
        assert tuned.num_trainable() == 460800  # 30 layers x 8 x ((576 + 576) + (576 + 192))
        assert torch.equal(logits(tuned, ids), base_logits)  # B = 0: exactly the base
        randomise_smollm2(tuned)
        ours = logits(tuned, ids)
        assert max_diff(ours, base_logits) > 1e-2
        dt.export_peft(tuned, tmp_path / "a")
        config, tensors = read_adapter(tmp_path / "a")
        assert len(tensors) == 120 and config["r"] == 8 and config["lora_alpha"] == 16
        pm = load_in_peft(fresh, tmp_path / "a")
        theirs = logits(pm, ids)
        diff = max_diff(ours, theirs)
        print(f"SmolLM2 export -> PEFT max abs diff {diff:.3g} (logit scale {ours.abs().max().item():.3g})")
        assert diff <= TOL, diff
        # and back: unwrap PEFT's model to get the untouched base again
        plain = pm.unload()
        back = dt.import_peft(plain, tmp_path / "a")
        try:
            assert_same_delta(tuned, back)
            back_logits = logits(back, ids)
            print(f"SmolLM2 import max abs diff {max_diff(back_logits, ours):.3g}")
            assert torch.equal(back_logits, ours)
        finally:
            for form in back.forms().values():
                form.detach()
    finally:
        for form in tuned.forms().values():
            form.detach()


def randomise_smollm2(tuned: dt.Tuned) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for form in tuned.forms().values():
            form.B.copy_(torch.randn(form.B.shape, generator=g) * 0.02)


def test_half_precision_base_keeps_fp32_factors_like_peft(tmp_path) -> None:
    import peft

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16).eval()
    ref = copy.deepcopy(base)
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    pm.save_pretrained(tmp_path / "a")
    tuned = dt.import_peft(base, tmp_path / "a")
    assert all(f.A.dtype == torch.float32 for f in tuned.forms().values())
    x = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.equal(tuned(input_ids=x).logits, pm(input_ids=x).logits)
