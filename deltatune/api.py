"""The Python functions behind the CLI verbs (each verb calls the function of the same name).

They take their inputs first and the folder they write (``out``) last, as the CLI does (inputs positional, the
output after ``--out``). Every writer owns ``out`` through
``artifact.destination``: it refuses an ``out`` that is or holds one of its inputs, and a non-empty folder that is
not its own kind of output unless ``overwrite=True`` (``--overwrite``). The words: ``merge`` folds one
delta into its base and writes a plain model; ``merge_deltas`` makes one new delta of several; ``compose`` writes
θ0 + the sum of several deltas as a plain model and ``revert`` rebuilds it without one (``deltatune.ops.compose``
says more).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from deltatune.core import artifact, quantized, registry
from deltatune.core.options import describe as describe_method
from deltatune.core.tuned import Tuned, load
from deltatune.data import models
from deltatune.errors import DeltatuneError
from deltatune.interop.gguf import DTYPES as GGUF_DTYPES
from deltatune.interop.gguf import check_llama, export_gguf
from deltatune.interop.peft import check_rank, export_peft, import_peft, read_peft

FORMATS = ("peft",)  # what import reads
EXPORT_FORMATS = ("peft", "gguf")  # what export writes


def methods(name: str | None = None) -> Any:
    """Registered method names with a one-line description each; with ``name``, that method's family and options
    (each with its type, default and meaning: ``deltatune methods NAME``)."""
    if name is not None:
        return describe_method(name)
    return {name: registry.get(name).description for name in registry.names()}


def _check_format(format: str, formats: tuple[str, ...] = FORMATS) -> None:
    """``formats``: what the verb takes (``import`` reads PEFT adapters; ``export`` also writes GGUF)."""
    if format not in formats:
        raise DeltatuneError(f"unknown format {format!r}: supported formats are {', '.join(formats)}")


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """What an artifact holds: method, config, base fingerprint, trainable and stored sizes."""
    meta = artifact.read_meta(path)
    tensors = artifact.read_tensors(path, meta)
    fp = meta.get("fingerprint", {})
    return {
        "path": str(path),
        "method": meta["method"],
        "deltatune_version": meta.get("deltatune_version"),
        "config": meta["config"],
        "base": {
            "architecture": fp.get("architecture"),
            "model_type": fp.get("model_type"),
            "name_or_path": fp.get("name_or_path"),
            "num_parameters": fp.get("num_parameters"),
            "targeted_tensors": len(fp.get("tensors", {})),
            "shapes_hash": fp.get("shapes"),
            # the model class it needs (a fresh classification head: its labels); None for older artifacts
            "head": fp.get("head"),
        },
        "trainable": meta.get("sizes", {}).get("trainable"),
        # the parameters of a fresh classification head that trained fully next to the method's delta
        "fresh_head": meta.get("fresh_head") or [],
        "stored_tensors": len(tensors),
        "stored_values": sum(t.numel() for t in tensors.values()),
        "stored_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "file_bytes": meta.get("files", {}).get(artifact.TENSOR_FILE, {}).get("bytes"),
        # a compressed artifact (deltatune compress): the size of what it was made from, and how
        "original_bytes": meta.get("sizes", {}).get("original_bytes") or meta["config"].get("source_bytes"),
        "compression": meta.get("compression"),
    }


def compress(artifact_path: str | os.PathLike, out: str | os.PathLike, *, calibrate: Any = None,
             **options: Any) -> Path:
    """``deltatune compress``: ComPEFT (top-k + ternary, bit-packed) of a saved delta; see deltatune.ops.compress.
    ``calibrate``: a data section (a mapping, as a run config's ``data:``, or a ``DataConfig``) whose training part
    gives the dev split that density, α and scope are chosen on (``deltatune.ops.compress_calibrate``)."""
    from deltatune.ops.compress import compress as compress_artifact
    from deltatune.train.config import parse_data_section

    if isinstance(calibrate, dict | list):
        calibrate = parse_data_section(calibrate)  # every unknown key, with the nearest known one, in one error
    return compress_artifact(artifact_path, out, calibrate=calibrate, **options)


def export(artifact_or_tuned: str | os.PathLike | Tuned, out: str | os.PathLike, *, base: str | nn.Module | None = None,
           format: str = "peft", rank: int | None = None, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Export an artifact (a path, with its base model) or a tuned model to another library's format.

    ``format="peft"``: a PEFT LoRA adapter; a low-rank delta as it is, or with ``rank=R`` any weight-side delta
    (sparse, dense, sums) as a rank-R LoRA by truncated SVD, with ``export-report.json`` giving the error per tensor.
    ``format="gguf"``: the delta merged into its base, as ``out/model.gguf`` (Llama architecture; ``dtype`` "f32",
    the default, or "f16"); the tokenizer is the base's (``base``, else the one the artifact or the model names).
    A ``Tuned`` is merged for the GGUF export and unmerged after (as ``unmerge`` does: within float rounding)."""
    _check_format(format, EXPORT_FORMATS)
    if format == "peft" and dtype is not None:
        raise DeltatuneError("dtype is an option of format 'gguf'; a PEFT adapter keeps the delta's own dtype")
    if format == "gguf" and rank is not None:
        raise DeltatuneError("rank is an option of format 'peft' (a LoRA of that rank); a GGUF file holds the "
                             "merged model, exactly")
    if rank is not None:
        check_rank(rank)
    dtype = dtype or "f32"
    if format == "gguf" and dtype not in GGUF_DTYPES:
        raise DeltatuneError(f"dtype={dtype!r}: GGUF export writes {' or '.join(GGUF_DTYPES)}")
    if isinstance(artifact_or_tuned, Tuned):
        if format == "peft":
            return export_peft(artifact_or_tuned, out, rank=rank, overwrite=overwrite)
        return _gguf_of_tuned(artifact_or_tuned, out, base, dtype, overwrite)
    meta = artifact.read_meta(artifact_or_tuned)  # a bad path fails before a model is loaded
    base, head = models.base_of(meta, base)
    with artifact.destination(out, format, inputs=[artifact_or_tuned, base], overwrite=overwrite):
        tuned = load(models.load_base(base, head), artifact_or_tuned)
        if format == "peft":
            return export_peft(tuned, out, rank=rank)
        check_llama(tuned.model)  # before the tokenizer is read and the weights are merged
        return export_gguf(tuned.merge(), _tokenizer_for_gguf(base), out, dtype=dtype)


def _tokenizer_for_gguf(base: str | nn.Module | None) -> Any:
    if not isinstance(base, str | os.PathLike) or not base:
        raise DeltatuneError("a GGUF file holds the tokenizer, and this model does not say where its own is: pass "
                             "base=... (the shipped name or the folder of the base model, with its tokenizer)")
    return models.load_tokenizer(base)


def _gguf_of_tuned(tuned: Tuned, out: str | os.PathLike, base: str | nn.Module | None, dtype: str,
                   overwrite: bool) -> Path:
    check_llama(tuned.model)
    if base is None:
        base = getattr(getattr(tuned.model, "config", None), "_name_or_path", None)
    tokenizer = _tokenizer_for_gguf(base)
    plain = tuned.merge()
    try:
        return export_gguf(plain, tokenizer, out, dtype=dtype, overwrite=overwrite)
    finally:
        tuned.unmerge()


def import_(adapter: str | os.PathLike, out: str | os.PathLike, *, base: str | nn.Module, format: str = "peft",
            overwrite: bool = False) -> Path:
    """Import another library's adapter into a deltatune artifact at ``out`` (``import`` is a Python keyword)."""
    _check_format(format)
    read_peft(adapter)  # a bad adapter fails before a model is loaded
    with artifact.destination(out, "artifact", inputs=[adapter, base], overwrite=overwrite):
        import_peft(models.load_base(base), adapter).save(out)
    return Path(out)


def merge(path: str | os.PathLike, *, base: str | nn.Module | None = None, out: str | os.PathLike,
          overwrite: bool = False) -> Path:
    """Merge an artifact into its base and write a ``save_pretrained`` folder (a plain model, with the head the
    artifact was trained with). ``base``: default the one the artifact records, as ``export`` takes it."""
    base, head = models.base_of(artifact.read_meta(path), base)  # a bad path fails before a model is loaded
    with artifact.destination(out, "model", inputs=[path, base], overwrite=overwrite) as dest:
        plain = load(models.load_base(base, head), path).merge()
        if not hasattr(plain, "save_pretrained"):
            raise DeltatuneError(f"{type(plain).__name__} has no save_pretrained; merge in Python and save it yourself")

        def fill(tmp: Path) -> None:
            with models.quiet_transformers():  # no "Writing model shards" bar
                plain.save_pretrained(tmp)
            models.copy_tokenizer(base, tmp)

        dest.write(fill)
    return Path(out)


def compose(deltas: list[str], out: str | os.PathLike, *, base: str | None = None, overwrite: bool = False) -> Path:
    """``deltatune compose``: θ0 + the sum of several artifacts, merged and written as a plain model (with a
    record of its parts, so ``revert`` can take one out exactly). In Python, ``dt.compose`` keeps the
    composition live instead."""
    from deltatune.ops.compose import save_composed

    return save_composed(deltas, out, base=base, overwrite=overwrite)


def revert(composed: str | os.PathLike, part: str, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``deltatune revert``: the composed model without ``part``, rebuilt from the base (exact)."""
    from deltatune.ops.compose import save_reverted

    return save_reverted(composed, part, out, overwrite=overwrite)


def merge_deltas(deltas: list[str], out: str | os.PathLike, **options: Any) -> Any:
    """``deltatune merge-deltas``: ``dt.merge_deltas(deltas, out, ...)`` (task arithmetic, TIES, DARE)."""
    from deltatune.ops.merging import merge_deltas as merge_deltas_

    return merge_deltas_(deltas, out, **options)


def _artifact_base(path: str | os.PathLike, base: str | None) -> tuple[str, dict[str, Any] | None]:
    """The base model's name and the head the artifact records (``models.base_of``), naming the artifact."""
    try:
        name, head = models.base_of(artifact.read_meta(path), base)
    except DeltatuneError:
        raise DeltatuneError(f"{path} does not say which base model it belongs to: pass base=...") from None
    return str(name), head


def _check_labels(path: str | os.PathLike, head: dict[str, Any] | None, model: nn.Module, data: Any) -> None:
    """Refuse data that does not fit the classification head the artifact was trained with (the fingerprint
    check would say only that parameter shapes differ)."""
    if not head or head.get("task") != "classification":
        return
    is_head = artifact.model_task(type(model).__name__) == "classification"
    n = getattr(model.config, "num_labels", None) if is_head else None
    if n != head.get("num_labels"):
        names = ", ".join((head.get("id2label") or {}).values())
        given = f"{n} labels" if is_head else f"task {data.task!r} without a classification head"
        raise DeltatuneError(
            f"{path} was trained with a {head.get('num_labels')}-label classification head ({names}), but the data "
            f"{getattr(data, 'name', None) or getattr(data, 'path', None)} gives {given}: evaluate it on the data it was trained on (e.g. --config "
            "with its run config)"
        )


def eval(path: str | os.PathLike | None, data: dict[str, Any], *, base: str | None = None,  # noqa: A001 (the verb)
         batch_size: int = 16, objective: str | dict[str, Any] | None = None, fuse_large: str | None = None,
         fuse_small: str | None = None, experts: list[str] | None = None,
         alpha: str | float | list[float] = "dynamic") -> dict[str, float]:
    """Evaluate an artifact on a data config (``deltatune.data.tasks.DataConfig`` keys): loss, perplexity for
    text and chat, accuracy where there are labels, ``edit_success`` and ``token_accuracy`` for task
    ``edit``. The held-out split of the data is used (for edits: the edits themselves). ``objective``: the
    run's ``train.objective`` for data that needs one (preference pairs: the DPO family's β; prompts: GRPO's
    rewards, e.g. ``{"name": "grpo", "rewards": ["numeric"]}``).

    ``fuse_large`` with ``experts`` (and no ``path``): evaluate the large model steered by the small experts'
    logits (``dt.fuse``; label words are scored on the fused log-probabilities); adds ``alpha_mean`` per expert."""
    from deltatune.data import tasks
    from deltatune.train.config import parse_data_section

    cfg = data if isinstance(data, tasks.DataConfig) else parse_data_section(dict(data))
    if fuse_large is not None or experts:
        if path is not None or fuse_large is None or not experts:
            raise DeltatuneError("fused evaluation takes --fuse-large and at least one --expert (and no ARTIFACT)")
        fused = fuse(fuse_large, fuse_small, experts, alpha=alpha)
        task = tasks.build_task(cfg, models.load_tokenizer(fuse_large), fused.large, objective)
        _use_objective(task, objective)
        metrics = task.evaluate(fused, batch_size)
        used = torch.cat([a.reshape(-1, len(experts)) for a in fused.alpha_log])
        return {**metrics, **{f"alpha_mean_expert{i}": float(used[:, i].mean()) for i in range(len(experts))}}
    if path is None:
        raise DeltatuneError("say which artifact to evaluate (or --fuse-large with --expert)")
    name, head = _artifact_base(path, base)
    # a delta trained on a quantized base is evaluated on the base quantized as it records (the data section's way:
    # the compute dtype by name)
    quant = quantized.load_options((head or {}).get("quantization"))
    if "compute_dtype" in quant:
        quant["compute_dtype"] = str(quant["compute_dtype"]).removeprefix("torch.")
    model, _, task = tasks.load_for_task(cfg, name, objective=objective,  # checks cfg first; a head sized to the data
                                         quantization=quant or None)
    _use_objective(task, objective)
    _check_labels(path, head, model, cfg)
    tuned = load(model, path)
    return task.evaluate(tuned, batch_size)


def _use_objective(task: Any, objective: Any) -> None:
    """Score with the run's objective (the DPO family's β and options), as training did: the preference task is
    built with DPO's defaults and takes another only this way. An objective made for no data task (sft) changes
    nothing; one made for another task is refused by name."""
    from deltatune.data import objectives

    if objective is None:
        return
    found, options = objectives.parse(objective)
    problem = objectives.task_problem(found, task.kind)
    if problem is not None:
        raise DeltatuneError(problem)
    if found.task is not None:
        task.use_objective(options)


def generate(path: str | os.PathLike | None, prompt: str, *, base: str | None = None, max_new_tokens: int = 64,
             stream: bool = True, chat: bool | None = None, fuse_large: str | None = None,
             fuse_small: str | None = None, experts: list[str] | None = None,
             alpha: str | float | list[float] = "dynamic") -> str:
    """Generate from a prompt with the artifact's delta attached (``path=None``: the base model alone).

    The tokenizer's chat template is applied when it has one (``chat=False`` turns it off); with
    ``stream`` the text is printed as it is produced. An artifact trained with a classification head (the
    quick demo's) has no text to generate: it classifies the prompt and returns the label it predicts.

    ``fuse_large`` (with ``experts``, artifacts or PEFT adapters trained on ``fuse_small``): decode from the large
    model steered by the experts' logits (``dt.fuse``, docs/fusion.md); ``alpha`` "dynamic" or fixed."""
    from transformers import TextStreamer

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DeltatuneError(f"max_new_tokens={max_new_tokens!r}: must be a whole number of at least 1")
    if fuse_large is not None or experts:
        if path is not None or fuse_large is None or not experts:
            raise DeltatuneError("fused generation takes --fuse-large and at least one --expert (and no ARTIFACT): "
                                 "the experts are the small model's artifacts")
        return _fused_generate(prompt, fuse_large, fuse_small, experts, alpha, max_new_tokens, stream, chat)
    name, head = _artifact_base(path, base) if path is not None else (base, None)
    if not name:
        raise DeltatuneError("generate needs an artifact or base=... (a shipped name or a folder)")
    model = models.load_base(name, head)
    runner = load(model, path) if path is not None else model
    tok = models.load_tokenizer(name)
    if artifact.model_task(type(model).__name__) == "classification":
        return _classify(runner, tok, prompt, stream)
    if not getattr(model, "can_generate", lambda: False)():
        raise DeltatuneError(
            f"{name} loads as a {type(model).__name__}, which has no language-model head to generate with; use a "
            "causal LM (e.g. smollm2-135m), or `deltatune eval` for a model trained on classification"
        )
    # the template the delta was trained with (data.chat_template), else the tokenizer's own
    ids = _prompt_ids(tok, prompt, chat, runner.delta.chat_template if isinstance(runner, Tuned) else None)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        out = runner.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                              pad_token_id=tok.pad_token_id)
    # a decoder-only model's output starts with the prompt; an encoder-decoder's (T5, BART) is the answer alone
    start = 0 if getattr(model.config, "is_encoder_decoder", False) else ids["input_ids"].shape[1]
    return tok.decode(out[0, start:], skip_special_tokens=True)


def fuse(large: str | nn.Module, small: str | nn.Module | None = None, experts: list[str] | tuple[str, ...] = (),
         **options: Any) -> Any:
    """``dt.fuse``: a large model steered at decoding time by small experts (``deltatune.ops.fusion.fuse``)."""
    from deltatune.ops.fusion import fuse as fuse_models

    return fuse_models(large, small, experts, **options)


def _prompt_ids(tok: Any, prompt: str, chat: bool | None, template: str | None = None) -> Any:
    """The prompt's ids: as a user message in the chat template (``template``, else the tokenizer's) when there is
    one and ``chat`` is not False, else the plain text."""
    use_chat = bool(template or getattr(tok, "chat_template", None)) if chat is None else chat
    if use_chat:
        return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True, chat_template=template)
    return tok(prompt, return_tensors="pt")


