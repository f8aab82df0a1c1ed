"""Quantized bases (QLoRA-style): ``dt.models.load(name, quantize=...)``, which deltas train on one, the
fingerprint, merging, PEFT interop and ``deltatune inspect``.

A tiny random Llama is saved as a folder and loaded through transformers' ``BitsAndBytesConfig``
(bitsandbytes 0.50.2, its CPU backend), as PEFT users load a QLoRA base. References: bitsandbytes' own NF4
code values for the quantization error; a plain model holding the dequantized weights for every delta's
forward and gradients (a 4-bit layer computes x·dequant(W)ᵀ in its compute dtype, so the two agree to float
rounding); PEFT + bitsandbytes for the exported and imported adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
import torch.nn as nn
from conftest import batch, output_of, tiny_llama, tiny_llama_cls

import deltatune as dt
from deltatune import api
from deltatune.core import quantized, registry
from deltatune.data import models

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits

LINEARS = 7 * 3  # q, k, v, o, gate, up, down in each of the tiny Llama's 3 blocks


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cls_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-cls")
    tiny_llama_cls().save_pretrained(path)
    return path


def nf4(folder: Path, **options) -> nn.Module:
    return models.load(folder, quantize="nf4", **options)


def randomize(tuned: dt.Tuned, seed: int = 0, scale: float = 0.05) -> None:
    """Every delta parameter drawn at random (seeded): a delta that visibly changes the model, as after
    training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.deltas.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def dequantized_copy(folder: Path, model: nn.Module) -> nn.Module:
    """The full-precision model from ``folder`` with each quantized layer's dequantized weight in place of its
    own."""
    plain = models.load(folder)
    with torch.no_grad():
        for name, m in quantized.quantized_layers(model):
            plain.get_submodule(name).weight.copy_(quantized.dequantize(m, torch.float32))
    return plain


def loss_of(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(**x).logits.float()
    return logits.pow(2).mean() if logits.dim() == 2 else logits.logsumexp(-1).mean()


def base_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in m.__dict__)
               for m in model.modules())


# -- loading
# ---------------------------------------------------------------------------------------------------
def test_load_quantizes_every_linear_but_the_head(folder: Path) -> None:
    model = nf4(folder)
    layers = quantized.quantized_layers(model)
    assert len(layers) == LINEARS and all(isinstance(m, bnb.nn.Linear4bit) for _, m in layers)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight, \
        "the tied head and the embeddings stay in full precision, as transformers and bitsandbytes keep them"
    assert quantized.record(model) == {"library": "bitsandbytes", "version": bnb.__version__, "scheme": "nf4",
                                       "double_quant": True, "blocksize": 64, "compute_dtype": "float32",
                                       "layers": LINEARS}
    assert quantized.record(models.load(folder, quantize="fp4", double_quant=False))["scheme"] == "fp4"
    int8 = models.load(folder, quantize="int8")
    assert quantized.record(int8)["scheme"] == "int8" and len(quantized.quantized_layers(int8)) == LINEARS
    assert quantized.record(models.load(folder)) is None
    # a packed weight counts as the matrix it stands for
    assert quantized.num_parameters(model) == sum(p.numel() for p in models.load(folder).parameters())
    with pytest.raises(dt.DeltatuneError, match="quantize='int4' is not supported"):
        models.load(folder, quantize="int4")


