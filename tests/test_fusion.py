"""Logit fusion (``dt.fuse``, deltatune/ops/fusion.py): the spec's six tests (shared/methods/logit-fusion.md), the
vocabulary check, multi-expert batching, the depth-pruned small model and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.errors import DeltatuneError
from deltatune.ops import fusion

V = 48


def gpt2(seed: int, vocab: int = V, layers: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=layers, n_head=4, eos_token_id=1,
                     bos_token_id=1, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def llama(seed: int, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=1,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def expert(model: torch.nn.Module, path, seed: int, scale: float = 0.3, zero: bool = False) -> str:
    """A LoRA artifact on ``model`` with random factors (``zero``: B = 0, the expert computes the base exactly)."""
    tuned = dt.attach(model, "lora", r=4, alpha=8, targets="all-linear")
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.copy_(torch.zeros_like(p) if zero and p.shape[1] == 4 else torch.randn_like(p) * scale)
    tuned.save(path)
    tuned.detach()
    return str(path)


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


IDS = torch.tensor([[5, 9, 17, 3, 22, 8]])


# 1. α = 0 gives the large model exactly
def test_alpha_zero_is_the_large_model(tmp_path):
    large, small = gpt2(0, layers=3), gpt2(1)
    fused = dt.fuse(large, small, [expert(small, tmp_path / "e", 2)], alpha=0.0)
    out = fused(IDS).logits
    assert torch.equal(out, F.log_softmax(logits(large, IDS).float(), -1))


# 2. large ≡ small and α = 1 give the expert
def test_same_model_alpha_one_is_the_expert(tmp_path):
    small = gpt2(1)
    path = expert(small, tmp_path / "e", 2)
    fused = dt.fuse(small, small, [path], alpha=1.0)
    out = fused(IDS).logits
    with_expert = dt.load(gpt2(1), path)
    want = F.log_softmax(logits(with_expert, IDS).float(), -1)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


# 3. an expert equal to the small base leaves the large model unchanged, and the solver returns α = 0
def test_expert_equal_to_its_base_changes_nothing(tmp_path):
    large, small = gpt2(0, layers=3), gpt2(1)
    fused = dt.fuse(large, small, [expert(small, tmp_path / "e", 2, zero=True)], alpha="dynamic")
    out = fused(IDS)
    assert torch.equal(out.alpha, torch.zeros_like(out.alpha))
    assert torch.equal(out.logits, F.log_softmax(logits(large, IDS).float(), -1))


# 4. the KL helper against a float64 reference
def test_kl_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 300, generator=g, dtype=torch.float64) * 3
    q = torch.randn(5, 300, generator=g, dtype=torch.float64) * 3
    p[0, :10] = -math.inf  # P has zeros: they contribute nothing
    lp, lq = F.log_softmax(p, -1), F.log_softmax(q, -1)
    P, Q = np.exp(lp.numpy()), np.exp(lq.numpy())
    ref = np.array([sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(pr, qr, strict=True) if pi > 0)
                    for pr, qr in zip(P, Q, strict=True)])
    got = fusion.kl(lp, lq).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    # a Q with zero mass where P has some: infinite
    lq_zero = lq.clone()
    lq_zero[1, 0] = -math.inf
    assert math.isinf(float(fusion.kl(lp[1], lq_zero[1])))


# 5. with z_L = z_S both constraints hold at α = 1 (P_α = P_t): the solver finds it
def test_solver_finds_the_known_minimiser():
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(16, 200, generator=g) * 2
    zt = zs + torch.randn(16, 200, generator=g)
    alpha = fusion.solve(zs, zs, zt.unsqueeze(0))
    assert torch.all((alpha - 1.0).abs() <= fusion.ALPHA_STEP / 2 + 1e-9), alpha.flatten()


def test_two_experts_coordinate_descent_finds_both_weights():
    """With two experts on disjoint directions and z_L = z_S, α = (1, 1) satisfies every constraint of the
    summed objective only approximately, so the check is the objective: no grid point is better than the
    solver's choice along either coordinate."""
    g = torch.Generator().manual_seed(2)
    zs = torch.randn(4, 100, generator=g)
    experts = torch.stack([zs + torch.randn(4, 100, generator=g), zs + torch.randn(4, 100, generator=g)])
    alpha = fusion.solve(zs, zs, experts)
    grid = fusion.grid()
    step = fusion.FusionStep(F.log_softmax(zs, -1), F.log_softmax(zs, -1), F.log_softmax(experts, -1))
    for t in range(2):
        cand = alpha.unsqueeze(0).repeat(len(grid), 1, 1)
        cand[:, :, t] = grid.float().view(-1, 1)
        fused = F.log_softmax(zs + torch.einsum("gnt,tnv->gnv", cand, experts - zs), -1)
        loss = fusion.kl_constraints(fused, step)
        chosen = fusion.kl_constraints(F.log_softmax(zs + torch.einsum("nt,tnv->nv", alpha, experts - zs), -1)
                                       .unsqueeze(0), step)[0]
        assert torch.all(chosen <= loss.min(0).values * (1 + 1e-5) + 1e-9)


