"""LoHa and LoKr against Hugging Face PEFT 0.21.2 (the reference): the factors each layer gets (LoKr's factorisation,
whole or factored W1 / W2), logits and gradients with PEFT's (randomised) trained factors copied in, PEFT's rank and
module dropout drawn in the same order, merge / unmerge, and PEFT adapters round-tripped through import and export.

Every comparison runs in fp32 with tolerances scaled by the compared values; each case checks that the delta moves
the logits well above them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import batch, close, eval_logits, peft_round_trip, tiny_bert, tiny_gpt2, tiny_llama
from conftest import randomised_peft as shared_randomised_peft

import deltatune as dt
from deltatune.methods._lycoris import LycorisDelta
from deltatune.methods.lokr import factorization

peft = pytest.importorskip("peft")
from peft import LoHaConfig, LoKrConfig  # noqa: E402
from peft.tuners.lokr.layer import factorization as peft_factorization  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits

MAKERS = {"llama": tiny_llama, "bert": tiny_bert}
PREFIX = {"loha": "hada_", "lokr": "lokr_"}


def randomised_peft(base: nn.Module, config, seed: int = 3, scale: float = 0.1) -> nn.Module:
    """init_weights=False: no tensor is zero, so a smaller move off the init suffices."""
    return shared_randomised_peft(base, config, seed, scale)


def copy_from_peft(tuned: dt.Tuned, reference: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's factors into deltatune's forms (same names after PEFT's prefix, same shapes); (ours, PEFT's) pairs."""
    pairs = []
    prefix = PREFIX[tuned.method.name]
    with torch.no_grad():
        for name, form in tuned.forms().items():
            if not isinstance(form, LycorisDelta):
                continue
            module = name.rsplit(".", 1)[0]
            for t, mine in form.named_parameters():
                ref = reference.get_parameter(f"base_model.model.{module}.{prefix}{t}.default")
                mine.copy_(ref)
                pairs.append((mine, ref))
    return pairs


