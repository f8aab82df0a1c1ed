"""IAA connected modules against the paper's invariants."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, batch, loss_of, output_of, tiny_bert, tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.core.forms.module import blocks
from deltatune.errors import DeltatuneError

VARIANTS = ["aside", "aside+adapters", "linked", "adapters"]
SMALL = {"r": 4, "adapter_r": 4}


def cls_of(tuned: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The [CLS] embedding: position 0 of BERT's last hidden state (h̃ when the delta is attached)."""
    return tuned.bert(input_ids=ids).last_hidden_state[:, 0]


def randomise(tuned: dt.Tuned, seed: int = 0, std: float = 0.1) -> None:
    """Non-zero values for every delta tensor, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def form_of(tuned: dt.Tuned):
    return tuned.forms()["connected"]


# -- 1. identity at init ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_identity_at_init(variant: str, placement: str) -> None:
    x = batch(n=3)
    for make in (tiny_bert, tiny_llama, tiny_gpt2):
        model = make()
        base = output_of(model, x)
        base_cls = cls_of(model, x["input_ids"]) if make is tiny_bert else None
        tuned = dt.attach(model, "connected", variant=variant, placement=placement, **SMALL)
        assert torch.equal(output_of(tuned, x), base), (make.__name__, variant)
        if base_cls is not None:
            with torch.no_grad():
                assert torch.equal(cls_of(tuned, x["input_ids"]), base_cls)
        form = form_of(tuned)
        ups = [m.up for m in [*form.adapters, *form.aside]]
        assert ups and all(bool((u.weight == 0).all() and (u.bias == 0).all()) for u in ups)


def test_identity_at_init_on_a_half_precision_base() -> None:
    model = tiny_llama().to(torch.bfloat16)
    x = batch()
    base = output_of(model, x)
    tuned = dt.attach(model, "connected", **SMALL)
    assert all(p.dtype == torch.float32 for p in tuned.trainable_parameters())  # modules train in fp32
    out = output_of(tuned, x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, base)


# -- the equations: h̃ = h_L + g_L, g_l = g_{l-1} + Bn_l(h_l + g_{l-1}) ----------------------------------------

def block_outputs(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
               for _, b in blocks(model)]
    with torch.no_grad():
        model(**x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_pathway_matches_the_equations(arch: str) -> None:
    """V1 against a hand-written pathway over the base model's block outputs; for Llama, g_L goes in before the
    final norm (so norm(h_L + g_L) feeds the LM head)."""
    model = tiny_bert() if arch == "bert" else tiny_llama()
    x = batch(n=2)
    hs = block_outputs(model, x)
    tuned = dt.attach(model, "connected", variant="aside", r=4)
    randomise(tuned)
    aside = form_of(tuned).aside
    with torch.no_grad():
        g = torch.zeros_like(hs[0])
        for h, bn in zip(hs, aside, strict=True):
            g = g + bn(h + g)
        expected = hs[-1] + g
        assert g.abs().max() > 1e-2  # the pathway does change the representation
        if arch == "bert":
            got = tuned.bert(**x).last_hidden_state
            assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)
            assert torch.allclose(tuned(**x).logits, model.classifier(model.bert.pooler(expected)), atol=1e-6, rtol=1e-5)
        else:
            assert torch.allclose(tuned(**x).logits, model.lm_head(model.model.norm(expected)), atol=1e-5, rtol=0)


def test_linked_adapters_read_the_previous_adapter_output() -> None:
    """V3: adapter k+1 reads h + Bn_k(δ_k); with links zeroed it is exactly the scattered-adapter model."""
    x = batch()
    linked = dt.attach(tiny_llama(), "connected", variant="linked", **SMALL)
    randomise(linked)
    plain = dt.attach(tiny_llama(), "connected", variant="adapters", **SMALL)
    form, ref = form_of(linked), form_of(plain)
    assert len(form.aside) == len(form.adapters) - 1
    with torch.no_grad():
        for a, b in zip(form.adapters, ref.adapters, strict=True):
            b.load_state_dict(a.state_dict())
        assert not torch.allclose(output_of(linked, x), output_of(plain, x))
        for link in form.aside:
            link.up.weight.zero_()
            link.up.bias.zero_()
    assert torch.equal(output_of(linked, x), output_of(plain, x))


# -- 2. gradient path -------------------------------------------------------------------------------------

def detach_above_first_block(model: torch.nn.Module) -> None:
    """Blocks F_2..F_L see their input detached: a zero Jacobian, so nothing flows down through them."""
    def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}

    for _, block in blocks(model)[1:]:
        block.register_forward_pre_hook(pre, with_kwargs=True)


def grads_after_steps(variant: str, steps: int) -> list[dt.Tuned]:
    """The tuned model after ``steps`` AdamW updates and one more backward (grads of that step left in place)."""
    model = tiny_bert()
    detach_above_first_block(model)
    tuned = dt.attach(model, "connected", variant=variant, **SMALL)
    ids = batch(n=4)["input_ids"]
    w = torch.randn(32, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    for step in range(steps + 1):
        opt.zero_grad()
        (cls_of(tuned, ids) @ w).pow(2).mean().backward()
        if step < steps:
            opt.step()
    return tuned


def nonzero_grad(module: torch.nn.Module) -> bool:
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters())


def test_scattered_adapters_below_frozen_blocks_get_no_gradient() -> None:
    for steps in (0, 3):
        form = form_of(grads_after_steps("adapters", steps))
        assert not nonzero_grad(form.adapters[0]), "a block-1 adapter must be cut off by detaching blocks"
        assert nonzero_grad(form.adapters[-1])  # the top adapter still learns: the loss reaches it


def test_aside_pathway_connects_block_one_to_the_loss() -> None:
    at_start = form_of(grads_after_steps("aside+adapters", 0))
    assert nonzero_grad(at_start.aside[0].up)  # Bn_1's W_up: identity path g_1 -> g_L -> h̃
    assert not nonzero_grad(at_start.adapters[0])  # reaches the loss only through Bn_1's W_up, still zero
    after_one = form_of(grads_after_steps("aside+adapters", 1))
    assert nonzero_grad(after_one.adapters[0])  # now the block-1 adapter is connected too


def test_linked_adapters_connect_block_one_once_the_chain_is_non_zero() -> None:
    """V3's chain runs through every adapter's and link's W_up: zero at init, and (detached blocks, δ = 0 and
    zero biases under a ReLU) nothing moves them, so it connects only once the adapters learned through the
    normal path. With every module non-zero, as after training, block 1 reaches the loss through the links."""
    assert not nonzero_grad(form_of(grads_after_steps("linked", 3)).adapters[0])
    for variant, connected in (("linked", True), ("adapters", False)):
        model = tiny_bert()
        detach_above_first_block(model)
        tuned = dt.attach(model, "connected", variant=variant, **SMALL)
        randomise(tuned, std=0.3)
        cls_of(tuned, batch(n=4)["input_ids"]).pow(2).sum().backward()
        assert nonzero_grad(form_of(tuned).adapters[0]) == connected, variant


# -- 3. parameter count ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_parameter_count(variant: str, placement: str) -> None:
    d, n_blocks, m, a = 32, 3, 5, 7
    tuned = dt.attach(tiny_bert(), "connected", variant=variant, placement=placement, r=m, adapter_r=a)
    n_adapters = 0 if variant == "aside" else n_blocks * (2 if placement == "houlsby" else 1)
    n_aside = {"aside": n_blocks, "aside+adapters": n_blocks, "linked": n_adapters - 1, "adapters": 0}[variant]
    expected = n_adapters * (2 * d * a + d + a) + n_aside * (2 * d * m + d + m)
    assert tuned.num_trainable() == expected == tuned.forms()["connected"].num_trainable()
    head = dt.attach(tiny_bert(), "connected", variant=variant, placement=placement, r=m, adapter_r=a,
                     modules_to_save=["classifier"])
    assert head.num_trainable() == expected + 32 * 3 + 3  # + the 3-way classifier, trained fully


# -- 4. convergence smoke test -----------------------------------------------------------------------------

def contrastive_backbone(seed: int) -> torch.nn.Module:
    """Tiny BERT whose [CLS] carries the sequence. With the default N(0, 0.02) weights the blocks add ~1% to the
    residual stream and every [CLS] is the same vector (std 0.004 across inputs); a pretrained encoder mixes far
    more, so the block matrices are redrawn with std 0.3."""
    model = tiny_bert(seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.bert.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.3, generator=g)
    return model


def query_passage_pairs(seed: int, n: int = 32, length: int = 16, overlap: int = 6) -> tuple[torch.Tensor, ...]:
    """Random passages; each query is ``overlap`` tokens of its passage; both start with a [CLS] token (id 2)."""
    g = torch.Generator().manual_seed(seed)
    passages = torch.randint(4, VOCAB, (n, length), generator=g)
    picks = torch.stack([torch.randperm(length, generator=g)[:overlap] for _ in range(n)])
    queries = torch.gather(passages, 1, picks)
    cls = torch.full((n, 1), 2)
    return torch.cat([cls, queries], 1), torch.cat([cls, passages], 1)


def steps_to_accuracy(variant: str, seed: int, target: float = 0.9, cap: int = 100, **options) -> int:
    """Optimizer steps until the in-batch top-1 accuracy (query -> its passage among all 32) reaches ``target``,
    training with the in-batch contrastive loss on ⟨q, p⟩ of [CLS] embeddings."""
    torch.manual_seed(seed)
    tuned = dt.attach(contrastive_backbone(seed), "connected", variant=variant, **options)
    queries, passages = query_passage_pairs(100 + seed)
    labels = torch.arange(len(queries))
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(cap):
        scores = cls_of(tuned, queries) @ cls_of(tuned, passages).T
        if (scores.argmax(1) == labels).float().mean() >= target:
            return step
        opt.zero_grad()
        F.cross_entropy(scores, labels).backward()
        opt.step()
    return cap


def test_connected_converges_no_slower_than_scattered_adapters_of_equal_size() -> None:
    """Equal size: IAA's adapters (8) + aside (8) against scattered adapters of 16 (3·d = 96 fewer bias entries).
    Measured over seeds 0-9: IAA 25-51 steps (mean 31.9), scattered 31-77 (mean 44.1), IAA ≤ scattered on every
    seed; the test takes the mean of three."""
    seeds = range(3)
    connected = [steps_to_accuracy("aside+adapters", s, r=8, adapter_r=8) for s in seeds]
    scattered = [steps_to_accuracy("adapters", s, adapter_r=16) for s in seeds]
    assert max(connected) < 100, f"IAA did not learn the task: {connected}"
    assert statistics.mean(connected) <= statistics.mean(scattered), (connected, scattered)


# -- 5. re-encoding, save / load, merge, detach -------------------------------------------------------------

@pytest.mark.parametrize("variant", ["aside+adapters", "linked"])
def test_embeddings_are_stable_across_calls_modes_and_save_load(variant: str, tmp_path) -> None:
    ids = batch(n=3)["input_ids"]
    other = batch(seed=5, n=5, length=4)["input_ids"]
    tuned = dt.attach(tiny_bert(), "connected", variant=variant, **SMALL)
    randomise(tuned)
    with torch.no_grad():
        first = cls_of(tuned, ids)
        cls_of(tuned, other)  # another batch shape in between: no state may carry over
        assert torch.equal(cls_of(tuned, ids), first)
        tuned.train()  # training mode, dropout 0: the same embeddings as at indexing time
        assert torch.equal(cls_of(tuned, ids), first)
        tuned.eval()
    tuned.save(tmp_path / "a")
    loaded = dt.load(tiny_bert(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(cls_of(loaded, ids), first)


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_merge_detach(variant: str, tmp_path) -> None:
    x = batch()
    model = tiny_llama()
    base = output_of(model, x)
    tuned = dt.attach(model, "connected", variant=variant, placement="houlsby", **SMALL)
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss_of(tuned, x).backward()
        opt.step()
    trained = output_of(tuned, x)
    assert not torch.allclose(trained, base)
    tuned.save(tmp_path / "a")
    assert dt.inspect(tmp_path / "a")["config"]["variant"] == variant
    loaded = dt.load(tiny_llama(), tmp_path / "a")
    assert torch.equal(output_of(loaded, x), trained)
    with pytest.raises(DeltatuneError, match="cannot be merged"):
        tuned.merge()
    plain = tuned.detach()
    assert torch.equal(output_of(plain, x), base)
    assert not any(b._forward_hooks or b._forward_pre_hooks for _, b in blocks(plain))


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("variant", ["aside+adapters", "linked"])
def test_gradient_checkpointing_gives_the_same_gradients(variant: str) -> None:
    """A checkpointed block reruns its sublayer hooks in backward: linked adapters keep δ_k per adapter (not a
    running value), so the recomputed adapter k+1 reads the same δ_k as in the forward pass."""
    x = batch(n=2)
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        tuned = dt.attach(model, "connected", variant=variant, placement="houlsby", **SMALL)
        randomise(tuned)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        tuned.train()
        loss_of(tuned, x).backward()
        grads.append([p.grad.clone() for p in tuned.trainable_parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_kv_cache_decoding_matches_the_full_forward() -> None:
    """Every aside module is token-wise: decoding with the KV cache gives the full forward's logits."""
    tuned = dt.attach(tiny_llama(), "connected", variant="linked", **SMALL)
    randomise(tuned)
    ids = batch(length=8)["input_ids"]
    with torch.no_grad():
        full = tuned(input_ids=ids).logits
        past = tuned(input_ids=ids[:, :5], use_cache=True).past_key_values
        step = tuned(input_ids=ids[:, 5:], past_key_values=past, use_cache=True).logits
    assert torch.allclose(step, full[:, 5:], atol=1e-5, rtol=0)


def test_bad_options_are_refused() -> None:
    with pytest.raises(DeltatuneError, match="variant"):
        dt.attach(tiny_bert(), "connected", variant="scattered")
    with pytest.raises(DeltatuneError, match="positive"):
        dt.attach(tiny_bert(), "connected", r=0)
    with pytest.raises(DeltatuneError, match="activation"):
        dt.attach(tiny_bert(), "connected", activation="swishy")
