"""The ``deltatune`` command: each verb parses its arguments, calls the Python function of the same name
(in ``deltatune.api`` or ``deltatune.cli.demo``) and prints the result. A ``DeltatuneError`` is printed in red
after ``error:`` with exit code 2 (one line, or a header and one problem per line as the error has them), and so
is an ``OSError`` (a full disk, a read-only or forbidden folder: the path and what went wrong); any other
exception is a bug and propagates with its traceback. Every verb that writes takes its inputs as positional
arguments and the folder it writes after ``--out``.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import typer
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from deltatune.cli.demo import human_bytes
from deltatune.core.yamlfile import load_yaml
from deltatune.errors import DeltatuneError
from deltatune.version import __version__

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="deltatune",
    help="Parameter-efficient fine-tuning where every fine-tune is a delta.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _out() -> Console:
    return Console()


def _err() -> Console:
    return Console(stderr=True)


def _errors(fn: F) -> F:
    """Turn a DeltatuneError or an OSError into a red ``error:`` message on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeltatuneError as e:
            _fail(str(e))
        except BrokenPipeError:  # `deltatune methods | head`: the reader has what it wanted; stop quietly
            _quiet_stdout()
            raise typer.Exit(0) from None
        except OSError as e:  # the machine's state, not a bug: say which path and what the system said
            _fail(_os_error_message(e))

    return wrapper  # type: ignore[return-value]


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that Python's own flush at exit meets no closed pipe (and prints nothing)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _fail(message: str) -> NoReturn:
    # a message is one line, or a header and one problem per line (a config with several mistakes): keep its
    # line breaks and indentation, drop blank lines and the breaks inside a line's own spacing
    lines = [" ".join(line.split()) if not line.startswith(" ") else line.rstrip() for line in message.splitlines()]
    text = "\n".join(line for line in lines if line.strip()) or "(no message)"
    _err().print(Text(f"error: {text}", style="red"), soft_wrap=True, highlight=False)
    raise typer.Exit(2) from None


# what to do about the errors a reader or writer meets most, by errno
_OS_ERROR_FIXES = {
    errno.ENOSPC: "free space on that disk or write the output to another one",
    errno.EDQUOT: "free space within your quota or write the output elsewhere",
    errno.EROFS: "the file system is read-only: write the output to a writable folder",
    errno.EACCES: "use a path you have access to, or change its permissions",
    errno.EPERM: "use a path you have access to, or change its permissions",
}


def _os_error_message(e: OSError) -> str:
    """``<path>: <the errno's text> (<ERRNO>); <what to do>``, for an OSError from any reader or writer."""
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    what = e.strerror or str(e) or type(e).__name__
    code = f" ({errno.errorcode[e.errno]})" if e.errno in errno.errorcode else ""
    fix = _OS_ERROR_FIXES.get(e.errno or 0)
    return f"{paths + ': ' if paths else ''}{what}{code}{'; ' + fix if fix else ''}"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"deltatune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Parameter-efficient fine-tuning where every fine-tune is a delta."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars for sub-second loads only clutter the output


@app.command()
@_errors
def methods(
    name: str | None = typer.Argument(None, help="A method's name: print its options (type, default, meaning)."),
) -> None:
    """List the registered fine-tuning methods by family, or print one method's options."""
    from deltatune import api
    from deltatune.core import options

    if name is not None:
        _print_method(api.methods(name))
        return
    for line in _methods_table(options.grouped()):
        typer.echo(line)


METHODS_WIDTH = 100  # the listing fits a 100-column terminal without wrapping


def _methods_table(groups: dict[str, list[str]]) -> list[str]:
    """One line per method under its family's heading: name, whether it merges into the weights, what it is."""
    from deltatune.core import registry

    width = max(len(n) for names in groups.values() for n in names)
    lines = [f"{'method':<{width + 2}}  merges  what it is (`deltatune methods NAME`: its options)"]
    for family, names in groups.items():
        lines += ["", family]
        for n in names:
            method = registry.get(n)
            merges = {True: "yes", False: "no"}.get(method.mergeable, "some")  # type: ignore[call-overload]
            head = f"  {n:<{width}}  {merges:<6}  "
            lines.append(head + _clip(_without_name(n, method.description), METHODS_WIDTH - len(head)))
    lines += ["", "merges: yes = into the weights (deltatune merge); no = serve it attached; some = with some options",
              "train one: deltatune train NAME (a preset) or a YAML config (docs/config.md)"]
    return lines


def _without_name(name: str, description: str) -> str:
    """"LoRA: low-rank ..." -> "low-rank ...": the name column already says it (only an exact "NAME: " goes)."""
    head, sep, rest = description.partition(": ")

    def plain(text: str) -> str:
        return "".join(c for c in text.lower() if c.isalnum())

    return rest if sep and plain(head) == plain(name) else description


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _print_method(info: Any) -> None:
    """``deltatune methods NAME``: what the method is, then each option as ``name (type, default): meaning``."""
    lines = [f"{info.name}: {info.description}", f"family: {info.family}; merges into the weights: {info.merges}",
             "", f"options (in a run config: method: {{name: {info.name}, KEY: VALUE}}; on the command line: "
             f"--set method.KEY=VALUE)"]
    for option in info.options:
        lines += [f"  {option.name}: {option.type}, default {option.default}", f"      {option.meaning}"]
    for line in lines:
        _out().print(line, soft_wrap=True, highlight=False, markup=False)