def stored_nf4(layer: nn.Module, code: torch.Tensor, stored_absmax: torch.Tensor) -> torch.Tensor:
    """The weights a 4-bit layer stores, decoded in plain torch: two codes per byte (high nibble first), each the
    NF4 value times its block's stored absmax."""
    packed = layer.weight.data.reshape(-1)
    codes = torch.stack([(packed >> 4) & 15, packed & 15], 1).reshape(-1).long()
    return code[codes].reshape(-1, 64) * stored_absmax.float().reshape(-1, 1)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_a_fresh_head_over_a_quantized_base_stays_full_precision(tmp_path: Path, scheme: str) -> None:
    """An encoder loaded as a classifier gets a fresh head the checkpoint lacks; transformers made it a bitsandbytes
    layer that was never quantized (its forward failed on the float init). It is a plain Linear, the delta trains
    it, and the model classifies."""
    from conftest import tiny_bert

    tiny_bert().bert.save_pretrained(tmp_path / "encoder")  # the body alone, as a pre-trained encoder is shipped
    model = models.load(tmp_path / "encoder", task="classification", num_labels=3, quantize=scheme)
    assert type(model.classifier) is nn.Linear and model.classifier.weight.shape == (3, model.config.hidden_size)
    assert quantized.quantized_layers(model)  # the body stays quantized
    tuned = dt.attach(model, "lora", r=4)
    logits = tuned(input_ids=torch.randint(1, 100, (2, 6))).logits
    logits.sum().backward()
    assert logits.shape == (2, 3) and model.classifier.weight.grad is not None  # the fresh head trains


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_a_quantized_model_keeps_no_mapping_of_the_full_precision_checkpoint(folder: Path) -> None:
    """The full-precision tensors a quantized model keeps (embeddings, norms) are copied out of the memory-mapped
    checkpoint, so the mapping, and the full-precision weights quantizing read through it, do not stay resident."""
    import gc

    checkpoint = str((folder / "model.safetensors").resolve())
    model = nf4(folder)
    gc.collect()
    assert checkpoint not in Path("/proc/self/maps").read_text()
    plain = models.load(folder)  # a full-precision model computes from the mapping itself: nothing to copy
    gc.collect()
    assert checkpoint in Path("/proc/self/maps").read_text()
    del model, plain


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_dequantize_error_within_the_code_bound(folder: Path, double_quant: bool) -> None:
    """The bound: NF4 rounds each weight divided by its block's absmax a (blocks of 64 consecutive weights) to
    the nearest of bitsandbytes' 16 NF4 code values (``bitsandbytes.functional.get_4bit_type("nf4")``, the
    QLoRA paper's quantiles of N(0, 1) scaled to [-1, 1]), so |W - code·a| <= a·g/2 with g the largest gap
    between neighbouring codes (0.277, between 0.7230 and 1). Double quantization stores a itself in 8 bits
    as a', which adds at most |a - a'| (the codes are within [-1, 1]).

    The bound is checked on the stored codes decoded in plain torch, and ``quantized.dequantize`` must be what
    bitsandbytes' own ``dequantize_4bit`` gives (what its forward computes with). bitsandbytes 0.50.2's CPU
    ``dequantize_4bit`` does not decode the stored codes exactly on every CPU (on an AVX-512 machine some values
    came out off the code grid, up to 0.3·a away: docs/quantization.md), so the two are not compared."""
    plain = models.load(folder)
    model = nf4(folder, double_quant=double_quant)
    raw = bnbf.get_4bit_type("nf4", device="cpu")
    code = raw.sort().values
    half_gap = (code[1:] - code[:-1]).max().item() / 2
    worst = 0.0
    for name, layer in quantized.quantized_layers(model):
        w = plain.get_submodule(name).weight.detach().reshape(-1, 64)
        state = layer.weight.quant_state
        stored = (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset) if state.nested \
            else state.absmax
        err = (stored_nf4(layer, raw, stored) - w).abs().amax(dim=1)
        absmax = w.abs().amax(dim=1)
        bound = absmax * half_gap + (absmax - stored.float()).abs() + 1e-7
        assert bool((err <= bound).all()), name
        worst = max(worst, (err / bound).max().item())
        theirs = bnbf.dequantize_4bit(layer.weight.data, state).float()
        assert torch.equal(quantized.dequantize(layer, torch.float32), theirs.reshape(layer.out_features, -1)), name
    assert worst > 0.5, "the weights are really quantized: some error comes near the bound"


# -- which deltas train on it
# ------------------------------------------------------------------------------------
SUPPORTED = [
    ("lora", {"r": 4, "alpha": 8}),
    ("lora", {"r": 4, "alpha": 8, "targets": ["q_proj", "down_proj"], "modules_to_save": ["lm_head"]}),
    ("dora", {"r": 4, "alpha": 8}),
    ("adalora", {"init_r": 4, "target_r": 2, "delta_t": 1}),
    ("increlora", {"init_warmup": 0, "incre_interval": 1}),
    ("corda", {"r": 4, "data": "random", "samples": 4}),
    ("kasa", {"r": 4, "alpha": 8}),
    ("kasa", {"r": 4, "alpha": 8, "truncation": "none"}),
    ("spiel", {"density": 0.05}),
    ("adapter", {"r": 4}),
    ("parallel_adapter", {"r": 4}),
    ("scaled_parallel_adapter", {"r": 4}),
    ("connected", {"r": 4, "adapter_r": 4, "variant": "linked", "placement": "houlsby"}),
    ("mam", {"prefix_length": 3, "mid_dim": 16, "r": 4}),
    ("prefix", {"length": 4, "reparam": False}),
    ("prompt", {"length": 4}),
    ("ptuning_v2", {"length": 4}),
    ("autopeft", {"serial": 4, "parallel": 2, "prefix": 3, "mid_dim": 16}),
    ("vqt", {"tokens": 2}),
    ("ist", {"base_options": {"r": 4, "alpha": 8}, "score_interval": 2}),
    ("mezo", {"base": "lora", "base_options": {"r": 4, "alpha": 8}}),
    ("sparse_mezo", {"base": "lora", "base_options": {"r": 4, "alpha": 8}}),
]


