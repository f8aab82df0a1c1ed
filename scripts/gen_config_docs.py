"""Write docs/config.md, the run-config reference, from the config dataclasses themselves.

    .venv/bin/python scripts/gen_config_docs.py          # rewrite docs/config.md
    .venv/bin/python scripts/gen_config_docs.py --check  # exit 1 if docs/config.md is out of date

Every key of every section is a field of a dataclass (``DataConfig``, ``TrainSettings`` and the dataclasses
nested in it); its type, default and meaning are read from the class (the meaning from the field's comment, see
``deltatune.core.options``), so the page cannot drift from the code: tests/test_discoverability.py regenerates
it and compares. A method's own options are printed by ``deltatune methods NAME`` from the same source.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"
REGENERATE = ".venv/bin/python scripts/gen_config_docs.py"

INTRO = f"""# Run config reference

<!-- Generated from the config dataclasses by scripts/gen_config_docs.py: do not edit by hand, run
     `{REGENERATE}` (tests/test_discoverability.py fails when this page is out of date). -->

A run config is what `deltatune train CONFIG` and `dt.train(config)` take: a YAML file, a mapping, or the name of
a shipped preset (`deltatune train lora`; the presets are in `deltatune/presets/`). `--set KEY=VALUE` changes one
key (`--set train.steps=10`, `--set method.r=16`). It has five sections:

```yaml
model: smollm2-135m                            # a shipped model name or a from_pretrained folder
data: {{name: tweets, task: classification}}     # which data and which task
method: {{name: lora, r: 8, alpha: 16}}          # the method and its options
train: {{steps: 100, batch_size: 8, lr: 2.0e-4}}  # the loop
output: runs/lora                              # the run's folder: artifact, checkpoints, logs
```

Types are written as errors say them; `null` is YAML's empty value (None in Python).
"""

MODEL = """## model

Required. A shipped model name ({shipped}) or a local `from_pretrained` folder. The artifact records it, so
`deltatune export`, `merge`, `eval` and `generate` find the base model again.

A quantized base (QLoRA; `docs/quantization.md`) is a mapping: `model: {{name: smollm2-135m, quantize: nf4}}`, with
`quantize` one of nf4, fp4, int8 (bitsandbytes), optional `double_quant` (default true) and `compute_dtype` (float32,
bfloat16 or float16; default the model's, float32). The artifact records the quantization, and a delta trained on
it refuses another base. A mapping with the name alone (`model: {{name: smollm2-135m}}`) is the full-precision base.
"""

METHOD = """## method

Required. `name` and the method's own options: `method: {{name: lora, r: 16, targets: [q_proj, v_proj]}}` (or
just `method: lora` for its defaults). `deltatune methods` lists the methods; `deltatune methods NAME` prints a
method's options with type, default and meaning, read from its config dataclass as this page is.

{families}
"""

OUTPUT = """## output

Required. The run's folder: the artifact (`deltatune.json` + `delta.safetensors`), `checkpoints/` and `logs/`.
A new run refuses a folder that holds something else (`--overwrite` replaces it, `--resume` continues the run
in it).
"""


def _table(cls: type, prefix: str) -> list[str]:
    """A markdown table of ``cls``'s fields (``prefix.key``), then one for each nested dataclass field."""
    from deltatune.core import options

    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested: list[tuple[str, type]] = []
    hints = typing.get_type_hints(cls)
    for opt in options.options(cls):
        inner = _dataclass_in(hints[opt.name])
        type_text = opt.type if inner is None else opt.type.replace(inner.__name__, f"a mapping (`{prefix}.{opt.name}` "
                                                                                   "below)")
        rows.append(f"| `{prefix}.{opt.name}` | {_cell(type_text)} | `{_cell(opt.default)}` | {_cell(opt.meaning)} |")
        if inner is not None:
            nested.append((f"{prefix}.{opt.name}", inner))
    out = rows
    for name, inner in nested:
        out += ["", f"### {name}", "", *_table(inner, name)]
    return out


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (``EarlyStopping | None`` -> EarlyStopping), or None."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _families() -> str:
    from deltatune.core import options

    rows = ["| family | methods |", "|---|---|"]
    rows += [f"| {family} | {', '.join(f'`{n}`' for n in names)} |" for family, names in options.grouped().items()]
    return "\n".join(rows)


def render() -> str:
    """The page's text."""
    import deltatune  # noqa: F401 (registers the methods)
    from deltatune.data import models
    from deltatune.data.config import DataConfig
    from deltatune.train.config import TrainSettings

    data = ["## data", "", "Required. Which data and how it becomes examples: `name` (a shipped set) or `path` (a "
            "local file or folder), and the `task`.", "", *_table(DataConfig, "data")]
    train = ["## train", "", "The training loop; every key has a default.", "", *_table(TrainSettings, "train")]
    parts = [INTRO, MODEL.format(shipped=", ".join(f"`{n}`" for n in models.names())), "\n".join(data) + "\n", METHOD.format(families=_families()), "\n".join(train) + "\n",
             OUTPUT]
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is out of date: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    tmp = DOC.with_name(f".{DOC.name}.tmp")  # a reader never sees half a page
    tmp.write_text(text)
    os.replace(tmp, DOC)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