def _fused_generate(prompt: str, large: str, small: str | None, experts: list[str], alpha: Any,
                    max_new_tokens: int, stream: bool, chat: bool | None) -> str:
    from transformers import TextStreamer

    fused = fuse(large, small, experts, alpha=alpha)
    tok = models.load_tokenizer(large)
    ids = _prompt_ids(tok, prompt, chat)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    out = fused.generate(ids["input_ids"], ids.get("attention_mask"), max_new_tokens=max_new_tokens,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, streamer=streamer)
    if stream and fused.alpha_log:
        a = torch.cat(fused.alpha_log)  # (steps, experts)
        per = ", ".join(f"expert {i}: mean {float(a[:, i].mean()):.2f} (min {float(a[:, i].min()):.2f}, "
                        f"max {float(a[:, i].max()):.2f})" for i in range(a.shape[1]))
        print(f"\n[alpha over {a.shape[0]} steps: {per}]", end="", flush=True)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _classify(runner: nn.Module, tok: Any, prompt: str, stream: bool) -> str:
    """The label a sequence classifier predicts for ``prompt`` (its ``id2label`` name), printed with its
    probability when ``stream``."""
    ids = tok(prompt, return_tensors="pt", truncation=True)
    with torch.no_grad():
        probs = runner(**ids).logits.float().softmax(-1)[0]
    k = int(probs.argmax())
    label = str(runner.config.id2label.get(k, k))
    if stream:
        print(f"{label} (p={float(probs[k]):.2f})", end="", flush=True)
    return label


