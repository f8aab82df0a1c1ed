"""The ``deltatune`` command: every verb on a tiny Llama saved as a local from_pretrained folder.

Errors must be one red line with exit code 2; the installed console script gets one smoke test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import _parse_options, app
from deltatune.errors import DeltatuneError

VERBS = ("methods", "inspect", "export", "import", "merge", "demo", "compose", "revert", "merge-deltas", "compress")
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result, *needles: str) -> str:
    """The run failed with exit code 2 and one ``error: ...`` line naming the problem."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def artifact(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A LoRA artifact with random B (init=False), so merging visibly changes the model."""
    torch.manual_seed(1)
    tuned = dt.attach(dt.models.load(base_dir), "lora", r=4, alpha=8, targets=["q_proj", "v_proj"], init=False)
    path = tmp_path_factory.mktemp("artifacts") / "lora"
    tuned.save(path)
    return path, tuned.num_trainable()


def test_help_lists_every_verb() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for verb in VERBS:
        assert verb in result.output


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"deltatune {dt.__version__}"


def test_methods_lists_the_registered_methods() -> None:
    result = run("methods")
    assert result.exit_code == 0
    for name in ("lora", "full", "bitfit", "lightweight"):
        assert name in result.output


def test_inspect_table_and_json(artifact: tuple[Path, int], base_dir: Path) -> None:
    path, trainable = artifact
    result = run("inspect", path)
    assert result.exit_code == 0, result.output
    assert "lora" in result.output
    assert f"{trainable:,}" in result.output
    assert "LlamaForCausalLM" in result.output

    result = run("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["method"] == "lora"
    assert info["trainable"] == trainable
    assert info["config"]["r"] == 4
    assert info["base"]["architecture"] == "LlamaForCausalLM"
    assert info["base"]["name_or_path"] == str(base_dir)


def test_export_import_round_trip(artifact: tuple[Path, int], base_dir: Path, tmp_path: Path) -> None:
    path, trainable = artifact
    peft_dir = tmp_path / "peft"
    result = run("export", "--format", "peft", path, "--out", peft_dir, "--base", base_dir)
    assert result.exit_code == 0, result.output
    assert (peft_dir / "adapter_config.json").is_file()
    assert (peft_dir / "adapter_model.safetensors").is_file()

    # without --base the artifact's recorded base (here the local folder) is used
    result = run("export", path, "--out", tmp_path / "peft2")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "peft2" / "adapter_model.safetensors").is_file()

    back = tmp_path / "back"
    result = run("import", "--format", "peft", peft_dir, "--out", back, "--base", base_dir)
    assert result.exit_code == 0, result.output
    info = json.loads(run("inspect", back, "--json").stdout)
    assert info["method"] == "lora"
    assert info["trainable"] == trainable


