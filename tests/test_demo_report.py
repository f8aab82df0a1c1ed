"""The demo's report on a tiny stand-in (a tiny BERT encoder with a fresh head on the sentiment data, every row in
this process): the table with each row's run config, the plots (accuracy against cost, eval curves, confusion
matrices, loss), example predictions, and the next commands, which are run here as bash would pass them and must
work: eval (the row's accuracy again), generate, export (a PEFT adapter) and merge (the same logits)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from test_head_artifacts import close, ids_of, logits, save_tiny_encoder
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.demo import DEFAULT_SETUP, QUICK_SETUP, Row, bash_word, demo, example_indices, run_config
from deltatune.cli.main import app
from deltatune.data import models

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"
README = Path(__file__).resolve().parents[1] / "README.md"


def stand_in(root: Path) -> dict:
    """The quick demo's shape (an encoder, a fresh head, LoRA with the head as a module to save, and full
    fine-tuning from their presets) on a model and data that train in a second."""
    model = save_tiny_encoder(root / "model", root / "data.jsonl")
    return {"title": "a tiny encoder with a fresh head on one-word sentiment", "model": str(model),
            "data": {"path": str(root / "data.jsonl"), "task": "classification", "max_length": 16,
                     "eval_fraction": 0.25},
            "batch_size": 8, "eval_batch_size": 16, "baseline": "untrained head", "eval_points": 2,
            "methods": {"lora": Row("lora-minilm", {"steps": 8, "lr": 2e-2}),
                        "full": Row("full-minilm", {"steps": 8, "lr": 1e-3})}}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path, dict]:
    root = tmp_path_factory.mktemp("demo-report")
    setup = stand_in(root)
    out = root / "report"
    return demo(setup=setup, out=out, show=False, isolate=False), out, setup


def bash_argv(line: str) -> list[str]:
    """The arguments bash passes to ``deltatune`` for a command line as the report or README writes it."""
    script = "deltatune() { printf '%s\\0' \"$@\"; }\n" + line
    done = subprocess.run(["bash", "-c", script], capture_output=True, check=True)
    return done.stdout.decode().split("\0")[:-1]


def commands(report_md: str) -> list[str]:
    block = report_md.split("## Use the artifacts", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_first_row_is_the_model_before_training(report: tuple[list[dict], Path, dict]) -> None:
    rows, _, _ = report
    assert [r["method"] for r in rows] == ["untrained head", "lora", "full"]
    assert QUICK_SETUP["baseline"] == "untrained head" and DEFAULT_SETUP["baseline"] == "zero-shot"
    assert rows[0]["trainable"] == 0 and rows[0]["artifact"] is None


def test_the_report_has_its_parts(report: tuple[list[dict], Path, dict]) -> None:
    rows, out, _ = report
    text = (out / "report.md").read_text()
    assert "| method | trainable params | peak memory | s / step | held-out accuracy | artifact | run config |" in text
    for name in ("cost.png", "curves.png", "confusion.png", "loss.png"):
        assert f"]({name})" in text
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name
    for row in rows[1:]:
        assert f"[{row['method']}.yaml](configs/{row['method']}.yaml)" in text
        assert f"<code>configs/{row['method']}.yaml</code>" in text  # inline, under "Run configs"
    for section in ("## Example predictions", "## Use the artifacts", "## Run configs"):
        assert section in text


def test_each_rows_config_is_the_one_it_trained(report: tuple[list[dict], Path, dict]) -> None:
    rows, out, setup = report
    for row in rows[1:]:
        written = yaml.safe_load((out / row["config_file"]).read_text())
        assert written == run_config(setup, row["method"], output=out / "artifacts" / row["method"])
        assert written["train"]["eval_every"] == written["train"]["steps"] // setup["eval_points"]


def test_eval_curves_and_predictions_agree_with_the_final_accuracy(report: tuple[list[dict], Path, dict]) -> None:
    """The curves come from the runs' evaluations and end at the row's accuracy; the predictions (the confusion
    matrices, the examples) come from the artifact loaded back and give that same accuracy."""
    rows, _, setup = report
    for row in rows[1:]:
        assert [s for s, _ in row["evals"]] == [4, 8]
        assert row["evals"][-1][1] == row["accuracy"]
        seen = row["predictions"]
        hits = sum(p == y for p, y in zip(seen["predictions"], seen["labels"], strict=True))
        assert hits / len(seen["labels"]) == row["accuracy"]
        assert row["starts_at_base"]  # LoRA (B = 0, the head copied) and full start at the untrained model
    assert rows[1]["uses"] == {"export": True, "merge": True} and rows[2]["uses"] == {"export": False, "merge": True}


def test_example_predictions_show_each_row(report: tuple[list[dict], Path, dict]) -> None:
    rows, out, _ = report
    text = (out / "report.md").read_text().split("## Example predictions", 1)[1].split("##", 1)[0]
    table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert table[0] == "| text | label | untrained head | lora | full |"
    names = rows[0]["predictions"]["label_names"]
    assert len(table) - 1 == len(example_indices(rows[0]["predictions"]["labels"], len(names))) == 4
    for line in table[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] in names and all(re.fullmatch(rf"({'|'.join(names)}) [✓✗]", c) for c in cells[2:])


def test_the_next_commands_work_as_written(report: tuple[list[dict], Path, dict]) -> None:
    rows, out, _ = report
    lines = commands((out / "report.md").read_text())
    verbs = [bash_argv(line)[0] for line in lines]
    assert verbs == ["eval", "generate", "export", "merge", "eval", "generate", "merge"]  # full: no PEFT form
    runner = CliRunner()
    outputs = {}
    for line in lines:
        argv = bash_argv(line)
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, f"{line}\n{result.output}"
        outputs[line] = result.output
    for row in rows[1:]:
        art = row["artifact"]
        evaluated = next(o for line, o in outputs.items() if line.startswith(f"deltatune eval {art} "))
        assert f"{row['accuracy']:.4f}" in evaluated  # the row's held-out accuracy, again
        said = next(o for line, o in outputs.items() if line.startswith(f"deltatune generate {art} "))
        assert said.split(" (p=")[0].strip() in dt.inspect(art)["base"]["head"]["id2label"].values()
        tuned = dt.load(models.load_base(str(Path(art).parent.parent.parent / "model"),
                                         dt.inspect(art)["base"]["head"]), art)
        inputs = ids_of(Path(tuned.config._name_or_path))
        merged = models.load(str(out / "merged" / row["method"]))
        assert close(logits(merged, inputs), logits(tuned, inputs))
    adapter = out / "peft" / "lora"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()


def test_a_prompt_with_a_newline_reaches_the_program_as_one(tmp_path: Path) -> None:
    prompt = "Tweet: it's a \\ lovely day\nSentiment:"
    assert bash_word(prompt).startswith("$'")
    assert bash_argv(f"deltatune generate a --prompt {bash_word(prompt)}") == ["generate", "a", "--prompt", prompt]
    assert bash_argv(f"deltatune generate a --prompt {bash_word('plain text')}")[-1] == "plain text"


def test_the_readme_generate_example_passes_a_real_newline() -> None:
    lines = [line.split("  #")[0] for line in README.read_text().splitlines()
             if line.startswith("deltatune generate ")]
    assert lines, "the README shows deltatune generate"
    for line in lines:
        argv = bash_argv(line)
        prompt = argv[argv.index("--prompt") + 1]
        assert "\\n" not in prompt, f"a literal backslash-n reaches the model: {line}"
        if "Sentiment:" in prompt:
            assert prompt.endswith("\nSentiment:")


def test_the_default_demo_generates_after_the_prompt() -> None:
    """On the default demo (label words after a prompt), the generate command gives the causal LM the prompt with a
    real newline and no chat template, as the rows were scored."""
    from deltatune.cli.demo import next_commands

    row = {"method": "lora", "artifact": "demo-report/artifacts/lora", "config_file": "configs/lora.yaml",
           "uses": {"export": True, "merge": True}, "predictions": {"prompt": "Tweet: {text}\nSentiment:"}}
    lines = next_commands(row, Path("demo-report"), DEFAULT_SETUP["example"])
    argv = bash_argv(lines[1])
    assert argv[:2] == ["generate", "demo-report/artifacts/lora"]
    assert argv[argv.index("--prompt") + 1] == f"Tweet: {DEFAULT_SETUP['example']}\nSentiment:"
    assert "--no-chat" in argv
    assert bash_argv(lines[0]) == ["eval", "demo-report/artifacts/lora", "--config", "demo-report/configs/lora.yaml"]
    assert [bash_argv(line) for line in lines[2:]] == [
        ["export", "demo-report/artifacts/lora", "--out", "demo-report/peft/lora"],
        ["merge", "demo-report/artifacts/lora", "--out", "demo-report/merged/lora"]]


def test_torch_threads_are_the_callers_again(report: tuple[list[dict], Path, dict]) -> None:
    assert torch.get_num_threads() == 1  # the demo in this process leaves the module's one-thread setting alone


def test_one_seed_and_no_grid_is_the_report_of_one_run(report: tuple[list[dict], Path, dict]) -> None:
    """Without --seeds / --lr-grid the report is the one-run report: no ±, no per-seed or search sections, one
    artifact and config per row under the row's own name, nothing of the protocol in rows.json."""
    rows, out, _ = report
    text = (out / "report.md").read_text()
    assert "±" not in text and "## Per seed" not in text and "## Learning-rate search" not in text
    assert ", seed 0. Each method" in text and not (out / "lr-search").exists()
    assert sorted(p.name for p in (out / "artifacts").iterdir()) == ["full", "lora"]
    for row in json.loads((out / "rows.json").read_text()):
        assert not {"seeds", "lr_search", "accuracy_se", "eval_loss_se", "seconds_per_step_se"} & set(row)