def search(config: str | os.PathLike | dict[str, Any], out: str | os.PathLike, *, resume: bool = False,
           storage: str | None = None, trials: int | None = None, overrides: list[str] | None = None,
           runner: Any = None, on_trial: Any = None, refit: int = 0) -> Any:
    """``deltatune search``: a multi-objective configuration search over a run config (``deltatune.ops.search``);
    returns the optuna ``Study``.

    ``config``: a YAML path or a mapping, a run config plus ``search: {space, trials, objectives, ...}``
    (``docs/search.md``); ``overrides``: ``key=value`` items as ``deltatune train --set`` takes them. ``out``: the
    study folder (``study.db``, ``trials.csv``, ``pareto.png``, ``pareto/<trial>.yaml``); a folder that is not
    empty is refused without ``resume``, which continues a killed search or joins one as another worker.
    ``storage``: an optuna RDB URL (``sqlite:///...``, ``postgresql://...``) that several workers share.
    ``trials`` overrides ``search.trials``. ``runner(config, folder) -> dict``: how a trial trains (default: a
    ``dt.train`` run in a process of its own, scored on the dev split); ``on_trial(trial, done, total)`` is called
    after each trial. ``refit`` K > 0: the front's K best configurations by the first objective are trained again on
    the config's own data at its budget with ``search.refit_seeds`` seeds (default 3) and scored on its eval split,
    written to ``OUT/refit.json`` (mean ± standard error per configuration)."""
    from deltatune.ops import search as search_ops
    from deltatune.ops.search_run import isolated

    raw = search_config(config, overrides)
    return search_ops.run(raw, out, validate=config_problems, runner=runner or isolated("deltatune.api:search_trial"),
                          resume=resume, storage=storage, trials=trials, on_trial=on_trial, refit=refit)


