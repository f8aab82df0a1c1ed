"""``export --format peft --rank R``: any weight-side delta as a PEFT LoRA adapter by truncated SVD.

References: PEFT 0.21 itself (the exported folder is loaded with ``PeftModel.from_pretrained`` and its logits compared
with deltatune's), the delta's own ΔW (the adapter's B·A read back from the safetensors file), and Eckart–Young (the
error of the best rank-r approximation is the tail energy sqrt(Σ_{i>r} s_i²) of ΔW's singular values, computed here
independently with ``torch.linalg.svdvals``). Deltas get random values so that a dropped or mis-oriented tensor shows.
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
from conftest import tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PREFIX = "base_model.model."
REPORT = "export-report.json"


# -- helpers ------------------------------------------------------------------------------------------------------
def randomise(tuned: dt.Tuned, seed: int = 1, scale: float = 0.05) -> dt.Tuned:
    """Random values in every delta tensor: sparse values, LoRA B, in-place weights (after their W0 snapshot)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for form in tuned.forms().values():
            if hasattr(form, "snapshot"):  # an in-place dense form: the model's own tensor trains
                form.snapshot()
                form.weight.add_(torch.randn(form.weight.shape, generator=g) * scale)
            for attr in ("values", "B", "delta"):
                t = getattr(form, attr, None)
                if isinstance(t, nn.Parameter):
                    t.copy_(torch.randn(t.shape, generator=g) * scale * 2)
    return tuned.eval()


def ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits.float()


def peft_logits(base: nn.Module, folder: Path) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note on LoRA layers at a tied embedding, its FutureWarnings
        return logits(PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval())


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor) -> None:
    """Equal to float32 rounding (relative to the logits' scale), and the delta moved them far more than that."""
    tol = 1e-5 * ours.abs().max().item()
    assert (ours - theirs).abs().max().item() <= tol
    assert (ours - base).abs().max().item() > 1000 * tol


