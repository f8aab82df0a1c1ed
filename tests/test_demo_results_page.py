"""scripts/demo_results.py, the generator of docs/demo-results.md (issue 18): its table shows each row's search
and mean ± standard error, names the rows not run yet, keeps the hand-written notes, and every row it runs is a
row the demo can run, with the preset's method options (or the row's variant of them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from deltatune.cli.demo import run_config
from deltatune.core import registry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gen():  # noqa: ANN201 - the script's module
    spec = importlib.util.spec_from_file_location("demo_results", ROOT / "scripts" / "demo_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(name: str, method: str, accuracies: list[float], dev: list[float]) -> dict:
    seeds = [{"seed": k, "accuracy": a} for k, a in enumerate(accuracies)]
    runs = [{"multiplier": m, "lr": m * 1e-3, "dev_accuracy": d} for m, d in zip((0.5, 1.0, 2.0), dev, strict=True)]
    best = max(runs, key=lambda r: r["dev_accuracy"])
    return {"method": name, "config": {"name": method}, "steps": 60, "trainable": 460800, "artifact_bytes": 2**20,
            "accuracy": sum(accuracies) / len(accuracies), "accuracy_se": 0.01, "seeds": seeds, "note": "",
            "lr_search": {"runs": runs, "chosen_lr": best["lr"]}}


def test_the_page_shows_the_search_the_seeds_and_the_rows_not_run(gen, tmp_path: Path) -> None:
    rows = [{"method": "zero-shot", "accuracy": 0.52}, row("lora", "lora", [0.80, 0.84, 0.82], [0.7, 0.81, 0.8])]
    text = gen.page(rows, "CMD")
    line = next(x for x in text.splitlines() if x.startswith("| lora |"))
    cells = [c.strip() for c in line.strip("|").split(" | ")]
    assert cells[1] == registry.get("lora").family and cells[3] == "460,800"
    assert cells[4] == "0.0005: 70.0, 0.001: 81.0, 0.002: 80.0 → **0.001**"
    assert cells[5] == "82.0 ± 1.0" and cells[6] == "80.0, 84.0, 82.0"
    assert "**52.0 %**" in text and "`CMD`" in text
    not_run = next(x for x in text.splitlines() if x.startswith("Not run yet")).split(": ", 1)[1].rstrip(".")
    assert not_run.split(", ") == [name for name in gen.TABLE["methods"] if name != "lora"]


def test_rewriting_the_page_keeps_the_notes(gen, tmp_path: Path) -> None:
    path = tmp_path / "page.md"
    rows = [{"method": "zero-shot", "accuracy": 0.5}, row("lora", "lora", [0.8, 0.8, 0.8], [0.7, 0.8, 0.8])]
    gen.write_page(rows, "CMD", path)
    path.write_text(path.read_text() + "what the table says, by hand\n")
    rows[1]["accuracy"] = 0.9
    gen.write_page(rows, "CMD", path)
    text = path.read_text()
    assert text.endswith(gen.NOTES_MARKER + "\nwhat the table says, by hand\n") and "| 90.0 ± 1.0 |" in text


def test_every_row_is_a_registered_method_with_the_protocols_data(gen) -> None:
    table = gen.TABLE
    assert table["data"]["max_eval"] == gen.HELD_OUT >= 400  # ±2 points or better for one run
    names = set()
    for name in table["methods"]:
        config = run_config(table, name)
        method = registry.get(config["method"]["name"])
        registry.make_config(method, {k: v for k, v in config["method"].items() if k != "name"})
        names.add(method.name)
        assert config["data"]["max_eval"] == gen.HELD_OUT and config["train"]["eval_every"] == config["train"]["steps"]
    assert names | set(gen.NOT_HERE) == set(registry.names())  # every registered method: a row, or a reason
    spiel = run_config(table, "spiel-one-selection")["method"]
    assert spiel["selection_accumulation_steps"] == 20 and spiel["match"] == "lora:r=8"


def test_a_row_is_finished_when_its_search_and_seeds_are_kept(gen, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    stems = [f"lr-search-lora-x{m:g}" for m in gen.GRID] + [f"lora-seed{k}" for k in range(gen.SEEDS)]
    for stem in stems[:-1]:
        (runs / f"{stem}.json").write_text(json.dumps({"spec": {}, "result": {"summary": {}}}))
    assert not gen.finished(tmp_path, "lora")
    (runs / f"{stems[-1]}.json").write_text(json.dumps({"spec": {}, "result": {"summary": {}}}))
    assert gen.finished(tmp_path, "lora")
    for stem in stems[:len(gen.GRID)]:  # a method that does not apply: its search's errors are the row
        (runs / f"{stem.replace('lora', 'bitfit')}.json").write_text(json.dumps({"spec": {}, "result": {"error": "x"}}))
    assert gen.finished(tmp_path, "bitfit")


def test_rows_under_way_show_their_runs_so_far(gen, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()

    def keep(stem: str, lr: float, accuracy: float) -> None:
        spec = {"config": {"train": {"lr": lr}}}
        (runs / f"{stem}.json").write_text(json.dumps({"spec": spec, "result": {"summary": {"final": {
            "eval_accuracy": accuracy}}}}))

    keep("lr-search-spiel-x0.5", 5e-4, 0.748)
    keep("lr-search-spiel-x1", 1e-3, 0.8)
    keep("spiel-seed0", 1e-3, 0.81)
    assert gen.in_progress(tmp_path, ["lora", "spiel"]) == ["| spiel | 0.0005: 74.8, 0.001: 80.0 | 81.0 |"]
    text = gen.page([{"method": "zero-shot", "accuracy": 0.5}], "CMD", gen.in_progress(tmp_path, ["spiel"]))
    assert "| spiel | 0.0005: 74.8, 0.001: 80.0 | 81.0 |" in text.split("Rows under way", 1)[1]