def peft_structure(model: nn.Module, prefix: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """PEFT's adapter tensors: module path -> name (without prefix and adapter) -> shape."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, p in model.named_parameters():
        if f".{prefix}" in name:
            module, rest = name.removeprefix("base_model.model.").split(f".{prefix}")
            out.setdefault(module, {})[rest.removesuffix(".default")] = tuple(p.shape)
    return out


CASES = {
    "loha-default": ("llama", "loha", {}),
    "loha-patterns": ("llama", "loha", {"r": 4, "alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"],
                                        "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
    "loha-bert": ("bert", "loha", {"r": 2, "target_modules": ["query", "value", "dense"]}),
    "lokr-default": ("llama", "lokr", {}),
    "lokr-decompose-both": ("llama", "lokr", {"r": 2, "decompose_both": True,
                                              "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}),
    "lokr-factor": ("llama", "lokr", {"r": 1, "alpha": 3, "decompose_factor": 4, "target_modules": ["k_proj", "o_proj"]}),
    "lokr-bert": ("bert", "lokr", {"r": 16, "alpha": 4, "target_modules": ["query", "key", "dense"]}),  # W2 whole
}
OPTION = {"target_modules": "targets"}  # PEFT's name -> deltatune's where they differ


def both(case: str) -> tuple[nn.Module, nn.Module, dt.Tuned]:
    arch, method, options = CASES[case]
    base = MAKERS[arch]()
    config_cls = LoHaConfig if method == "loha" else LoKrConfig
    reference = randomised_peft(base, config_cls(**options, init_weights=False))
    tuned = dt.attach(copy.deepcopy(base), method, **{OPTION.get(k, k): v for k, v in options.items()}, init=False)
    return base, reference, tuned


@pytest.mark.parametrize("case", list(CASES))
def test_the_factors_are_peft_s(case: str) -> None:
    _, reference, tuned = both(case)
    prefix = PREFIX[tuned.method.name]
    ours = {n.rsplit(".", 1)[0]: {t: tuple(p.shape) for t, p in f.named_parameters()}
            for n, f in tuned.forms().items()}
    assert ours == peft_structure(reference, prefix)
    assert tuned.num_trainable() == sum(p.numel() for p in reference.parameters() if p.requires_grad)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_gradients_and_merge_match_peft(case: str) -> None:
    base, reference, tuned = both(case)
    x = batch()
    pairs = copy_from_peft(tuned, reference)
    ours, theirs = tuned(**x).logits, reference(**x).logits
    assert close(ours, theirs), (ours - theirs).abs().max()
    assert (theirs - eval_logits(base, x)).abs().max() > 1e-2 * theirs.abs().max(), "the delta must move the logits"
    ours.float().pow(2).mean().backward()
    theirs.float().pow(2).mean().backward()
    for mine, ref in pairs:
        assert close(mine.grad, ref.grad, rtol=1e-4), (mine.grad - ref.grad).abs().max()
    # merged = unmerged, and PEFT's own merge gives the same weights
    w0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
    unmerged = eval_logits(tuned, x)
    merged = tuned.merge()
    assert close(eval_logits(merged, x), unmerged)
    peft_merged = reference.merge_and_unload().state_dict()
    for k, v in merged.state_dict().items():
        assert close(v, peft_merged[k]), k
    tuned.unmerge()
    assert close(eval_logits(tuned, x), unmerged)
    tuned.detach()
    for k, v in tuned.model.state_dict().items():
        assert torch.allclose(v, w0[k], rtol=1e-6, atol=1e-6 * float(w0[k].abs().max())), k


def test_a_fresh_delta_starts_at_the_base() -> None:
    base = tiny_llama()
    x = batch()
    for method, options in (("loha", {}), ("lokr", {}), ("lokr", {"init": "lycoris"}),
                            ("lokr", {"r": 2, "decompose_both": True})):
        tuned = dt.attach(copy.deepcopy(base), method, **options)
        assert torch.equal(eval_logits(tuned, x), eval_logits(base, x)), (method, options)


@pytest.mark.parametrize(("method", "extra"), [("loha", {}), ("lokr", {}), ("lokr", {"rank_dropout_scale": True})])
def test_rank_and_module_dropout_draw_as_peft_does(method: str, extra: dict) -> None:
    """In training, PEFT draws the module-dropout coin and then the rank-dropout rows for each layer, in that order:
    from the same seed, deltatune drops the same rows and skips the same layers (and rescales the kept rows as PEFT:
    LoHa always, LoKr with rank_dropout_scale)."""
    options = {"rank_dropout": 0.5, "module_dropout": 0.3}
    config = (LoHaConfig if method == "loha" else LoKrConfig)(**options, **extra, init_weights=False)
    base = tiny_llama()
    reference = randomised_peft(base, config)
    tuned = dt.attach(copy.deepcopy(base), method, **options, **extra, init=False)
    copy_from_peft(tuned, reference)
    x = batch()
    reference.train()
    tuned.train()
    outputs = []
    with torch.no_grad():
        for seed in (0, 1):
            torch.manual_seed(seed)
            theirs = reference(**x).logits
            torch.manual_seed(seed)
            outputs.append(tuned(**x).logits)
            assert close(outputs[-1], theirs), (outputs[-1] - theirs).abs().max()
    assert not close(outputs[0], outputs[1], 1e-3), "the draws must change the output"
    assert close(eval_logits(tuned, x), eval_logits(reference, x)), "no dropout in eval mode"


@pytest.mark.parametrize("dimension", [1, 7, 12, 32, 64, 96, 127, 128, 576, 1536])
@pytest.mark.parametrize("factor", [-1, 2, 4, 5, 16])
def test_factorization_is_peft_s(dimension: int, factor: int) -> None:
    assert factorization(dimension, factor) == peft_factorization(dimension, factor)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_a_gpt2_conv1d_target_is_refused(method: str) -> None:
    with pytest.raises(dt.DeltatuneError, match="nn.Linear"):
        dt.attach(tiny_gpt2(), method, targets=["c_attn"])


# -- PEFT adapters both ways ---------------------------------------------------------------------------------------
ROUND_TRIPS = {
    "loha-llama": ("llama", lambda: LoHaConfig(rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 3},
                                               init_weights=False)),
    "loha-bert-cls": ("bert", lambda: LoHaConfig(r=2, task_type="SEQ_CLS", init_weights=False)),
    "lokr-llama": ("llama", lambda: LoKrConfig(r=2, decompose_both=True, rank_dropout=0.1, init_weights=False)),
    "lokr-bert-cls": ("bert", lambda: LoKrConfig(r=2, task_type="SEQ_CLS", decompose_factor=4,
                                                 modules_to_save=["pooler.dense"], init_weights=False)),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_peft_adapters_import_and_export_back(case: str, tmp_path: Path) -> None:
    arch, config = ROUND_TRIPS[case]
    base = MAKERS[arch]()
    x = batch()
    reference = randomised_peft(base, config())
    with torch.no_grad():  # the modules PEFT trains fully: trained values too
        for n, p in reference.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.05)
    peft_round_trip(base, reference, type(config()), case.split("-")[0], x, tmp_path)


def test_an_adapter_whose_structure_differs_is_refused(tmp_path: Path) -> None:
    """A LoKr adapter whose config gives another split than its tensors (a hand-edited r) names the module."""
    base = tiny_llama()
    randomised_peft(base, LoKrConfig(r=2, decompose_both=True, init_weights=False)).save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 64}))
    with pytest.raises(dt.DeltatuneError, match="holds .*its config gives another structure"):
        dt.import_peft(base, tmp_path / "peft")