@pytest.mark.parametrize(("method", "options"), SUPPORTED, ids=lambda v: v if isinstance(v, str) else "")
def test_supported_methods_put_gradients_on_the_delta_only(folder: Path, cls_folder: Path, method: str,
                                                           options: dict) -> None:
    model = nf4(cls_folder if method == "vqt" else folder)
    before = {n: quantized.identity(m) for n, m in quantized.quantized_layers(model)}
    tuned = dt.attach(model, method, **options).train()
    delta = {id(p) for p in tuned.deltas.parameters()}
    assert not [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in delta]
    if registry.get(method).has("gradient_free", options):
        tuned.policy.train_step(0, tuned, batch(), lambda b: loss_of(tuned, b), 1e-3, 0.0)
    else:
        loss_of(tuned, batch()).backward()
        assert not [n for n, p in model.named_parameters() if p.grad is not None and id(p) not in delta]
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in tuned.deltas.parameters())
    after = dict(quantized.quantized_layers(model))
    assert all(torch.equal(quantized.identity(after[n]), b) for n, b in before.items()), \
        "the base is not written"


# the deltas whose forward needs W0 itself (norms, SVD, W0 + scatter) and a plain one: each on the nf4 base
# gives the logits and gradients it gives on a plain model holding the dequantized weights
MATCHED = [("lora", {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]}),
           ("dora", {"r": 4, "alpha": 8, "dropout": 0.0}),
           ("kasa", {"r": 4, "alpha": 8}),
           ("adalora", {"init_r": 4, "target_r": 2}),
           ("spiel", {"density": 0.05})]


@pytest.mark.parametrize(("method", "options"), MATCHED, ids=[m for m, _ in MATCHED])
def test_deltas_compute_as_on_the_dequantized_weights(folder: Path, method: str, options: dict) -> None:
    x = batch()
    model = nf4(folder)
    tuned = dt.attach(model, method, **options).train()
    randomize(tuned)
    reference = dt.attach(dequantized_copy(folder, model), method, **options).train()
    reference.load_delta_state_dict(tuned.delta_state_dict())
    out, expected = tuned(**x).logits, reference(**x).logits
    assert torch.allclose(out, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)
    loss_of(tuned, x).backward()
    loss_of(reference, x).backward()
    for (name, p), q in zip(tuned.deltas.named_parameters(), reference.deltas.parameters(), strict=True):
        if q.grad is not None:
            scale = q.grad.abs().max().item()
            assert torch.allclose(p.grad, q.grad, atol=1e-4 * scale + 1e-9, rtol=0), name


QUANTIZED_REFUSED = [n for n in registry.names() if registry.get(n).quantized_refusal() is not None]


