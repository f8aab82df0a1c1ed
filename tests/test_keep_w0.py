"""``keep_w0`` for ``full`` and ``lisa``: W0 in a file on disk (the default) or beside the weight in memory trains and
stores the same bits; the disk form settles W chunk by chunk to exactly what ``InPlace`` settles it to, with
temporaries bounded by the chunk; merge / unmerge / detach restore exactly; a resumed run ends bit-identical."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from conftest import batch, loss_of, output_of, tiny_llama, train_then_resume, word_run_config
from torch.utils._python_dispatch import TorchDispatchMode

import deltatune as dt
from deltatune.core.forms.inplace import InPlace
from deltatune.methods import _offloaded_w0
from deltatune.methods._offloaded_w0 import OffloadedInPlace, TensorFile

pytestmark = pytest.mark.usefixtures("one_thread")

# LISA on the 3-block tiny Llama: one block at a time, a switch every 2 steps (the 4 steps below see two draws)
METHODS = [("full", {}), ("lisa", {"activated_layers": 1, "interval_steps": 2})]


def run(tuned: dt.Tuned, steps: int, lr: float = 0.05) -> None:
    """The native loop's order of calls on one batch. A large lr moves W far from W0, so W − W0 rounds and the
    per-step settle changes W (what makes the stored bits depend on doing it identically)."""
    opt = torch.optim.AdamW(list(tuned.deltas.parameters()), lr=lr, weight_decay=0.0)
    x = batch()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(tuned, x).backward()
        tuned.policy.before_optimizer_step(step, tuned, opt)
        opt.step()
        tuned.policy.after_optimizer_step(step, tuned, opt)


def w0_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("deltatune-w0-*.bin"))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize(("method", "opts"), METHODS, ids=[m for m, _ in METHODS])
def test_disk_and_memory_store_the_same_bits(tmp_path, method: str, opts: dict, tied: bool) -> None:
    x = batch()
    stored = {}
    for keep in ("disk", "memory"):
        model = tiny_llama(tied=tied)
        tuned = dt.attach(model, method, keep_w0=keep, w0_dir=str(tmp_path / f"w0-{keep}"), **opts)
        run(tuned, 4)
        touched = [f for f in tuned.forms().values() if f.touched]
        assert touched
        if keep == "disk":  # one raw file per trained tensor; no W0 tensor held in memory
            assert all(isinstance(f, OffloadedInPlace) and isinstance(f.__dict__["_w0_kept"], TensorFile)
                       for f in touched)
            assert [p.name for p in w0_files(tmp_path / "w0-disk")] == sorted(
                Path(f.__dict__["_w0_kept"].path).name for f in touched)
        else:  # the InPlace form, W0 a tensor beside the weight, nothing on disk
            assert not any(isinstance(f, OffloadedInPlace) for f in tuned.forms().values())
            assert all(isinstance(f.w0, torch.Tensor) for f in touched)
            assert not (tmp_path / "w0-memory").exists()
        base = tiny_llama(tied=tied).state_dict()
        assert all(torch.equal(f.w0, base[n]) for n, f in tuned.forms().items() if f.touched)
        trained = output_of(tuned, x)
        tuned.save(tmp_path / keep)
        assert torch.equal(output_of(tuned, x), trained), "the model was already settled: saving changes nothing"
        assert torch.equal(output_of(dt.load(tiny_llama(tied=tied), tmp_path / keep), x), trained)
        stored[keep] = (tmp_path / keep / "delta.safetensors").read_bytes()
        del tuned, touched, model
        gc.collect()
    assert stored["disk"] == stored["memory"]
    assert not w0_files(tmp_path / "w0-disk"), "W0's files go with the delta"


class Allocations(TorchDispatchMode):
    """The bytes of the largest tensor any operation allocates while it is on (views and in-place results share an
    input's storage and are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in [*args, *(kwargs or {}).values()]
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("keep", ["disk", "memory"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_settle_is_inplace_settle_bit_for_bit(tmp_path, monkeypatch, keep: str, dtype: torch.dtype) -> None:
    """OffloadedInPlace (both places; MeZO uses ``memory``) settles in chunks that do not divide the tensor, to the
    very bits InPlace's whole-tensor settle gives, and never builds anything larger than a chunk."""
    monkeypatch.setattr(_offloaded_w0, "SETTLE_CHUNK", 100)
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(29, 37, generator=g).to(dtype)
    # W far from W0 (sign flips, shrinks, entries near 0): W0 + (W − W0) rounds away from W for many entries
    w = (w0.float() * torch.empty_like(w0, dtype=torch.float32).uniform_(-3, 3, generator=g)
         + 1e-6 * torch.randn(w0.shape, generator=g)).to(dtype)
    settled = []
    for form_type in (InPlace, OffloadedInPlace):
        layer = nn.Linear(37, 29, bias=False).to(dtype)
        with torch.no_grad():
            layer.weight.copy_(w0)
        form = InPlace([(layer, "weight")], "weight") if form_type is InPlace else OffloadedInPlace(
            [(layer, "weight")], "weight", keep, str(tmp_path))
        form.attach()
        form.snapshot()
        with torch.no_grad():
            layer.weight.copy_(w)
        with Allocations() as seen:
            form.settle(force=True)
        # the chunked settle allocates chunks only; InPlace's whole-tensor temporaries (the check that it counts)
        assert seen.largest == (100 if form_type is OffloadedInPlace else w.numel()) * w.element_size()
        settled.append(layer.weight.detach().clone())
        assert torch.equal(w0 + (settled[-1] - w0), settled[-1]), "a fixed point: the artifact reproduces W"
    assert not torch.equal(settled[0], w), "the values must need settling, or the comparison says nothing"
    assert torch.equal(settled[0], settled[1])


@pytest.mark.parametrize(("method", "opts"), METHODS, ids=[m for m, _ in METHODS])
def test_merge_unmerge_and_detach_restore_exactly(tmp_path, method: str, opts: dict) -> None:
    x = batch()
    model = tiny_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = dt.attach(model, method, w0_dir=str(tmp_path), **opts)  # keep_w0: disk, the default
    assert tuned.method_config.keep_w0 == "disk"
    run(tuned, 3)
    trained = output_of(tuned, x)
    assert not torch.equal(trained, output_of(tiny_llama(), x))
    merged = tuned.merge()
    assert torch.equal(output_of(merged, x), trained)
    tuned.unmerge()
    assert torch.equal(output_of(tuned, x), trained)
    tuned.detach()
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), f"{n}: detaching puts W0 back bit for bit"
    tuned.reattach()
    assert torch.equal(output_of(tuned, x), trained)


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lisa", "activated_layers": 1, "interval_steps": 3}],
                         ids=["full", "lisa"])
def test_resume_is_exact_and_matches_memory(word_run, method: dict, tmp_path) -> None:
    """Through dt.train (clipping, schedule, checkpoints): a run resumed after step 4 ends with the uninterrupted
    run's bits (W0 of the resumed run is written afresh from the base), and those are keep_w0: memory's bits."""
    disk = {**method, "keep_w0": "disk", "w0_dir": str(tmp_path / "w0")}
    train_then_resume(word_run_config(word_run, disk, tmp_path / "disk", lr=0.05), keep=2)
    dt.train(word_run_config(word_run, {**method, "keep_w0": "memory"}, tmp_path / "memory", lr=0.05))
    assert (tmp_path / "disk" / "delta.safetensors").read_bytes() == (
        tmp_path / "memory" / "delta.safetensors").read_bytes()


def test_a_bad_place_is_refused() -> None:
    for method in ("full", "lisa"):
        with pytest.raises(dt.DeltatuneError, match="keep_w0='ram'.*'disk' or 'memory'"):
            dt.attach(tiny_llama(), method, keep_w0="ram")


def test_the_bench_measures_both_places() -> None:
    """``deltatune bench`` runs the presets (disk) and their ``-memory`` variants with the same short-run changes."""
    from deltatune.cli.bench_workload import bench_names, method_config

    assert {"full-memory", "lisa-memory"} <= set(bench_names())
    for name in ("full", "lisa"):
        assert method_config(name).get("keep_w0", "disk") == "disk"
        assert method_config(f"{name}-memory") == {**method_config(name), "keep_w0": "memory"}
    assert method_config("lisa-memory")["interval_steps"] == 5  # lisa's SHORT_RUN reaches its variant
