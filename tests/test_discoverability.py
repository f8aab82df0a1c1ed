"""What a first-day user reads to find their way: ``deltatune methods`` (a compact table by family),
``deltatune methods NAME`` (every option with type, default and a meaning read from its dataclass),
``train --help`` and docs/config.md (generated from the dataclasses, so it cannot drift), and output that does
not cut numbers or run an error's lines together."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import io
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from deltatune.cli.bench_report import print_whole, rows, table
from deltatune.cli.main import app
from deltatune.core import options, registry

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


# -- meanings come from the dataclass source -----------------------------------------------------------------------
@dataclass
class _Example:
    # the comment block right above a field
    # is its meaning when the line has none
    above: int = 1
    trailing: float = 0.5  # a trailing comment wins
    documented: str = "x"
    """a string right below the field"""
    bare: list[str] = field(default_factory=list)


@dataclass
class _Child(_Example):
    trailing: float = 0.25
    own: bool | None = None  # the child's own field


def test_meanings_are_read_from_the_dataclass_source_and_inherited() -> None:
    got = {o.name: o for o in options.options(_Child)}
    assert got["above"].meaning == "the comment block right above a field is its meaning when the line has none"
    assert got["trailing"].meaning == "a trailing comment wins", "a redefined field keeps its base's meaning"
    assert got["trailing"].default == "0.25"
    assert got["documented"].meaning == "a string right below the field"
    assert got["bare"].meaning == "" and got["bare"].default == "[]"
    assert got["own"].meaning == "the child's own field" and got["own"].default == "null"
    assert got["own"].type == registry.type_name(bool | None), "types are said as errors say them"
    assert "<class" not in got["above"].type


def test_every_option_of_every_registered_method_has_a_meaning() -> None:
    missing = options.missing_meanings()
    assert not missing, (f"options without a meaning: {missing}; give each a trailing `# comment` in its config "
                         "dataclass (deltatune methods NAME and docs/config.md print it)")


# -- deltatune methods ---------------------------------------------------------------------------------------------
def test_methods_is_one_line_per_method_grouped_by_family_within_100_columns() -> None:
    result = run("methods")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    names = registry.names()
    for name in names:
        assert sum(1 for line in lines if line.startswith(f"  {name} ")) == 1, name
    groups = options.grouped()
    assert sorted(n for ns in groups.values() for n in ns) == names, "every method is in exactly one family"
    headings = [line for line in lines if line in groups]
    assert headings == list(groups), "families appear as headings, in their order"
    family_of = {n: fam for fam, ns in groups.items() for n in ns}
    assert family_of["lora"] == family_of["dora"] == family_of["adalora"] == "low-rank"
    assert family_of["spiel"] == family_of["lt-sft"] == "sparse" and family_of["dsee"] == "low-rank + sparse"
    assert family_of["prefix"] == family_of["adapter"] == "adapters & prompts"
    assert family_of["mezo"] == "zeroth-order" and family_of["full"] == family_of["lisa"] == "full & layer-wise"
    assert family_of["bitfit"] == "chosen tensors" and family_of["compeft"] == "made from artifacts"


@pytest.mark.parametrize("name", registry.names())
def test_a_methods_declared_family_agrees_with_the_forms_it_builds(name: str) -> None:
    """``family=`` is declared where a method registers (so `deltatune methods` builds nothing); the declaration
    must say what the method's default delta is made of, built on a small probe model."""
    assert registry.get(name).family == _probed_family(registry.get(name))


def _probed_family(method: registry.Method) -> str:
    from deltatune.core.forms.base import WeightDelta
    from deltatune.core.forms.dense import Dense
    from deltatune.core.forms.inplace import InPlace
    from deltatune.core.forms.module import ModuleForm
    from deltatune.core.forms.scaling import Scaling
    from deltatune.core.forms.sparse import Sparse

    if method.traits.made_by:
        return "made from artifacts"
    if method.traits.gradient_free:
        return "zeroth-order"
    # the forms an artifact of the method is loaded into: built without calibration or decompositions, so cheap
    forms = _probe_forms(method, loading=True) or _probe_forms(method, loading=False)
    if not forms:  # builds only from data or an allocation it is given: only SPT, whose allocation mixes both
        assert method.name == "spt", f"{method.name} builds nothing on the probe model: its family is unchecked"
        return "low-rank + sparse"
    if any(isinstance(f, ModuleForm) for f in forms):
        return "adapters & prompts"
    if any(isinstance(f, Scaling) for f in forms):  # W0 rescaled along one axis ((IA)³)
        return "scaling vectors"
    # a weight delta that is none of the full-size kinds is factorised: low-rank (LoRA, SVD triplets, DoRA, KaSA)
    lowrank = any(isinstance(f, WeightDelta) and not isinstance(f, Dense | InPlace | Sparse) for f in forms)
    sparse = any(isinstance(f, Sparse) for f in forms)
    if lowrank:
        return "low-rank + sparse" if sparse else "low-rank"
    if sparse:
        return "sparse"
    # dense tensors: trained in place (the model's own weights, all or by layers) or as deltas on chosen tensors
    if any(isinstance(f, InPlace) for f in _probe_forms(method, loading=False)):
        return "full & layer-wise"
    return "chosen tensors"


