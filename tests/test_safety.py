"""Never lose a user's files, never resume from a corrupt state.

Writers own their output folder (one process at a time), refuse a folder that is not their own kind of output or
that is one of their inputs, and replace their own kind only atomically; readers repair nothing while a writer
owns a folder. Checkpoints carry checksums, a resumed run falls back past a corrupt one, a swap killed between its
renames is put right before a run starts, a moved run folder still resumes, a diverged run is warned about, and an
in-place delta refuses a W0 written after attach. Faults are injected (a folder left as a kill leaves it, flipped
bytes, a lock held by a helper process), never timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import batch, loss_of, tiny_llama, word_run_config
from typer.testing import CliRunner

import deltatune as dt
from deltatune import api
from deltatune.cli.main import app
from deltatune.core import artifact
from deltatune.data import models
from deltatune.train.callbacks import print_summary
from deltatune.train.loop import FLAT_STEPS, divergence
from deltatune.train.state import checkpoints

LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}


def lora_artifact(model_folder: str, out: Path, seed: int = 0) -> Path:
    """A LoRA with small random factors on the word-level model, saved at ``out``."""
    tuned = dt.attach(models.load(model_folder), "lora", r=2, alpha=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    tuned.save(out)
    return out


def users_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    return path


def flip_a_byte(path: Path, at: int = -8) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


# -- A. nothing of the user's is replaced ------------------------------------------------------------------
def test_train_refuses_a_folder_of_the_users_files_until_told(word_run, tmp_path) -> None:
    out = users_folder(tmp_path / "mine")
    cfg = word_run_config(word_run, LORA, out, steps=2, save_every=0)
    with pytest.raises(dt.DeltatuneError, match=r"mine is not empty \(it holds notes.txt\).*--resume.*--overwrite"):
        dt.train(cfg)
    assert (out / "notes.txt").read_text() == "mine"
    dt.train(cfg, overwrite=True)
    assert sorted(os.listdir(out)) == ["checkpoints", "delta.safetensors", "deltatune.json", "logs"]


def test_train_refuses_the_base_model_folder_and_the_data(word_run, tmp_path) -> None:
    folder, data = word_run
    before = sorted(os.listdir(folder))
    for out in (Path(folder), Path(folder) / "run", Path(data).parent):
        with pytest.raises(dt.DeltatuneError, match="which this command reads"):
            dt.train(word_run_config(word_run, LORA, out, steps=2), overwrite=True)
    assert sorted(os.listdir(folder)) == before and Path(data).is_file()


def test_a_fresh_run_into_a_used_run_folder_is_refused(word_run, tmp_path) -> None:
    out = tmp_path / "run"
    dt.train(word_run_config(word_run, LORA, out, steps=8, save_every=2, keep_last=4))
    again = word_run_config(word_run, LORA, out, steps=4, save_every=2, keep_last=4, seed=1)
    with pytest.raises(dt.DeltatuneError, match="pass --resume to continue the run there or --overwrite"):
        dt.train(again)
    assert [p.name for p in checkpoints(out / "checkpoints")][-1] == "step-0000008", "the old run is untouched"
    dt.train(again, overwrite=True)
    # the old run's checkpoints are gone: none of them can outlive the new ones or be resumed from later
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["step-0000002", "step-0000004"]


def test_writers_refuse_their_own_inputs(word_run, tmp_path) -> None:
    folder, _ = word_run
    art = lora_artifact(folder, tmp_path / "art")
    other = lora_artifact(folder, tmp_path / "other", seed=1)
    adapter = dt.export(art, tmp_path / "peft")
    saved = {p: p.read_bytes() for p in [*art.iterdir(), *adapter.iterdir(), *Path(folder).iterdir()] if p.is_file()}
    attempts = [
        lambda: dt.export(art, art),
        lambda: dt.merge(art, base=folder, out=art),
        lambda: dt.merge(art, base=folder, out=folder),
        lambda: dt.merge(art, base=folder, out=Path(folder) / "merged"),
        lambda: dt.merge(art, base=folder, out=tmp_path),  # holds the artifact
        lambda: dt.compress(art, art),
        lambda: dt.import_(adapter, adapter, base=folder),
        lambda: api.compose([art, other], other, base=folder),
        lambda: api.revert(tmp_path / "composed", "art", tmp_path / "composed"),
        lambda: dt.merge_deltas([art, other], art),
    ]
    api.compose([art, other], tmp_path / "composed", base=folder)
    for attempt in attempts:
        with pytest.raises(dt.DeltatuneError, match="which this command reads"):
            attempt()
    assert all(p.read_bytes() == data for p, data in saved.items()), "every input is as it was"


def test_writers_refuse_a_folder_of_other_files_and_replace_their_own(word_run, tmp_path) -> None:
    folder, _ = word_run
    art = lora_artifact(folder, tmp_path / "art")
    other = lora_artifact(folder, tmp_path / "other", seed=1)
    writers = {
        "export": lambda out, **kw: dt.export(art, out, **kw),
        "import": lambda out, **kw: dt.import_(dt.export(art, tmp_path / "adapter", overwrite=True), out, base=folder, **kw),
        "merge": lambda out, **kw: dt.merge(art, base=folder, out=out, **kw),
        "compose": lambda out, **kw: api.compose([art, other], out, base=folder, **kw),
        "revert": lambda out, **kw: api.revert(tmp_path / "compose", "art", out, **kw),
        "merge-deltas": lambda out, **kw: dt.merge_deltas([art, other], out, **kw),
        "compress": lambda out, **kw: dt.compress(art, out, **kw),
    }
    for name, write in writers.items():
        out = users_folder(tmp_path / name)
        with pytest.raises(dt.DeltatuneError, match=r"is not empty and is not .*notes.txt.*--overwrite"):
            write(out)
        assert (out / "notes.txt").read_text() == "mine", name
        write(out, overwrite=True)
        assert not (out / "notes.txt").exists(), name
        write(out)  # its own kind of output: replaced without being told
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder or lock is left"


def test_cli_writers_take_overwrite(word_run, tmp_path) -> None:
    folder, _ = word_run
    art = lora_artifact(folder, tmp_path / "art")
    out = users_folder(tmp_path / "out")
    refused = CliRunner().invoke(app, ["merge", str(art), "--base", folder, "--out", str(out)])
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr and (out / "notes.txt").exists()
    done = CliRunner().invoke(app, ["merge", str(art), "--base", folder, "--out", str(out), "--overwrite"])
    assert done.exit_code == 0, done.output
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()


def test_a_report_folder_holds_one_writers_output_and_a_fresh_report_replaces_the_old(tmp_path) -> None:
    from deltatune.cli.demo import demo

    out = users_folder(tmp_path / "report")
    for attempt in (lambda: artifact.report_folder(out, "study").__enter__(),
                    lambda: demo(quick=True, out=out, show=False)):
        with pytest.raises(dt.DeltatuneError, match=r"is not empty and is not a deltatune report.*notes.txt"):
            attempt()
    assert (out / "notes.txt").read_text() == "mine"

    fresh = tmp_path / "fresh"
    with artifact.report_folder(fresh, "study") as folder:
        (folder / "runs").mkdir()
        (folder / "runs" / "a.json").write_text("{}")
    with artifact.report_folder(fresh, "study", resume=True):  # a long study continued: its runs stay
        assert (fresh / "runs" / "a.json").is_file()
    with pytest.raises(dt.DeltatuneError, match="holds the output of study, not of deltatune demo"):
        demo(quick=True, out=fresh, show=False)
    with artifact.report_folder(fresh, "study"):  # a new report: nothing of the old one mixes in
        assert [p.name for p in fresh.iterdir()] == [artifact.REPORT_MARKER]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no lock is left"


def test_a_study_script_refuses_a_folder_in_one_line_not_a_traceback(tmp_path) -> None:
    """scripts/spiel_study.py on a folder holding someone's files: the refusal is the error's message on stderr
    and exit code 2, as the CLI gives it; the files stay."""
    out = users_folder(tmp_path / "study")
    script = Path(__file__).resolve().parent.parent / "scripts" / "spiel_study.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: ") and "notes.txt" in done.stderr and done.stderr.count("\n") == 1
    assert (out / "notes.txt").read_text() == "mine"


def test_a_study_script_reports_an_oserror_in_one_line(tmp_path) -> None:
    """scripts/dpo_results.py with its output folder under a file (NotADirectoryError): one line, exit code 2."""
    (tmp_path / "file").write_text("x")
    script = Path(__file__).resolve().parent.parent / "scripts" / "dpo_results.py"
    done = subprocess.run([sys.executable, str(script), "--demo", str(tmp_path), "--out", str(tmp_path / "file" / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr


# -- A. one owner per folder; readers repair nothing a writer is doing --------------------------------------
HOLD = """
import sys
from deltatune.core import artifact
with artifact.destination(sys.argv[1], "run", resume=True):
    print("holding", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def held(tmp_path):
    """Another process owning a folder, for as long as the test runs: ``held(path)`` returns its PID once it
    holds the lock (it says so on its stdout)."""
    procs: list[subprocess.Popen] = []

    def hold(path: Path) -> int:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "holding"
        return proc.pid

    yield hold
    for proc in procs:
        proc.communicate("")


def test_a_run_folder_has_one_owner(word_run, tmp_path, held) -> None:
    out = tmp_path / "run"
    pid = held(out)
    with pytest.raises(dt.DeltatuneError, match=rf"run is in use by PID {pid}"):
        dt.train(word_run_config(word_run, LORA, out, steps=2), overwrite=True)
    with pytest.raises(dt.DeltatuneError, match=rf"in use by PID {pid}"):
        lora_artifact(word_run[0], out)
    assert not out.exists(), "the refused writers wrote nothing"


def test_a_reader_never_repairs_what_a_live_writer_is_swapping(word_run, tmp_path, held) -> None:
    art = lora_artifact(word_run[0], tmp_path / "out")
    pid = held(art)
    # the writer is between its two renames: the old version aside, the new one still in its temporary folder
    os.rename(art, tmp_path / ".out.previous")
    (tmp_path / ".out.tmp-live").mkdir()
    with pytest.raises(dt.DeltatuneError, match=rf"being replaced right now by PID {pid}"):
        dt.inspect(art)
    assert (tmp_path / ".out.previous").is_dir() and (tmp_path / ".out.tmp-live").is_dir(), "nothing was touched"


def test_a_reader_repairs_a_swap_whose_writer_died(word_run, tmp_path) -> None:
    art = lora_artifact(word_run[0], tmp_path / "out")
    os.rename(art, tmp_path / ".out.previous")
    (tmp_path / ".out.tmp-dead").mkdir()
    assert dt.inspect(art)["method"] == "lora"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- B. checkpoints: checksums, and a corrupt newest one is skipped ------------------------------------------
def test_checkpoints_record_the_checksum_of_their_tensors(word_run, tmp_path) -> None:
    out = tmp_path / "run"
    dt.train(word_run_config(word_run, LORA, out, steps=2))
    (last,) = checkpoints(out / "checkpoints")
    files = json.loads((last / "state.json").read_text())["files"]["state.safetensors"]
    assert files["sha256"] == artifact.sha256_file(last / "state.safetensors")


def test_resume_falls_back_past_a_corrupt_checkpoint(word_run, tmp_path) -> None:
    out = tmp_path / "run"
    cfg = word_run_config(word_run, LORA, out)
    straight = dt.train(cfg)
    uninterrupted = (out / "delta.safetensors").read_bytes()
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-0000008")  # as if killed after step 6
    flip_a_byte(out / "checkpoints" / "step-0000006" / "state.safetensors")  # bit rot in the newest one
    with pytest.warns(UserWarning, match=r"step-0000006.*corrupted.*resumes from the older step-0000004"):
        resumed = dt.train(cfg, resume=True)
    assert resumed["resumed_from"] == 4 and any("step-0000006" in w for w in resumed["warnings"])
    assert (out / "delta.safetensors").read_bytes() == uninterrupted, "resumed from the good one: bit-identical"
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert (out / "checkpoints" / "step-0000006.corrupt").is_dir(), "kept aside, never resumed from or pruned to"


def test_resume_refuses_when_every_checkpoint_is_corrupt(word_run, tmp_path) -> None:
    out = tmp_path / "run"
    cfg = word_run_config(word_run, LORA, out, steps=2, save_every=0)
    dt.train(cfg)
    flip_a_byte(out / "checkpoints" / "step-0000002" / "state.safetensors")
    with pytest.raises(dt.DeltatuneError, match="no checkpoint in .* is intact"):
        dt.train(cfg, resume=True)


# -- B. a swap killed between its renames is put right before a run starts ------------------------------------
def killed_between_renames(out: Path) -> None:
    """What a SIGKILL between the two renames of the artifact's swap leaves: ``out`` gone, the previous version
    (with its checkpoints) aside."""
    os.rename(out, out.parent / f".{out.name}.previous")


def test_resume_recovers_a_swap_killed_between_renames(word_run, tmp_path) -> None:
    out = tmp_path / "run"
    dt.train(word_run_config(word_run, LORA, out, steps=4, save_every=2))
    killed_between_renames(out)
    resumed = dt.train(word_run_config(word_run, LORA, out, steps=6, save_every=2), resume=True)
    assert resumed["resumed_from"] == 4 and not (tmp_path / ".run.previous").exists()


def test_a_fresh_run_recovers_then_refuses_the_used_folder(word_run, tmp_path) -> None:
    out = tmp_path / "run"
    dt.train(word_run_config(word_run, LORA, out, steps=4, save_every=2))
    killed_between_renames(out)
    with pytest.raises(dt.DeltatuneError, match="is not empty"):
        dt.train(word_run_config(word_run, LORA, out, steps=4, save_every=2))
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["step-0000002", "step-0000004"]


# -- B. a moved run folder resumes -------------------------------------------------------------------------
def test_a_moved_run_folder_resumes(word_run, tmp_path) -> None:
    import shutil

    first = tmp_path / "here"
    straight = dt.train(word_run_config(word_run, LORA, first))
    uninterrupted = (first / "delta.safetensors").read_bytes()
    for c in checkpoints(first / "checkpoints")[2:]:
        shutil.rmtree(c)
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    os.rename(first, moved)
    resumed = dt.train(word_run_config(word_run, LORA, moved), resume=True)
    assert resumed["resumed_from"] == 4 and (moved / "delta.safetensors").read_bytes() == uninterrupted
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]


