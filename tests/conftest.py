"""Tiny random models built from transformers configs: seconds to build, nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

VOCAB = 128


def tiny_llama(tied: bool = True, bias: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def tiny_llama_cls(seed: int = 0) -> LlamaForSequenceClassification:
    """A decoder with a classification head (pooling the last non-pad token): for head-training methods (VQT)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "llama-cls": tiny_llama_cls}


def batch(seed: int = 1, n: int = 2, length: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (n, length), generator=g)}


def output_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def loss_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(**inputs).logits
    return logits.float().pow(2).mean() if logits.dim() == 2 else logits.float().logsumexp(-1).mean()


SENTIMENT_WORDS = {"positive": ["great", "lovely", "happy", "superb"], "negative": ["awful", "sad", "terrible", "bad"]}


def write_sentiment_jsonl(path, words: dict[str, list[str]] = SENTIMENT_WORDS) -> None:
    """48 labelled one-line texts whose label is carried by one word: a task a tiny model can learn."""
    import json

    rows = [{"text": f"what a {w} day number {i}", "label": lab} for i in range(12) for lab, ws in words.items()
            for w in ws[i % 2::2]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    return batch()


@pytest.fixture(scope="session", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory):
    """One fresh DELTATUNE_CACHE for the whole session: the SmolLM2 GGUF conversion (~20 s) runs once,
    every test sees the same cache, and the user's real cache is never touched."""
    path = tmp_path_factory.mktemp("deltatune-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("DELTATUNE_CACHE", str(path))
    patch.setenv("DELTATUNE_DATA_CACHE", str(path / "data-steps"))  # the data steps' cache and embeddings too
    yield path
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def no_curves():
    """No ``logs/curves.png`` after the suite's hundreds of tiny runs (matplotlib would add minutes on a loaded
    machine); test_curves.py draws them with the real function."""
    from deltatune.train import reporting

    patch = pytest.MonkeyPatch()
    patch.setattr(reporting, "write_curves", lambda *args, **kwargs: False)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def smollm2() -> torch.nn.Module:
    """The shipped SmolLM2-135M, loaded once per session; tests deep-copy it before changing it."""
    from deltatune.data import models

    return models.load("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, saved as a local from_pretrained folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    from deltatune.data import models

    models.load_tokenizer("smollm2-135m").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sentiment_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sentiment.jsonl"
    write_sentiment_jsonl(path)
    return path


def save_word_llama(folder: Path, extra_words: tuple[str, ...] = ()) -> Path:
    """A tiny random Llama with a word-level tokenizer of the sentiment data's words, saved as a
    from_pretrained folder: no shipped model to convert, starts in milliseconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]", "negative", "positive", "what", "a", "day", "number", *extra_words,
             *[w for ws in SENTIMENT_WORDS.values() for w in ws], *[str(i) for i in range(12)]]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="[EOS]").save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def word_run(tmp_path_factory) -> tuple[str, str]:
    """A word-level tiny Llama folder and a sentiment JSONL: a real ``dt.train`` run in a second (resume tests)."""
    root = tmp_path_factory.mktemp("word-run")
    folder = save_word_llama(root / "model")
    write_sentiment_jsonl(root / "data.jsonl")
    return str(folder), str(root / "data.jsonl")


def word_run_config(word_run: tuple[str, str], method: dict, out: Path, **train: object) -> dict:
    """A ``dt.train`` config on the ``word_run`` model and data that checkpoints as it goes (the resume tests);
    ``train`` overrides the defaults: 8 steps of 4, lr 1e-2, warmup 1, weight decay 0.01, a checkpoint every 2
    steps, no eval."""
    folder, path = word_run
    return {
        "model": folder,
        "data": {"path": path, "task": "classification", "max_length": 16, "eval_fraction": 0.25,
                 "labels": ["negative", "positive"], "max_eval": 4},
        "method": method,
        "train": {"steps": 8, "batch_size": 4, "lr": 1e-2, "warmup": 1, "weight_decay": 0.01, "save_every": 2,
                  "keep_last": 4, "eval_every": 0, "progress": False, **train},
        "output": str(out),
    }


def train_then_resume(cfg: dict, keep: int, inspect=None) -> tuple[dict, dict]:
    """Train ``cfg`` straight through, delete every checkpoint after the first ``keep`` (as if the run had died
    after writing the last one kept), resume, and check that the resumed run ends bit-identical to the
    uninterrupted one with the same losses. ``inspect(checkpoint_folders)`` sees the checkpoints before the
    deletion. Returns both runs' summaries."""
    import shutil

    import deltatune as dt
    from deltatune.train.state import checkpoints

    out = Path(cfg["output"])
    straight = dt.train(cfg)
    uninterrupted = (out / "delta.safetensors").read_bytes()
    folders = checkpoints(out / "checkpoints")
    if inspect is not None:
        inspect(folders)
    for c in folders[keep:]:
        shutil.rmtree(c)
    resumed = dt.train(cfg, resume=True)
    assert (out / "delta.safetensors").read_bytes() == uninterrupted, "a resumed run must end bit-identical"
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    return straight, resumed


def random_lora(make=tiny_llama, seed: int = 1, scale: float = 0.3, **opts):
    """A LoRA (r 4, alpha 8 unless ``opts`` say otherwise) whose factors are random N(0, scale²), not B = 0 as at
    a real init: a delta that visibly changes the model, for tests of what is done with deltas."""
    import deltatune as dt

    tuned = dt.attach(make(), "lora", **{"r": 4, "alpha": 8, **opts})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for form in tuned.forms().values():
            form.A.copy_(torch.randn(form.A.shape, generator=g) * scale)
            form.B.copy_(torch.randn(form.B.shape, generator=g) * scale)
    return tuned


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    matrices gain nothing from threads, and on a loaded machine an OpenMP team waiting for a busy core dominates
    (seen: 23 ms against 3 µs for a 32×32 linear). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# fixtures that load the shipped 135M model: a test that uses one is slow (`make test-fast` leaves it out)
SLOW_FIXTURES = {"smollm2", "smollm2_own"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def load_smol_tokenizer():
    """The SmolLM2 tokenizer: from the session cache when the model was already converted there, else straight
    from the GGUF file (a few seconds, instead of the ~20 s conversion)."""
    from transformers import AutoTokenizer

    from deltatune import data
    from deltatune.data import models

    if models._complete(models.cache_dir() / "models" / "smollm2-135m"):
        return models.load_tokenizer("smollm2-135m")
    item = models.SHIPPED["smollm2-135m"]
    package = data.package_folder(item.module, item.requirement, "the SmolLM2 tokenizer")
    return AutoTokenizer.from_pretrained(package, gguf_file=models._GGUF_FILE, local_files_only=True)


@pytest.fixture(scope="session")
def smol_tok():
    """``load_smol_tokenizer()``, once per session."""
    return load_smol_tokenizer()


# ---------------------------------------------------------------- PEFT parity helpers


def close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Equal to float rounding, with a tolerance scaled by the values compared."""
    return torch.allclose(ours, theirs, rtol=rtol, atol=rtol * float(theirs.detach().abs().max()))


def assert_close_after_adam(ours: torch.Tensor, theirs: torch.Tensor, rtol: float, *, share: float = 0.01,
                            msg: str = "") -> None:
    """Two trainings' tensors equal up to summation order, after Adam steps. Adam divides by sqrt(v), so where a
    gradient is within rounding of zero its step can go either way, and an entry may then differ by up to the
    learning rate although every gradient agrees to rounding (seen on fresh clones: 1 entry of 256). So all but
    ``share`` of the entries (at least one may) must agree within ``rtol`` of the tensor's largest entry; a real
    fault (a wrong gradient, a wrong normalisation) moves far more of them."""
    scale = max(float(theirs.detach().abs().max()), 1e-6)
    off = ~torch.isclose(ours, theirs, rtol=rtol, atol=rtol * scale)
    allowed = max(1, int(share * theirs.numel()))
    assert int(off.sum()) <= allowed, (
        f"{msg}: {int(off.sum())} of {theirs.numel()} entries differ by more than {rtol:g} of the largest "
        f"({scale:.3g}; {allowed} may); the largest difference is {float((ours - theirs).abs().max()):.3g}")


def eval_logits(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits in eval mode (no dropout)."""
    model.eval()
    with torch.no_grad():
        return model(**x).logits


def randomised_peft(base: torch.nn.Module, config, seed: int = 3, scale: float = 0.3) -> torch.nn.Module:
    """PEFT's model with every trainable adapter tensor moved off its init (a trained adapter)."""
    import copy

    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "modules_to_save" not in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def peft_round_trip(base: torch.nn.Module, reference: torch.nn.Module, config_cls: type, method: str,
                    x: dict[str, torch.Tensor], folder: Path) -> dict:
    """A trained PEFT adapter (``reference``) saved, imported by deltatune, exported again and reloaded by PEFT:
    the logits equal PEFT's at every stage, the export's config holds only fields ``config_cls`` has, and
    importing the export gives the same tensors again. Returns the exported config."""
    import copy
    import dataclasses
    import json

    from peft import PeftModel

    import deltatune as dt

    reference.save_pretrained(folder / "peft")
    expected = eval_logits(reference, x)
    assert (expected - eval_logits(base, x)).abs().max() > 1e-2 * expected.abs().max()

    tuned = dt.import_peft(copy.deepcopy(base), folder / "peft")
    assert tuned.method.name == method
    assert close(eval_logits(tuned, x), expected)

    dt.export_peft(tuned, folder / "back")
    config_back = json.loads((folder / "back" / "adapter_config.json").read_text())
    assert config_back["peft_type"] == config_cls().peft_type.value
    assert set(config_back) <= {f.name for f in dataclasses.fields(config_cls)}, "only fields PEFT's config has"
    again = PeftModel.from_pretrained(copy.deepcopy(base), folder / "back").eval()
    assert close(eval_logits(again, x), expected)
    twice = dt.import_peft(copy.deepcopy(base), folder / "back")
    assert all(torch.equal(a, b) for a, b in zip(twice.delta_state_dict().values(),
                                                 tuned.delta_state_dict().values(), strict=True))
    return config_back


# ---------------------------------------------------------------- one tiny model per architecture of the table


def tiny_architecture(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model (width 32, two layers per stack) of ``model_type``, a key of
    ``deltatune.core.architectures.TABLE``, in eval mode; dropout off so that training steps are deterministic."""
    import transformers as tf

    torch.manual_seed(seed)
    dec = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
    enc = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    seq2seq = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                   dropout=0.0)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3)
    makers = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**dec)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**dec)),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**dec, head_dim=8)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**dec)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**dec, head_dim=8)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**dec, head_dim=8)),
        "gemma3_text": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**dec, head_dim=8)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**dec, pad_token_id=0)),
        "qwen3_moe": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**dec, head_dim=8, moe_intermediate_size=16,
                                                                      num_experts=4, num_experts_per_tok=2)),
        "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**dec, num_local_experts=4, num_experts_per_tok=2)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                         n_positions=64)),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)),
        "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**enc)),
        "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**enc, pad_token_id=1)),
        "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
            dropout_rate=0.0)),
        "mt5": lambda: tf.MT5ForConditionalGeneration(tf.MT5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
            dropout_rate=0.0)),
        "bart": lambda: tf.BartForConditionalGeneration(tf.BartConfig(**seq2seq)),
        "mbart": lambda: tf.MBartForConditionalGeneration(tf.MBartConfig(**seq2seq)),
        "vit": lambda: tf.ViTForImageClassification(tf.ViTConfig(**vision, image_size=16, patch_size=4)),
        "swin": lambda: tf.SwinForImageClassification(tf.SwinConfig(
            image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=3)),
        "audio-spectrogram-transformer": lambda: tf.ASTForAudioClassification(tf.ASTConfig(
            **vision, num_mel_bins=16, max_length=32, patch_size=8, frequency_stride=8, time_stride=8)),
    }
    return makers[model_type]().eval()


def architecture_batch(model: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """Two inputs of the kind ``model`` takes: 7 tokens (and 5 decoder tokens), 16×16 images, or 32×16 spectrograms."""
    from deltatune.core import architectures

    g = torch.Generator().manual_seed(seed)
    kind = architectures.of(model).inputs
    if kind == "pixels":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    if kind == "spectrogram":
        return {"input_values": torch.randn(2, 32, 16, generator=g)}
    x = {"input_ids": torch.randint(2, VOCAB, (2, 7), generator=g)}
    if model.config.is_encoder_decoder:
        x["decoder_input_ids"] = torch.randint(2, VOCAB, (2, 5), generator=g)
    return x
