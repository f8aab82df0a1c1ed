"""``deltatune data select | prune | curate | augment``: the data steps (``deltatune.data.steps``) from the shell.

Each verb is ``dt.data.<verb>`` with the same options: ``SOURCE`` (a shipped set, a data file, or a run config
whose data section's training part is the pool), ``--out FOLDER`` (``data.jsonl`` + ``manifest.json``), ``--method``,
``--seed``, and the method's options as ``-o key=value`` (or the common ``--budget`` / ``--target``). A progress bar
shows each phase; a summary table ends it.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

data_app = typer.Typer(name="data", help="Choose or make the data a fine-tune sees: select (GOT-D), prune "
                       "(DEALRec), curate (DART), augment (EDA, back-translation). docs/data.md.",
                       no_args_is_help=True, rich_markup_mode=None)

SOURCE = typer.Argument(..., help="A shipped data set (tweets, bbc), a data file (.jsonl .csv ...), or a run config "
                        "YAML: its data section's training part (after its eval split) is the pool.")
OUT = typer.Option(None, "--out", help="The folder to write: data.jsonl and manifest.json (required).")
SEED = typer.Option(0, "--seed", help="The seed of every random choice the step makes.")
OPTION = typer.Option([], "--option", "-o", metavar="KEY=VALUE", help="A method option (YAML value), e.g. "
                      "-o budget=0.1; `deltatune data VERB --help` lists them in docs/data.md.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace what OUT holds (else only an empty folder or an older "
                         "output of a data step is replaced).")


def _run(verb: str, source: str, out: str | None, method: str | None, seed: int, items: list[str],
         overwrite: bool, **common: Any) -> None:
    from deltatune.cli.main import _errors_call, _out, _parse_options, _require_out
    from deltatune.data import steps

    def go() -> None:
        folder = _require_out(out, f"deltatune data {verb} SOURCE --out FOLDER")
        options = {**{k: v for k, v in common.items() if v is not None}, **_parse_options(items)}
        result = steps.run_step(verb, source, method=method, out=folder, seed=seed, overwrite=overwrite,
                                progress=True, **options)
        _out().print(summary(result.manifest))
        _out().print(f"wrote {len(result.rows):,} rows to {result.folder} (data.jsonl, manifest.json); train on "
                     f"it with data: {{path: {result.folder}/data.jsonl}}", soft_wrap=True, highlight=False)

    _errors_call(go)


def summary(manifest: dict[str, Any]) -> Table:
    """The manifest as a two-column table: step, method, sizes, time, the options and the step's own figures."""
    table = Table(title=f"data {manifest['step']} ({manifest['method']})", show_header=False)
    table.add_column("key")
    table.add_column("value", overflow="fold")
    table.add_row("source", str(manifest.get("source")))
    table.add_row("pool rows", f"{manifest['pool_size']:,}")
    table.add_row("rows written", f"{manifest['rows']:,}")
    table.add_row("seconds", f"{manifest['seconds']:.1f}")
    for key, value in manifest["options"].items():
        table.add_row(f"option {key}", str(value))
    for key, value in manifest.get("info", {}).items():
        if isinstance(value, int | float | str | bool) or value is None:
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


@data_app.command()
def select(source: str = SOURCE, out: str = OUT, method: str = typer.Option(None, "--method", help="gotd (default)."),
           budget: float = typer.Option(None, "--budget", help="A share (0 < b < 1) or a count of rows to keep."),
           target: str = typer.Option(None, "--target", help="The target data (a file or shipped set) the selection "
                                      "moves the pool towards."),
           seed: int = SEED, option: list[str] = OPTION, overwrite: bool = OVERWRITE) -> None:
    """Select the rows of SOURCE that move it towards a target set (GOT-D: optimal-transport potentials)."""
    _run("select", source, out, method, seed, option, overwrite, budget=_count(budget), target=target)


@data_app.command()
def prune(source: str = SOURCE, out: str = OUT, method: str = typer.Option(None, "--method", help="dealrec (default)."),
          budget: float = typer.Option(None, "--budget", help="A share (0 < b < 1) or a count of rows to keep."),
          seed: int = SEED, option: list[str] = OPTION, overwrite: bool = OVERWRITE) -> None:
    """Prune SOURCE to a small subset that keeps what training needs (DEALRec: influence + effort, strata)."""
    _run("prune", source, out, method, seed, option, overwrite, budget=_count(budget))


@data_app.command()
def curate(source: str = SOURCE, out: str = OUT, method: str = typer.Option(None, "--method", help="dart (default)."),
           seed: int = SEED, option: list[str] = OPTION, overwrite: bool = OVERWRITE) -> None:
    """Make an SFT set from SOURCE's queries: a generator's solutions a verifier accepts (DART, Uniform / Prop2Diff)."""
    _run("curate", source, out, method, seed, option, overwrite)


@data_app.command()
def augment(source: str = SOURCE, out: str = OUT, method: str = typer.Option(None, "--method", help="eda (default) "
                                                                             "or backtranslation."),
            seed: int = SEED, option: list[str] = OPTION, overwrite: bool = OVERWRITE) -> None:
    """Add label-keeping variants of every row of SOURCE (EDA's four edits; back-translation with your models)."""
    _run("augment", source, out, method, seed, option, overwrite)


def _count(budget: float | None) -> float | int | None:
    """--budget 500 is a count, --budget 0.1 a share."""
    if budget is None:
        return None
    return int(budget) if budget >= 1 and float(budget).is_integer() else budget

