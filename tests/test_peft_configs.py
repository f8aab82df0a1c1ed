"""PEFT's IA3Config, VeraConfig, LoHaConfig and LoKrConfig given to ``dt.attach``: each attaches as the deltatune
method of its type (``PeftFormat.config_fields``), adapts exactly the modules PEFT adapts with the same trainable
count, and with PEFT's randomised (trained) tensors copied in gives PEFT's logits; fields deltatune cannot honour are
refused in one error that names each, before anything is attached."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import batch, close, eval_logits, randomised_peft, tiny_llama

import deltatune as dt

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits

# (PEFT config, deltatune method, options the conversion must give): non-default fields of each type
CONFIGS = {
    "ia3-defaults": (lambda: peft.IA3Config(), "ia3", {"targets": None, "feedforward": None}),
    "ia3-lists": (lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj", "up_proj"],
                                         feedforward_modules=["down_proj", "up_proj"]),
                  "ia3", {"targets": ["down_proj", "k_proj", "up_proj", "v_proj"],
                          "feedforward": ["down_proj", "up_proj"]}),
    "ia3-all-linear-regex-ff": (lambda: peft.IA3Config(target_modules="all-linear", feedforward_modules=r".*mlp\..*"),
                                "ia3", {"feedforward": [r"re:.*mlp\..*"]}),
    "vera": (lambda: peft.VeraConfig(r=8, projection_prng_key=5, d_initial=0.2, vera_dropout=0.1,
                                     save_projection=False),
             "vera", {"r": 8, "seed": 5, "d_initial": 0.2, "dropout": 0.1}),
    "vera-all-linear-layers": (lambda: peft.VeraConfig(r=4, target_modules="all-linear", layers_to_transform=[0, 2]),
                               "vera", {"r": 4, "layers": [0, 2]}),
    "loha": (lambda: peft.LoHaConfig(r=2, alpha=4, rank_dropout=0.1, module_dropout=0.2, target_modules="all-linear",
                                     rank_pattern={"q_proj": 3}, alpha_pattern={"v_proj": 2}),
             "loha", {"r": 2, "alpha": 4, "rank_dropout": 0.1, "module_dropout": 0.2, "rank_pattern": {"q_proj": 3},
                      "alpha_pattern": {"v_proj": 2}}),
    "lokr": (lambda: peft.LoKrConfig(r=2, alpha=3, decompose_both=True, rank_dropout_scale=True,
                                     target_modules=["q_proj", "v_proj", "up_proj"], exclude_modules=["model.layers.1.mlp.up_proj"]),
             "lokr", {"r": 2, "alpha": 3, "decompose_both": True, "rank_dropout_scale": True,
                      "exclude": ["model.layers.1.mlp.up_proj"]}),
    # PEFT applies layers_to_transform only to a list of names: with a regular expression it is ignored
    "lokr-regex": (lambda: peft.LoKrConfig(r=1, decompose_factor=4, target_modules=r".*\.(q_proj|o_proj)",
                                           layers_to_transform=[0, 2]),
                   "lokr", {"r": 1, "decompose_factor": 4, "targets": [r"re:.*\.(q_proj|o_proj)"], "layers": None}),
}


def peft_modules(model: torch.nn.Module) -> set[str]:
    """The modules PEFT put an adapter layer on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_peft_config_attaches_as_peft_builds_it(case: str, tmp_path: Path) -> None:
    make, method, expected = CONFIGS[case]
    base = tiny_llama()
    reference = randomised_peft(base, make())
    tuned = dt.attach(copy.deepcopy(base), make())

    assert tuned.method.name == method
    for option, value in expected.items():
        assert getattr(tuned.method_config, option) == value, option
    modules = {n.rsplit(".", 1)[0] for n in tuned.forms()}
    assert modules == peft_modules(reference)
    assert tuned.num_trainable() == reference.get_nb_trainable_parameters()[0]

    # PEFT's trained tensors into the attached delta (through deltatune's import of the saved adapter)
    reference.save_pretrained(tmp_path / "peft")
    imported = dt.import_peft(copy.deepcopy(base), tmp_path / "peft")
    assert set(imported.forms()) == set(tuned.forms())
    for name, form in tuned.forms().items():
        form.load_stored(imported.forms()[name].stored_tensors())
    x = batch()
    expected_logits = eval_logits(reference, x)
    assert not close(expected_logits, eval_logits(base, x), rtol=1e-3), "the trained tensors must move the logits"
    assert close(eval_logits(tuned, x), expected_logits, rtol=1e-5)


def test_the_default_targets_are_peft_defaults_for_each_type() -> None:
    for config in (peft.IA3Config(), peft.VeraConfig(r=4), peft.LoHaConfig(), peft.LoKrConfig()):
        reference = peft.get_peft_model(tiny_llama(), copy.deepcopy(config))
        tuned = dt.attach(tiny_llama(), config)
        assert {n.rsplit(".", 1)[0] for n in tuned.forms()} == peft_modules(reference), type(config).__name__


@pytest.mark.parametrize(("config", "field"), [
    (lambda: peft.VeraConfig(r=4, inference_mode=True), "inference_mode=True"),
    (lambda: peft.IA3Config(inference_mode=True), "inference_mode=True"),
    (lambda: peft.LoHaConfig(layers_to_transform=[0], layers_pattern="self_attn"), "layers_pattern='self_attn'"),
    (lambda: peft.LoKrConfig(layers_to_transform=[1], layers_pattern="mlp"), "layers_pattern='mlp'"),
])
def test_a_field_deltatune_cannot_honour_is_refused_naming_it(config, field: str) -> None:
    model = tiny_llama()
    with pytest.raises(dt.DeltatuneError) as err:
        dt.attach(model, config())
    lines = str(err.value).splitlines()
    assert "cannot honour" in lines[0] and len(lines) == 2 and lines[1].strip().startswith(field), lines
    # nothing was attached: the model takes a delta as before
    assert dt.attach(model, "ia3").num_trainable() > 0


def test_every_field_deltatune_cannot_honour_is_named_in_one_error() -> None:
    config = peft.LoHaConfig(inference_mode=True, layers_to_transform=[0], layers_pattern="self_attn")
    with pytest.raises(dt.DeltatuneError) as err:
        dt.attach(tiny_llama(), config)
    lines = str(err.value).splitlines()
    assert len(lines) == 3 and {line.strip().split("=")[0] for line in lines[1:]} == {"inference_mode",
                                                                                        "layers_pattern"}


def test_a_peft_type_without_a_conversion_is_refused_in_one_line() -> None:
    with pytest.raises(dt.DeltatuneError) as err:
        dt.attach(tiny_llama(), peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj"]))
    message = str(err.value)
    assert "\n" not in message and "BOFTConfig" in message and "no deltatune conversion" in message
    for kind in ("LORA", "IA3", "VERA", "LOHA", "LOKR", "TRAINABLE_TOKENS"):
        assert kind in message
