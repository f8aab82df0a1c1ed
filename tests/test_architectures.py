"""The architecture table (deltatune/core/architectures.py) against tiny random models of every row: where blocks
and sublayers are, and each method of ``METHODS`` through attach -> a training step changes the output -> save/load
gives the same output -> detach restores the base exactly; every (method, architecture) pair that cannot work is
listed in ``UNSUPPORTED`` and must fail with one DeltatuneError line before anything is attached."""

from __future__ import annotations

import pytest
import torch
from conftest import architecture_batch, loss_of, output_of, tiny_architecture, tiny_llama

import deltatune as dt
from deltatune.core import architectures, registry
from deltatune.core.forms.attention import attention_modules
from deltatune.core.forms.module import blocks, sublayers
from deltatune.errors import DeltatuneError
from deltatune.methods._lowrank import default_targets

pytestmark = pytest.mark.usefixtures("one_thread")

# one tiny model per model type of the table (a whole run of this file takes ~15 s on 2 cores)
ARCHITECTURES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "qwen3_moe", "mixtral",
                 "gpt2", "gpt_neox", "bert", "roberta", "t5", "mt5", "bart", "mbart", "vit", "swin",
                 "audio-spectrogram-transformer"]
METHODS = {
    "lora": {"r": 2, "alpha": 4},
    "ia3": {},
    "adapter": {"r": 4},
    "parallel_adapter": {"r": 4, "sublayers": ["attention", "cross_attention", "ffn"]},
    "prefix": {"length": 3, "reparam": False},
    "prompt": {"length": 3},
}
# options a row needs besides the method's (where IA³ has no default targets: see UNSUPPORTED)
OPTIONS = {("ia3", "qwen3_moe"): {"targets": ["k_proj", "v_proj"], "feedforward": []},
           ("ia3", "mixtral"): {"targets": ["k_proj", "v_proj"], "feedforward": []}}
# (method, architecture) -> what the one-line error says
UNSUPPORTED = {
    ("prefix", "swin"): "prefix cannot be used on swin: its stages differ in width",
    # their FFN is fused 3-D expert tensors, no Linear to scale (PEFT's default for mixtral names w2, gone in transformers 5)
    ("ia3", "qwen3_moe"): "no default IA³ targets",
    ("ia3", "mixtral"): "no default IA³ targets",
}
# soft-token prompts need token embeddings and a single input stack
UNSUPPORTED.update({("prompt", a): "encoder-decoder" for a in ("t5", "mt5", "bart", "mbart")})
UNSUPPORTED.update({("prompt", a): "takes pixels" for a in ("vit", "swin")})
UNSUPPORTED[("prompt", "audio-spectrogram-transformer")] = "takes spectrogram"
PAIRS = [(m, a) for a in ARCHITECTURES for m in METHODS]
SUPPORTED = [pytest.param(m, a, id=f"{m}-{a}") for m, a in PAIRS if (m, a) not in UNSUPPORTED]


def test_every_architecture_has_a_row() -> None:
    """A model type added to the table needs its tiny model here (conftest.tiny_architecture) and a row above."""
    assert set(ARCHITECTURES) == set(architectures.TABLE)


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize(("method", "arch"), SUPPORTED)
def test_attach_train_save_load_detach(method: str, arch: str, tmp_path) -> None:
    model = tiny_architecture(arch)
    x = architecture_batch(model)
    base = output_of(model, x)
    options = {**METHODS[method], **OPTIONS.get((method, arch), {})}
    torch.manual_seed(0)
    tuned = dt.attach(model, method, **options)
    fresh = output_of(model, x)
    m = registry.get(method)
    if m.has("starts_at_base", registry.make_config(m, dict(options))):
        assert torch.equal(fresh, base), "a fresh delta starts at the base model"
    params = tuned.trainable_parameters()
    assert params
    opt = torch.optim.Adam(params, lr=1e-2)
    loss_of(model, x).backward()
    opt.step()
    trained = output_of(model, x)
    scale = float(base.abs().max())
    assert (trained - fresh).abs().max() > 1e-6 * scale, "one training step changes the output"

    tuned.save(tmp_path / "delta")
    other = tiny_architecture(arch)
    loaded = dt.load(other, tmp_path / "delta")
    assert torch.equal(output_of(other, x), trained), "a loaded delta gives the saved one's output"
    loaded.detach()
    tuned.detach()
    assert torch.equal(output_of(model, x), base), "detaching restores the base model"
    assert torch.equal(output_of(other, x), base)
    assert _hooks(model) == 0 and model.config._attn_implementation in ("sdpa", "eager")


@pytest.mark.parametrize(("method", "arch"), [pytest.param(m, a, id=f"{m}-{a}") for m, a in UNSUPPORTED])
def test_unsupported_pairs_fail_in_one_line_before_attaching(method: str, arch: str) -> None:
    model = tiny_architecture(arch)
    x = architecture_batch(model)
    base = output_of(model, x)
    implementation = model.config._attn_implementation
    with pytest.raises(DeltatuneError) as err:
        dt.attach(model, method, **METHODS[method])
    text = str(err.value)
    assert "\n" not in text
    assert UNSUPPORTED.get((method, arch), "") in text
    assert _hooks(model) == 0 and model.config._attn_implementation == implementation
    assert not any("_deltatune_kv_hook" in m.__dict__ for m in model.modules())
    assert torch.equal(output_of(model, x), base), "a refused method leaves the model as it was"


