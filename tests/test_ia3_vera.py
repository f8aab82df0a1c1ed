"""(IA)³ and VeRA against Hugging Face PEFT 0.21.2 (the reference): the modules each adapts by default, logits and
gradients with PEFT's (randomised) trained tensors copied in, merge / unmerge, VeRA's shared projections drawn from the
seed exactly as PEFT draws them, and PEFT adapters round-tripped through import and export (Python and CLI).

Every comparison runs in fp32 with tolerances scaled by the compared values; each case checks that the delta moves
the logits well above them, so a dropped or mis-scaled tensor shows.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import (
    VOCAB,
    batch,
    close,
    eval_logits,
    peft_round_trip,
    randomised_peft,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import deltatune as dt
from deltatune.core.forms.scaling import ScaledBias, Scaling
from deltatune.methods.vera import Vera

peft = pytest.importorskip("peft")
from peft import IA3Config, PeftModel, VeraConfig, get_peft_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits


# -- helpers -------------------------------------------------------------------------------------------------------
def gpt2_with_biases(seed: int = 0) -> nn.Module:
    """GPT-2 initialises biases to zero: random ones, so that (IA)³'s scaling of an output bias shows."""
    model = tiny_gpt2(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


MAKERS = {"llama": tiny_llama, "gpt2": gpt2_with_biases, "bert": tiny_bert}




def peft_tensor(model: nn.Module, module: str, name: str) -> torch.nn.Parameter:
    return model.get_parameter(f"base_model.model.{module}.{name}.default")


OURS_TO_PEFT = {Scaling: {"scale": "ia3_l"}, Vera: {"lambda_b": "vera_lambda_b", "lambda_d": "vera_lambda_d"}}


def copy_from_peft(tuned: dt.Tuned, reference: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's adapter tensors into deltatune's forms; the (ours, PEFT's) parameter pairs."""
    pairs = []
    with torch.no_grad():
        for name, form in tuned.forms().items():
            for ours, theirs in OURS_TO_PEFT.get(type(form), {}).items():
                mine, ref = getattr(form, ours), peft_tensor(reference, name.rsplit(".", 1)[0], theirs)
                mine.copy_(ref.reshape(mine.shape))
                pairs.append((mine, ref))
    return pairs


def check_parity(tuned: dt.Tuned, reference: nn.Module, base: nn.Module, x: dict[str, torch.Tensor]) -> None:
    """Logits, gradients of every trained tensor on one backward, merged = unmerged, unmerge restores W0."""
    pairs = copy_from_peft(tuned, reference)
    assert pairs, "no tensor was copied"
    ours, theirs = tuned(**x).logits, reference(**x).logits
    assert close(ours, theirs), (ours - theirs).abs().max()
    moved = (theirs - eval_logits(base, x)).abs().max()
    assert moved > 1e-2 * theirs.abs().max(), "the adapter must move the logits for the comparison to mean anything"
    ours.float().pow(2).mean().backward()
    theirs.float().pow(2).mean().backward()
    for mine, ref in pairs:
        assert close(mine.grad, ref.grad.reshape(mine.shape), rtol=1e-4), (mine.grad - ref.grad.reshape(mine.shape))
    w0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
    unmerged = eval_logits(tuned, x)
    merged = eval_logits(tuned.merge(), x)
    assert close(merged, unmerged)
    tuned.unmerge()
    assert close(eval_logits(tuned, x), unmerged)
    tuned.detach()
    for k, v in tuned.model.state_dict().items():
        assert torch.allclose(v, w0[k], rtol=1e-6, atol=1e-6 * float(w0[k].abs().max())), k


# -- (IA)³ ---------------------------------------------------------------------------------------------------------
def peft_ia3_layers(model: nn.Module) -> dict[str, bool]:
    """PEFT's (IA)³ layers: module path -> whether it scales the input (feedforward)."""
    from peft.tuners.ia3 import IA3Layer

    return {n.removeprefix("base_model.model."): m.is_feedforward for n, m in model.named_modules()
            if isinstance(m, IA3Layer)}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_ia3_adapts_peft_default_modules_and_starts_at_the_base(arch: str) -> None:
    base = MAKERS[arch]()
    task = "SEQ_CLS" if arch == "bert" else None
    reference = get_peft_model(copy.deepcopy(base), IA3Config(task_type=task))
    tuned = dt.attach(copy.deepcopy(base), "ia3")
    ours = {n.rsplit(".", 1)[0]: f.on_input for n, f in tuned.forms().items() if isinstance(f, Scaling)}
    assert ours == peft_ia3_layers(reference)
    # a module with a bias whose output is scaled gets the bias's form, the others none
    biased = {n.rsplit(".", 1)[0] for n, f in tuned.forms().items() if isinstance(f, ScaledBias)}
    assert biased == {m for m, on_input in ours.items() if not on_input and tuned.model.get_submodule(m).bias
                      is not None}
    assert tuned.num_trainable() == sum(p.numel() for p in reference.parameters() if p.requires_grad) - \
        sum(p.numel() for n, p in reference.named_parameters() if p.requires_grad and "classifier" in n)
    x = batch()
    assert torch.equal(eval_logits(tuned, x), eval_logits(base, x)), "vectors of ones leave the model as it is"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_ia3_matches_peft(arch: str) -> None:
    base = MAKERS[arch]()
    task = "SEQ_CLS" if arch == "bert" else None
    reference = randomised_peft(base, IA3Config(task_type=task, init_ia3_weights=False))
    tuned = dt.attach(copy.deepcopy(base), "ia3", init=False)
    if arch == "bert":  # the fresh head PEFT's SEQ_CLS trains: the same values on both sides
        tuned.model.classifier.load_state_dict(reference.base_model.model.classifier.modules_to_save.default.state_dict())
    check_parity(tuned, reference, base, batch())


def test_ia3_custom_targets_and_feedforward_follow_peft() -> None:
    base = tiny_llama()
    config = IA3Config(target_modules=["q_proj", "up_proj", "o_proj"], feedforward_modules=["up_proj", "o_proj"],
                       init_ia3_weights=False)
    reference = randomised_peft(base, config)
    tuned = dt.attach(copy.deepcopy(base), "ia3", targets=["q_proj", "up_proj", "o_proj"],
                      feedforward=["up_proj", "o_proj"])
    assert {n.rsplit(".", 1)[0]: f.on_input for n, f in tuned.forms().items()} == peft_ia3_layers(reference)
    check_parity(tuned, reference, base, batch())


def test_ia3_refuses_a_feedforward_name_no_target_has() -> None:
    with pytest.raises(dt.DeltatuneError, match=r"feedforward=\['down_prj'\] names no targeted module"):
        dt.attach(tiny_llama(), "ia3", feedforward=["down_prj"])


def test_ia3_beside_another_delta_adds_exactly_its_own_delta() -> None:
    """On a module another delta also changes, the scaling cannot multiply the whole output (it would scale the other
    delta too): it adds ΔW·x (+ Δb) itself. Composed with a LoRA on the same modules, the attached logits are the
    merged model's (W0 + ΔW_ia3 + ΔW_lora), and the scaling alone gives the same logits either way."""
    base = gpt2_with_biases()
    x = batch()
    ia3 = dt.attach(copy.deepcopy(base), "ia3", init=False)
    lora = dt.attach(copy.deepcopy(base), "lora", r=2, alpha=4, targets=["c_attn", "mlp.c_proj"], init=False)
    alone = eval_logits(ia3, x)
    # the additive path on its own (another hook on every module forces it) gives the multiplicative path's logits
    hooks = [f.sites[0][0].register_forward_hook(lambda m, a, o: o) for f in ia3.forms().values()]
    assert close(eval_logits(ia3, x), alone)
    for h in hooks:
        h.remove()
    both = dt.compose(copy.deepcopy(base), [ia3, lora])
    attached = eval_logits(both, x)
    assert not close(attached, alone, 1e-3), "the LoRA part must show"
    assert close(eval_logits(both.merge(), x), attached)


def test_ia3_merge_of_a_zero_scale_unmerges_exactly() -> None:
    tuned = dt.attach(tiny_llama(), "ia3")
    w0 = {k: v.detach().clone() for k, v in tuned.model.state_dict().items()}
    with torch.no_grad():
        for f in tuned.forms().values():
            f.scale.uniform_(-1, 1)
            f.scale[:3] = 0.0  # rows / columns a merge zeroes: division cannot bring them back
    tuned.merge()
    tuned.unmerge()
    tuned.detach()
    for k, v in tuned.model.state_dict().items():
        assert torch.allclose(v, w0[k], rtol=1e-6, atol=1e-6 * float(w0[k].abs().max())), k


# -- VeRA ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 7])
def test_vera_draws_peft_projections_from_the_seed(seed: int) -> None:
    base = tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]  # different in / out sizes: A and B take the largest of each
    reference = get_peft_model(copy.deepcopy(base), VeraConfig(r=16, projection_prng_key=seed, target_modules=targets))
    tuned = dt.attach(copy.deepcopy(base), "vera", r=16, seed=seed, targets=targets)
    shared = next(iter(tuned.forms().values())).shared
    assert torch.equal(shared.A, reference.base_model.vera_A["default"])
    assert torch.equal(shared.B, reference.base_model.vera_B["default"])
    assert shared.A.shape == (16, 64) and shared.B.shape == (32, 16)  # down_proj takes 64, q_proj gives 32
    assert all(f.shared is shared for f in tuned.forms().values()), "one pair, shared by every layer"
    x = batch()
    assert torch.equal(eval_logits(tuned, x), eval_logits(base, x)), "b = 0: a fresh delta is the base model"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_vera_matches_peft(arch: str) -> None:
    base = MAKERS[arch]()
    reference = randomised_peft(base, VeraConfig(r=8, projection_prng_key=5))
    tuned = dt.attach(copy.deepcopy(base), "vera", r=8, seed=5)
    check_parity(tuned, reference, base, batch())


def test_vera_artifact_holds_only_the_vectors_and_regenerates_the_projections(tmp_path: Path) -> None:
    base = tiny_llama()
    tuned = dt.attach(copy.deepcopy(base), "vera", r=16, seed=3)
    with torch.no_grad():
        for f in tuned.forms().values():
            f.lambda_b.normal_()
    x = batch()
    expected = eval_logits(tuned, x)
    tuned.save(tmp_path / "vera")
    stored = load_file(tmp_path / "vera" / "delta.safetensors")
    assert {k.rsplit(".", 1)[1] for k in stored} == {"lambda_b", "lambda_d"}, "A and B are never stored"
    assert sum(v.numel() for v in stored.values()) == tuned.num_trainable()
    assert dt.inspect(tmp_path / "vera")["config"]["seed"] == 3
    assert torch.equal(eval_logits(dt.load(copy.deepcopy(base), tmp_path / "vera"), x), expected)
    # a checkpoint's state dict (tuned.deltas) holds no projection either
    assert not [k for k in tuned.deltas.state_dict() if k.endswith((".A", ".B"))]


# -- PEFT adapters both ways ---------------------------------------------------------------------------------------
ROUND_TRIPS = {
    "ia3-llama": ("llama", lambda: IA3Config(init_ia3_weights=False)),
    "ia3-gpt2": ("gpt2", lambda: IA3Config(init_ia3_weights=False)),
    "ia3-bert-cls": ("bert", lambda: IA3Config(task_type="SEQ_CLS", init_ia3_weights=False)),
    "vera-llama": ("llama", lambda: VeraConfig(r=16, projection_prng_key=2)),  # save_projection: true (PEFT's)
    "vera-gpt2-bias": ("gpt2", lambda: VeraConfig(r=8, bias="vera_only")),
    "vera-bert-cls": ("bert", lambda: VeraConfig(r=8, task_type="SEQ_CLS", bias="all", save_projection=False)),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_peft_adapters_import_and_export_back(case: str, tmp_path: Path) -> None:
    arch, config = ROUND_TRIPS[case]
    base = MAKERS[arch]()
    x = batch()
    reference = randomised_peft(base, config())
    if "bias" in case:  # trained biases: PEFT saves them with the adapter
        with torch.no_grad():
            for n, p in reference.named_parameters():
                if p.requires_grad and n.endswith("bias"):
                    p.add_(0.1)
    config_back = peft_round_trip(base, reference, type(config()), case.split("-")[0], x, tmp_path)
    if config_back["peft_type"] == "VERA":
        assert config_back["save_projection"] is False and "base_model.vera_A" not in load_file(
            tmp_path / "back" / "adapter_model.safetensors")


@pytest.mark.parametrize(("method", "arch"), [("ia3", "gpt2"), ("vera", "llama")])
def test_export_as_a_lora_by_svd_at_full_rank_is_exact(method: str, arch: str, tmp_path: Path) -> None:
    """``rank=R``: each ΔW as a LoRA by truncated SVD (exact at full rank); (IA)³'s scaled biases travel as trained
    values, also on a GPT-2 Conv1D whose bias a parametrisation holds."""
    base = MAKERS[arch]()
    tuned = dt.attach(copy.deepcopy(base), method, init=False)
    x = batch()
    dt.export_peft(tuned, tmp_path / "svd", rank=64)
    config = json.loads((tmp_path / "svd" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not config["modules_to_save"], "every weight matrix became a LoRA layer"
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "svd").eval()
    expected = eval_logits(tuned, x)
    assert (expected - eval_logits(base, x)).abs().max() > 1e-2 * expected.abs().max()
    assert close(eval_logits(again, x), expected)


def test_vera_import_refuses_projections_the_seed_does_not_give(tmp_path: Path) -> None:
    base = tiny_llama()
    randomised_peft(base, VeraConfig(r=8)).save_pretrained(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] * 1.5
    save_file(tensors, weights)
    model = tiny_llama()
    with pytest.raises(dt.DeltatuneError, match="vera_A is not the projection projection_prng_key=0 gives"):
        dt.import_peft(model, tmp_path / "peft")
    assert not any(m._forward_hooks for m in model.modules()), "a refused adapter leaves the model as it was"


def test_cli_export_and_import_an_ia3_artifact(tmp_path: Path) -> None:
    from deltatune.cli.main import app

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    tuned = dt.attach(copy.deepcopy(base), "ia3", init=False)
    tuned.save(tmp_path / "art")
    runner = CliRunner()
    result = runner.invoke(app, ["export", "--format", "peft", str(tmp_path / "art"), "--out", str(tmp_path / "peft"),
                                 "--base", str(tmp_path / "base")])
    assert result.exit_code == 0, result.output
    x = {"input_ids": torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))}
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    assert close(eval_logits(peft_model, x), eval_logits(tuned, x))
    result = runner.invoke(app, ["import", "--format", "peft", str(tmp_path / "peft"), "--out", str(tmp_path / "back"),
                                 "--base", str(tmp_path / "base")])
    assert result.exit_code == 0, result.output
    assert dt.inspect(tmp_path / "back")["method"] == "ia3"
    assert close(eval_logits(dt.load(copy.deepcopy(base), tmp_path / "back"), x), eval_logits(tuned, x))
