from __future__ import annotations

import pytest
import torch.nn as nn
from conftest import tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.core.targeting import layer_index, match_name, select_modules, select_parameters


def names(selected) -> list[str]:
    return [n for n, _ in selected]


def test_suffix_glob_regex_select_the_same_modules() -> None:
    model = tiny_llama()
    by_suffix = names(select_modules(model, ["q_proj", "v_proj"]))
    by_glob = names(select_modules(model, ["self_attn.[qv]_proj"]))
    by_regex = names(select_modules(model, [r"re:model\.layers\.\d+\.self_attn\.(q|v)_proj"]))
    assert by_suffix == by_glob == by_regex
    assert len(by_suffix) == 6 and all(n.endswith(("q_proj", "v_proj")) for n in by_suffix)


def test_suffix_matches_whole_name_parts_only() -> None:
    assert match_name("proj", "a.proj") and not match_name("proj", "a.q_proj")
    assert match_name("re:a\\..*", "a.b") and not match_name("re:b", "a.b")


def test_layer_range_and_types() -> None:
    model = tiny_llama()
    sel = names(select_modules(model, ["*"], layers="1:", types=["linear"]))
    assert sel and {layer_index(n) for n in sel} == {1, 2}
    assert all(isinstance(dict(model.named_modules())[n], nn.Linear) for n in sel)
    assert {layer_index(n) for n in names(select_modules(model, ["q_proj"], layers=[-1]))} == {2}
    conv = names(select_modules(tiny_gpt2(), ["*"], types=["conv1d"]))
    assert conv and all(n.split(".")[-1] in {"c_attn", "c_proj", "c_fc"} for n in conv)


def test_tied_parameters_selected_once() -> None:
    model = tiny_llama(tied=True)
    sel = names(select_parameters(model, ["embed_tokens.weight", "lm_head.weight"]))
    assert sel == ["model.embed_tokens.weight"]


def test_unmatched_target_lists_nearest_names() -> None:
    with pytest.raises(dt.DeltatuneError) as err:
        dt.attach(tiny_llama(), "lora", targets=["q_prj"])
    msg = str(err.value)
    assert "'q_prj'" in msg and "q_proj" in msg
    assert len(msg.split("Nearest names it does have: ")[1].split(". Fix")[0].split(", ")) == 20


def test_plain_torch_module() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    tuned = dt.attach(model, "lora", r=2, targets=["1", "3"])
    assert tuned.num_trainable() == 2 * (8 + 8) + 2 * (8 + 3)
    with pytest.raises(dt.DeltatuneError, match="no default LoRA targets"):
        dt.attach(nn.Sequential(nn.Linear(4, 4)), "lora")


def test_low_rank_refuses_unsupported_module() -> None:
    with pytest.raises(dt.DeltatuneError, match="cannot target a LlamaRMSNorm"):
        dt.attach(tiny_llama(), "lora", targets=["input_layernorm"])
