"""``export --format gguf``: the merged model as one GGUF file.

References: the ``gguf`` package's reader (every tensor read back equals the merged model's once transformers' own
inverse of llama.cpp's Q/K permutation is applied), transformers' GGUF loader (``from_pretrained(folder,
gguf_file=...)``: the same logits and the same tokenisation as the model and tokenizer exported), and, on the shipped
SmolLM2, the GGUF file llama.cpp's converter wrote (every tensor equal to that file's, de-quantised, and the same
tokenizer metadata).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import save_word_llama, tiny_gpt2
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.interop.gguf import GGUF_FILE, export_gguf

gguf = pytest.importorskip("gguf")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 320  # the tokenizer has 300 tokens: the 20 rows past it are written as [PAD<i>] tokens
TEXTS = ["the quick brown fox jumps", "<|im_start|>what a great day<|im_end|>", "numbers 12345 and  two spaces"]


def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) trained here on a few sentences: 300 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "what a great day number one",
                             "tokenizers learn their merges from text"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def save_llama(folder: Path, tied: bool = True) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, bos_token_id=1,
                      eos_token_id=0, rope_theta=5e4)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    bpe_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("bpe-llama"))


def randomise(tuned: dt.Tuned, seed: int = 1) -> dt.Tuned:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for form in tuned.forms().values():
            for attr in ("values", "B"):
                t = getattr(form, attr, None)
                if isinstance(t, nn.Parameter):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return tuned


@pytest.fixture(scope="module")
def sparse_artifact(base_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("art") / "spiel"
    randomise(dt.attach(dt.models.load(base_folder), "spiel", density=0.05)).save(path)
    return path


def merged_of(base_folder: Path, artifact: Path) -> nn.Module:
    return dt.load(dt.models.load(base_folder), artifact).merge().eval()


def read_back(folder: Path, config) -> dict[str, torch.Tensor]:
    """The file's tensors under transformers' names, with transformers' inverse of the Q/K permutation applied."""
    reader = gguf.GGUFReader(folder / GGUF_FILE)
    processor = LlamaTensorProcessor(config={"num_attention_heads": config.num_attention_heads,
                                             "num_key_value_heads": config.num_key_value_heads})
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    to_hf = {names.get_name(n, try_suffixes=(".weight",)): n for n in ALL_HF_NAMES(config)}
    out = {}
    for t in reader.tensors:
        data = np.array(t.data)
        out[to_hf[t.name]] = torch.from_numpy(np.array(processor.process(data, t.name).weights))
    return out


def ALL_HF_NAMES(config) -> list[str]:  # noqa: N802
    layer = ["input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    return ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            *(f"model.layers.{i}.{m}.weight" for i in range(config.num_hidden_layers) for m in layer)]


def field(reader, key: str):
    return reader.fields[key].contents()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def load_gguf(folder: Path) -> tuple[nn.Module, object]:
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE, local_files_only=True)


# -- round trips ----------------------------------------------------------------------------------------------------
def test_f32_round_trip_tensors_logits_and_tokenizer(base_folder: Path, sparse_artifact: Path, tmp_path: Path) -> None:
    out = dt.export(sparse_artifact, tmp_path / "g", format="gguf")
    merged = merged_of(base_folder, sparse_artifact)
    config = merged.config
    back = read_back(out, config)
    ours = dict(merged.named_parameters())  # tied: lm_head is the embedding, named once
    assert set(back) == set(ours)
    for name, value in ours.items():
        assert torch.equal(back[name], value.detach()), name  # f32: bit for bit

    reader = gguf.GGUFReader(out / GGUF_FILE)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.ALL_F32)
    assert field(reader, "llama.block_count") == config.num_hidden_layers
    assert field(reader, "llama.attention.head_count_kv") == config.num_key_value_heads
    assert field(reader, "llama.rope.freq_base") == pytest.approx(5e4)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == VOCAB and tokens[300:] == [f"[PAD{i}]" for i in range(300, VOCAB)]
    assert types[:3] == [int(gguf.TokenType.CONTROL)] * 3 and set(types[300:]) == {int(gguf.TokenType.UNUSED)}

    loaded, tokenizer = load_gguf(out)
    assert loaded.config.tie_word_embeddings
    ids = torch.tensor([tokenizer(TEXTS[0]).input_ids])
    theirs, mine = logits(loaded, ids), logits(merged, ids)
    assert (theirs - mine).abs().max() <= 1e-4 * mine.abs().max()
    assert (mine - logits(dt.models.load(base_folder).eval(), ids)).abs().max() > 1e-2 * mine.abs().max()
    original = dt.models.load_tokenizer(base_folder)
    for text in TEXTS:
        assert tokenizer(text).input_ids == original(text).input_ids


def test_f16_matrices_half_norms_float(base_folder: Path, sparse_artifact: Path, tmp_path: Path) -> None:
    out = dt.export(sparse_artifact, tmp_path / "g", format="gguf", dtype="f16")
    merged = merged_of(base_folder, sparse_artifact)
    reader = gguf.GGUFReader(out / GGUF_FILE)
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16)
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert {k for k, v in kinds.items() if v == gguf.GGMLQuantizationType.F32} == \
        {k for k in kinds if k.endswith("norm.weight")}
    back = read_back(out, merged.config)
    for name, value in merged.named_parameters():
        expected = value.detach() if value.dim() == 1 else value.detach().half()
        assert back[name].dtype == expected.dtype and torch.equal(back[name], expected), name
    loaded, _ = load_gguf(out)
    ids = torch.tensor([[1, 5, 40, 200, 299, 7]])
    mine = logits(merged, ids)
    assert (logits(loaded, ids) - mine).abs().max() <= 1e-2 * mine.abs().max()  # float16: ~3 digits