@pytest.mark.parametrize("method", QUANTIZED_REFUSED)
def test_other_methods_are_refused_in_one_line_before_anything_changes(folder: Path, method: str) -> None:
    model = nf4(folder)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(dt.DeltatuneError) as caught:
        dt.attach(model, method)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{method} cannot train on this quantized base (nf4 ")
    assert registry.get(method).quantized_refusal() in message and "load the base without quantize" in message
    assert base_hooks(model) == 0 and [p.requires_grad for p in model.parameters()] == flags


def test_a_method_over_a_base_method_follows_it(folder: Path) -> None:
    assert registry.get("mezo").quantized_refusal({"base": "lora"}) is None
    assert "base method 'full'" in registry.get("ist").quantized_refusal({"base": "full"})
    with pytest.raises(dt.DeltatuneError, match="perturbs and steps the base weights in place"):
        dt.attach(nf4(folder), "mezo")


# -- the artifact: fingerprint and base
# --------------------------------------------------------------------------
def test_save_load_records_the_quantization_and_refuses_another(folder: Path, tmp_path: Path) -> None:
    x = batch()
    tuned = dt.attach(nf4(folder), "lora", r=4, alpha=8)
    randomize(tuned)
    tuned.save(tmp_path / "art")
    head = api.inspect(tmp_path / "art")["base"]["head"]
    assert head["quantization"]["scheme"] == "nf4" and head["quantization"]["double_quant"] is True
    # the verbs that load the base for an artifact load it quantized the same way
    base = models.load_base(str(folder), head)
    assert quantized.record(base)["scheme"] == "nf4"
    assert torch.equal(output_of(dt.load(base, tmp_path / "art"), x), output_of(tuned, x))
    for other, said in [(models.load(folder), "this base is not quantized"),
                        (models.load(folder, quantize="fp4"), "this base is fp4 (bitsandbytes"),
                        (nf4(folder, double_quant=False), "no double quantization")]:
        with pytest.raises(dt.DeltatuneError) as caught:
            dt.load(other, tmp_path / "art")
        message = str(caught.value)
        assert "\n" not in message and "quantized as nf4 (bitsandbytes, double quantization" in message
        assert said in message and "dt.models.load(name, quantize='nf4', double_quant=True" in message
        assert base_hooks(other) == 0
    # and the other way round: a delta of the full-precision base is refused on the quantized one
    plain = dt.attach(models.load(folder), "lora", r=4, alpha=8)
    assert "quantization" not in plain.fingerprint()["head"], "a plain base's fingerprint is as before"
    plain.save(tmp_path / "plain")
    with pytest.raises(dt.DeltatuneError, match="not quantized, this base is nf4 .*: load it without "
                                                "quantize"):
        dt.load(nf4(folder), tmp_path / "plain")


def test_cli_inspect_shows_the_quantization(folder: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from deltatune.cli.main import app

    dt.attach(nf4(folder), "lora", r=4, alpha=8).save(tmp_path / "art")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "art")])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "base quantization" in line)
    assert "nf4 (bitsandbytes" in row, result.output


