"""deltatune bench on a tiny random Llama: every run gives a full record, ratios are to PEFT's LoRA."""

from __future__ import annotations

import json

import pytest

from deltatune.cli import bench as bench_module
from deltatune.cli.bench_report import markdown, rows
from deltatune.errors import DeltatuneError


@pytest.mark.slow  # a subprocess per run
def test_bench_records(tiny_folder, tmp_path):
    out = tmp_path / "bench.json"
    docs = tmp_path / "benchmarks.md"
    records = bench_module.bench(str(tiny_folder), "lora,full", 3, json_path=out, write_docs=True,
                                 docs_path=docs, batch_size=2, seq_len=32, max_train=200, max_eval=20, threads=1)
    by = {r["name"]: r for r in records}
    assert set(by) == {"deltatune lora", "deltatune full", "peft lora", "plain full", "plain forward"}
    for r in records:
        assert r.get("error") is None, r
        for f in bench_module.FIELDS:
            if r["name"] == "plain forward" and f in ("trainable", "artifact_bytes"):
                assert r[f] == 0  # inference: nothing trains, nothing is saved
            else:
                assert r[f] is not None and r[f] > 0, (r["name"], f)
        assert len(r["step_times"]) == 3
    # every training run is also compared with the forward-only pass of the same batches
    assert set(by["deltatune lora"]["ratios_to_forward"]) == set(bench_module.FIELDS)
    assert "ratios_to_forward" not in by["plain forward"]
    assert all(v == pytest.approx(1.0) for v in by["peft lora"]["ratios"].values())
    assert by["deltatune lora"]["trainable"] == by["peft lora"]["trainable"]
    assert by["deltatune full"]["trainable"] == by["plain full"]["trainable"]
    assert by["deltatune lora"]["ratios"]["trainable"] == pytest.approx(1.0)
    payload = json.loads(out.read_text())
    assert [r["name"] for r in payload["records"]] == [r["name"] for r in records]
    assert payload["machine"]["torch_threads"] == 1 and payload["workload"]["steps"] == 3
    text = docs.read_text()
    assert "| peft lora |" in text and "deltatune bench" in text and "| deltatune lora | " in text.split(
        "Against a forward-only pass")[1]
    # a rewrite keeps hand-written notes below the marker
    docs.write_text(text + "my notes\n")
    bench_module.write_markdown(records, bench_module.Workload(model=str(tiny_folder)), docs, "cmd")
    assert docs.read_text().endswith("my notes\n")


@pytest.mark.slow  # a subprocess per run
def test_peft_prefix_and_prompt_run_next_to_deltatune_s(tiny_folder):
    """`peft-prefix` / `peft-prompt` in methods run PEFT's own prefix and prompt tuning at the presets' sizes."""
    records = bench_module.bench(str(tiny_folder), "prompt,peft-prompt,prefix,peft-prefix", 2, batch_size=2,
                                 seq_len=16, max_train=40, max_eval=4, threads=1, baselines=False)
    by = {r["name"]: r for r in records}
    assert list(by) == ["deltatune prompt", "peft prompt", "deltatune prefix", "peft prefix"]
    assert all(r.get("error") is None and r["framework"] == ("peft" if r["name"].startswith("peft") else "deltatune")
               for r in records), records
    hidden = 16  # the tiny Llama's hidden size: 100 soft tokens of it in both
    assert by["deltatune prompt"]["trainable"] == by["peft prompt"]["trainable"] == 100 * hidden
    assert all(r["artifact_bytes"] > 0 and r["eval_loss"] > 0 for r in records)


@pytest.mark.slow  # a subprocess per run
def test_peft_runs_of_the_same_method_train_what_deltatune_trains(tiny_folder):
    """`peft-<method>` runs PEFT's implementation at the preset's options: the same trainable count as deltatune's
    run, and each deltatune run is compared with it."""
    names = ["ia3", "vera", "loha", "lokr", "trainable_tokens"]
    records = bench_module.bench(str(tiny_folder), ",".join(f"{m},peft-{m}" for m in names), 2, batch_size=2,
                                 seq_len=16, max_train=40, max_eval=4, threads=1, baselines=False)
    by = {r["name"]: r for r in records}
    assert all(r.get("error") is None for r in records), [r["error"] for r in records if r.get("error")]
    for m in names:
        ours, theirs = by[f"deltatune {m}"], by[f"peft {m}"]
        assert theirs["framework"] == "peft" and ours["trainable"] == theirs["trainable"] > 0, (m, ours, theirs)
        assert ours["peft_same"] == f"peft {m}"
        assert ours["ratios_to_peft_same"]["trainable"] == 1.0
    text = bench_module.write_markdown(records, bench_module.Workload(model=str(tiny_folder)),
                                       tiny_folder / "bench.md", "cmd").read_text()
    assert "| deltatune vera | peft vera |" in text