def test_untied_head_after_a_merge_is_written_and_loads_untied(base_folder: Path, tmp_path: Path) -> None:
    """A LoRA on the tied embedding changes it only there (as in PEFT), so the merged head differs from the
    embedding: the file must hold output.weight, and the loader then unties them."""
    tuned = randomise(dt.attach(dt.models.load(base_folder), "lora", r=2, targets=["embed_tokens", "q_proj"]))
    tuned.save(tmp_path / "art")
    out = dt.export(tmp_path / "art", tmp_path / "g", format="gguf")
    names = {t.name for t in gguf.GGUFReader(out / GGUF_FILE).tensors}
    assert "output.weight" in names
    merged = merged_of(base_folder, tmp_path / "art")
    loaded, _ = load_gguf(out)
    assert not loaded.config.tie_word_embeddings
    ids = torch.tensor([[1, 5, 40, 200, 299, 7]])
    mine = logits(merged, ids)
    assert (logits(loaded, ids) - mine).abs().max() <= 1e-4 * mine.abs().max()


def test_a_tuned_model_is_exported_and_left_as_it_was(base_folder: Path, tmp_path: Path) -> None:
    tuned = randomise(dt.attach(dt.models.load(base_folder), "spiel", density=0.05)).eval()
    ids = torch.tensor([[1, 5, 40, 200, 299, 7]])
    before = logits(tuned, ids)
    out = dt.export(tuned, tmp_path / "g", format="gguf")  # the tokenizer: the folder the model was loaded from
    assert not tuned.merged
    assert (logits(tuned, ids) - before).abs().max() <= 1e-5 * before.abs().max()
    loaded, _ = load_gguf(out)
    assert (logits(loaded, ids) - before).abs().max() <= 1e-4 * before.abs().max()


# -- refusals -------------------------------------------------------------------------------------------------------
def test_refusals_name_the_problem_and_write_nothing(base_folder: Path, sparse_artifact: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "g"
    with pytest.raises(dt.DeltatuneError, match="Llama-architecture.*GPT2LMHeadModel"):
        dt.export(dt.attach(tiny_gpt2(), "lora", r=2), out, format="gguf", base=str(base_folder))
    word = save_word_llama(tmp_path / "word")  # a word-level tokenizer: no BPE merges
    with pytest.raises(dt.DeltatuneError, match="byte-level BPE"):
        dt.export(dt.attach(dt.models.load(word), "lora", r=2), out, format="gguf")
    with pytest.raises(dt.DeltatuneError, match="rank is an option of format 'peft'"):
        dt.export(sparse_artifact, out, format="gguf", rank=4)
    with pytest.raises(dt.DeltatuneError, match="dtype='q8'.*f32 or f16"):
        dt.export(sparse_artifact, out, format="gguf", dtype="q8")
    model = dt.models.load(base_folder)
    model.config.attention_bias = True  # a config llama.cpp's llama would run differently
    with pytest.raises(dt.DeltatuneError, match="attention_bias"):
        export_gguf(model, dt.models.load_tokenizer(base_folder), out)
    with pytest.raises(dt.DeltatuneError, match="unknown format 'onnx'.*peft, gguf"):
        dt.export(sparse_artifact, out, format="onnx")
    assert not out.exists()


def test_cli_writes_the_file_and_replaces_its_own_export(sparse_artifact: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for dtype in ("f16", "f32"):  # the second run replaces the first export
        result = runner.invoke(app, ["export", str(sparse_artifact), "--out", str(tmp_path / "g"), "--format", "gguf",
                                     "--dtype", dtype])
        assert result.exit_code == 0, result.output
        assert f"model.gguf (gguf, {dtype})" in result.output.replace("\n", "")
    reader = gguf.GGUFReader(tmp_path / "g" / GGUF_FILE)
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.ALL_F32)


# -- against llama.cpp's own converter --------------------------------------------------------------------------------
def test_shipped_smollm2_matches_the_gguf_llama_cpp_wrote(smollm2: nn.Module, tmp_path: Path) -> None:
    """The shipped SmolLM2 is llama.cpp's Q4_1 GGUF de-quantised by transformers: writing it back must give that
    file's tensors exactly (names, Q/K permutation, layout) and its tokenizer metadata."""
    from deltatune.data import models
    from deltatune.data.sets import package_folder

    item = models.SHIPPED["smollm2-135m"]
    reference = gguf.GGUFReader(package_folder(item.module, item.requirement, "smollm2") / models._GGUF_FILE)
    out = export_gguf(copy.deepcopy(smollm2), models.load_tokenizer("smollm2-135m"), tmp_path / "g")
    ours = gguf.GGUFReader(out / GGUF_FILE)
    theirs = {t.name: t for t in reference.tensors}
    assert sorted(theirs) == sorted(t.name for t in ours.tensors)
    for t in ours.tensors:
        expected = gguf.dequantize(theirs[t.name].data, theirs[t.name].tensor_type)
        assert np.array_equal(np.asarray(t.data), expected), t.name
    same = ["llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
            "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
            "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count", "llama.vocab_size",
            "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
            "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template"]
    for key in same:
        assert field(ours, key) == field(reference, key), key
