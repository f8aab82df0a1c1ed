"""lora's ``init: eva`` (EVA, arXiv 2410.07170) against PEFT's ``tuners/lora/eva.py`` run on CPU on the same batches:
the per-layer ranks after the redistribution, A's rows (up to the sign of each component), the alpha adjustment; the
model at init is the base; a saved delta loads without data; PEFT round trips keep the logits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, close, eval_logits, peft_round_trip, tiny_llama

import deltatune as dt
from deltatune.errors import DeltatuneError
from deltatune.interop.peft import peft_config_options

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora.config import EvaConfig  # noqa: E402
from peft.tuners.lora.eva import initialize_lora_eva_weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def calibration(seed: int = 5, n: int = 4) -> list[dict[str, torch.Tensor]]:
    """Batches as a PEFT user's dataloader gives them: padding in the mask, the prompt's labels -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (4, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 12:] = 0
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def peft_eva(base: torch.nn.Module, batches: list, targets: list[str] = TARGETS, r: int = 4, **eva: object
             ) -> torch.nn.Module:
    from peft import get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=8, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(**eva))
    model = get_peft_model(copy.deepcopy(base), cfg, low_cpu_mem_usage=True)
    initialize_lora_eva_weights(model, dataloader=batches, show_progress_bar=False)
    return model.eval()