def delta_of(tuned: dt.Tuned) -> dict[str, torch.Tensor]:
    """ΔW per base tensor name (the sum of the forms on it), in float64."""
    names = {id(p): n.replace("parametrizations.", "").replace(".original", "")
             for n, p in tuned.model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for form in tuned.forms().values():
            key = names[id(form.base)]
            out[key] = out.get(key, 0) + form.delta_weight().double()
    return out


def lora_products(folder: Path) -> dict[str, torch.Tensor]:
    """scale · B·A per module as PEFT computes it (in the module's (out, in) orientation), from the files."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    out = {}
    for module in config["target_modules"]:
        key = PREFIX + module
        a = tensors.get(f"{key}.lora_A.weight", tensors.get(f"{key}.lora_embedding_A"))
        b = tensors.get(f"{key}.lora_B.weight", tensors.get(f"{key}.lora_embedding_B"))
        r = config["rank_pattern"].get(module.replace(".", r"\."), config["r"])
        alpha = config["alpha_pattern"].get(module.replace(".", r"\."), config["lora_alpha"])
        assert r == a.shape[0]
        out[module] = (alpha / r) * (b.double() @ a.double())
    return out


def report(folder: Path) -> dict:
    return json.loads((folder / REPORT).read_text())


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("untied-llama")
    tiny_llama(tied=False).save_pretrained(folder)
    return folder


# -- full rank: the delta itself ----------------------------------------------------------------------------------
def test_sparse_delta_at_full_rank_is_the_delta_and_peft_gives_our_logits(tmp_path: Path) -> None:
    base = tiny_llama(tied=False)
    tuned = randomise(dt.attach(copy.deepcopy(base), "spiel", density=0.05))
    out = dt.export(tuned, tmp_path / "a", rank=64)  # every matrix here has min(out, in) <= 64
    products, deltas = lora_products(out), delta_of(tuned)
    assert {f"{m}.weight" for m in products} == set(deltas)
    for module, product in products.items():
        delta = deltas[f"{module}.weight"]
        assert torch.linalg.norm(product - delta) <= 1e-5 * torch.linalg.norm(delta)
    rows = report(out)["tensors"]
    assert all(r["as"] == "lora" and r["relative_error"] <= 1e-5 for r in rows) and len(rows) == len(deltas)
    assert_same_logits(logits(tuned), peft_logits(base, out), logits(base))


def test_dense_artifact_at_full_rank_norms_travel_as_values(base_folder: Path, tmp_path: Path) -> None:
    """LISA from its saved artifact (loaded as plain dense deltas, the CLI's path): the matrices become LoRA layers,
    the norm weights (no LoRA form) modules_to_save copies, exactly; PEFT's logits are ours."""
    tuned = randomise(dt.attach(dt.models.load(base_folder), "lisa", activated_layers=1))
    tuned.save(tmp_path / "art")
    out = dt.export(tmp_path / "art", tmp_path / "a", rank=64)
    rows = {r["tensor"]: r for r in report(out)["tensors"]}
    norms = [n for n in rows if "norm" in n]
    assert norms and all(rows[n]["as"] == "modules_to_save" and rows[n]["relative_error"] == 0 for n in norms)
    assert all(r["relative_error"] <= 1e-5 for r in rows.values())
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) == {n.rsplit(".", 1)[0] for n in norms}
    base = dt.models.load(base_folder)
    assert_same_logits(logits(tuned), peft_logits(base, out), logits(base))


def test_tied_embedding_trained_at_both_modules_gets_a_lora_at_each(tmp_path: Path) -> None:
    """Full fine-tuning of a tied embedding changes the LM head too: one SVD, a LoRA layer at embed_tokens (PEFT's
    embedding layout, ΔW transposed) and one at lm_head."""
    base = tiny_llama(tied=True)
    tuned = randomise(dt.attach(copy.deepcopy(base), "full", targets=["embed_tokens.weight", "q_proj.weight"]))
    out = dt.export(tuned, tmp_path / "a", rank=64)
    row = next(r for r in report(out)["tensors"] if r["tensor"] == "model.embed_tokens.weight")
    assert set(row["modules"]) == {"model.embed_tokens", "lm_head"}
    products = lora_products(out)
    delta = delta_of(tuned)["model.embed_tokens.weight"]
    assert torch.allclose(products["lm_head"], delta, atol=1e-5 * delta.abs().max().item())
    assert torch.allclose(products["model.embed_tokens"].T, delta, atol=1e-5 * delta.abs().max().item())
    assert_same_logits(logits(tuned), peft_logits(base, out), logits(base))


def test_conv1d_and_biases_of_gpt2(tmp_path: Path) -> None:
    """GPT-2: Conv1D weights (stored (in, out)) become LoRA layers, biases PEFT's bias values."""
    base = tiny_gpt2()
    with torch.no_grad():  # GPT-2 initialises biases to zero: make them visible
        for n, p in base.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    tuned = randomise(dt.attach(copy.deepcopy(base), "full",
                                      targets=["c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"]))
    out = dt.export(tuned, tmp_path / "a", rank=128)
    kinds = {r["as"] for r in report(out)["tensors"]}
    assert kinds == {"lora", "bias"}
    assert json.loads((out / "adapter_config.json").read_text())["bias"] != "none"
    assert_same_logits(logits(tuned), peft_logits(base, out), logits(base))


def test_sum_of_forms_and_dora(tmp_path: Path) -> None:
    """DSEE (low-rank + sparse on one weight: their sum is one ΔW) and DoRA (ΔW = m/‖W0 + sBA‖ ⊙ (W0 + sBA) − W0,
    which depends on W0: still a weight delta)."""
    for method, options in (("dsee", {}), ("dora", {"r": 4, "targets": ["q_proj", "v_proj"]})):
        base = tiny_llama(tied=False)
        tuned = randomise(dt.attach(copy.deepcopy(base), method, **options))
        out = dt.export(tuned, tmp_path / method, rank=64)
        assert report(out)["max_relative_error"] <= 1e-5
        assert not json.loads((out / "adapter_config.json").read_text())["use_dora"]
        assert_same_logits(logits(tuned), peft_logits(base, out), logits(base))


# -- low rank: Eckart–Young -----------------------------------------------------------------------------------------
def test_low_rank_error_is_the_svd_tail_energy_and_falls_with_rank(tmp_path: Path) -> None:
    tuned = randomise(dt.attach(tiny_llama(tied=False), "spiel", density=0.1))
    deltas = delta_of(tuned)
    previous: dict[str, float] = {}
    for r in (1, 2, 4, 8):
        out = dt.export(tuned, tmp_path / f"r{r}", rank=r)
        products = lora_products(out)
        for row in report(out)["tensors"]:
            delta = deltas[row["tensor"]]
            s = torch.linalg.svdvals(delta)
            tail = math.sqrt(float((s[r:] ** 2).sum())) / float(torch.linalg.norm(delta))
            assert row["rank"] == r
            assert abs(row["relative_error"] - tail) <= 1e-6  # float32 factors: ~1e-7 off the exact tail
            measured = torch.linalg.norm(delta - products[row["modules"][0]]) / torch.linalg.norm(delta)
            assert abs(float(measured) - row["relative_error"]) <= 1e-6  # the report is what the file holds
            assert row["relative_error"] < previous.get(row["tensor"], 1.0)
            previous[row["tensor"]] = row["relative_error"]
        pooled = report(out)
        total = math.sqrt(sum(r_["delta_norm"] ** 2 for r_ in pooled["tensors"]))
        assert pooled["relative_error"] == pytest.approx(
            math.sqrt(sum((r_["relative_error"] * r_["delta_norm"]) ** 2 for r_ in pooled["tensors"])) / total)


def test_rank_above_min_dimension_is_clamped_and_said(tmp_path: Path) -> None:
    """k_proj of the tiny Llama is 16 x 32: rank 20 becomes 16 there (exact), 20 where the matrix allows it."""
    tuned = randomise(dt.attach(tiny_llama(tied=False), "spiel", density=0.1, targets=["q_proj", "k_proj"]))
    out = dt.export(tuned, tmp_path / "a", rank=20)
    rows = {r["tensor"]: r for r in report(out)["tensors"]}
    k_rows = [r for n, r in rows.items() if "k_proj" in n]
    q_rows = [r for n, r in rows.items() if "q_proj" in n]
    assert all(r["rank"] == 16 and r["relative_error"] <= 1e-5 for r in k_rows)
    assert all(r["rank"] == 20 and r["relative_error"] > 0 for r in q_rows)
    assert any("exceeds min(out, in)" in note for note in report(out)["notes"])
    tensors = load_file(out / "adapter_model.safetensors")
    assert all(tensors[f"{PREFIX}{r['modules'][0]}.lora_A.weight"].shape[0] == 16 for r in k_rows)


# -- the exact path stays; errors --------------------------------------------------------------------------------
def test_lora_without_rank_keeps_its_own_factors_and_with_rank_is_truncated(tmp_path: Path) -> None:
    tuned = randomise(dt.attach(tiny_llama(tied=False), "lora", r=4, alpha=8, targets=["q_proj"]))
    exact = dt.export(tuned, tmp_path / "exact")
    assert not (exact / REPORT).exists()
    tensors = load_file(exact / "adapter_model.safetensors")
    for name, form in tuned.forms().items():
        assert torch.equal(tensors[f"{PREFIX}{name.rsplit('.', 1)[0]}.lora_B.weight"], form.B.detach())
    out = dt.export(tuned, tmp_path / "r2", rank=2)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 2)  # scale 1: B·A is the approximation itself
    for row in report(out)["tensors"]:  # ΔW = s·B·A has rank 4: rank 2 loses exactly its two smallest values
        s = torch.linalg.svdvals(delta_of(tuned)[row["tensor"]])
        assert row["relative_error"] == pytest.approx(float(torch.linalg.norm(s[2:]) / torch.linalg.norm(s)), abs=1e-6)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    sparse = randomise(dt.attach(tiny_llama(tied=False), "spiel", density=0.05))
    with pytest.raises(dt.DeltatuneError, match=r"no PEFT LoRA equivalent.*--rank"):
        dt.export(sparse, tmp_path / "a")
    for bad in (0, -1, True, 2.5):
        with pytest.raises(dt.DeltatuneError, match="positive integer"):
            dt.export(sparse, tmp_path / "a", rank=bad)
    with pytest.raises(dt.DeltatuneError, match="dtype is an option of format 'gguf'"):
        dt.export(sparse, tmp_path / "a", rank=2, dtype="f16")
    adapter = dt.attach(tiny_gpt2(), "adapter")
    with pytest.raises(dt.DeltatuneError, match=r"transformer\.h\.0\..*'adapter' delta.*no LoRA can express it"):
        dt.export(adapter, tmp_path / "a", rank=4)
    biases = randomise(dt.attach(tiny_gpt2(), "bitfit"))
    with pytest.raises(dt.DeltatuneError, match=r"no weight matrix.*\.bias"):
        dt.export(biases, tmp_path / "a", rank=4)
    unchanged = dt.attach(tiny_llama(tied=False), "spiel", density=0.05)  # values start at zero
    with pytest.raises(dt.DeltatuneError, match="changes no tensor"):
        dt.export(unchanged, tmp_path / "a", rank=4)
    sparse.merge()
    with pytest.raises(dt.DeltatuneError, match="unmerge"):
        dt.export(sparse, tmp_path / "a", rank=4)
    assert not (tmp_path / "a").exists()


# -- the command ----------------------------------------------------------------------------------------------------
def test_cli_prints_the_error_table_and_replaces_its_own_export(base_folder: Path, tmp_path: Path) -> None:
    tuned = randomise(dt.attach(dt.models.load(base_folder), "spiel", density=0.05))
    tuned.save(tmp_path / "art")
    runner = CliRunner()
    for _ in range(2):  # the second run replaces the first export (its own kind of folder, report included)
        result = runner.invoke(app, ["export", str(tmp_path / "art"), "--out", str(tmp_path / "a"), "--rank", "2"])
        assert result.exit_code == 0, result.output
    saved = report(tmp_path / "a")
    assert "relative error per tensor" in result.output and "all LoRA tensors together" in result.output
    assert f"{saved['relative_error']:.3e}" in result.output
    assert len(saved["tensors"]) == len(tuned.forms())
    result = runner.invoke(app, ["export", str(tmp_path / "art"), "--out", str(tmp_path / "b"), "--rank", "0"])
    assert result.exit_code == 2 and "--rank 0" in result.stderr