# -- B. a diverged run is warned about ----------------------------------------------------------------------
def test_a_run_whose_delta_ran_off_is_warned_about(word_run, tmp_path, capsys, monkeypatch) -> None:
    cfg = word_run_config(word_run, LORA, tmp_path / "run", lr=10.0, max_grad_norm=None, warmup=0)
    with pytest.warns(UserWarning, match="looks diverged"):
        summary = dt.train(cfg)
    assert len(summary["warnings"]) == 1 and "root-mean-square" in summary["warnings"][0]
    monkeypatch.setenv("COLUMNS", "1000")  # the table on one line per row
    print_summary(summary)
    assert "looks diverged" in " ".join(capsys.readouterr().out.split())


def test_a_normal_run_has_no_warnings(word_run, tmp_path) -> None:
    summary = dt.train(word_run_config(word_run, LORA, tmp_path / "run", steps=2 * FLAT_STEPS, save_every=0))
    assert summary["warnings"] == []


def test_a_loss_pinned_flat_is_divergence_and_a_noisy_one_is_not() -> None:
    tuned = dt.attach(tiny_llama(), "lora", r=2)
    ln2 = 0.6931471805599453
    pinned = [{"loss": 0.7}, {"loss": 0.68}] + [{"loss": ln2}] * (2 * FLAT_STEPS)
    assert any("stayed at 0.6931" in w for w in divergence(pinned, tuned))
    noisy = [{"loss": 0.7 + 0.01 * ((i * 7) % 5)} for i in range(3 * FLAT_STEPS)]
    converged = [{"loss": 0.7}] * FLAT_STEPS + [{"loss": 0.0}] * FLAT_STEPS  # learned: flat at zero is not diverged
    short = [{"loss": ln2}] * (2 * FLAT_STEPS - 1)
    assert divergence(noisy, tuned) == divergence(converged, tuned) == divergence(short, tuned) == []