# 6. greedy decoding with three tiny models is deterministic and equals recomputation without caches
@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_cached_greedy_equals_recomputation(tmp_path, make):
    large, small = make(0, layers=3), make(1)
    fused = dt.fuse(large, small, [expert(small, tmp_path / "e", 2)], alpha=1.0)
    prompts = torch.tensor([[0, 0, 5, 9, 17], [4, 12, 7, 3, 30]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cached = fused.generate(prompts, mask, max_new_tokens=8, eos_token_id=None)
    again = fused.generate(prompts, mask, max_new_tokens=8, eos_token_id=None)
    plain = fused.generate(prompts, mask, max_new_tokens=8, eos_token_id=None, use_cache=False)
    assert torch.equal(cached, again)
    assert torch.equal(cached, plain)
    # and each step's token is the argmax of the fused forward over the sequence so far
    for k in range(prompts.shape[1], cached.shape[1]):
        m = torch.cat([mask, torch.ones(2, k - prompts.shape[1], dtype=mask.dtype)], 1)
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        step = fused(cached[:, :k], m, position_ids=pos).logits[:, -1]
        assert torch.equal(step.argmax(-1), cached[:, k])


def test_dynamic_alpha_is_logged_per_step_and_stops_at_eos(tmp_path):
    large, small = gpt2(0, layers=3), gpt2(1)
    fused = dt.fuse(large, small, [expert(small, tmp_path / "e", 2, scale=0.5)])
    first = fused.generate(IDS, max_new_tokens=6, eos_token_id=None)
    assert len(fused.alpha_log) == first.shape[1] - IDS.shape[1]
    assert all(a.shape == (1, 1) and 0 <= float(a) <= fusion.ALPHA_MAX for a in fused.alpha_log)
    generated = first[0, IDS.shape[1]:].tolist()
    stop = generated[1]  # the second generated token as EOS: generation stops at its first occurrence
    end = IDS.shape[1] + generated.index(stop) + 1
    short = fused.generate(IDS, max_new_tokens=6, eos_token_id=stop)
    assert torch.equal(short[0], first[0, :end])
    assert any(float(a) > 0 for a in fused.alpha_log)  # the expert moved the large model somewhere


def test_vocabulary_mismatch_is_refused(tmp_path):
    small = gpt2(1)
    path = expert(small, tmp_path / "e", 2)
    with pytest.raises(DeltatuneError, match="one tokenizer"):
        dt.fuse(gpt2(0, vocab=V + 2), small, [path])


def test_two_experts_one_forward_equals_one_forward_each(tmp_path):
    """The experts' rows in one batch (low-rank forms) give what switching deltas gives, and a batch of two
    left-padded prompts gives each prompt's result alone."""
    large, small = llama(0, layers=3), llama(1)
    paths = [expert(small, tmp_path / "a", 2), expert(small, tmp_path / "b", 3)]
    fused = dt.fuse(large, small, paths, alpha="dynamic")
    assert fused.mixed
    ids = torch.tensor([[0, 0, 5, 9, 17], [4, 12, 7, 3, 30]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    one = fused(ids, mask, logits_to_keep=1)
    fused.mixed = False
    each = fused(ids, mask, logits_to_keep=1)
    torch.testing.assert_close(one.logits, each.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(one.alpha, each.alpha)
    alone = fused(ids[1:, :], mask[1:], logits_to_keep=1)
    torch.testing.assert_close(one.logits[1:], alone.logits, rtol=1e-5, atol=1e-5)
    # the experts act: their fused distribution differs from the large model's
    assert not torch.allclose(one.logits[:, -1], F.log_softmax(logits(large, ids, mask)[:, -1].float(), -1))


def test_alpha_values_are_checked(tmp_path):
    small = gpt2(1)
    path = expert(small, tmp_path / "e", 2)
    with pytest.raises(DeltatuneError, match="one per expert"):
        dt.fuse(gpt2(0), small, [path], alpha=[1.0, 0.5])
    with pytest.raises(DeltatuneError, match="dynamic"):
        dt.fuse(gpt2(0), small, [path], alpha="adaptive")
    with pytest.raises(DeltatuneError, match="at least one expert"):
        dt.fuse(gpt2(0), small, [])


def test_peft_adapter_as_expert_equals_its_import(tmp_path):
    peft = pytest.importorskip("peft")
    small = llama(1)
    torch.manual_seed(5)
    pm = peft.get_peft_model(llama(1), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    large = llama(0, layers=3)
    via_peft = dt.fuse(large, small, [str(tmp_path / "peft")], alpha=1.0)(IDS).logits
    z_l, z_s = logits(large, IDS).float(), logits(llama(1), IDS).float()
    with torch.no_grad():
        z_t = pm(input_ids=IDS).logits.float()
    want = F.log_softmax(z_l + z_t - z_s, -1)
    torch.testing.assert_close(via_peft, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_depth_pruned_model_is_named_and_reloads(tmp_path):
    from deltatune.data import pruned

    assert pruned.parse_layers("0-2,5") == [0, 1, 2, 5]
    assert pruned.spec([5, 0, 1, 2, 2]) == "0-2,5"
    assert pruned.split("smollm2-135m@layers=0-9") == ("smollm2-135m", list(range(10)))
    assert pruned.split("runs/model") == ("runs/model", None)
    with pytest.raises(DeltatuneError, match="e.g. 0-9"):
        pruned.parse_layers("3-1")
    model = llama(0, layers=4)
    model.save_pretrained(tmp_path / "m")
    small = dt.models.load(tmp_path / "m", keep_layers=[0, 2])
    assert small.config.num_hidden_layers == 2 and small.config._name_or_path.endswith("@layers=0,2")
    assert [b.self_attn.layer_idx for b in small.model.layers] == [0, 1]
    again = dt.models.load(small.config._name_or_path)
    assert torch.equal(logits(small, IDS), logits(again, IDS))
    with pytest.raises(DeltatuneError, match="blocks 0-3"):
        dt.models.load(tmp_path / "m", keep_layers=[7])
    with pytest.raises(DeltatuneError, match="disagrees"):
        dt.models.load(f"{tmp_path / 'm'}@layers=0-1", keep_layers=[0])
    # an artifact trained on the pruned model names it, and fusion finds the small base from the artifact
    path = expert(small, tmp_path / "e", 3)
    from deltatune.core import artifact

    assert artifact.read_meta(path)["fingerprint"]["name_or_path"].endswith("@layers=0,2")
    fused = dt.fuse(dt.models.load(tmp_path / "m"), None, [path], alpha=1.0)
    assert fused.small.model.config.num_hidden_layers == 2


def test_cli_fused_generation(tmp_path):
    from typer.testing import CliRunner

    from deltatune.cli.main import app

    model = llama(0, layers=3)
    model.save_pretrained(tmp_path / "large")
    small = dt.models.load(tmp_path / "large", keep_layers=[0])
    path = expert(small, tmp_path / "e", 3)
    runner = CliRunner()
    # no tokenizer in the folder: the error names it
    result = runner.invoke(app, ["generate", "--fuse-large", str(tmp_path / "large"), "--expert", path,
                                 "-p", "hi", "--alpha", "1.0"])
    assert result.exit_code != 0 and "tokenizer" in result.output
    result = runner.invoke(app, ["generate", "--fuse-large", str(tmp_path / "large"), "-p", "hi"])
    assert result.exit_code != 0 and "--expert" in result.output


def test_cli_eval_and_generate_on_a_fused_model(word_run, tmp_path):
    """``deltatune eval --fuse-large`` with alpha 0 scores exactly what the large model alone scores; with an expert
    and dynamic alpha it reports the weights; ``deltatune generate --fuse-large`` runs end to end."""
    import json

    from typer.testing import CliRunner

    from deltatune.cli.main import app
    from deltatune.data import tasks
    from deltatune.train.config import parse_data_section

    folder, data = word_run
    path = expert(dt.models.load(folder, keep_layers=[0]), tmp_path / "e", 4, scale=0.5)
    runner = CliRunner()
    common = ["--fuse-large", folder, "--expert", path, "--data", data, "--task", "classification", "--json"]
    zero = runner.invoke(app, ["eval", *common, "--alpha", "0"])
    assert zero.exit_code == 0, zero.output
    large = dt.models.load(folder)
    cfg = parse_data_section({"path": data, "task": "classification"})
    alone = tasks.build_task(cfg, dt.models.load_tokenizer(folder), large).evaluate(large, 16)
    got = json.loads(zero.output)
    assert got["accuracy"] == alone["accuracy"]
    assert math.isclose(got["loss"], alone["loss"], rel_tol=1e-5)
    dynamic = runner.invoke(app, ["eval", *common])
    assert dynamic.exit_code == 0, dynamic.output
    assert 0 <= json.loads(dynamic.output)["alpha_mean_expert0"] <= fusion.ALPHA_MAX
    gen = runner.invoke(app, ["generate", "--fuse-large", folder, "--expert", path, "-p", "what a day", "--no-chat",
                              "--max-new-tokens", "3"])
    assert gen.exit_code == 0, gen.output
    assert "alpha over" in gen.output