# ---------------------------------------------------------------- the table's structure


@pytest.mark.parametrize(("arch", "n_blocks", "cross"), [
    ("t5", 4, {2, 3}), ("bart", 4, {2, 3}), ("swin", 4, set()), ("llama", 2, set()), ("bert", 2, set()),
    ("qwen3_moe", 2, set()), ("mixtral", 2, set()),
])
def test_blocks_span_every_stack_with_one_index(arch: str, n_blocks: int, cross: set[int]) -> None:
    model = tiny_architecture(arch)
    found = blocks(model)
    assert len(found) == n_blocks and len({id(b) for _, b in found}) == n_blocks
    assert {s.block for s in sublayers(model, "cross_attention")} == cross
    for kind in ("attention", "ffn"):
        sites = sublayers(model, kind)
        assert [s.block for s in sites] == list(range(n_blocks))
        assert all(dict(model.named_modules())[s.name] is s.writes for s in sites)
    if arch in ("t5", "bart"):
        assert found[0][0].split(".")[-3] == "encoder" and found[-1][0].split(".")[-3] == "decoder"


def test_swin_adapters_take_each_stages_width() -> None:
    model = tiny_architecture("swin")
    tuned = dt.attach(model, "adapter", r=4)
    widths = [f.bottleneck.down.in_features for f in tuned.forms().values()]
    assert sorted(set(widths)) == [16, 32] and len(widths) == 8


def test_moe_ffn_is_the_sparse_block_as_a_whole() -> None:
    for arch in ("qwen3_moe", "mixtral"):
        model = tiny_architecture(arch)
        assert all(type(s.writes).__name__.endswith("SparseMoeBlock") for s in sublayers(model, "ffn"))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "gpt_neox"])
def test_the_generic_fallback_finds_what_the_table_says(arch: str, monkeypatch) -> None:
    """A model the table lacks gets today's name-based guess: on Llama / GPT-2 / BERT blocks it agrees with the table."""
    model = tiny_architecture(arch)
    table = ([(n, id(b)) for n, b in blocks(model)],
             {k: [(s.name, id(s.reads)) for s in sublayers(model, k)] for k in ("attention", "ffn")},
             [id(m) for m in attention_modules(model)])
    monkeypatch.setattr(architectures, "TABLE", {})
    assert architectures.of(model) is architectures.GENERIC
    generic = ([(n, id(b)) for n, b in blocks(model)],
               {k: [(s.name, id(s.reads)) for s in sublayers(model, k)] for k in ("attention", "ffn")},
               [id(m) for m in attention_modules(model)])
    assert generic == table


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_table_projections_agree_with_the_default_lora_targets(arch: str) -> None:
    model = tiny_architecture(arch)
    roles = architectures.projections(model)
    chosen = roles["query"] + roles["value"] if roles["query"] else roles["qkv"]
    selected = {n for n, _ in model.named_modules() if any(n == p or n.endswith("." + p) for p in default_targets(model))}
    assert selected == set(chosen)


def test_lora_default_targets_come_from_the_table_where_names_say_nothing(monkeypatch) -> None:
    model = tiny_architecture("t5")
    from deltatune.methods import _lowrank

    monkeypatch.setattr(_lowrank, "_attention_projections", lambda model: {})  # nothing recognisable by name
    assert default_targets(model) == ["q", "v"]


def test_a_model_without_blocks_names_the_supported_architectures() -> None:
    with pytest.raises(DeltatuneError, match="t5, vit") as err:
        blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert "\n" not in str(err.value)


def test_t5_prefix_reaches_every_attention_through_each_stacks_config() -> None:
    """T5's stacks keep their own copies of the config: the prefix switches them all (and back), and its keys
    enter self- and cross-attention of both stacks, with T5's relative position bias padded for them."""
    model = tiny_architecture("t5")
    x = architecture_batch(model)
    base = output_of(model, x)
    tuned = dt.attach(model, "prefix", length=2, reparam=False)
    assert len(tuned.forms()) == 6  # 2 encoder self, 2 decoder self, 2 cross
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "model_type")}
    assert len(configs) >= 3 and all(c._attn_implementation == "deltatune_sdpa" for c in configs.values())
    assert not torch.equal(output_of(model, x), base)
    tuned.detach()
    assert all(c._attn_implementation == "sdpa" for c in configs.values())
    assert torch.equal(output_of(model, x), base)


def test_the_text_model_check_says_why_in_one_line() -> None:
    for arch, words in [("vit", "takes pixels"), ("t5", "encoder-decoder"), ("swin", "use an adapter")]:
        with pytest.raises(DeltatuneError, match=words):
            architectures.check_text_model(tiny_architecture(arch), "prompt")
    architectures.check_text_model(tiny_llama(), "prompt")


def test_t5_prefix_agrees_between_eager_and_sdpa_attention() -> None:
    """T5 adds its relative position bias to the scores in both implementations: padded for the prefix's keys
    alike, the two compute the same attention."""
    outputs = []
    for implementation in ("eager", "sdpa"):
        model = tiny_architecture("t5")
        model.set_attn_implementation(implementation)
        torch.manual_seed(0)
        dt.attach(model, "prefix", length=2, reparam=False)
        outputs.append(output_of(model, architecture_batch(model)))
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-5 * float(outputs[1].abs().max()))