def search_config(config: str | os.PathLike | dict[str, Any], overrides: list[str] | None = None) -> dict[str, Any]:
    """A search config's mapping: a YAML file's (or a mapping) with ``key=value`` overrides applied."""
    from deltatune.train.config import apply_overrides, read_config

    raw = read_config(config) if isinstance(config, str | os.PathLike) else dict(config)
    if not isinstance(raw, dict):
        raise DeltatuneError(f"{config}: a search config is a mapping (a run config with a search: section)")
    return apply_overrides(raw, overrides)


def config_problems(raw: dict[str, Any]) -> list[str]:
    """A run config mapping's problems, one line each ([] for a good one): what ``deltatune train`` would refuse."""
    from deltatune.train.config import parse_config

    try:
        parse_config(raw)
    except DeltatuneError as e:
        lines = str(e).splitlines()
        listed = [line.strip().removeprefix("- ") for line in lines[1:] if line.strip()]
        return listed or [lines[0].removeprefix("bad run config: ")]
    return []


def search_trial(config: dict[str, Any]) -> dict[str, Any]:
    """One trial of ``deltatune search`` (run in its own process by ``deltatune.ops.search_run``): train the
    config and return its final evaluation (on the search's dev split) and its costs."""
    from deltatune.ops.search_run import report_intermediate
    from deltatune.train import train
    from deltatune.train.callbacks import Callback

    class Intermediate(Callback):
        """Each evaluation on the dev split, to the search's pruner (a no-op unless a search runs this trial)."""

        def on_eval(self, step: int, metrics: dict[str, float]) -> None:
            report_intermediate(step, metrics)

    summary = train(config, callbacks=[Intermediate()])
    final = summary["final"]
    return {"metrics": {k.removeprefix("eval_"): v for k, v in final.items() if k.startswith("eval_")},
            "trainable": summary["trainable"], "peak_memory": summary["peak_memory_bytes"],
            "seconds_per_step": summary["seconds_per_step"], "steps": summary["steps"],
            "model_parameters": summary["model_parameters"]}