# -- merging
# -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("scheme", "method", "options"), [
    ("nf4", "lora", {"r": 4, "alpha": 8}),
    ("nf4", "dora", {"r": 4, "alpha": 8, "dropout": 0.0}),
    ("nf4", "spiel", {"density": 0.05}),
    ("int8", "lora", {"r": 4, "alpha": 8}),
], ids=["nf4-lora", "nf4-dora", "nf4-spiel", "int8-lora"])
def test_merge_dequantizes_to_a_plain_model_and_unmerge_restores(folder: Path, scheme: str, method: str,
                                                                 options: dict) -> None:
    x = batch()
    model = models.load(folder, quantize=scheme)
    tuned = dt.attach(model, method, **options)
    randomize(tuned)
    unmerged = output_of(tuned, x)
    stored = {n: quantized.identity(m) for n, m in quantized.quantized_layers(model)}
    merged = tuned.merge()
    assert not quantized.is_quantized_model(merged) and not hasattr(merged.config, "quantization_config")
    assert not hasattr(merged, "hf_quantizer") and type(merged.model.layers[0].mlp.up_proj) is nn.Linear
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.float32, "the compute dtype"
    out = output_of(merged, x)
    err = (out - unmerged).abs().max().item()
    print(f"{scheme} {method}: merged (plain fp32) vs unmerged max |Δlogit| {err:.3g} "
          f"of {unmerged.abs().max():.3g}")
    # nf4 layers compute x·dequant(W)ᵀ: only float rounding differs; LLM.int8() also quantizes the activations
    tol = 1e-5 if scheme == "nf4" else 1e-2
    assert err <= tol * unmerged.abs().max().item()
    tuned.unmerge()
    layers = dict(quantized.quantized_layers(model))
    assert layers.keys() == stored.keys() and all(torch.equal(quantized.identity(layers[n]), b)
                                                  for n, b in stored.items())
    assert torch.equal(output_of(tuned, x), unmerged)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_merge_requantizes_within_the_scheme_bound(folder: Path, scheme: str) -> None:
    """``merge(quantize=...)`` quantizes W0' = dequant(W0) + ΔW again. Bounds: nf4 as in the dequantize test
    (half the largest NF4 code gap times each block's absmax, plus the double quantization's error on it);
    int8 (LLM.int8(): each row of the fp16-cast weight scaled to ±127) half a step plus the fp16 cast's
    rounding."""
    x = batch()
    tuned = dt.attach(nf4(folder), "lora", r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    randomize(tuned)
    unmerged = output_of(tuned, x)
    fp = {n: m.weight.detach().clone() for n, m in quantized.quantizable(tuned.merge())}
    plain = output_of(tuned.model, x)
    tuned.unmerge()
    requantized = tuned.merge(quantize=scheme)
    layers = quantized.quantized_layers(requantized)
    assert {n for n, _ in layers} == set(fp) and all(quantized.scheme_of(m) == scheme for _, m in layers)
    raw = bnbf.get_4bit_type("nf4", device="cpu")
    code = raw.sort().values
    half_gap = (code[1:] - code[:-1]).max().item() / 2
    for name, layer in layers:
        w, back = fp[name], quantized.dequantize(layer, torch.float32)
        if scheme == "nf4":  # the stored codes, decoded in plain torch (see the dequantize test)
            state = layer.weight.quant_state
            stored = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
            absmax = w.reshape(-1, 64).abs().amax(dim=1)
            bound = (absmax * half_gap + (absmax - stored).abs() + 1e-7)[:, None]
            assert bool(((stored_nf4(layer, raw, stored) - w.reshape(-1, 64)).abs() <= bound).all()), name
        else:
            step = w.abs().amax(dim=1, keepdim=True) / 127
            assert bool(((back - w).abs() <= step / 2 + w.abs() * 2**-10 + 1e-7).all()), name
    out = output_of(requantized, x)
    scale = unmerged.abs().max().item()
    print(f"merge(quantize={scheme!r}) vs unmerged nf4 + LoRA: max |Δlogit| "
          f"{(out - unmerged).abs().max():.3g}; "
          f"plain merge: {(plain - unmerged).abs().max():.3g} (max |logit| {scale:.3g})")
    with pytest.raises(dt.DeltatuneError, match="cannot be undone"):
        tuned.unmerge()


def test_deltatune_merge_writes_a_plain_model(folder: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    x = batch()
    tuned = dt.attach(nf4(folder), "lora", r=4, alpha=8)
    randomize(tuned)
    tuned.save(tmp_path / "art")
    api.merge(tmp_path / "art", out=tmp_path / "merged")  # loads the base quantized as the artifact records
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not quantized.is_quantized_model(merged)
    expected = output_of(tuned, x)
    assert torch.allclose(output_of(merged, x), expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


# -- PEFT
# --------------------------------------------------------------------------------------------------------
def test_peft_export_and_import_on_the_nf4_base(folder: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    from deltatune.interop.peft import export_peft, import_peft

    x = batch()
    tuned = dt.attach(nf4(folder), "lora", r=4, alpha=8)
    randomize(tuned)
    export_peft(tuned, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(nf4(folder), str(tmp_path / "peft")).eval()
    assert "bnb" in type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__
    assert torch.allclose(output_of(theirs, x), output_of(tuned, x), atol=1e-6, rtol=0)
    # an adapter PEFT trained (here: random B) on the bitsandbytes base imports and computes the same
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(nf4(folder), config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = import_peft(nf4(folder), tmp_path / "adapter")
    assert torch.allclose(output_of(ours, x), output_of(peft_model, x), atol=1e-6, rtol=0)


# -- the run config: model: {name, quantize} ------------------------------------------------------------------------
def test_a_run_config_trains_on_a_quantized_base(tmp_path: Path, smol_tok) -> None:
    """``model: {name: FOLDER, quantize: nf4}`` in a run config: the run loads the base quantized, trains LoRA on it,
    and the artifact records the quantization; the mapping's bad keys and values are refused with the others."""
    from conftest import write_sentiment_jsonl
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune.train.config import parse_config

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(smol_tok), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=True)).save_pretrained(tmp_path / "base")
    smol_tok.save_pretrained(tmp_path / "base")
    write_sentiment_jsonl(tmp_path / "data.jsonl")
    config = {"model": {"name": str(tmp_path / "base"), "quantize": "nf4"},
              "data": {"path": str(tmp_path / "data.jsonl"), "task": "classification", "max_length": 16},
              "method": {"name": "lora", "r": 4}, "train": {"steps": 2, "batch_size": 4, "lr": 1e-3},
              "output": str(tmp_path / "run")}
    assert parse_config(config).quantization == {"quantize": "nf4"}
    summary = dt.train(config)
    meta = json.loads((tmp_path / "run" / "deltatune.json").read_text())
    assert meta["fingerprint"]["head"]["quantization"]["scheme"] == "nf4", meta["fingerprint"]["head"]
    # deltatune eval loads the base quantized as the artifact records: the run's own final evaluation again
    again = dt.eval(str(tmp_path / "run"), config["data"], batch_size=4)
    final = summary["final"]
    assert again["accuracy"] == final["eval_accuracy"], (again, final)
    assert again["loss"] == pytest.approx(final["eval_loss"], rel=1e-4), (again, final)
    bad = {**config, "model": {"name": "x", "quantize": "nf3", "double_quant": "yes", "bits": 4}}
    with pytest.raises(dt.DeltatuneError) as e:
        parse_config(bad)
    for part in ("model.quantize='nf3'", "model.double_quant='yes'", "unknown key model.bits"):
        assert part in str(e.value), (part, str(e.value))
    # a mapping with the name alone is the full-precision base (examples/lora-loftq.yaml writes it so); options of a
    # quantized base without quantize are named
    plain = parse_config({**config, "model": {"name": "x"}})
    assert plain.model == "x" and plain.quantization is None
    with pytest.raises(dt.DeltatuneError, match=r"model.double_quant apply to a quantized base: add model.quantize"):
        parse_config({**config, "model": {"name": "x", "double_quant": True}})


def test_transformers_trainer_trains_a_delta_on_a_quantized_base(folder: Path, tmp_path: Path) -> None:
    """QLoRA through ``transformers.Trainer``: it refuses a quantized model that carries no adapters; a Tuned carries
    its delta, so ``DeltaTuneTrainer`` (and a plain Trainer with the callback) trains it, and only the delta moves."""
    from transformers import Trainer, TrainingArguments

    from deltatune.train.hf import DeltaTuneCallback, DeltaTuneTrainer

    g = torch.Generator().manual_seed(3)
    rows = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 100, (8, 12), generator=g)]
    for trainer_cls in (DeltaTuneTrainer, Trainer):
        tuned = dt.attach(nf4(folder), "lora", r=4)
        base = {name: quantized.identity(m).clone() for name, m in quantized.quantized_layers(tuned.model)}
        before = {k: v.clone() for k, v in tuned.delta_state_dict().items()}
        args = TrainingArguments(output_dir=str(tmp_path / trainer_cls.__name__), max_steps=2,
                                 per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
                                 save_strategy="no", disable_tqdm=True, remove_unused_columns=False)
        extra = {} if trainer_cls is DeltaTuneTrainer else {"callbacks": [DeltaTuneCallback(tuned)]}
        trainer_cls(model=tuned, args=args, train_dataset=rows, **extra).train()
        after = tuned.delta_state_dict()
        assert any(not torch.equal(after[k], before[k]) for k in before), trainer_cls
        assert all(torch.equal(quantized.identity(m), base[name]) for name, m in quantized.quantized_layers(tuned.model))
    assert not getattr(tuned.model, "_hf_peft_config_loaded", False)  # the model's own flag stays unset


def test_the_cpu_repacking_fast_path_is_kept_off() -> None:
    """bitsandbytes' AVX-512 BF16 CPU path repacks a 4-bit weight in place at its first inference forward (another
    byte layout, bf16 absmax). Every 4-bit layer deltatune makes or loads has it switched off; a layer already
    repacked is refused in one line (bitsandbytes' inverse does not give the weights back)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    torch.manual_seed(0)
    layer = quantized.quantize_linear(torch.randn(64, 128) * 0.05, None, "nf4", double_quant=False)
    assert layer.support_avx512bf16_for_cpu is False
    before = layer.weight.data.clone()
    with torch.no_grad():
        layer.eval()(torch.randn(2, 128))  # an inference forward: the fast path would repack here
    assert torch.equal(layer.weight.data, before)
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                layer.weight.quant_state)
    with pytest.raises(dt.DeltatuneError, match="repacked by bitsandbytes' CPU inference path"):
        quantized.keep_standard_layout(layer)


def test_loading_a_quantized_base_prints_no_advice_about_a_kernel_deltatune_does_not_use(tmp_path: Path) -> None:
    """On a CPU with AVX-512 BF16 (this project's), importing bitsandbytes warns that the fused kernel of its repacked
    inference path could not be fetched from the Hub. deltatune turns that path off, so loading a quantized model
    through it says nothing of the kind (elsewhere the warning never fires and this holds trivially)."""
    import subprocess
    import sys

    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    code = f"import deltatune as dt; dt.models.load({str(folder)!r}, quantize='nf4')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert "gemm_4bit_forward" not in done.stderr and "pip install kernels" not in done.stderr