def peft_factors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, float]]:
    """module name -> (lora_A, scaling) of PEFT's EVA-initialised model."""
    return {n.removeprefix("base_model.model."): (m.lora_A["default"].weight.detach(), m.scaling["default"])
            for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


# PEFT whitens in place on a view of the shared PCA's components, so layers that share an input (q / k / v, gate / up)
# are divided once per sharing layer there; deltatune divides each once: whitening is compared on unshared inputs
WHITEN_TARGETS = ["o_proj", "down_proj"]


@pytest.mark.parametrize(("eva", "targets"), [({}, TARGETS), ({"rho": 1.0}, TARGETS),
                                              ({"whiten": True, "adjust_scaling_factors": False}, WHITEN_TARGETS),
                                              ({"use_label_mask": False, "tau": 0.95}, TARGETS)])
def test_ranks_and_components_are_peft(eva: dict, targets: list[str]) -> None:
    base, batches = tiny_llama(), calibration()
    theirs = peft_factors(peft_eva(base, batches, targets, **eva))
    tuned = dt.attach(copy.deepcopy(base), "lora", r=4, alpha=8, targets=targets, init="eva", eva={**eva, "data": batches})
    ours = {k.removesuffix(".weight"): f for k, f in tuned.forms().items()}
    assert {k: a.shape[0] for k, (a, _) in theirs.items()} == {k: f.A.shape[0] for k, f in ours.items()}
    ranks = {f.A.shape[0] for f in ours.values()}
    if eva.get("rho", 2.0) > 1.0:
        assert len(ranks) > 1, "the budget was redistributed"
    else:
        assert ranks == {4}
    assert sum(f.A.shape[0] for f in ours.values()) <= 4 * len(theirs) * 3  # the budget Σ r (shared layers repeat)
    for name, (a, scale) in theirs.items():
        form = ours[name]
        sign = torch.sign((form.A.detach() * a).sum(1, keepdim=True))
        assert close(form.A.detach() * sign, a), name
        assert form.scale == pytest.approx(scale, rel=1e-12)
        assert not form.B.detach().any()


def test_init_is_the_base_and_a_saved_delta_loads_without_data(tmp_path: Path) -> None:
    base, batches = tiny_llama(), calibration()
    x = batches[0]
    tuned = dt.attach(copy.deepcopy(base), "lora", r=4, alpha=8, targets=TARGETS, init="eva", eva={"data": batches})
    assert torch.equal(eval_logits(tuned, x), eval_logits(base, x))
    cfg = tuned.method_config
    assert cfg.eva["data"] is None and cfg.eva["calibration"]["batches"] == 4  # batches are not written
    with torch.no_grad():
        for form in tuned.forms().values():
            form.B.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    expected = eval_logits(tuned, x)
    tuned.save(tmp_path / "eva")
    meta = json.loads((tmp_path / "eva" / "deltatune.json").read_text())
    assert meta["config"]["init"] == "eva" and meta["config"]["rank_pattern"]
    loaded = dt.load(copy.deepcopy(base), tmp_path / "eva")
    assert torch.equal(eval_logits(loaded, x), expected)
    assert {k: f.A.shape for k, f in loaded.forms().items()} == {k: f.A.shape for k, f in tuned.forms().items()}


def test_rank_zero_layers_carry_no_lora() -> None:
    """A tiny budget against a large rho leaves some layers with no component: no LoRA there (PEFT removes them)."""
    base, batches = tiny_llama(), calibration()
    theirs = peft_factors(peft_eva(base, batches, r=1, rho=8.0))
    assert len(theirs) < 21
    tuned = dt.attach(copy.deepcopy(base), "lora", r=1, alpha=8, targets=TARGETS, init="eva",
                      eva={"rho": 8.0, "data": batches})
    ours = {k.removesuffix(".weight"): f for k, f in tuned.forms().items()}
    assert {k: f.A.shape[0] for k, f in ours.items()} == {k: a.shape[0] for k, (a, _) in theirs.items()}
    assert all(f.scale == pytest.approx(theirs[k][1]) for k, f in ours.items())
    zero = [k for k, r in tuned.method_config.rank_pattern.items() if r == 0]
    assert len(ours) + len(zero) == 21


def test_peft_eva_adapter_round_trip(tmp_path: Path) -> None:
    """A saved PEFT EVA adapter is a plain LoRA with its rank_pattern: import, export back, PEFT loads it."""
    base, batches = tiny_llama(), calibration()
    reference = peft_eva(base, batches)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    config = peft_round_trip(base, reference, LoraConfig, "lora", batches[1], tmp_path)
    assert config["init_lora_weights"] is True and len(set(config["rank_pattern"].values())) > 1


def test_peft_lora_config_converts_to_init_eva() -> None:
    base, batches = tiny_llama(), calibration()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
                     eva_config=EvaConfig(rho=1.5, tau=0.95))
    name, options = peft_config_options(cfg, base)
    assert name == "lora" and options["init"] == "eva"
    assert options["eva"] == {"rho": 1.5, "tau": 0.95, "use_label_mask": True, "label_mask_value": -100,
                              "whiten": False, "adjust_scaling_factors": True}
    with pytest.raises(DeltatuneError, match="eva.data"):  # PEFT passes the batches apart: so does deltatune
        dt.attach(copy.deepcopy(base), cfg)
    tuned = dt.attach(copy.deepcopy(base), name, **{**options, "eva": {**options["eva"], "data": batches}})
    theirs = peft_factors(peft_eva(base, batches, TARGETS, rho=1.5, tau=0.95))
    assert {k: a.shape[0] for k, (a, _) in theirs.items()} == {
        k.removesuffix(".weight"): f.A.shape[0] for k, f in tuned.forms().items()}
    with pytest.raises(DeltatuneError, match="eva_config"):
        peft_config_options(LoraConfig(target_modules=TARGETS, eva_config=EvaConfig()), base)


def test_bad_eva_options_are_refused() -> None:
    with pytest.raises(DeltatuneError, match="init='eva'"):
        dt.attach(tiny_llama(), "lora", eva={"rho": 2.0})
    with pytest.raises(DeltatuneError, match="rho"):
        dt.attach(tiny_llama(), "lora", init="eva", eva={"rho": 0.5, "data": "random"})
    with pytest.raises(DeltatuneError, match="no option 'rank'"):
        dt.attach(tiny_llama(), "lora", init="eva", eva={"rank": 2})
    with pytest.raises(DeltatuneError, match="eva.data"):
        dt.attach(tiny_llama(), "lora", init="eva")
    with pytest.raises(DeltatuneError, match="init='eva' is an option of the lora method"):
        dt.attach(tiny_llama(), "dora", init="eva")
