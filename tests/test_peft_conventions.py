"""The conventions PEFT users bring: a ``LoraConfig`` given to ``dt.attach``, default targets for every architecture,
an exported adapter that ``AutoPeftModel`` loads offline, and the plain-``Trainer`` recipe on tied embeddings.

References: PEFT's own ``get_peft_model`` (trainable counts, logits), its maintained per-architecture target table,
its ``AutoPeftModelForCausalLM`` loader, and ``transformers.Trainer``'s checkpoint / resume.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import VOCAB, tiny_bert, tiny_llama, tiny_llama_cls

import deltatune as dt
from deltatune.core.forms.lowrank import LowRank
from deltatune.methods._lowrank import default_targets

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS  # noqa: E402
from transformers import AutoConfig, AutoModel, Trainer, TrainingArguments  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits


def ids(seed: int = 1, n: int = 2, length: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n, length), generator=g)  # from 1: token 0 is the classifier's pad token


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits.float()


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal within float32 rounding, scaled by the size of the values compared."""
    return (a - b).abs().max().item() <= rel * max(1.0, b.abs().max().item())


# -- 1. dt.attach(model, peft.LoraConfig(...)) ------------------------------------------------------------------

def peft_lora_modules(pm: nn.Module) -> set[str]:
    return {n for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def copy_peft_factors(pm: nn.Module, tuned: dt.Tuned, seed: int = 0) -> None:
    """Randomise PEFT's LoRA factors (B is zero at init) and copy them, with DoRA's magnitudes, into the delta."""
    g = torch.Generator().manual_seed(seed)
    inner = pm.base_model.model
    with torch.no_grad():
        for name, form in tuned.forms().items():
            if not isinstance(form, LowRank):
                continue
            layer = inner.get_submodule(name.rsplit(".", 1)[0])
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a.copy_(torch.randn(a.shape, generator=g) * 0.3)
            b.copy_(torch.randn(b.shape, generator=g) * 0.3)
            form.A.copy_(a)
            form.B.copy_(b)
            if layer.lora_magnitude_vector:  # DoRA
                form.magnitude.copy_(layer.lora_magnitude_vector["default"].weight)


CONFIGS = {
    "patterns-rslora-bias-layers": (lambda: tiny_llama(bias=True), dict(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], rank_pattern={"o_proj": 2},
        alpha_pattern={"v_proj": 4}, use_rslora=True, bias="lora_only", layers_to_transform=[0, 2])),
    "dora-default-targets": (tiny_llama, dict(r=4, lora_alpha=8, use_dora=True)),
    "all-linear-gaussian-modules-to-save": (lambda: tiny_llama(tied=False), dict(
        r=2, target_modules="all-linear", init_lora_weights="gaussian", modules_to_save=["lm_head"])),
    "regex-exclude": (tiny_llama, dict(r=4, target_modules=r".*\.(q_proj|k_proj|up_proj)", exclude_modules=["k_proj"])),
    "seq-cls-head": (tiny_llama_cls, dict(r=4, task_type="SEQ_CLS")),
    "bert-seq-cls-all-linear": (tiny_bert, dict(r=4, target_modules="all-linear", task_type="SEQ_CLS")),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_peft_lora_config_attaches_as_peft_builds_it(case):
    make, fields = CONFIGS[case]
    pm = get_peft_model(make(), LoraConfig(**copy.deepcopy(fields)))
    tuned = dt.attach(make(), LoraConfig(**copy.deepcopy(fields)))

    assert tuned.method.name == ("dora" if fields.get("use_dora") else "lora")
    low_rank = {n.rsplit(".", 1)[0] for n, f in tuned.forms().items() if isinstance(f, LowRank)}
    assert low_rank == peft_lora_modules(pm)
    assert tuned.num_trainable() == pm.get_nb_trainable_parameters()[0]
    x = ids()
    base = logits(make(), x)
    copy_peft_factors(pm, tuned)
    theirs = logits(pm, x)
    assert not close(theirs, base, rel=1e-3), "the factors must move the logits for the comparison to mean anything"
    assert close(logits(tuned, x), theirs)


def test_a_lora_config_passed_as_method_keyword():
    tuned = dt.attach(tiny_llama(), method=LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1))
    cfg = tuned.method_config
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.targets) == (2, 4, 0.1, ["q_proj", "v_proj"])


def test_fields_deltatune_cannot_honour_are_each_named():
    model = tiny_llama()
    config = LoraConfig(r=4, lora_bias=True, layer_replication=[[0, 2]], inference_mode=True)
    with pytest.raises(dt.DeltatuneError) as err:
        dt.attach(model, config)
    lines = str(err.value).splitlines()
    assert "cannot honour" in lines[0]
    # (trainable_token_indices converts: lora's option of that name, tests/test_peft_lora_tokens.py)
    for field in ("lora_bias=True", "layer_replication=[[0, 2]]", "inference_mode=True"):
        assert sum(line.strip().startswith(field) for line in lines[1:]) == 1, (field, lines)
    assert len(lines) == 4
    # nothing was attached: the model takes a delta as before
    assert dt.attach(model, "lora", r=2).num_trainable() == tiny_llama_lora_size(r=2)


