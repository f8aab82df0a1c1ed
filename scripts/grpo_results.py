"""GRPO before and after (issue 21, docs/preference.md): the reward over a finished run and its completions.

    .venv/bin/deltatune train examples/grpo.yaml --set output=runs/grpo
    .venv/bin/python scripts/grpo_results.py --run runs/grpo --out grpo-results

Reads the run's config from its newest checkpoint (the exact sections it trained with) and its step records from
``logs/metrics.jsonl``, then:

- scores the held-out prompts greedily twice, with the base model (before: the delta off) and with the run's
  artifact (after), with the run's own reward functions: mean reward per function, and each prompt's two completions;
- draws ``grpo-reward.png``: the reward of the sampled completions per step (each step faint, a running mean) and per
  reward function, with the greedy evaluation's reward as points, the base model's at step 0;
- writes ``grpo-results.md`` (the table and the first prompts' completions before and after) and ``grpo-results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from deltatune.core.artifact import replace_text, report_folder  # noqa: E402
from deltatune.core.tuned import load  # noqa: E402
from deltatune.data import objectives, tasks  # noqa: E402
from deltatune.errors import DeltatuneError, run_script  # noqa: E402
from deltatune.train.config import load_config  # noqa: E402
from deltatune.train.curves import draw_panel, read_records, save_figure  # noqa: E402
from deltatune.train.state import saved_config  # noqa: E402

SHOWN = 6  # prompts whose completions the page shows


def run_config(run: Path) -> dict[str, Any]:
    """The config the run trained with, as its newest readable checkpoint keeps it (which leaves the output folder
    out)."""
    config = saved_config(run)
    if config is None:
        raise DeltatuneError(f"{run} has no checkpoint to read its config from: give the output folder of a "
                             "finished `deltatune train` run with save_every > 0")
    return {**config, "output": str(run)}


def greedy(task: Any, model: torch.nn.Module, batch_size: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    metrics = task.evaluate(model, batch_size)
    return metrics, list(task.last_eval_completions)


def plot(records: list[dict[str, Any]], before: dict[str, float], names: list[str], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in records if "reward" in r]
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(4.4 * (1 + len(names)), 3.4), squeeze=False)
    panels = [("reward (weighted sum)", "reward", "eval_reward")] + \
        [(f"{n} reward", f"rewards/{n}/mean", f"eval_rewards/{n}/mean") for n in names]
    for ax, (label, key, eval_key) in zip(axes.flat, panels, strict=True):
        evals = [(r["step"], r[eval_key]) for r in records if eval_key in r]
        draw_panel(ax, label, [(r["step"], r[key]) for r in trained],
                   [(0, before[eval_key.removeprefix("eval_")])] + evals,  # the base model's at step 0
                   train_label="sampled, training", eval_label="greedy, held-out prompts", window_share=8)
    save_figure(fig, png, title)


def text_of(prompt: Any) -> str:
    if isinstance(prompt, list):
        prompt = prompt[-1]["content"]
    return " ".join(str(prompt).split())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="the output folder of a finished GRPO run")
    ap.add_argument("--out", default="grpo-results")
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args()
    run = Path(a.run)
    cfg = load_config(run_config(run))
    if objectives.parse(cfg.train.objective)[0].name != "grpo":
        raise DeltatuneError(f"{run} was not trained with train.objective grpo")
    records = read_records(run / "logs" / "metrics.jsonl")
    torch.manual_seed(0)
    model, _, task = tasks.load_for_task(cfg.data, cfg.model, objective=cfg.train.objective,
                                         quantization=cfg.quantization or None)
    names = [r.name for r in task.rewards]
    before, before_done = greedy(task, model, a.batch_size)
    after, after_done = greedy(task, load(model, str(run)), a.batch_size)
    table = ["| | " + " | ".join(["reward"] + [f"{n} reward" for n in names] + ["mean length"]) + " |",
             "|---|" + "---:|" * (len(names) + 2)]
    for label, m in (("base model (before)", before), (f"after {records[-1]['step']} steps", after)):
        cells = [m["reward"]] + [m[f"rewards/{n}/mean"] for n in names]
        table.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in cells)
                     + f" | {m['completions/mean_length']:.1f} |")
    shown = ["", f"The first {SHOWN} held-out prompts, greedy completions (reward in brackets):", ""]
    for b, f in list(zip(before_done, after_done, strict=True))[:SHOWN]:
        shown += [f"- **{text_of(b['prompt'])}**",
                  f"  - before ({b['reward']:.2f}): {' '.join(b['completion'].split())}",
                  f"  - after ({f['reward']:.2f}): {' '.join(f['completion'].split())}"]
    page = "\n".join(table + shown) + "\n"
    print(page)
    title = f"GRPO, {cfg.method.get('name', '?')} on {cfg.model}: {len(task.eval)} held-out prompts greedy"
    with report_folder(Path(a.out), "scripts/grpo_results.py") as out:
        plot(records, before, names, out / "grpo-reward.png", title)
        replace_text(out / "grpo-results.md", page)
        replace_text(out / "grpo-results.json", json.dumps(
            {"run": str(run), "before": before, "after": after,
             "completions": [{"before": b, "after": f} for b, f in zip(before_done, after_done, strict=True)]},
            indent=1) + "\n")


if __name__ == "__main__":
    run_script(main)