def _probe_forms(method: registry.Method, loading: bool) -> list:
    """The forms ``method`` builds with its default options on a small probe model ([] if it cannot build there)."""
    import copy

    # a method for image / audio encoders refuses the Llama: it is probed on a ViT classifier instead
    for template in (_probe_template(method.traits.new_head), _probe_vit()):
        try:
            config = registry.make_config(method, {})
            forms = list(method.build(copy.deepcopy(template), config, loading=loading).forms.values())
        except Exception:  # noqa: BLE001 (a refusal to build on the probe just means "not known from forms")
            continue
        if forms:
            return forms
    return []


@functools.cache
def _probe_vit():
    """A 2-block ViT classifier on 8x8 one-channel images (the shipped digits' shape)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=128, intermediate_size=256,
                    num_hidden_layers=2, num_attention_heads=4, num_labels=2)
    return ViTForImageClassification(cfg).eval()


@functools.cache
def _probe_template(with_head: bool):
    """A 2-block Llama with biases (so BitFit has something to train), wide enough for rank-128 defaults."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                      num_labels=2, pad_token_id=0)
    return (LlamaForSequenceClassification if with_head else LlamaForCausalLM)(cfg).eval()


def test_methods_name_prints_every_option_with_type_default_and_meaning() -> None:
    result = run("methods", "lora")
    assert result.exit_code == 0, result.output
    out = result.stdout
    info = options.describe("lora")
    assert info.family == "low-rank" and info.merges == "yes"
    fields = dataclasses.fields(registry.get("lora").config_cls)
    assert [o.name for o in info.options] == [f.name for f in fields]
    for opt in info.options:
        assert f"  {opt.name}: {opt.type}, default {opt.default}" in out
        assert opt.meaning and opt.meaning in out
    assert "  r: a whole number, default 8" in out and "--set method.KEY=VALUE" in out


def test_methods_with_a_typo_says_did_you_mean() -> None:
    result = run("methods", "lroa")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'lora'" in lines[0] and "mean" in lines[0]


# -- the config reference ------------------------------------------------------------------------------------------
def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_config_md_is_generated_from_the_dataclasses_and_up_to_date() -> None:
    gen = _generator()
    text = gen.render()
    assert (ROOT / "docs" / "config.md").read_text() == text, (
        f"docs/config.md is out of date: run `{gen.REGENERATE}`")
    from deltatune.data.config import DataConfig
    from deltatune.train.config import TrainSettings

    for prefix, cls in (("data", DataConfig), ("train", TrainSettings)):
        for f in dataclasses.fields(cls):
            assert f"| `{prefix}.{f.name}` |" in text, f"{prefix}.{f.name} is not documented"
    for key in ("text_field", "label_field", "messages_field", "max_train", "head"):
        assert f"`data.{key}`" in text
    assert "## model" in text and "## output" in text and "deltatune methods NAME" in text


def test_train_help_points_to_the_config_reference() -> None:
    result = run("train", "--help")
    assert result.exit_code == 0
    flat = " ".join(result.stdout.split())
    assert "docs/config.md" in flat and "deltatune methods NAME" in flat


# -- quiet, whole output -------------------------------------------------------------------------------------------
def test_bench_table_never_cuts_a_number_on_a_narrow_terminal() -> None:
    record = {"name": "scaled_parallel_adapter-all", "seconds_per_step": 12.3456, "tokens_per_s": 123456.0,
              "peak_memory_bytes": 123 * 2**30, "trainable": 123_456_789, "artifact_bytes": 987 * 2**20,
              "eval_loss": 3.14159,
              "ratios": {"seconds_per_step": 1.2345, "tokens_per_s": 0.5, "peak_memory_bytes": 1.01,
                         "trainable": 12.5, "artifact_bytes": 3.25, "eval_loss": 0.99}}
    failed = {"name": "broken", "error": "RuntimeError: " + "x" * 70}
    out = io.StringIO()
    print_whole(Console(width=60, file=out), table([record, failed]))
    text = out.getvalue()
    assert "…" not in text
    words = set(text.replace("│", " ").replace("┃", " ").split())
    for cell in rows([record])[0][1:]:
        for word in cell.split():  # a figure may wrap before its ratio, but no word of it is cut or split
            assert word in words, f"{word!r} of {cell!r} was cut"
    assert "xxxxxxxx" in text, "a failed run's message is shown (wrapped), not cropped away"


def test_a_multi_line_error_keeps_its_lines(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("model: x\ndata: {name: tweets, nosuch: 1}\nmethod: {name: lora, rank: 4}\n"
                      "train: {stepz: 3}\noutput: out\n")
    result = run("train", config)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) >= 4, result.stderr
    for needle in ("nosuch", "rank", "stepz"):
        assert sum(needle in line for line in lines) == 1, (needle, lines)


def test_methods_piped_into_head_stops_quietly() -> None:
    """`deltatune methods | head -3`: the closed pipe is the reader being done, not an error to report."""
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).parent / "deltatune"
    done = subprocess.run(["bash", "-c", f"'{cli}' methods | head -1; exit ${{PIPESTATUS[0]}}"],
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.startswith("method"), done.stdout
    assert "error" not in done.stderr.lower() and "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