def tiny_llama_lora_size(r: int) -> int:
    pm = get_peft_model(tiny_llama(), LoraConfig(r=r))
    return pm.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("config, field", [
    (LoraConfig(init_lora_weights="corda"), "init_lora_weights='corda'"),
    (LoraConfig(layers_to_transform=[0], layers_pattern="self_attn"), "layers_pattern='self_attn'"),
])
def test_an_unsupported_init_or_layer_pattern_is_refused(config, field):
    with pytest.raises(dt.DeltatuneError, match=field):
        dt.attach(tiny_llama(), config)


def test_other_peft_configs_and_keywords_with_a_config_are_refused():
    with pytest.raises(dt.DeltatuneError, match="BOFTConfig.*has no deltatune conversion"):
        dt.attach(tiny_llama(), peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj"]))
    with pytest.raises(dt.DeltatuneError, match="not both"):
        dt.attach(tiny_llama(), LoraConfig(), r=4)


# -- 2. default targets, derived from the model and checked against PEFT's maintained table ---------------------

SIZES = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
             vocab_size=64, pad_token_id=0, max_position_embeddings=64, head_dim=8, d_model=16, d_ff=32, d_kv=8,
             num_layers=2, num_heads=2, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
             decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, n_head=2, n_layer=2, n_embd=16)


def tiny_model(model_type: str) -> nn.Module:
    """The bare model of ``model_type`` with a tiny config (only the sizes its config has are set)."""
    cfg = AutoConfig.for_model(model_type)
    for key, value in SIZES.items():
        if hasattr(cfg, key) and not isinstance(getattr(type(cfg), key, None), property):  # Falcon's head_dim
            setattr(cfg, key, value)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModel.from_config(cfg)


# every architecture of PEFT's table that transformers builds in well under a second; PEFT's list differs from the
# q/v rule on purpose for phi (it adds fc1/fc2) and nemotron_h (q/k/v/o), and rwkv has no attention projections
IN_PEFTS_TABLE = ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "stablelm", "gpt2",
                  "gpt_bigcode", "gpt_neox", "gpt_neo", "gptj", "codegen", "mpt", "bloom", "falcon", "opt", "bart",
                  "bert", "roberta", "xlm-roberta", "electra", "layoutlm", "deberta", "deberta-v2", "t5", "mt5"]


@pytest.mark.parametrize("model_type", IN_PEFTS_TABLE)
def test_default_targets_equal_pefts_table(model_type):
    assert default_targets(tiny_model(model_type)) == PEFT_TARGETS[model_type]


@pytest.mark.parametrize("model_type, expected", [("phi3", ["qkv_proj"]), ("distilbert", ["q_lin", "v_lin"])])
def test_default_targets_where_peft_has_none(model_type, expected):
    """PEFT asks for target_modules here; the attention's own query/value (or fused qkv) projections are found."""
    assert model_type not in PEFT_TARGETS
    assert default_targets(tiny_model(model_type)) == expected


@pytest.mark.parametrize("model_type", ["gemma2", "falcon"])
def test_lora_attaches_with_its_defaults_where_the_old_table_had_none(model_type):
    model = tiny_model(model_type)
    tuned = dt.attach(model, "lora", r=2)
    chosen = {n.rsplit(".", 1)[0] for n in tuned.forms()}
    expected = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in PEFT_TARGETS[model_type]}
    assert chosen == expected and len(chosen) == 2 * len(PEFT_TARGETS[model_type])


def test_no_attention_means_a_clear_error():
    with pytest.raises(dt.DeltatuneError, match="no default LoRA targets for Sequential.*targets="):
        dt.attach(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "lora")


# -- 3. an exported adapter loads with AutoPeftModelForCausalLM, offline ----------------------------------------