def test_merge_writes_a_plain_model(artifact: tuple[Path, int], base_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path, _ = artifact
    out = tmp_path / "merged"
    result = run("merge", path, "--base", base_dir, "--out", out)
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tuned = dt.load(dt.models.load(base_dir), path).eval()
    base = dt.models.load(base_dir)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tuned(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        assert not torch.allclose(base(input_ids=ids).logits, expected, atol=1e-3)  # the delta did something


def test_missing_artifact_is_one_error_line(base_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    one_error_line(run("inspect", missing), str(missing))
    one_error_line(run("merge", missing, "--base", base_dir, "--out", tmp_path / "out"), str(missing))
    one_error_line(run("export", missing, "--out", tmp_path / "peft"), str(missing))
    assert not (tmp_path / "out").exists() and not (tmp_path / "peft").exists()


def test_unknown_format_is_one_error_line(artifact: tuple[Path, int], tmp_path: Path) -> None:
    path, _ = artifact
    one_error_line(run("export", "--format", "onnx", path, "--out", tmp_path / "x"), "unknown format 'onnx'", "peft")
    one_error_line(run("import", "--format", "onnx", path, "--out", tmp_path / "y", "--base", "smollm2-135m"), "'onnx'")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_unknown_base_is_one_error_line(artifact: tuple[Path, int], tmp_path: Path) -> None:
    path, _ = artifact
    line = one_error_line(run("merge", path, "--base", "no-such-model", "--out", tmp_path / "m"), "'no-such-model'")
    assert "smollm2-135m" in line  # names what is available
    one_error_line(run("export", path, "--out", tmp_path / "p", "--base", "no-such-model"), "'no-such-model'")
    assert not (tmp_path / "m").exists()


def test_wrong_base_is_refused(artifact: tuple[Path, int], tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)  # same shapes, other weights
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )).save_pretrained(other)
    one_error_line(run("merge", artifact[0], "--base", other, "--out", tmp_path / "m"), "another base model")


def test_demo_options_parse_as_yaml() -> None:
    assert _parse_options(["r=16", "targets=[q_proj, k_proj]", "use_rslora=true", "alpha=0.5"]) == {
        "r": 16, "targets": ["q_proj", "k_proj"], "use_rslora": True, "alpha": 0.5,
    }
    with pytest.raises(DeltatuneError, match="key=value"):
        _parse_options(["r16"])
    one_error_line(run("demo", "--option", "r16"), "'r16'")


def test_installed_console_script() -> None:
    script = Path(sys.executable).parent / "deltatune"
    if not script.exists():
        found = shutil.which("deltatune")
        if found is None:
            pytest.skip("the deltatune console script is not installed")
        script = Path(found)
    done = subprocess.run([str(script), "methods"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "lora" in done.stdout
    done = subprocess.run([str(script), "inspect", "/no/such/artifact"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def _sparse_artifact(base_dir: Path, folder: Path, seed: int) -> Path:
    """A sparse delta with random values (so composing it visibly changes the model)."""
    torch.manual_seed(seed)
    tuned = dt.attach(dt.models.load(base_dir), "spiel", k=200, targets=["q_proj", "o_proj"])
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.normal_(0, 0.05)
    tuned.save(folder)
    return folder


def test_compose_then_revert_is_exact(artifact: tuple[Path, int], base_dir: Path, tmp_path: Path) -> None:
    """`compose A B --out C` writes θ0 + φ_a + φ_b; `revert C B --out R` gives exactly `compose A` (rebuilt from θ0)."""
    lora, _ = artifact
    sparse = _sparse_artifact(base_dir, tmp_path / "sparse", seed=3)
    result = run("compose", lora, sparse, "--out", tmp_path / "both", "--base", base_dir)
    assert result.exit_code == 0, result.output
    assert run("compose", lora, "--out", tmp_path / "lora-only", "--base", base_dir).exit_code == 0
    result = run("revert", tmp_path / "both", "sparse", "--out", tmp_path / "reverted")
    assert result.exit_code == 0, result.output
    both = dt.models.load(tmp_path / "both").state_dict()
    reverted = dt.models.load(tmp_path / "reverted").state_dict()
    alone = dt.models.load(tmp_path / "lora-only").state_dict()
    assert all(torch.equal(reverted[k], alone[k]) for k in alone)
    assert not all(torch.equal(both[k], alone[k]) for k in alone)
    # reverting the last part gives the base model back
    assert run("revert", tmp_path / "reverted", "lora", "--out", tmp_path / "base-again").exit_code == 0
    base = dt.models.load(base_dir).state_dict()
    again = dt.models.load(tmp_path / "base-again").state_dict()
    assert all(torch.equal(again[k], base[k]) for k in base)
    one_error_line(run("revert", tmp_path / "both", "nope", "--out", tmp_path / "x"), "not one of the composed parts")
    one_error_line(run("revert", base_dir, "lora", "--out", tmp_path / "x"), "deltatune-composition.json")


def test_merge_deltas_verb_writes_a_loadable_artifact(artifact: tuple[Path, int], base_dir: Path,
                                                      tmp_path: Path) -> None:
    """Task arithmetic of a delta with itself at weights 0.5, 0.5 is the delta (LoRA inputs: as cat, low-rank)."""
    lora, _ = artifact
    result = run("merge-deltas", lora, lora, "--out", tmp_path / "merged", "--weights", "0.5,0.5", "--base", base_dir)
    assert result.exit_code == 0, result.output
    x = {"input_ids": torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        want = dt.load(dt.models.load(base_dir), lora)(**x).logits
        got = dt.load(dt.models.load(base_dir), tmp_path / "merged")(**x).logits
    assert torch.allclose(got, want, atol=1e-5)
    one_error_line(run("merge-deltas", lora, lora, "--out", tmp_path / "m2", "--weights", "a,b", "--base", base_dir),
                   "--weights takes comma-separated numbers")


def test_compress_verb_and_inspect_show_both_sizes(artifact: tuple[Path, int], base_dir: Path, tmp_path: Path) -> None:
    lora, _ = artifact
    result = run("compress", lora, "--out", tmp_path / "small", "--density", "0.1", "--base", base_dir)
    assert result.exit_code == 0, result.output
    assert "smaller" in result.output
    shown = run("inspect", tmp_path / "small")
    assert shown.exit_code == 0, shown.output
    assert "original size" in shown.output and "compression" in shown.output
    info = dt.inspect(tmp_path / "small")
    # a LoRA's factors, each tensor its own 10 % (rounded down per tensor)
    assert info["compression"]["density"] == pytest.approx(0.1, abs=0.01)
    assert info["stored_bytes"] < info["original_bytes"]
    one_error_line(run("compress", lora, "--out", tmp_path / "bad", "--density", "0", "--base", base_dir), "density")


def test_every_writing_verb_takes_inputs_then_out_and_refuses_the_old_order(artifact: tuple[Path, int],
                                                                           base_dir: Path, tmp_path: Path) -> None:
    """One order for every verb that writes: inputs positional, the output after --out. The earlier order
    (`export ART OUT`, `merge-deltas OUT A B`) is one line showing the new one, and nothing is written."""
    lora, _ = artifact
    target = tmp_path / "target"
    old_calls = {
        "export": ["export", lora, target],
        "import": ["import", lora, target, "--base", base_dir],
        "merge": ["merge", lora, target],
        "compress": ["compress", lora, target],
        "revert": ["revert", tmp_path / "composed", "part", target],
        "merge-deltas": ["merge-deltas", target, lora, lora],
        "compose": ["compose", target, lora],
    }
    for verb, args in old_calls.items():
        line = one_error_line(run(*args), "--out")
        assert f"deltatune {verb} " in line, line
        assert not target.exists(), f"{verb} wrote into {target}"


def test_merge_takes_the_base_from_the_artifact(artifact: tuple[Path, int], tmp_path: Path) -> None:
    result = run("merge", artifact[0], "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "config.json").is_file()


def test_low_rank_inputs_stay_small_and_the_output_says_how_to_get_the_other(artifact: tuple[Path, int],
                                                                             base_dir: Path, tmp_path: Path) -> None:
    lora, _ = artifact
    result = run("merge-deltas", lora, lora, "--how", "ties", "--density", "0.5", "--out", tmp_path / "ties",
                 "--base", base_dir)
    assert result.exit_code == 0, result.output
    assert "a lora artifact" in result.stdout and "--dense" in result.stdout
    dense = run("merge-deltas", lora, lora, "--how", "ties", "--density", "0.5", "--dense", "--out",
                tmp_path / "dense", "--base", base_dir)
    assert dense.exit_code == 0, dense.output
    assert "a full artifact" in dense.stdout and "--dense" not in dense.stdout
    assert dt.inspect(tmp_path / "ties")["stored_bytes"] < dt.inspect(tmp_path / "dense")["stored_bytes"]
    result = run("compress", lora, "--out", tmp_path / "small", "--base", base_dir)
    assert result.exit_code == 0, result.output
    assert "factors A and B" in result.stdout and "--lowrank delta" in result.stdout
