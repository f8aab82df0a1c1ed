"""A bad run config is answered with a list a person reads: a header, one problem per line, types named as people
name them, and the keys that PEFT / Trainer / TRL / axolotl users bring pointed to deltatune's."""

from __future__ import annotations

import dataclasses
import importlib.util
import typing

import pytest
from conftest import tiny_llama, word_run_config

import deltatune as dt
from deltatune.core import registry
from deltatune.train import load_config
from deltatune.train.config import parse_data_section

LORA = {"name": "lora", "r": 2, "alpha": 4}


def message(word_run, tmp_path, method: dict | None = None, data: dict | None = None, **train) -> str:
    raw = word_run_config(word_run, method or LORA, tmp_path / "run", **train)
    raw["data"].update(data or {})
    with pytest.raises(dt.DeltatuneError) as err:
        load_config(raw)
    return str(err.value)


def test_several_problems_are_a_header_and_one_line_each(word_run, tmp_path) -> None:
    got = message(word_run, tmp_path, {"name": "lora", "rank": 8, "alpha": "x"}, steps=2.5, lr="abc")
    assert got == (
        "bad run config (4 problems):\n"
        "  - train.steps=2.5: should be a whole number\n"
        "  - train.lr='abc': should be a number\n"
        "  - unknown key method.rank for lora (did you mean 'r'?)\n"
        "  - method.alpha='x': should be a number"
    )


def test_one_problem_is_one_line(word_run, tmp_path) -> None:
    assert message(word_run, tmp_path, steps=True) == "bad run config: train.steps=True: should be a whole number"


def test_trainer_keys_point_to_deltatunes(word_run, tmp_path) -> None:
    raw = word_run_config(word_run, LORA, tmp_path / "run")
    raw["train"] = {"learning_rate": 2e-4, "num_train_epochs": 3, "per_device_train_batch_size": 8,
                    "gradient_accumulation_steps": 4, "warmup_ratio": 0.1, "lr_scheduler_type": "cosine",
                    "max_seq_length": 512, "save_total_limit": 2}
    with pytest.raises(dt.DeltatuneError) as err:
        load_config(raw)
    assert str(err.value) == (
        "bad run config (8 problems):\n"
        "  - unknown key train.learning_rate (did you mean 'lr'?)\n"
        "  - unknown key train.num_train_epochs (did you mean 'epochs'?)\n"
        "  - unknown key train.per_device_train_batch_size (did you mean 'batch_size'?)\n"
        "  - unknown key train.gradient_accumulation_steps (did you mean 'grad_accum'?)\n"
        "  - unknown key train.warmup_ratio (did you mean 'warmup'? a fraction below 1 is a share of the steps)\n"
        "  - unknown key train.lr_scheduler_type (did you mean 'schedule'?)\n"
        "  - unknown key train.max_seq_length (did you mean 'data.max_length'?)\n"
        "  - unknown key train.save_total_limit (did you mean 'keep_last'?)"
    )


def test_peft_keys_point_to_the_methods_options(word_run, tmp_path) -> None:
    method = {"name": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["q_proj"],
              "learning_rate": 1e-3}
    assert message(word_run, tmp_path, method) == (
        "bad run config (5 problems):\n"
        "  - unknown key method.learning_rate for lora (did you mean 'train.lr'?)\n"
        "  - unknown key method.lora_r for lora (did you mean 'r'?)\n"
        "  - unknown key method.lora_alpha for lora (did you mean 'alpha'?)\n"
        "  - unknown key method.lora_dropout for lora (did you mean 'dropout'?)\n"
        "  - unknown key method.target_modules for lora (did you mean 'targets'?)"
    )


def test_data_keys_from_trl_and_axolotl(word_run, tmp_path) -> None:
    got = message(word_run, tmp_path, data={"max_len": 64, "dataset_text_field": "text"})
    assert got == ("bad run config (2 problems):\n"
                   "  - unknown key data.max_len (did you mean 'max_length'?)\n"
                   "  - unknown key data.dataset_text_field (did you mean 'text_field'?)")
    with pytest.raises(dt.DeltatuneError) as err:
        parse_data_section({"name": "tweets", "sequence_len": 64, "max_train": "all"})
    assert str(err.value) == ("bad data options (2 problems):\n"
                              "  - unknown key data.sequence_len (did you mean 'max_length'?)\n"
                              "  - data.max_train='all': should be null or a whole number")