@pytest.mark.slow  # a subprocess per run
def test_quantized_base_runs_are_compared_with_the_full_precision_ones(tiny_folder):
    """`lora-nf4` trains the lora preset over an nf4 base, `peft-lora-nf4` PEFT's LoRA over the same base; each is
    compared with its framework's run over the full-precision base, and deltatune's with PEFT's."""
    records = bench_module.bench(str(tiny_folder), "lora,lora-nf4,peft-lora-nf4", 2, batch_size=2, seq_len=16,
                                 max_train=40, max_eval=4, threads=1)
    by = {r["name"]: r for r in records}
    assert all(r.get("error") is None for r in records), [r["error"] for r in records if r.get("error")]
    ours, theirs = by["deltatune lora-nf4"], by["peft lora-nf4"]
    assert ours["trainable"] == theirs["trainable"] == by["peft lora"]["trainable"] > 0
    assert ours["full_precision"] == "deltatune lora" and theirs["full_precision"] == "peft lora"
    assert ours["peft_same"] == "peft lora-nf4"
    for r in (ours, theirs, by["deltatune lora"], by["peft lora"]):  # the steps' own peak: within the process's
        assert 0 < r["train_peak_memory_bytes"] <= r["peak_memory_bytes"], r
    # the 4-bit base computes with other weights: the same batches give another loss than the full-precision base
    assert ours["eval_loss"] != by["deltatune lora"]["eval_loss"]
    text = bench_module.write_markdown(records, bench_module.Workload(model=str(tiny_folder)),
                                       tiny_folder / "bench-q.md", "cmd").read_text()
    assert "| deltatune lora-nf4 | deltatune lora |" in text and "| peft lora-nf4 | peft lora |" in text


def test_bench_rejects_unknown_method(tiny_folder):
    with pytest.raises(DeltatuneError, match="unknown method"):
        bench_module.bench(str(tiny_folder), "nope", 3)


def test_equal_count_runs_are_compared_with_the_lora_of_the_same_count() -> None:
    from deltatune.cli import bench

    def rec(name: str, method: str, framework: str, trainable: int, sps: float, mem: int) -> dict:
        return {"name": name, "method": method, "framework": framework, "trainable": trainable,
                "seconds_per_step": sps, "tokens_per_s": 1 / sps, "peak_memory_bytes": mem, "artifact_bytes": 1,
                "eval_loss": 1.0, "amortised_overhead": 0.05}

    records = [rec("deltatune lora", "lora", "deltatune", 100, 2.0, 1000),
               rec("deltatune lora-all", "lora-all", "deltatune", 300, 3.0, 1200),
               rec("deltatune spiel", "spiel", "deltatune", 100, 2.2, 1050),
               rec("deltatune spiel-all", "spiel-all", "deltatune", 300, 3.3, 1500),
               rec("peft lora", "peft-lora", "peft", 100, 2.0, 1000)]
    bench._add_ratios(records)
    assert records[2]["same_count_lora"] == "deltatune lora"
    assert records[2]["ratios_to_same_count_lora"]["seconds_per_step"] == pytest.approx(1.1)
    assert records[3]["same_count_lora"] == "deltatune lora-all"
    assert records[3]["ratios_to_same_count_lora"]["peak_memory_bytes"] == pytest.approx(1.25)
    assert "same_count_lora" not in records[0] and "same_count_lora" not in records[4]
    assert bench.method_config("spiel-all")["targets"] == bench.ALL_LINEAR
    lines = bench.equal_count_lines(records)
    assert any("deltatune spiel-all | deltatune lora-all | 300 | 1.10× | 1.25×" in line for line in lines)


@pytest.mark.slow  # a subprocess per run
def test_bench_classification_workload_compares_vqt_with_a_forward_pass(tiny_folder):
    """The head workload: a sequence-classification model on the tweets' labels; VQT and PEFT's LoRA
    train on it, and each run is compared with the forward-only pass of the same batches."""
    records = bench_module.bench(str(tiny_folder), "vqt", 3, task="classification", batch_size=2, seq_len=32,
                                 max_train=40, max_eval=10, threads=1)
    by = {r["name"]: r for r in records}
    assert set(by) == {"deltatune vqt", "peft lora", "plain full", "plain forward"}
    for r in records:
        assert r.get("error") is None, r
    vqt = by["deltatune vqt"]
    hidden, layers, labels = 16, 2, 3  # the tweets' negative / neutral / positive
    assert vqt["trainable"] == layers * hidden + hidden * (1 + layers) * labels + labels  # queries + head
    assert vqt["ratios_to_forward"]["peak_memory_bytes"] > 0


def test_bench_rejects_unknown_task(tiny_folder):
    with pytest.raises(DeltatuneError, match="not a bench workload"):
        bench_module.bench(str(tiny_folder), "lora", 3, task="chat")


