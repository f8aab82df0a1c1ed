"""``deltatune search`` (deltatune.ops.search*): the space, Pareto and hypervolume, the study loop with a mock
objective (resume, two workers, failures), a bad space, and one real search of a tiny encoder through the CLI."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

import deltatune as dt
from deltatune.api import config_problems
from deltatune.ops import search as search_ops
from deltatune.ops import search_pareto as pareto
from deltatune.ops.search_space import decode, encode, parse_search, trial_config

ROOT = Path(__file__).resolve().parent.parent

# the mock objective: accuracy rises with r and peaks at lr = 1e-3; adapters cost twice LoRA's parameters
MOCK = textwrap.dedent("""
    import math

    def mock(config, folder):
        method = config["method"]
        r, lr = method["r"], config["train"]["lr"]
        accuracy = 1 - math.exp(-r / 6) - 0.3 * (math.log10(lr) + 3) ** 2 / 4
        return {"metrics": {"accuracy": accuracy}, "trainable": r * 100 * (2 if method["name"] == "adapter" else 1)}
""")
namespace: dict = {}
exec(MOCK, namespace)
mock = namespace["mock"]


def config(data: Path, trials: int = 12, **search) -> dict:
    return {"model": "not-loaded-by-the-mock", "data": {"path": str(data), "task": "classification",
                                                        "eval_fraction": 0.25},
            "method": {"name": "lora", "r": 8, "targets": ["query", "value"], "modules_to_save": ["classifier"]},
            "train": {"steps": 3, "lr": 1.0e-3},
            "search": {"space": {"method.name": ["lora", "adapter"], "method.r": [2, 4, 8, 16, 32],
                                 "train.lr": {"log": [1.0e-5, 1.0e-1]}},
                       "trials": trials, "objectives": {"accuracy": "maximize", "trainable": "minimize"}, **search}}


def history(study) -> list[tuple]:
    return [(t.params, t.values) for t in search_ops.finished(study)]


# -- the space ---------------------------------------------------------------------------------------------------
def test_space_encodes_and_decodes_every_value_back(sentiment_file: Path) -> None:
    cfg = config(sentiment_file)
    cfg["search"]["space"].update({"method.targets": [["query"], ["query", "value"]], "train.steps": {"range": [2, 8],
                                   "step": 2}, "method.dropout": {"range": [0.0, 0.2]}})
    spec = parse_search(cfg["search"], cfg, config_problems)
    rng = random.Random(0)
    for _ in range(50):
        values = {d.key: rng.choice(d.choices) if d.choices else (d.low if rng.random() < 0.5 else d.high)
                  for d in spec.space}
        params = encode(spec.space, values)
        assert all(v is None or isinstance(v, bool | int | float | str) for v in params.values())  # optuna's kinds
        assert decode(spec.space, params) == values
    # an adapter trial: LoRA's options (targets, dropout) are dropped, the shared r and the head stay
    run = trial_config(cfg, spec.space, {"method.name": "adapter", "method.r": 4, "train.lr": 0.01})
    assert run["method"] == {"name": "adapter", "r": 4, "modules_to_save": ["classifier"]}
    assert "search" not in run and run["train"]["lr"] == 0.01
    assert config_problems({**run, "output": "runs/x"}) == []


def test_a_bad_space_is_refused_before_any_trial_with_every_problem(sentiment_file: Path, tmp_path: Path) -> None:
    cfg = config(sentiment_file)
    cfg["search"]["space"] = {"method.name": ["lora", "lorra"], "method.r": [], "train.lr": {"log": [1.0e-2, 1.0e-4]},
                              "train.lrr": [0.1], "method.nonsense": [1]}
    cfg["search"]["objectives"] = {"accuracy": "maximize", "f1": "maximize"}
    calls = []
    with pytest.raises(dt.DeltatuneError) as e:
        dt.search(cfg, tmp_path / "study", runner=lambda c, f: calls.append(c) or {})
    text = str(e.value)
    for part in ("unknown method 'lorra'", "method.r: an empty list", "an empty range", "unknown key train.lrr",
                 "'method.nonsense'", "'f1' is not an objective"):
        assert part in text, (part, text)
    assert text.startswith("bad search config (6 problems)")
    assert not calls and not (tmp_path / "study").exists()


# -- Pareto and hypervolume --------------------------------------------------------------------------------------
def test_pareto_front_and_hypervolume_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        points = rng.integers(0, 12, size=(15, 2)).astype(float)
        mask = pareto.pareto_mask(points)
        for i, p in enumerate(points):
            dominated = any(np.all(q <= p) and np.any(q < p) for q in points)
            assert mask[i] == (not dominated)
        ref = np.array([12.0, 12.0])
        # brute force: count the unit cells [x, x+1) x [y, y+1) that some point dominates
        cells = sum(1 for x, y in itertools.product(range(12), range(12)) if any(px <= x and py <= y for px, py in points))
        assert pareto.hypervolume(points, ref) == pytest.approx(cells)
        assert pareto.hypervolume(points[mask], ref) == pytest.approx(cells)
    assert pareto.hypervolume(np.array([[5.0, 5.0]]), np.array([4.0, 9.0])) == 0.0  # outside the reference
    assert pareto.minimized([[0.9, 10]], ["maximize", "minimize"]).tolist() == [[-0.9, 10]]
    hv = pareto.hypervolume_history(np.array([[3.0, 3.0], [4.0, 4.0], [1.0, 5.0]]), np.array([6.0, 6.0]))
    assert hv == pytest.approx([9.0, 9.0, 11.0])  # (1, 5) adds [1, 3) x [5, 6)


# -- the study loop (mock objective) -----------------------------------------------------------------------------
def test_the_search_beats_its_random_start_and_random_search(sentiment_file: Path, tmp_path: Path) -> None:
    trials, ref = 30, {"accuracy": -1.5, "trainable": 7000}
    tpe = dt.search(config(sentiment_file, trials, startup=8, reference=ref), tmp_path / "tpe", runner=mock)
    rnd = dt.search(config(sentiment_file, trials, sampler="random", reference=ref), tmp_path / "random",
                    runner=mock)
    spec = search_ops.prepare(config(sentiment_file, trials, startup=8, reference=ref), config_problems)
    hv_tpe, _ = search_ops.hypervolumes(tpe, spec)
    hv_rnd, _ = search_ops.hypervolumes(rnd, spec)
    assert len(hv_tpe) == len(hv_rnd) == trials
    assert hv_tpe[-1] > hv_tpe[7]  # beyond the 8 random trials it started with
    assert hv_tpe[-1] > hv_rnd[-1]  # and beyond random search with as many trials
    out = tmp_path / "tpe"
    assert (out / "study.db").is_file() and (out / "pareto.png").stat().st_size > 10_000
    rows = list((out / "trials.csv").read_text().splitlines())
    assert rows[0].startswith("trial,state,method.name,method.r,train.lr,accuracy,trainable,pareto") and len(rows) == 31
    front = search_ops.front_rows(tpe, spec)
    assert {p.name for p in (out / "pareto").glob("*.yaml")} == {f"{r['trial']}.yaml" for r in front}
    run = yaml.safe_load((out / "pareto" / f"{front[0]['trial']}.yaml").read_text())
    assert run["data"]["path"] == str(sentiment_file)  # the full data, not the search's pool
    assert config_problems(run) == []
    with pytest.raises(dt.DeltatuneError, match="not empty: add --resume"):
        dt.search(config(sentiment_file, trials), out, runner=mock)


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(MOCK + textwrap.dedent(body))
    return path


def test_a_killed_and_resumed_search_equals_an_uninterrupted_one(sentiment_file: Path, tmp_path: Path) -> None:
    cfg = config(sentiment_file, 10, startup=4)
    whole = dt.search(cfg, tmp_path / "whole", runner=mock)
    script = _script(tmp_path, """
        import json, os, signal, sys
        import deltatune as dt

        def dies_at_six(config, folder):
            if folder.name == "6":  # the search is killed during its seventh trial
                os.kill(os.getpid(), signal.SIGKILL)
            return mock(config, folder)

        dt.search(json.loads(sys.argv[1]), sys.argv[2], runner=dies_at_six)
    """)
    done = subprocess.run([sys.executable, str(script), json.dumps(cfg), str(tmp_path / "cut")], cwd=ROOT)
    assert done.returncode == -9
    resumed = dt.search(cfg, tmp_path / "cut", resume=True, runner=mock)
    states = [(t.number, t.user_attrs.get("interrupted", False)) for t in resumed.get_trials()]
    assert states[6] == (6, True) and len(states) == 11  # the interrupted trial, marked, and ten that count
    assert history(resumed) == history(whole)


@pytest.mark.slow  # a Gaussian process fitted per trial: ~80 s on a busy 2-core machine
def test_botorch_samples_past_its_random_start_and_resumes_as_it_would_have_run(sentiment_file: Path,
                                                                                tmp_path: Path) -> None:
    """``sampler: botorch`` (qNEHVI through optuna-integration): beyond the random start the Gaussian-process
    model finds more hypervolume, and a search stopped after 7 trials and resumed samples the uninterrupted one's
    trials (each trial's sampler is seeded from the search's seed and the trials before it)."""
    ref = {"accuracy": -1.5, "trainable": 7000}
    cfg = config(sentiment_file, 10, startup=4, sampler="botorch", reference=ref)
    whole = dt.search(cfg, tmp_path / "whole", runner=mock)
    hv, _ = search_ops.hypervolumes(whole, search_ops.prepare(cfg, config_problems))
    assert hv[-1] > hv[3]
    dt.search(cfg, tmp_path / "cut", runner=mock, trials=7)
    resumed = dt.search(cfg, tmp_path / "cut", resume=True, runner=mock)
    assert history(resumed) == history(whole)


def test_botorch_never_compiles_its_kernel_at_run_time(sentiment_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """botorch compiles a C++ kernel at first use under a lock file; an interrupted compile left the lock and the
    next search (a CI run included) waited on it forever. The sampler deltatune builds takes the pure-PyTorch path."""
    from botorch.acquisition.multi_objective import logei

    monkeypatch.setattr(logei, "_load_attempted", False)
    monkeypatch.setattr(logei, "_C", None)
    search_ops.botorch_sampler(search_ops.prepare(config(sentiment_file, sampler="botorch"), config_problems), 0)
    logei._try_load_fused_kernel()  # what qLogNEHVI calls first: a no-op now
    assert logei._load_attempted and logei._C is None


def test_botorch_without_its_extra_is_refused_before_any_trial(sentiment_file: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import deltatune.ops.search_space as space

    monkeypatch.setattr(space, "botorch_installed", lambda: False)
    with pytest.raises(dt.DeltatuneError, match=r"pip install 'deltatune\[search\]'"):
        dt.search(config(sentiment_file, sampler="botorch"), tmp_path / "s", runner=mock)
    assert not (tmp_path / "s").exists()


@pytest.mark.slow  # two worker processes (each imports torch): ~25 s on a busy 2-core machine
def test_two_workers_share_one_study_and_run_no_trial_twice(sentiment_file: Path, tmp_path: Path) -> None:
    cfg = config(sentiment_file, 8, startup=3)
    log = tmp_path / "ran.txt"
    script = _script(tmp_path, f"""
        import json, os, sys, time
        import deltatune as dt

        def logged(config, folder):
            time.sleep(0.3)  # a trial takes a while: both workers are busy at once
            with open({str(log)!r}, "a") as f:
                f.write(f"{{os.getpid()}} {{folder.name}}\\n")
            return mock(config, folder)

        dt.search(json.loads(sys.argv[1]), sys.argv[2], resume=True, storage=sys.argv[3], runner=logged)
    """)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    workers = [subprocess.Popen([sys.executable, str(script), json.dumps(cfg), str(tmp_path / f"w{i}"), url],
                                cwd=ROOT) for i in range(2)]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    ran = [line.split() for line in log.read_text().splitlines()]
    numbers = [int(n) for _, n in ran]
    assert sorted(numbers) == sorted(set(numbers)) and len(numbers) == 8  # each trial once, eight in all
    assert len({pid for pid, _ in ran}) == 2  # both workers took trials
    import optuna

    study = optuna.load_study(study_name="deltatune-search", storage=url)
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 8


def test_a_failed_trial_is_recorded_and_the_search_goes_on(sentiment_file: Path, tmp_path: Path) -> None:
    def flaky(config: dict, folder: Path) -> dict:
        n = int(folder.name)
        if n == 1:
            raise dt.DeltatuneError("method 'adapter' does not apply to this model")
        if n == 2:
            raise RuntimeError("CUDA out of memory")
        if n == 3:
            return {"metrics": {"accuracy": math.nan}, "trainable": 10}
        if n == 4:
            return {"error": "the loss became nan at step 2"}
        return mock(config, folder)

    study = dt.search(config(sentiment_file, 7), tmp_path / "s", runner=flaky)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "FAIL", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    errors = [t.user_attrs.get("error", "") for t in study.trials]
    assert "does not apply" in errors[1] and errors[2] == "RuntimeError: CUDA out of memory"
    assert "not a finite number" in errors[3] and "loss became nan" in errors[4]
    csv_text = (tmp_path / "s" / "trials.csv").read_text()
    assert "failed" in csv_text and "CUDA out of memory" in csv_text


# -- end to end: a tiny encoder, real trials in their own processes, through the CLI ----------------------------
@pytest.mark.slow  # two trial processes (each imports torch and transformers): ~20 s on a busy 2-core machine
def test_a_real_search_through_the_cli(tmp_path: Path) -> None:
    from test_head_artifacts import save_tiny_encoder
    from typer.testing import CliRunner

    from deltatune.cli.main import app

    model = save_tiny_encoder(tmp_path / "model", tmp_path / "data.jsonl")
    cfg = {"model": str(model), "data": {"path": str(tmp_path / "data.jsonl"), "task": "classification",
                                         "max_length": 16, "eval_fraction": 0.25},
           "method": {"name": "lora", "r": 4, "targets": ["query", "value"], "modules_to_save": ["classifier"]},
           "train": {"steps": 2, "batch_size": 8, "lr": 1.0e-2, "seed": 0},
           "search": {"space": {"method.name": ["lora", "adapter"], "method.r": [2, 4]}, "trials": 5,
                      "sampler": "random", "dev_size": 8}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "study"
    result = CliRunner().invoke(app, ["search", str(path), "--out", str(out), "--trials", "2"])
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.output and "pareto.png" in result.output
    study = dt.search(cfg, out, resume=True, trials=2)  # the study is complete: nothing more runs
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for t in study.trials:
        assert t.user_attrs["result"]["trainable"] > 0 and 0 <= t.values[0] <= 1
        assert t.values[1] == t.user_attrs["result"]["trainable"]
    assert study.user_attrs["dev"] == {"train": 28, "dev": 8}
    assert not (out / "trials").exists() or not any((out / "trials").iterdir())  # the trials' deltas are gone
    fronts = sorted((out / "pareto").glob("*.yaml"))
    assert fronts and (out / "pareto.png").is_file()
    run = yaml.safe_load(fronts[0].read_text())
    from deltatune.train import load_config

    assert load_config(run).data.path == str(tmp_path / "data.jsonl")
    assert os.path.isabs(run["output"])