def test_the_python_api_names_the_option_meant() -> None:
    with pytest.raises(dt.DeltatuneError) as err:
        dt.attach(tiny_llama(), "lora", rank=4)
    assert str(err.value) == "bad config for method 'lora': unknown option 'rank' (did you mean 'r'?)"
    with pytest.raises(dt.DeltatuneError) as err:
        dt.attach(tiny_llama(), "lora", rank=4, alpha="16", dropout=None)
    assert str(err.value) == ("bad config for method 'lora' (3 problems):\n"
                              "  - unknown option 'rank' (did you mean 'r'?)\n"
                              "  - alpha='16': should be a number\n"
                              "  - dropout=None: should be a number")


def test_early_stopping_with_trainers_names(word_run, tmp_path) -> None:
    got = message(word_run, tmp_path, early_stopping={"metric_for_best_model": "eval_loss", "greater_is_better": False,
                                                      "early_stopping_patience": 0}, eval_every=2)
    assert got == (
        "bad run config (3 problems):\n"
        "  - unknown key train.early_stopping.metric_for_best_model (did you mean 'metric'?)\n"
        "  - unknown key train.early_stopping.greater_is_better (did you mean 'mode'? mode: max for true, min for "
        "false)\n"
        "  - unknown key train.early_stopping.early_stopping_patience (did you mean 'patience'?)"
    )
    got = message(word_run, tmp_path, early_stopping={"patience": 0, "mode": "lower"})
    assert got == (
        "bad run config (3 problems):\n"
        "  - train.early_stopping.patience=0: must be >= 1 (null: never stop, keep the best)\n"
        "  - train.early_stopping.mode='lower': allowed are min, max (null: min for a loss, max otherwise)\n"
        "  - train.early_stopping is judged at each evaluation: set train.eval_every (e.g. 1)"
    )


def test_steps_and_epochs_together(word_run, tmp_path) -> None:
    assert message(word_run, tmp_path, epochs=2) == (
        "bad run config: train.steps=8 and train.epochs=2.0 both set the run's length: keep one (--set "
        "train.epochs=N on the command line replaces the config's steps)")
    raw = word_run_config(word_run, LORA, tmp_path / "run")
    del raw["train"]["steps"]
    assert load_config({**raw, "train": {**raw["train"], "epochs": 2}}).train.epochs == 2.0
    # on the command line one length replaces the other
    on_top = load_config(raw | {"train": {**raw["train"], "steps": 8}}, ["train.epochs=1.5"]).train
    assert (on_top.epochs, on_top.steps) == (1.5, 100)
    assert load_config({**raw, "train": {**raw["train"], "epochs": 2}}, ["train.steps=3"]).train.epochs is None
    assert raw["train"].get("epochs") is None, "the caller's mapping is left as it was"


def test_reporters_are_checked_before_anything_runs(word_run, tmp_path) -> None:
    assert message(word_run, tmp_path, report_to=["tensorbord"]) == (
        "bad run config: train.report_to: 'tensorbord' is not a reporter (did you mean 'tensorboard'?)")
    assert load_config(word_run_config(word_run, LORA, tmp_path / "r", report_to="none")).train.report_to == []
    if importlib.util.find_spec("mlflow") is None:
        assert message(word_run, tmp_path, report_to=["csv", "mlflow"]) == (
            "bad run config: train.report_to: 'mlflow' needs the mlflow package: pip install mlflow, or remove it")


@pytest.mark.parametrize(("hint", "spoken"), [
    (int, "a whole number"), (float, "a number"), (bool, "true or false"), (str, "text"),
    (list[str], "a list of names"), (int | None, "null or a whole number"), (float | None, "null or a number"),
    (int | float, "a number"), (bool | str, "true, false or text"), (list[str] | str | None, "null, a list of names or text"),
    (dict[str, float], "a mapping of names to numbers"), (tuple[float, float], "a list of 2 numbers"),
    (typing.Literal["sum", "mean"], "'sum' or 'mean'"), (typing.Literal["a", "b", "c"], "'a', 'b' or 'c'"),
])
def test_types_are_named_as_people_say_them(hint, spoken) -> None:
    assert registry.type_name(hint) == spoken


def _wrong_value(hint) -> object:
    """A YAML value ``hint`` does not take: a mapping where the field takes none, else a word."""
    return "zzz" if registry._is_instance({"x": 1}, hint) else {"x": 1}


def test_no_method_option_is_named_by_a_python_type() -> None:
    for name in registry.names():
        method = registry.get(name)
        hints = typing.get_type_hints(method.config_cls)
        for f in dataclasses.fields(method.config_cls):
            value = _wrong_value(hints[f.name])
            if registry._is_instance(value, hints[f.name]):
                continue  # takes anything
            (problem,) = registry.config_problems(method, {f.name: value})
            assert problem.startswith(f"{f.name}={value!r}: should be "), problem
            for python in ("<class", "typing.", " | ", "NoneType", "str]", "int]", "Literal"):
                assert python not in problem, (name, problem)