def test_bench_methods_are_the_presets_with_the_short_run_changes() -> None:
    from deltatune.cli import bench_workload as workload
    from deltatune.train import load_config

    w = bench_module.Workload()
    lora = load_config("lora").method
    assert bench_module.method_config("lora") == lora
    assert bench_module.method_config("lora-all") == {**lora, "targets": bench_module.ALL_LINEAR}
    assert bench_module.method_config("lisa") == {**load_config("lisa").method, "interval_steps": 5}
    corda = bench_module.method_config("corda", w.data())
    assert corda["data"] == "random" and corda["r"] == load_config("corda").method["r"]
    assert bench_module.method_config("compeft") == {"name": "compeft"}  # no preset: the method's defaults
    # first-order runs train at the workload's learning rate, zeroth-order ones at their preset's
    assert workload.learning_rate("lora", w) == w.lr
    assert workload.learning_rate("mezo", w) == load_config("mezo").train.lr
    peft_lora = workload._peft_config("peft-lora", "CAUSAL_LM")
    assert (peft_lora.r, peft_lora.lora_alpha, sorted(peft_lora.target_modules)) == (
        lora["r"], lora["alpha"], sorted(lora["targets"]))


def test_several_seeds_report_mean_and_standard_error_with_ratios_paired_by_seed(tiny_folder, monkeypatch):
    """--seeds N runs every workload once per seed, seed by seed; each figure is the mean ± standard error over
    the seeds and each ratio to PEFT's LoRA the mean of the per-seed ratios (not the ratio of the means)."""
    step = {("lora", 0): 1.0, ("lora", 1): 2.0, ("peft-lora", 0): 2.0, ("peft-lora", 1): 8.0}
    calls = []

    def fake_run(run, w, timeout):
        calls.append((run.method, w.seed))
        s = step[(run.method, w.seed)]
        return {"times": [9.0, s, s, s], "tokens": [256] * 4, "peak_memory_bytes": 2**30 * (1 + w.seed),
                "trainable": 100, "artifact_bytes": 10, "eval_loss": 3.0 + w.seed, "train_loss": 3.0,
                "device": "cpu", "torch_threads": 1}, None

    monkeypatch.setattr(bench_module, "_run_one", fake_run)
    bench_module.bench(str(tiny_folder), "lora", 4, seeds=2, baselines=False, threads=1)
    assert calls == [("lora", 0), ("lora", 1)]
    calls.clear()
    # peft-lora named: PEFT's LoRA without the other baselines (plain full, plain forward)
    records = bench_module.bench(str(tiny_folder), "lora,peft-lora", 4, seeds=2, baselines=False, threads=1)
    assert calls == [("lora", 0), ("peft-lora", 0), ("lora", 1), ("peft-lora", 1)]  # seed by seed
    lora = records[0]
    assert lora["seconds_per_step"] == pytest.approx(1.5) and lora["seconds_per_step_se"] == pytest.approx(0.5)
    assert lora["eval_loss"] == pytest.approx(3.5) and lora["eval_loss_se"] == pytest.approx(0.5)
    assert lora["peak_memory_bytes"] == round(1.5 * 2**30) and lora["seed"] == [0, 1]
    assert [r["seconds_per_step"] for r in lora["per_seed"]] == [1.0, 2.0]
    # per-seed ratios 0.5 and 0.25: mean 0.375 ± 0.125 (the ratio of the means would be 1.5 / 5 = 0.3)
    assert lora["ratios"]["seconds_per_step"] == pytest.approx(0.375)
    assert lora["ratios_se"]["seconds_per_step"] == pytest.approx(0.125)
    cells = rows(records)[0]
    assert cells[1] == "1.500 ± 0.500 (0.38 ± 0.12×)" and cells[6].startswith("3.5000 ± 0.5000")
    assert cells[4] == "100 (1.00×)"  # the same in every seed: no spread shown
    text = markdown(records, bench_module.Workload(model=str(tiny_folder), seed=0), "CMD", seeds=2)
    assert "seeds 0 to 1 (every run once per seed" in text and "| deltatune lora | 1.500 ± 0.500 (0.38" in text


def test_a_failed_seed_fails_the_run_and_names_the_seed(tiny_folder, monkeypatch):
    def fake_run(run, w, timeout):
        if w.seed == 1:
            return None, "exit code 1: boom"
        return {"times": [1.0, 1.0], "tokens": [8, 8], "peak_memory_bytes": 1, "trainable": 1, "artifact_bytes": 1,
                "eval_loss": 1.0, "train_loss": 1.0, "device": "cpu", "torch_threads": 1}, None

    monkeypatch.setattr(bench_module, "_run_one", fake_run)
    [record] = bench_module.bench(str(tiny_folder), "lora", 2, seeds=3, baselines=False, threads=1)
    assert record["error"] == "seed 1: exit code 1: boom"
    with pytest.raises(DeltatuneError, match="seeds=0"):
        bench_module.bench(str(tiny_folder), "lora", 2, seeds=0, baselines=False)
