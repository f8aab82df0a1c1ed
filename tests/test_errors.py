"""Bad input and a failing machine end in one clear line, never a traceback: every probe below runs through the
``deltatune`` command (exit code 2, one ``error: ...`` line naming the problem and the fix) or the Python API,
and leaves what is on disk as it was."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_llama, word_run_config
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import _os_error_message, app
from deltatune.core import artifact
from deltatune.train import load_config
from deltatune.train.state import checkpoints, load_checkpoint

runner = CliRunner()
LORA = {"name": "lora", "r": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]}


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result, *needles: str) -> str:
    """Exit code 2, no traceback, and one ``error: ...`` line holding every needle."""
    assert result.exit_code == 2, (result.exception, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes: what must not change when a command fails."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def lora_artifact(word_run: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("errors") / "lora"
    dt.attach(dt.models.load(word_run[0]), "lora", r=2, targets=["q_proj", "v_proj"], init=False).save(path)
    return path


@pytest.fixture
def trained(word_run: tuple[str, str], tmp_path: Path) -> tuple[Path, Path]:
    """A finished 2-step run with a checkpoint at each step: its config file and its output folder."""
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", word_run_config(word_run, LORA, out, steps=2, save_every=1))
    assert run("train", config).exit_code == 0
    return config, out


# -- the run config ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("setting", "needle"), [
    ({"lr": float("nan")}, "train.lr=nan: must be a finite number"),
    ({"lr": 1e38}, "must be > 0 and at most 10"),
    ({"lr": 0.0}, "must be > 0"),
    ({"steps": True}, "train.steps=True: should be a whole number"),
    ({"warmup": float("inf")}, "train.warmup=inf: must be a finite number"),
    ({"weight_decay": -0.1}, "train.weight_decay=-0.1: must be >= 0"),
    ({"max_grad_norm": 0.0}, "train.max_grad_norm=0.0: must be > 0 (null: no clipping)"),
], ids=["lr-nan", "lr-1e38", "lr-0", "steps-true", "warmup-inf", "weight-decay", "grad-norm-0"])
def test_bad_train_settings_are_refused_before_anything_runs(word_run, tmp_path, setting, needle) -> None:
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", word_run_config(word_run, LORA, out, **setting))
    one_error_line(run("train", config), "bad run config", needle)
    assert not out.exists()


def test_a_bool_is_not_an_integer_option(word_run, tmp_path) -> None:
    with pytest.raises(dt.DeltatuneError, match=r"r=True: should be a whole number"):
        load_config(word_run_config(word_run, {**LORA, "r": True}, tmp_path / "run"))


def test_non_positive_lora_alpha_warns_as_peft_accepts_it(word_run, tmp_path) -> None:
    """PEFT's LoraConfig takes any lora_alpha (a negative one flips the sign of B·A, which training absorbs into
    B), and its adapters must import: a warning, not a refusal. A non-finite alpha is refused."""
    with pytest.warns(UserWarning, match=r"alpha=-8 is negative"):
        load_config(word_run_config(word_run, {**LORA, "alpha": -8}, tmp_path / "run"))
    with pytest.warns(UserWarning, match=r"alpha=0 scales the delta to zero"):
        dt.attach(tiny_llama(), "lora", r=2, alpha=0)
    with pytest.raises(dt.DeltatuneError, match=r"alpha=nan must be a finite number"):
        load_config(word_run_config(word_run, {**LORA, "alpha": float("nan")}, tmp_path / "run"))


def test_output_that_is_a_file_or_under_one_is_refused(word_run, tmp_path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for output, needle in ((afile, "is a file"), (afile / "run", f"lies under {str(afile)!r}, which is a file")):
        config = write_config(tmp_path / "run.yaml", word_run_config(word_run, LORA, output))
        one_error_line(run("train", config), f"output={str(output)!r}", needle)
    assert afile.read_text() == "keep me"


@pytest.mark.parametrize("output", [".", "..", "./"])
def test_output_that_is_the_current_folder_or_holds_it_is_refused(word_run, tmp_path, monkeypatch, output) -> None:
    """The run swaps its artifact folder in at ``output``: at "." that would replace the folder the user is in."""
    here = tmp_path / "project"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    config = write_config(tmp_path / "run.yaml", word_run_config(word_run, LORA, Path(output)))
    before = files_under(tmp_path)
    one_error_line(run("train", config), "is the current folder or holds it", "name a new folder")
    assert files_under(tmp_path) == before


def test_set_with_a_value_that_is_not_yaml(word_run, tmp_path) -> None:
    config = write_config(tmp_path / "run.yaml", word_run_config(word_run, LORA, tmp_path / "run"))
    one_error_line(run("train", config, "--set", "train.steps=[1"), "--set 'train.steps=[1'", "not valid YAML")
    assert not (tmp_path / "run").exists()


# -- a failing disk --------------------------------------------------------------------------------
def _failing_writes(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """Every tensor file write fails with ``code`` (a full disk, a read-only or forbidden folder)."""

    def fail(tensors, filename, metadata=None):
        raise OSError(code, os.strerror(code), filename)

    monkeypatch.setattr(artifact, "save_file", fail)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES], ids=errno.errorcode.get)
def test_a_failing_disk_on_a_fresh_run_is_one_line_and_writes_no_file(word_run, tmp_path, monkeypatch, code) -> None:
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", word_run_config(word_run, LORA, out, steps=2, save_every=1))
    _failing_writes(monkeypatch, code)
    line = one_error_line(run("train", config), os.strerror(code), errno.errorcode[code], str(out))
    assert "state.safetensors" in line, "the line names the file that could not be written"
    assert files_under(tmp_path) == {"run.yaml": config.read_bytes()}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failing_disk_on_resume_leaves_the_run_as_it_was(trained, monkeypatch, code) -> None:
    config, out = trained
    before = files_under(out)
    _failing_writes(monkeypatch, code)
    one_error_line(run("train", config, "--resume", "--set", "train.steps=4"), os.strerror(code), str(out))
    assert files_under(out) == before


def test_a_failing_artifact_write_names_the_path(lora_artifact, tmp_path, monkeypatch) -> None:
    _failing_writes(monkeypatch, errno.ENOSPC)
    one_error_line(run("export", lora_artifact, "--out", tmp_path / "peft"), "adapter_model.safetensors",
                   "No space left on device (ENOSPC)", "free space")
    assert not (tmp_path / "peft").exists()


def test_os_error_without_a_path_still_says_what_happened() -> None:
    assert _os_error_message(OSError(errno.EIO, os.strerror(errno.EIO))) == f"{os.strerror(errno.EIO)} (EIO)"
    assert _os_error_message(OSError("socket closed")) == "socket closed"
    renamed = _os_error_message(OSError(errno.EXDEV, os.strerror(errno.EXDEV), "a", None, "b"))
    assert renamed.startswith("a -> b: ")


# -- artifacts, adapters, checkpoints and base folders that do not fit ------------------------------------
def test_an_artifact_asking_for_a_huge_rank_is_refused_before_allocating(lora_artifact, word_run, tmp_path) -> None:
    """r = 2**31 on a 16-wide layer would allocate 128 GiB; the rank is bounded by the targeted weights."""
    huge = tmp_path / "huge"
    shutil.copytree(lora_artifact, huge)
    meta = json.loads((huge / "deltatune.json").read_text())
    meta["config"]["r"] = 2**31
    (huge / "deltatune.json").write_text(json.dumps(meta))
    before = files_under(huge)
    one_error_line(run("eval", huge, "--data", word_run[1], "--task", "classification"),
                   f"rank r={2**31} is too large", "at most max(out, in) = 16", "lower r")
    assert files_under(huge) == before


def test_rank_is_bounded_by_the_larger_side_of_each_weight_as_peft_allows() -> None:
    """tiny_llama's k_proj is 16 x 32: r = 20 exceeds min(out, in), which PEFT accepts (its adapters must import);
    r = 33 exceeds max(out, in), where each factor would outgrow the weight."""
    assert dt.attach(tiny_llama(), "lora", r=20, targets=["k_proj"]).forms()
    with pytest.raises(dt.DeltatuneError, match=r"rank r=33 is too large for a Linear weight of 16x32"):
        dt.attach(tiny_llama(), "lora", r=33, targets=["k_proj"])
    with pytest.raises(dt.DeltatuneError, match=r"rank r=40 is too large"):
        dt.attach(tiny_llama(), "adalora", init_r=40, target_r=8, total_step=10, targets=["k_proj"])


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("r", "eight", "r='eight' must be a positive integer"),
    ("lora_alpha", "x", "lora_alpha='x' must be a number"),
    ("lora_dropout", 2, "lora_dropout=2 must be a number in [0, 1)"),
    ("use_rslora", "no", "use_rslora='no' must be true or false"),
    ("alpha_pattern", {"q_proj": "a"}, "alpha_pattern={'q_proj': 'a'} must be an object"),
], ids=["r", "lora_alpha", "lora_dropout", "use_rslora", "alpha_pattern"])
def test_a_peft_config_with_wrong_types_is_refused(lora_artifact, word_run, tmp_path, key, value, needle) -> None:
    adapter = tmp_path / "adapter"
    assert run("export", lora_artifact, "--out", adapter).exit_code == 0
    config_file = adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), key: value}))
    one_error_line(run("import", adapter, "--out", tmp_path / "imported", "--base", word_run[0]),
                   f"{config_file} is not a valid PEFT config", needle)
    assert not (tmp_path / "imported").exists()


DAMAGED_STATES = [
    ({}, "lacks step, config, delta"),
    ([], "holds a list, not a checkpoint's state"),
    ({"step": -1}, "lacks config"),
]


@pytest.mark.parametrize(("state", "needle"), DAMAGED_STATES, ids=["empty", "list", "partial"])
def test_a_damaged_checkpoint_state_names_the_file(trained, state, needle) -> None:
    _, out = trained
    last = checkpoints(out / "checkpoints")[-1]
    (last / "state.json").write_text(json.dumps(state))
    with pytest.raises(dt.DeltatuneError, match=rf"{re.escape(str(last / 'state.json'))} {re.escape(needle)}"):
        load_checkpoint(last)


def test_a_checkpoint_state_with_a_bad_step_is_refused(trained) -> None:
    _, out = trained
    last = checkpoints(out / "checkpoints")[-1]
    state = json.loads((last / "state.json").read_text())
    (last / "state.json").write_text(json.dumps({**state, "step": True}))
    with pytest.raises(dt.DeltatuneError, match=r"has a bad step: the checkpoint is damaged"):
        load_checkpoint(last)


def test_resuming_from_a_damaged_only_checkpoint_is_one_line(word_run, tmp_path) -> None:
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", word_run_config(word_run, LORA, out, steps=2, save_every=0))
    assert run("train", config).exit_code == 0
    (only,) = checkpoints(out / "checkpoints")
    (only / "state.json").write_text("{}")
    before = files_under(out)
    one_error_line(run("train", config, "--resume", "--set", "train.steps=4"), str(only / "state.json"),
                   "lacks step, config, delta")
    assert files_under(out) == before


def test_a_base_with_only_pickle_weights_is_refused_unread(word_run, lora_artifact, tmp_path) -> None:
    base = tmp_path / "pickled"
    base.mkdir()
    shutil.copy(Path(word_run[0]) / "config.json", base / "config.json")
    (base / "pytorch_model.bin").write_bytes(b"\x80\x02not a model")
    needles = ("pytorch_model.bin", "pickle weights are not loaded", "convert to safetensors")
    one_error_line(run("generate", "--base", base, "--prompt", "hi"), *needles)
    one_error_line(run("merge", lora_artifact, "--base", base, "--out", tmp_path / "merged"), *needles)
    assert not (tmp_path / "merged").exists()


# -- eval and generate options -------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["data.max_evl", "max_evl"])
def test_eval_unknown_data_option_suggests_the_nearest(lora_artifact, word_run, key) -> None:
    one_error_line(run("eval", lora_artifact, "--data", word_run[1], "--set", f"{key}=3"),
                   "unknown key data.max_evl", "did you mean 'max_eval'?")


def test_eval_data_options_take_the_train_spelling(lora_artifact, word_run) -> None:
    result = run("eval", lora_artifact, "--data", word_run[1], "--task", "classification", "--json",
                 "--set", "data.max_eval=4", "--set", "data.labels=[negative, positive]")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) == {"loss", "accuracy"}


@pytest.mark.parametrize(("args", "needle"), [
    (("eval", "--batch-size", "0"), "--batch-size 0: must be at least 1"),
    (("eval", "--set", "max_eval=[1"), "not valid YAML"),
    (("generate", "--max-new-tokens", "-5"), "--max-new-tokens -5: must be at least 1"),
])
def test_eval_and_generate_option_values(lora_artifact, word_run, args, needle) -> None:
    verb, *options = args
    source = ["--data", word_run[1]] if verb == "eval" else ["--prompt", "what a"]
    one_error_line(run(verb, lora_artifact, *source, *options), needle)


def test_python_eval_and_generate_refuse_bad_options_in_one_line(lora_artifact, word_run) -> None:
    with pytest.raises(dt.DeltatuneError, match=r"unknown key data.max_evl \(did you mean 'max_eval'\?\)"):
        dt.api.eval(lora_artifact, {"path": word_run[1], "max_evl": 3})
    with pytest.raises(dt.DeltatuneError, match=r"max_new_tokens=-5: must be a whole number of at least 1"):
        dt.api.generate(lora_artifact, "what a", max_new_tokens=-5)


def test_save_into_a_folder_of_other_files_needs_overwrite(word_run, tmp_path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    tuned = dt.attach(dt.models.load(word_run[0]), "lora", r=2, targets=["q_proj", "v_proj"])
    with pytest.raises(dt.DeltatuneError, match="overwrite"):
        tuned.save(folder)
    assert files_under(folder) == {"notes.txt": b"keep me"}
    tuned.save(folder, overwrite=True)
    assert dt.api.inspect(folder)["method"] == "lora" and not (folder / "notes.txt").exists()