@app.command()
@_errors
def inspect(
    artifact: str = typer.Argument(..., help="An artifact folder (deltatune.json + delta.safetensors)."),
    as_json: bool = typer.Option(False, "--json", help="Print the description as JSON."),
) -> None:
    """Show what an artifact holds: method, config, base model, trainable parameters, size."""
    from deltatune import api

    info = api.inspect(artifact)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    base = info["base"]
    table = Table(title=f"deltatune artifact {info['path']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("method", str(info["method"]))
    for key, value in info["config"].items():
        text = json.dumps(value, default=str)
        if isinstance(value, dict) and len(text) > 200:  # e.g. a compressed artifact's record per tensor
            text = f"{len(value)} entries (see --json)"
        table.add_row(f"config.{key}", text)
    table.add_row("base architecture", str(base["architecture"]))
    table.add_row("base model type", str(base["model_type"]))
    table.add_row("base name/path", str(base["name_or_path"]))
    if base.get("head"):
        head = base["head"]
        labels = ", ".join((head.get("id2label") or {}).values())
        table.add_row("base model class", str(head.get("class")) + (f" (labels: {labels})" if labels else ""))
        if head.get("quantization"):  # a quantized base: merge / export / eval load it the same way
            from deltatune.core.quantized import spoken

            table.add_row("base quantization", spoken(head["quantization"]))
    table.add_row("base parameters", _count(base["num_parameters"]))
    table.add_row("targeted tensors", _count(base["targeted_tensors"]))
    table.add_row("trainable parameters", _count(info["trainable"]))
    if info.get("fresh_head"):
        table.add_row("fresh head, trained fully", ", ".join(info["fresh_head"]))
    table.add_row("stored tensors", f"{_count(info['stored_tensors'])} ({_count(info['stored_values'])} values)")
    table.add_row("stored size", human_bytes(info["stored_bytes"]))
    table.add_row("file size", human_bytes(info["file_bytes"]))
    if info.get("original_bytes"):
        comp = info.get("compression") or {}
        table.add_row("original size", human_bytes(info["original_bytes"]))
        if comp:
            table.add_row("compression", f"{comp['ratio']:.1f}x smaller; {comp['kept']:,} of {comp['entries']:,} "
                          f"task-vector entries kept ({comp['density']:.2%})")
    table.add_row("deltatune version", str(info["deltatune_version"]))
    _out().print(table)


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


# Every verb that writes takes its inputs as positional arguments and the folder it writes after --out. The
# earlier order (OUT as a positional: `export ART OUT`, `merge-deltas OUT A B`) is answered with one line that
# shows the new one; an extra positional is never taken as the output, so nothing is written where an input is.
OUT_OPTION = typer.Option(None, "--out", help="The folder to write (required).")
OLD_ORDER = {"context_settings": {"allow_extra_args": True}}


def _out_folder(ctx: typer.Context, out: str | None, usage: str) -> str:
    """``out``, after refusing the earlier argument order (an extra positional) and a missing ``--out``."""
    if ctx.args:
        raise DeltatuneError(f"deltatune {ctx.info_name} takes the folder to write after --out: {usage} "
                             f"(got the extra argument {ctx.args[0]!r}: nothing was written)")
    return _require_out(out, usage)


def _require_out(out: str | None, usage: str) -> str:
    """``out``, or one line that shows where it goes (a verb whose inputs are a list takes every positional as
    an input, so the earlier `merge-deltas OUT A B` ends here, with nothing written)."""
    if not out:
        raise DeltatuneError(f"say where to write with --out: {usage} (inputs first, the output after --out)")
    return out


@app.command(**OLD_ORDER)
@_errors
def export(
    ctx: typer.Context,
    artifact: str = typer.Argument(..., help="The deltatune artifact folder to export."),
    out: str | None = OUT_OPTION,
    format: str = typer.Option("peft", "--format", help="Target format: peft (Hugging Face PEFT adapter) or gguf "
                               "(the merged model as one GGUF file, for llama.cpp; Llama architecture)."),
    rank: int | None = typer.Option(None, "--rank", help="peft: export any weight-side delta (sparse, dense, sums) "
                                    "as a LoRA of this rank by truncated SVD; prints the error per tensor and writes "
                                    "it to OUT/export-report.json. Without it only low-rank deltas export, exactly."),
    dtype: str | None = typer.Option(None, "--dtype", help="gguf: f32 (default) or f16 (matrices in float16, norms "
                                     "in float32, as llama.cpp's converter writes)."),
    base: str | None = typer.Option(
        None, "--base", help="Base model: a shipped name or a from_pretrained folder (default: the one the "
        "artifact records)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what OUT holds (without it a folder that is "
                                   "not empty and not this command's kind of output is refused)."),
) -> None:
    """Export an artifact to another library's format (a PEFT LoRA adapter, or a GGUF file of the merged model):
    export ARTIFACT --out FOLDER [--format gguf] [--rank R]."""
    from deltatune import api

    out = _out_folder(ctx, out, "deltatune export ARTIFACT --out FOLDER")
    if rank is not None:
        _at_least_one(rank, "--rank")
    path = api.export(artifact, out, base=base, format=format, rank=rank, dtype=dtype, overwrite=overwrite)
    if rank is not None:
        _print_svd_report(json.loads((path / "export-report.json").read_text()))
    where = path / "model.gguf" if format == "gguf" else path
    _out().print(f"exported {artifact} to {where} ({format}{', ' + (dtype or 'f32') if format == 'gguf' else ''})",
                 soft_wrap=True, highlight=False)


def _print_svd_report(report: dict[str, Any]) -> None:
    """The SVD export's error per tensor: ‖ΔW − B·A‖_F / ‖ΔW‖_F (0 for tensors carried exactly as values)."""
    table = Table(title=f"rank-{report['rank']} LoRA of a {report['method']} delta: relative error per tensor")
    for column in ("tensor", "shape", "as", "rank", "rel. error"):
        table.add_column(column, justify="right" if column in ("rank", "rel. error") else "left")
    for row in report["tensors"]:
        table.add_row(row["tensor"], "x".join(map(str, row["shape"])), row["as"],
                      "" if row["rank"] is None else str(row["rank"]), f"{row['relative_error']:.2e}")
    _out().print(table)
    _out().print(f"all LoRA tensors together: {report['relative_error']:.3e} (largest {report['max_relative_error']:.3e})"
                 + (f"; {len(report['unchanged'])} tensors unchanged (left out)" if report["unchanged"] else ""),
                 highlight=False)
    for note in report["notes"]:
        _out().print(f"  {note}", soft_wrap=True, highlight=False)


@app.command("import", **OLD_ORDER)
@_errors
def import_(
    ctx: typer.Context,
    adapter: str = typer.Argument(..., help="The adapter folder to import (e.g. a PEFT LoRA adapter)."),
    out: str | None = OUT_OPTION,
    base: str = typer.Option(..., "--base", help="Base model: a shipped name or a from_pretrained folder."),
    format: str = typer.Option("peft", "--format", help="Source format: peft (Hugging Face PEFT adapter)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what OUT holds (without it a folder that is "
                                   "not empty and not this command's kind of output is refused)."),
) -> None:
    """Import another library's adapter as a deltatune artifact: import ADAPTER --base MODEL --out FOLDER."""
    from deltatune import api

    out = _out_folder(ctx, out, "deltatune import ADAPTER --base MODEL --out FOLDER")
    path = api.import_(adapter, out, base=base, format=format, overwrite=overwrite)
    _out().print(f"imported {adapter} ({format}) to {path}", soft_wrap=True, highlight=False)


@app.command(**OLD_ORDER)
@_errors
def merge(
    ctx: typer.Context,
    artifact: str = typer.Argument(..., help="The deltatune artifact folder to merge."),
    base: str | None = typer.Option(None, "--base", help="Base model: a shipped name or a from_pretrained folder "
                                    "(default: the one the artifact records)."),
    out: str | None = typer.Option(None, "--out", help="The save_pretrained folder to write (a plain model; "
                                   "required)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what OUT holds (without it a folder that is "
                                   "not empty and not this command's kind of output is refused)."),
) -> None:
    """Merge an artifact into its base model and write a plain save_pretrained folder: merge ARTIFACT --out FOLDER."""
    from deltatune import api

    out = _out_folder(ctx, out, "deltatune merge ARTIFACT --out FOLDER")
    path = api.merge(artifact, base=base, out=out, overwrite=overwrite)
    _out().print(f"merged {artifact} into {base or 'its base model'}: {path}", soft_wrap=True, highlight=False)


def _parse_options(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are YAML (``r=16``, ``targets=[q_proj,v_proj]``, ``use_rslora=true``)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DeltatuneError(f"option {item!r} is not key=value, e.g. --option r=16")
        try:
            options[key.strip()] = load_yaml(value)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise DeltatuneError(f"option {item!r} has a value that is not valid YAML ({problem}); quote it as a "
                                 "string or fix the brackets, e.g. 'targets=[q_proj, v_proj]'") from e
    return options


@app.command()
@_errors
def demo(
    quick: bool = typer.Option(False, "--quick", help="MiniLM on BBC news topics: under a minute on 2 CPU cores."),
    out: str = typer.Option("demo-report", "--out", help="Where report.md, the plots and the artifacts go (an earlier demo's report there is replaced, or continued with --resume; a folder of other files is refused)."),
    methods: str = typer.Option(
        None, "--methods", help="Comma-separated methods to train, e.g. lora,full (default: the demo's default set; more, e.g. kasa,dora, by name)."
    ),
    steps: int = typer.Option(None, "--steps", help="Training steps for every method (default: each method's preset)."),
    seed: int = typer.Option(0, "--seed", help="Seed for data, initialisation and order."),
    option: list[str] = typer.Option(
        [], "--option", "-o", metavar="KEY=VALUE", help="LoRA option key=value (YAML value); repeatable, e.g. -o r=16."
    ),
    seeds: int = typer.Option(1, "--seeds", help="Train every row this many times (training seeds SEED, SEED+1, ...; "
                              "one held-out split) and report the mean ± standard error."),
    lr_grid: str = typer.Option(None, "--lr-grid", metavar="M1,M2,...", help="Choose each row's learning rate "
                                "first: multipliers of its preset's rate, e.g. 0.5,1,2, each trained once and scored "
                                "on a dev split carved from the training data; the reported runs use the best."),
    resume: bool = typer.Option(False, "--resume", help="Reuse the runs OUT/runs/ already holds with the same "
                                "config (a long protocol continues where it stopped); without it every run is new."),
    device: str = typer.Option("cpu", "--device", help="Where the runs train, e.g. cuda (the published tables: cpu)."),
) -> None:
    """Zero-shot vs LoRA vs full fine-tuning (and more) on SmolLM2-135M + tweet sentiment; writes a report."""
    import shlex
    import sys

    from deltatune.cli import demo as demo_module

    demo_module.demo(
        quick=quick,
        out=out,
        methods=methods,
        steps=steps,
        seed=seed,
        seeds=seeds,
        lr_grid=lr_grid,
        lora_options=_parse_options(option),
        console=_out(),
        command=shlex.join(["deltatune", *sys.argv[1:]]),
        resume=resume,
        device=device,
    )


@app.command()
@_errors
def train(
    config: str = typer.Argument(..., help="The run config: a YAML file (model, data, method, train, output) or the "
                                 "name of a shipped preset, e.g. lora, lora-minilm, spiel (deltatune/presets/)."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a config key, e.g. --set train.steps=10."),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from the newest checkpoint in OUTPUT/checkpoints."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what the output folder holds (a new run "
                                   "refuses a folder that is not empty)."),
    force: bool = typer.Option(False, "--force", help="With --resume: resume even though the config differs from "
                               "the checkpoint's (the differences are printed as a warning)."),
) -> None:
    """Train a method as a YAML config or a preset says; the artifact and checkpoints go to its output folder.

    Every config key (model, data, method, train, output) with its type, default and meaning:
    docs/config.md. A method's own options: deltatune methods NAME (the list: deltatune methods)."""
    from deltatune.train import train as train_fn

    train_fn(config, set_, resume=resume, overwrite=overwrite, force=force)


def _data_config(data: str | None, task: str | None, config: str | None, sets: list[str],
                 artifact: str | None = None) -> Any:
    """The data config of ``eval``: a run config's data section, then --data / --task, then --set ``key=value``
    (``data.key=value`` too, as ``train --set`` spells it), checked key by key. With neither --config nor --data:
    the data section of the run that wrote ``artifact`` (its newest checkpoint), when it keeps one."""
    from pathlib import Path

    from deltatune import data as data_module
    from deltatune.train.config import load_config, parse_data_section
    from deltatune.train.state import saved_data_section

    values: dict[str, Any] = {}
    if config:
        values = dict(vars(load_config(config).data))
    elif not data and artifact is not None:
        saved = saved_data_section(artifact)
        if saved is None:
            raise DeltatuneError(f"say which data to use: --data NAME_OR_FILE or --config RUN.yaml ({artifact} keeps "
                                 "no checkpoint with the data section of the run that trained it)")
        values = {"mix": saved} if isinstance(saved, list) else dict(saved)
    if data:
        values.pop("name", None)
        values.pop("path", None)
        values["name" if data in data_module.SHIPPED and not Path(data).exists() else "path"] = data
    if task:
        values["task"] = task
    values.update({key.removeprefix("data."): value for key, value in _parse_options(sets).items()})
    if not values.get("name") and not values.get("path"):
        raise DeltatuneError("say which data to use: --data NAME_OR_FILE or --config RUN.yaml")
    return parse_data_section(values)


def _at_least_one(value: int, option: str) -> None:
    if value < 1:
        raise DeltatuneError(f"{option} {value}: must be at least 1")


# logit fusion's options, shared by eval and generate (docs/fusion.md)
_FUSE_LARGE = typer.Option(None, "--fuse-large", help="Logit fusion: the large model to steer (a shipped name or "
                           "folder), with --expert; docs/fusion.md.")
_FUSE_SMALL = typer.Option(None, "--fuse-small", help="Logit fusion: the small base the experts were trained on "
                           "(default: the one the first expert names).")
_EXPERT = typer.Option([], "--expert", help="Logit fusion: an artifact or PEFT adapter trained on the small model "
                       "(repeat for several).")
_ALPHA = typer.Option("dynamic", "--alpha", help="Logit fusion: 'dynamic' (chosen per step) or a number (1.0 with one "
                      "expert is proxy tuning), or comma-separated, one per expert.")


@app.command("eval")
@_errors
def eval_(
    artifact: str = typer.Argument(None, help="The deltatune artifact folder (leave out with --fuse-large)."),
    data: str = typer.Option(None, "--data", help="A shipped data set (tweets, bbc) or a local file."),
    task: str = typer.Option(None, "--task", help="text | chat | classification | edit | preference | prompts | "
                             "seq2seq."),
    config: str = typer.Option(None, "--config", help="Take the data section of this run config (default, without "
                               "--data: the one of the run that wrote ARTIFACT, from its newest checkpoint)."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="A data option, e.g. --set max_eval=200."),
    base: str = typer.Option(None, "--base", help="Base model (default: the one the artifact names)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    fuse_large: str = _FUSE_LARGE,
    fuse_small: str = _FUSE_SMALL,
    expert: list[str] = _EXPERT,  # noqa: B006 (typer's option object, not a mutable default)
    alpha: str = _ALPHA,
    objective: str = typer.Option(None, "--objective", help="The run's train.objective, for data that needs one: a "
                                  "name (dpo, simpo, ...) or a JSON mapping, e.g. '{\"name\": \"dpo\", \"beta\": "
                                  "0.2}' (default: the one of --config, else of the run that wrote ARTIFACT)."),
) -> None:
    """Evaluate an artifact on held-out data: loss, perplexity, accuracy where labels exist, edit success for edits,
    reward margins for preference pairs (or, with --fuse-large, a large model steered by small experts)."""
    from deltatune import api

    _at_least_one(batch_size, "--batch-size")
    if artifact is None and fuse_large is None:
        raise DeltatuneError("say which artifact to evaluate: deltatune eval ARTIFACT --data ... (or --fuse-large "
                             "MODEL --expert ARTIFACT)")
    data_config = _data_config(data, task, config, set_, artifact)
    metrics = api.eval(artifact, data_config, base=base, batch_size=batch_size,
                       objective=_objective(objective, config, artifact, data_config.task), fuse_large=fuse_large,
                       fuse_small=fuse_small, experts=expert, alpha=_alpha(alpha))
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
        return
    table = Table(title=f"eval {artifact}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}")
    _out().print(table)


@app.command()
@_errors
def generate(
    artifact: str = typer.Argument(None, help="The deltatune artifact folder (leave out with --base for the base model)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt (a user message for chat models)."),
    base: str = typer.Option(None, "--base", help="Base model (default: the one the artifact names)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    no_chat: bool = typer.Option(False, "--no-chat", help="Do not apply the tokenizer's chat template."),
    fuse_large: str = _FUSE_LARGE,
    fuse_small: str = _FUSE_SMALL,
    expert: list[str] = _EXPERT,  # noqa: B006 (typer's option object, not a mutable default)
    alpha: str = _ALPHA,
) -> None:
    """Generate text with the delta attached, streamed as it is produced (or, with --fuse-large, from a large model
    steered by small experts)."""
    from deltatune import api

    _at_least_one(max_new_tokens, "--max-new-tokens")
    api.generate(artifact, prompt, base=base, max_new_tokens=max_new_tokens, stream=True,
                 chat=False if no_chat else None, fuse_large=fuse_large, fuse_small=fuse_small, experts=expert,
                 alpha=_alpha(alpha))
    typer.echo("")


def _objective(text: str | None, config: str | None, artifact: str | None, task: str | None = None) -> Any:
    """``--objective`` (a name or a JSON mapping), else the run config's ``train.objective``, else the one of the run
    that wrote ``artifact`` (its newest checkpoint); None when none says (data that needs none). The run's objective
    counts only for the data ``task`` it was made for: a DPO run evaluated on its texts' labels (``--set
    data.task=classification``) is scored as a classifier; an objective given with --objective is checked."""
    from deltatune.data import objectives
    from deltatune.train.config import load_config
    from deltatune.train.state import saved_config

    if text is not None:
        if not text.lstrip().startswith("{"):
            return text
        try:
            return json.loads(text)
        except ValueError as e:
            raise DeltatuneError(f"--objective {text!r} is neither a name nor a JSON mapping ({e})") from None
    if config:
        run = getattr(load_config(config).train, "objective", None)
    else:
        saved = saved_config(artifact) if artifact is not None else None
        run = ((saved or {}).get("train") or {}).get("objective")
    if run is not None and task is not None and objectives.task_problem(objectives.parse(run)[0], task) is not None:
        return None  # made for another data task than the one evaluated
    return run


def _alpha(text: str) -> str | float | list[float]:
    if text == "dynamic":
        return text
    values = _floats(text, "--alpha") or []
    return values[0] if len(values) == 1 else values


@app.command(**OLD_ORDER)
@_errors
def compress(
    ctx: typer.Context,
    artifact: str = typer.Argument(..., help="The deltatune artifact folder to compress (a weight-side delta)."),
    out: str | None = OUT_OPTION,
    density: float = typer.Option(None, "--density", help="Fraction of task-vector entries kept (ComPEFT's k/100; "
                                  "default 0.2; with --calibrate: fixed, not searched)."),
    alpha: float = typer.Option(None, "--alpha", help="Kept entries become ±alpha·std(task vector) (default 1; with "
                                "--calibrate: fixed, not searched)."),
    scope: str = typer.Option(None, "--scope", help="global (one top-k and scale, as the paper; the default) or "
                              "tensor (each tensor its own; the default for a LoRA's factors); with --calibrate: "
                              "fixed, else both are searched."),
    lowrank: str = typer.Option(None, "--lowrank", help="Low-rank deltas: factors (compress A and B, the result "
                                "stays low-rank; the default for a LoRA) or delta (compress ΔW = s·B·A)."),
    values: str = typer.Option("ternary", "--values", help="ternary (ComPEFT) or pruned (top-k only, values kept)."),
    base: str = typer.Option(None, "--base", help="Base model (default: the one the artifact records)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what OUT holds (without it a folder that is "
                                   "not empty and not this command's kind of output is refused)."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Choose density, alpha and scope on a dev split carved "
                                   "from the training part of --data / --config (never its eval split); without "
                                   "them, of the data of the run that wrote ARTIFACT (its newest checkpoint)."),
    data: str = typer.Option(None, "--data", help="With --calibrate: a shipped data set (tweets, bbc) or a local file."),
    task: str = typer.Option(None, "--task", help="With --calibrate: text | chat | classification."),
    config: str = typer.Option(None, "--config", help="With --calibrate: take the data section of this run config "
                               "(the run's own: its data.max_train examples are kept out of the dev split)."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="With --calibrate: a data option, e.g. "
                                   "--set data.max_train=480."),
    densities: str = typer.Option(None, "--densities", help="With --calibrate: the densities searched (default "
                                  "0.05,0.1,0.2,0.3)."),
    alphas: str = typer.Option(None, "--alphas", help="With --calibrate: the alphas searched (default 0.5,1,2,...,10)."),
    dev_size: int = typer.Option(200, "--dev-size", help="With --calibrate: dev examples."),
    tolerance: float = typer.Option(1.0, "--tolerance", help="With --calibrate: the dev score a compressed delta may "
                                    "lose: points of accuracy, or percent of the loss for text and chat."),
    batch_size: int = typer.Option(16, "--batch-size", help="With --calibrate: evaluation batch size."),
    min_ratio: float = typer.Option(None, "--min-ratio", help="With --calibrate: a size target, e.g. 10: the best "
                                    "dev score among the grid points at least this many times smaller (instead of "
                                    "the smallest point within --tolerance)."),
) -> None:
    """Compress a saved delta with ComPEFT (top-k + ternary, bit-packed): compress ARTIFACT --out FOLDER. The
    result loads like any artifact. With --calibrate --data NAME_OR_FILE (or --config RUN.yaml): the smallest
    grid point within --tolerance of the uncompressed delta on a dev split (with --min-ratio R: the best dev score
    at least R times smaller), the curve printed as a table."""
    import warnings

    from deltatune import api
    from deltatune.ops.compress_calibrate import CalibrationWarning

    out = _out_folder(ctx, out, "deltatune compress ARTIFACT --out FOLDER")
    grid: dict[str, Any] = {}
    if calibrate:
        grid = {"calibrate": _data_config(data, task, config, set_, artifact), "densities": _floats(densities, "--densities"),
                "alphas": _floats(alphas, "--alphas"), "dev_size": dev_size, "tolerance": tolerance,
                "batch_size": batch_size, "min_ratio": min_ratio}
    else:
        given = [name for name, value in (("--data", data), ("--task", task), ("--config", config), ("--set", set_),
                                          ("--densities", densities), ("--alphas", alphas),
                                          ("--min-ratio", min_ratio)) if value]
        if given:
            raise DeltatuneError(f"{', '.join(given)} choose the calibration data and grid: add --calibrate, e.g. "
                                 "deltatune compress ARTIFACT --out FOLDER --calibrate --data tweets")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # printed below, from the artifact's record
        path = api.compress(artifact, out, density=density, alpha=alpha, scope=scope, lowrank=lowrank, values=values,
                            base=base, overwrite=overwrite, **grid)
    info = api.inspect(path)
    comp = info["compression"]
    if comp.get("calibration"):
        _print_calibration(comp["calibration"])
    _out().print(f"compressed {artifact} to {path}: {human_bytes(info['original_bytes'])} -> "
                 f"{human_bytes(info['stored_bytes'])} ({comp['ratio']:.1f}x smaller), {comp['kept']:,} of "
                 f"{comp['entries']:,} entries kept", soft_wrap=True, highlight=False)
    if comp.get("note"):  # what was chosen for the input's kind and how to get the other
        _out().print(comp["note"], soft_wrap=True, highlight=False)
    for line in (comp.get("calibration") or {}).get("warnings", []):
        _err().print(Text(f"warning: {line}", style="yellow"), soft_wrap=True, highlight=False)


def _print_calibration(record: dict[str, Any]) -> None:
    """The searched curve: one row per grid point (a (scope, density) that was not evaluated: one row), the
    uncompressed delta first, the chosen point marked."""
    metric, dev, chosen = record["metric"], record["dev"], record["chosen"]

    def score(value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.2%}" if metric == "accuracy" else f"{value:.4f}"

    unit = "points" if metric == "accuracy" else "%"
    target = record.get("min_ratio")
    rule = (f"the best at >= {target:g}x smaller" if target is not None else
            f"within {record['tolerance']:g} {unit} of the uncompressed delta")
    table = Table(title=f"calibration on {dev['examples']} dev examples (dev {metric}; {rule})")
    for name, justify in (("scope", "left"), ("density", "right"), ("alpha", "right"), ("size", "right"),
                          ("ratio", "right"), (f"dev {metric}", "right"), ("", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    ref = record["reference"]
    table.add_row("uncompressed", "", "", human_bytes(ref["stored_bytes"]), "1.0x", score(ref["score"]), "reference")
    shown: set[tuple[str, float]] = set()
    for p in record["points"]:
        if p["metrics"] is None:
            if (p["scope"], p["density"]) not in shown:
                shown.add((p["scope"], p["density"]))
                table.add_row(p["scope"], f"{p['density']:g}", "all", human_bytes(p["stored_bytes"]),
                              f"{p['ratio']:.1f}x", "-", f"skipped: less than {target:g}x smaller"
                              if target is not None else "skipped: larger than a point within tolerance")
            continue
        is_chosen = all(p[k] == chosen[k] for k in ("scope", "density", "alpha"))
        table.add_row(p["scope"], f"{p['density']:g}", f"{p['alpha']:g}", human_bytes(p["stored_bytes"]),
                      f"{p['ratio']:.1f}x", score(p["score"]), f"chosen ({chosen['rule']})" if is_chosen else "")
    _out().print(table)


def _floats(text: str | None, option: str) -> list[float] | None:
    """``0.5,0.5`` -> [0.5, 0.5]."""
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError as e:
        raise DeltatuneError(f"{option} takes comma-separated numbers, e.g. {option} 0.5,0.5 (got {text!r})") from e


@app.command("merge-deltas")
@_errors
def merge_deltas(
    deltas: list[str] = typer.Argument(..., help="The artifact folders to merge (deltas of one base model)."),
    out: str | None = OUT_OPTION,
    how: str = typer.Option("task_arithmetic", "--how",
                            help="task_arithmetic | ties | dare_linear | dare_ties | magnitude_prune | cat."),
    weights: str = typer.Option(None, "--weights", help="One weight per delta, comma-separated (default: 1 each)."),
    density: float = typer.Option(None, "--density",
                                  help="Fraction of entries kept: ties, dare_*, magnitude_prune (e.g. 0.2)."),
    seed: int = typer.Option(0, "--seed", help="Seed of DARE's random masks."),
    majority: str = typer.Option("total", "--majority", help="TIES' sign election: total (by mass) | frequency."),
    rank: int = typer.Option(None, "--rank", help="Truncate every merged ΔW to this rank with an SVD (a LoRA artifact; "
                             "LoRA inputs default to the sum of their ranks)."),
    space: str = typer.Option("delta", "--space",
                              help="delta (merge each ΔW) | factors (PEFT's merge of LoRA factors A and B apart)."),
    dense: bool = typer.Option(False, "--dense", help="Write the merged ΔW in full (a dense delta), even for LoRA "
                               "inputs (which otherwise stay low-rank)."),
    base: str = typer.Option(None, "--base", help="Base model: a shipped name or a from_pretrained folder "
                             "(default: the one the artifacts record)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what OUT holds (without it a folder that is "
                                   "not empty and not this command's kind of output is refused)."),
) -> None:
    """Merge deltas trained on different tasks into one artifact (task arithmetic, TIES, DARE):
    merge-deltas A B ... --out FOLDER."""
    from deltatune import api
    from deltatune.core import artifact

    out = _require_out(out, "deltatune merge-deltas A B ... --out FOLDER")
    tuned = api.merge_deltas(deltas, out, how=how, weights=_floats(weights, "--weights"), density=density, seed=seed,
                             majority=majority, rank=rank, space=space, dense=dense, base=base, overwrite=overwrite)
    _out().print(f"merged {len(deltas)} deltas ({how}) into {out}: a {tuned.method.name} artifact of "
                 f"{human_bytes(tuned.stored_bytes())}", soft_wrap=True, highlight=False)
    note = artifact.read_meta(out).get("merged_from", {}).get("note")
    if note:  # what was chosen for low-rank inputs and how to get the other
        _out().print(note, soft_wrap=True, highlight=False)


@app.command()
@_errors
def compose(
    deltas: list[str] = typer.Argument(..., help="The artifact folders to apply together (θ0 + their sum)."),
    out: str | None = typer.Option(None, "--out", help="The save_pretrained folder to write (a plain model; "
                                   "required)."),
    base: str = typer.Option(None, "--base", help="Base model: a shipped name or a from_pretrained folder "
                             "(default: the one the first artifact records)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what OUT holds (without it a folder that is "
                                   "not empty and not this command's kind of output is refused)."),
) -> None:
    """Apply several deltas at once (their sum, e.g. a task and a language delta) and write the merged model:
    compose A B ... --out FOLDER."""
    from deltatune import api

    out = _require_out(out, "deltatune compose A B ... --out FOLDER")
    path = api.compose(deltas, out, base=base, overwrite=overwrite)
    _out().print(f"composed {len(deltas)} deltas into {path} (undo one with `deltatune revert`)", soft_wrap=True,
                 highlight=False)


@app.command(**OLD_ORDER)
@_errors
def revert(
    ctx: typer.Context,
    composed: str = typer.Argument(..., help="A model folder written by `deltatune compose`."),
    part: str = typer.Argument(..., help="The part to take out: its artifact folder name or path."),
    out: str | None = typer.Option(None, "--out", help="The save_pretrained folder to write (required)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what OUT holds (without it a folder that is "
                                   "not empty and not this command's kind of output is refused)."),
) -> None:
    """Take one delta out of a composed model, rebuilt from the base with the other parts (exact):
    revert COMPOSED PART --out FOLDER."""
    from deltatune import api

    out = _out_folder(ctx, out, "deltatune revert COMPOSED PART --out FOLDER")
    path = api.revert(composed, part, out, overwrite=overwrite)
    _out().print(f"{composed} without {part} written to {path}", soft_wrap=True, highlight=False)


@app.command()
@_errors
def search(
    config: str = typer.Argument(..., help="A search config: a run config (model, data, method, train) with a "
                                 "search: section (space, trials, objectives); docs/search.md."),
    out: str | None = typer.Option(None, "--out", help="The study folder: study.db, trials.csv, pareto.png, "
                                   "pareto/<trial>.yaml (required)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the search OUT (or --storage) holds, or join it "
                                "as another worker; without it a folder that is not empty is refused."),
    storage: str = typer.Option(None, "--storage", help="An optuna database URL that several workers share, e.g. "
                                "sqlite:///shared/study.db or postgresql://user@host/db (default: OUT/study.db)."),
    trials: int = typer.Option(None, "--trials", help="Trials in the study, counted over every worker (default: "
                               "search.trials)."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a config key, e.g. --set "
                                   "train.steps=10 or --set search.seed=1."),
    refit: int = typer.Option(0, "--refit", help="Train the front's K best configurations (by the first "
                              "objective) again on the full data with search.refit_seeds seeds (default 3), scored "
                              "on the eval split: OUT/refit.json and a table."),
) -> None:
    """Search a run config's options for the Pareto front of dev metric against trainable parameters (optuna; each
    trial a short training run in its own process): search CONFIG --out FOLDER."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from deltatune import api
    from deltatune.ops import search as search_ops

    out = _require_out(out, "deltatune search CONFIG --out FOLDER")
    if trials is not None:
        _at_least_one(trials, "--trials")
    if refit < 0:
        raise DeltatuneError(f"--refit {refit}: give the number of front configurations to train again (0: none)")
    failures: list[str] = []
    with Progress(TextColumn("search"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=_err(), transient=False) as bar:
        task = bar.add_task("", total=None)

        def on_trial(trial: Any, done: int, total: int) -> None:
            error = trial.user_attrs.get("error")
            if error and not trial.user_attrs.get("extra"):
                failures.append(f"trial {trial.number} failed: {error}")
            pruned = trial.user_attrs.get("pruned_at")
            shown = "failed" if error else f"pruned at step {pruned}" if pruned is not None else \
                ", ".join(f"{v:.4g}" for v in trial.values or [])
            bar.update(task, completed=done, total=total, description=f"trial {trial.number}: {shown}")

        study = api.search(config, out, resume=resume, storage=storage, trials=trials, overrides=set_,
                           on_trial=on_trial, refit=refit)
    for line in failures:
        _err().print(Text(f"warning: {line}"[:400], style="yellow"), soft_wrap=True, highlight=False)
    spec = search_ops.prepare(api.search_config(config, set_), api.config_problems, trials)
    _print_front(search_ops.front_rows(study, spec), spec, out)
    if refit:
        _print_refit(os.path.join(out, "refit.json"), spec)


def _print_front(rows: list[dict[str, Any]], spec: Any, out: str) -> None:
    """The Pareto front: one row per configuration, its values and objectives, and where its run config is."""
    table = Table(title=f"Pareto front ({len(rows)} configurations; dev split)")
    keys = [d.key for d in spec.space]
    table.add_column("trial", justify="right")
    for key in keys:
        table.add_column(key)
    for name, direction in spec.objectives.items():
        table.add_column(f"{name} ({direction[:3]})", justify="right")
    for row in rows:
        cells = [_value_cell(row["values"].get(k, "-")) for k in keys]
        scores = [f"{int(v):,}" if name in ("trainable", "peak_memory") else f"{v:.4g}"
                  for name, v in row["objectives"].items()]
        table.add_row(str(row["trial"]), *cells, *scores)
    _out().print(table)
    _out().print(f"run configs: {out}/pareto/TRIAL.yaml (deltatune train {out}/pareto/TRIAL.yaml); trials: "
                 f"{out}/trials.csv; plot: {out}/pareto.png", soft_wrap=True, highlight=False)


def _print_refit(path: str, spec: Any) -> None:
    """The refit table: per configuration, each objective's mean ± standard error over its seeds on the eval split,
    beside what the search measured on its dev split."""
    with open(path) as f:
        record = json.load(f)
    table = Table(title=f"Refit: the front's {record['k']} best by {next(iter(spec.objectives))}, "
                        f"{record['seeds']} seeds each (eval split; mean ± standard error)")
    table.add_column("trial", justify="right")
    for name in spec.objectives:
        table.add_column(f"{name} (search: dev)", justify="right")
        table.add_column(f"{name} (refit)", justify="right")
    table.add_column("failed", justify="right")

    def shown(name: str, v: float) -> str:
        return f"{int(v):,}" if name in ("trainable", "peak_memory") else f"{v:.4g}"

    for row in record["configurations"]:
        cells = []
        for name in spec.objectives:
            got = row["summary"].get(name)
            refit = "-" if got is None else shown(name, got["mean"]) + \
                ("" if got["se"] is None else f" ± {shown(name, got['se'])}")
            cells += [shown(name, row["search"][name]), refit]
        table.add_row(str(row["trial"]), *cells, str(row["summary"]["failed"]))
    _out().print(table)
    _out().print(f"refit runs: {path} (artifacts: {os.path.dirname(path)}/refit/TRIAL-seedS/run)", soft_wrap=True,
                 highlight=False)


def _value_cell(value: Any) -> str:
    """A searched value in the front table: text as it is, a float to 4 significant digits, others as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value)


@app.command()
@_errors
def bench(
    model: str = typer.Option("smollm2-135m", "--model", help="A shipped model name or a from_pretrained folder."),
    methods: str = typer.Option("lora,full", "--methods", help="Comma-separated deltatune methods, presets or bench "
                                "variants (lora-all, spiel-all, spiel-sm3) to run; peft-prefix and peft-prompt add "
                                "PEFT's prefix and prompt tuning, peft-<method> PEFT's own ia3, vera, loha, lokr "
                                "or trainable_tokens; peft-lora (a baseline) runs PEFT's LoRA with --no-baselines."),
    steps: int = typer.Option(10, "--steps", help="Training steps per run (the first is warm-up, not in the median)."),
    json_path: str = typer.Option(None, "--json", help="Write the records (one per run) to this JSON file."),
    docs: str = typer.Option(None, "--docs", help="Write the markdown report here (e.g. docs/benchmarks.md)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per step."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per sequence (packed text blocks)."),
    threads: int = typer.Option(2, "--threads", help="torch threads in each run."),
    seeds: int = typer.Option(1, "--seeds", help="Run every workload this many times (seeds 0, 1, ..., seed by "
                              "seed) and report each figure as mean ± standard error, each ratio to PEFT's LoRA "
                              "paired by seed."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    task: str = typer.Option("text", "--task", help="text (packed causal-LM text) | classification (tweet "
                             "sentiment with a fresh sequence-classification head, for head-training methods "
                             "such as vqt)."),
    no_baselines: bool = typer.Option(False, "--no-baselines",
                                      help="Skip PEFT LoRA, plain full fine-tuning and the forward-only pass."),
) -> None:
    """Benchmark deltatune's methods against PEFT's LoRA and plain full fine-tuning on one workload."""
    import shlex
    import sys

    from deltatune.cli import bench as bench_module

    command = "deltatune " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    records = bench_module.bench(
        model, methods, steps, json_path=json_path, write_docs=docs is not None, docs_path=docs or "",
        batch_size=batch_size, seq_len=seq_len, threads=threads, seeds=seeds, device=device, task=task,
        baselines=not no_baselines, console=_err(), command=command,
    )
    from deltatune.cli.bench_report import print_whole

    print_whole(_out(), bench_module.table(records))
    if json_path:
        _out().print(f"records written to {json_path}", highlight=False)
    if docs:
        _out().print(f"report written to {docs}", highlight=False)


def _errors_call(fn: Callable[[], Any]) -> Any:
    """``fn()`` with ``_errors``' handling (for the sub-commands of ``deltatune data``)."""
    return _errors(fn)()


from deltatune.cli.data_verbs import data_app  # noqa: E402  (the sub-app uses the helpers above)

app.add_typer(data_app, name="data")


def main() -> None:
    """The ``deltatune`` console script."""
    app()


if __name__ == "__main__":
    main()