# -- B. an in-place delta's W0 is the base as it was at attach -----------------------------------------------
@pytest.mark.parametrize("method", ["full", "mezo"])
def test_a_weight_written_after_attach_is_refused_as_w0(method, tmp_path) -> None:
    opts = {"w0_dir": str(tmp_path)} if method == "mezo" else {}
    tuned = dt.attach(tiny_llama(), method, **opts)
    form = tuned.forms()["model.layers.0.mlp.up_proj.weight"]
    with torch.no_grad():
        form.weight.add_(0.5)  # a hand edit after attach
    with pytest.raises(dt.DeltatuneError, match="up_proj.weight was written after the in-place delta was attached"):
        form.snapshot()  # what the first training forward (or MeZO's first update) does
    fresh = dt.attach(tiny_llama(), method, **opts)
    fresh.model.load_state_dict(tiny_llama(seed=3).state_dict())  # a state-dict load after attach
    with pytest.raises(dt.DeltatuneError, match="was written after the in-place delta was attached"):
        if method == "full":
            loss_of(fresh, batch()).backward()  # the first forward that builds a gradient copies W0
        else:
            fresh.forms()["model.layers.1.self_attn.q_proj.weight"].snapshot()


def test_a_rewrite_with_the_same_values_or_a_move_is_no_write() -> None:
    """DDP's broadcast at wrap rewrites every parameter with the values it has; .to(dtype) converts them."""
    tuned = dt.attach(tiny_llama(), "full")
    tuned.to(torch.float64)
    with torch.no_grad():
        for p in tuned.model.parameters():
            p.copy_(p.clone())
    loss_of(tuned, batch()).backward()  # W0 is taken, no error
    assert all(f.touched for f in tuned.forms().values())