@pytest.fixture
def offline(monkeypatch):
    """No Hub: a name that is no local folder fails at once instead of going to the network."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def random_factors(tuned: dt.Tuned, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for form in tuned.forms().values():
            form.A.copy_(torch.randn(form.A.shape, generator=g) * 0.3)
            form.B.copy_(torch.randn(form.B.shape, generator=g) * 0.3)


def test_an_exported_adapter_loads_with_auto_peft_offline(tmp_path, monkeypatch, offline):
    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(tmp_path)
    tiny_llama().save_pretrained("base")  # a local folder, named relative to the working directory
    tuned = dt.attach(dt.models.load("base"), "lora", r=4, targets=["q_proj", "v_proj", "down_proj"])
    random_factors(tuned)
    dt.export_peft(tuned, "adapter")
    config = json.loads(Path("adapter/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")

    monkeypatch.chdir(tmp_path.parent)  # the adapter is used from elsewhere
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    x = ids()
    assert not close(logits(tuned, x), logits(tiny_llama(), x), rel=1e-3)
    assert close(logits(theirs, x), logits(tuned, x))


def test_the_model_card_is_the_one_peft_writes(tmp_path):
    from huggingface_hub import ModelCard

    tiny_llama().save_pretrained(tmp_path / "base")
    tuned = dt.attach(dt.models.load(tmp_path / "base"), "lora", r=2)
    dt.export_peft(tuned, tmp_path / "adapter")
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.base_model == str(tmp_path / "base")
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert {"lora", "transformers", f"base_model:adapter:{tmp_path / 'base'}"} <= set(card.data.tags)
    assert f"- PEFT {peft.__version__}" in card.text.splitlines()


def test_a_shipped_base_is_named_by_its_folder_and_its_hub_id(tmp_path):
    """A shipped name (``minilm-l6``) is no Hub id: the adapter points at the local folder with the exact weights,
    and its card names the Hub model for use elsewhere."""
    from huggingface_hub import ModelCard

    tuned = dt.attach(tiny_bert(), "lora", r=2)
    tuned.model.config._name_or_path = "minilm-l6"  # as dt.models.load("minilm-l6") names it
    dt.export_peft(tuned, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    folder = Path(config["base_model_name_or_path"])
    assert folder.is_absolute() and (folder / "config.json").is_file()
    assert folder == Path(os.path.abspath(dt.models.resolve("minilm-l6")))
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"


def test_a_base_without_a_task_class_gets_pefts_auto_mapping(tmp_path, offline):
    from peft import AutoPeftModel

    model = tiny_model("bert")
    model.save_pretrained(tmp_path / "base")
    tuned = dt.attach(dt.models.load(tmp_path / "base", task="encoder"), "lora", r=2)
    random_factors(tuned)
    dt.export_peft(tuned, tmp_path / "adapter")
    theirs = AutoPeftModel.from_pretrained(str(tmp_path / "adapter")).eval()
    x = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert close(theirs(input_ids=x).last_hidden_state, tuned(input_ids=x).last_hidden_state)


# -- 4. the plain-Trainer recipe of docs/distributed.md on tied embeddings ---------------------------------------

def lm_rows(n: int = 16, length: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": x, "labels": x.clone()} for x in torch.randint(0, VOCAB, (n, length), generator=g)]


def run_plain_trainer(out: Path, steps: int, resume: str | None = None) -> dt.Tuned:
    """docs/distributed.md's recipe: a plain Trainer with trainer_kwargs, checkpointing every 2 steps."""
    from deltatune.hf import trainer_kwargs

    model = tiny_llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tuned = dt.attach(model, "lora", r=4)
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                             save_strategy="steps", save_steps=2, remove_unused_columns=False, label_names=["labels"],
                             report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0, data_seed=0,
                             lr_scheduler_type="constant")
    Trainer(**trainer_kwargs(tuned), args=args, train_dataset=lm_rows()).train(resume_from_checkpoint=resume)
    return tuned


def test_the_plain_trainer_checkpoints_the_delta_of_a_tied_model_and_resumes(tmp_path):
    from safetensors.torch import load_file

    straight = run_plain_trainer(tmp_path / "straight", 4)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    saved = load_file(checkpoint / "model.safetensors")
    assert saved.keys() == straight.deltas.state_dict().keys(), "the checkpoint holds the delta, not the base"
    at_step_2 = dt.load(tiny_llama(tied=True), checkpoint / "deltatune").deltas.state_dict()
    assert all(torch.equal(saved[k], at_step_2[k]) for k in saved)

    run_plain_trainer(tmp_path / "resumed", 2)
    resumed = run_plain_trainer(tmp_path / "resumed", 4, resume=str(tmp_path / "resumed" / "checkpoint-2"))
    for key, value in straight.delta_state_dict().items():
        assert torch.equal(resumed.delta_state_dict()[key], value), key
    final_state = straight.deltas.state_dict()
    assert any(not torch.equal(final_state[k], at_step_2[k]) for k in at_step_2), "steps 3-4 must change the delta"
    final = dt.load(tiny_llama(tied=True), tmp_path / "resumed" / "deltatune")
    assert all(torch.equal(final.delta_state_dict()[k], v) for k, v in straight.delta_state_dict().items())
    assert os.path.getsize(checkpoint / "model.safetensors") < 64 * 1024, "a few LoRA factors, not the base model"
