"""The transfer demo of issue 25, as a small-scale analogue: no pretrained vision or audio weights can be downloaded
here, so this script pre-trains its own tiny backbones and then adapts them with each method.

1. Pre-training (full training, fixed seed, cached in OUT/pretrained): a tiny ViT (ViTConfig: 8x8 grey images,
   patch 2, 4 layers, width 64) on scikit-learn's bundled digits 0-4, and a tiny AST (ASTConfig: 32 mel bins x 48
   frames, patch 8, 4 layers, width 64) on three of the synthesised ``tones`` classes. Only the body is kept
   (``save_pretrained`` of the ViTModel / ASTModel), so adaptation starts from a fresh head.
2. Adaptation to the other classes (digits 5-9; the other three tones) with lora, adapter, bitfit, vqt, q_adapter,
   full and a linear probe (vqt with no query tokens: a head on the normalised CLS), each at its natural size, all
   through ``dt.train``. The held-out classes' examples are split once (seeded, stratified) into a training file
   and a test file (OUT/data/*.npz). The learning rate of each method is chosen from a small grid on a dev split
   that ``dt.train`` carves from the training file (``data.eval_fraction``), with training seed 0; then
   ``--seeds`` training seeds (0, 1, ...) run at that rate (seed 0's is the grid run itself) and report the test
   accuracy, mean +- standard error over seeds. The test file is read only for that report.
3. The test accuracy comes from the artifact alone: its base is loaded from what the artifact records
   (``models.load_base(*models.base_of(meta))``: the image / audio classifier with its labels) and the delta
   loaded onto it.

Writes OUT/transfer.json, OUT/transfer.md (a markdown table) and OUT/transfer.png (a bar chart, if matplotlib is
installed). Sized to run on 2 CPU cores in about 10-15 minutes; ``--quick`` is a smoke test (1 seed, one learning
rate, a few steps), whose figures mean nothing. A small-scale analogue: tiny backbones pre-trained on ~900 images
(or 300 clips) are not ViT-B on ImageNet-21k, and the ranking of methods here need not match the papers'.

    .venv/bin/python scripts/transfer_results.py --out runs/transfer          # the full run
    .venv/bin/python scripts/transfer_results.py --out /tmp/transfer --quick  # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.core import artifact
from deltatune.data import audio, models, vision
from deltatune.data.tasks import DataConfig, load_for_task
from deltatune.errors import run_script

# each method at its natural size, and its learning-rate grid (the dev split picks one)
METHODS: dict[str, tuple[dict[str, Any], list[float]]] = {
    "probe": ({"name": "vqt", "tokens": 0, "dropout": 0.0}, [1e-2, 3e-2, 1e-1]),
    "bitfit": ({"name": "bitfit"}, [3e-3, 1e-2, 3e-2]),
    "lora": ({"name": "lora", "r": 8, "alpha": 16}, [1e-3, 3e-3, 1e-2]),
    "adapter": ({"name": "adapter", "placement": "houlsby", "r": 8}, [1e-3, 3e-3, 1e-2]),
    "vqt": ({"name": "vqt", "tokens": 1}, [1e-2, 3e-2, 1e-1]),
    "q_adapter": ({"name": "q_adapter", "tokens": 4}, [1e-3, 3e-3, 1e-2]),
    "full": ({"name": "full"}, [3e-4, 1e-3, 3e-3]),
}
WIDTH = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TEST_FRACTION = 0.2  # of the held-out classes' examples: the test file
DEV_FRACTION = 0.2  # of the training file: the dev split dt.train carves (data.eval_fraction)


# ---------------------------------------------------------------- the two settings


class Setting:
    """A backbone, its pre-training classes and the classes it is adapted to."""

    name: str
    task: str  # the data task
    classifier: str  # the transformers class the artifact's base must load as
    steps: int  # adaptation steps at default settings
    pre_epochs: int

    def examples(self) -> tuple[list[Any], np.ndarray, list[str]]:
        """Every example, its class index and the class names."""
        raise NotImplementedError

    def classes(self) -> tuple[list[int], list[int]]:
        """The pre-training classes and the adaptation classes."""
        raise NotImplementedError

    def model(self, num_labels: int) -> torch.nn.Module:
        raise NotImplementedError

    def encode(self, model: torch.nn.Module, items: list[Any]) -> dict[str, torch.Tensor]:
        """A batch of the model's input, made as the data task makes it."""
        raise NotImplementedError

    def write(self, path: Path, items: list[Any], names: list[str]) -> None:
        raise NotImplementedError


class Digits(Setting):
    name, task, steps, pre_epochs = "digits", "image-classification", 300, 40
    classifier = "ViTForImageClassification"

    def examples(self) -> tuple[list[Any], np.ndarray, list[str]]:
        images, labels = vision.load_digits_arrays()
        return list(images), labels, [str(d) for d in range(10)]

    def classes(self) -> tuple[list[int], list[int]]:
        return [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]

    def model(self, num_labels: int) -> torch.nn.Module:
        import transformers as tf

        return tf.ViTForImageClassification(tf.ViTConfig(**WIDTH, image_size=8, patch_size=2, num_channels=1,
                                                         num_labels=num_labels))

    def encode(self, model: torch.nn.Module, items: list[Any]) -> dict[str, torch.Tensor]:
        shape = vision.ImageShape.of(model)
        return {"pixel_values": torch.stack([vision.pixel_values(x, shape) for x in items])}

    def write(self, path: Path, items: list[Any], names: list[str]) -> None:
        np.savez(path, image=np.stack(items).astype(np.float32), label=np.array(names))


class Tones(Setting):
    name, task, steps, pre_epochs = "tones", "audio-classification", 150, 30
    classifier = "ASTForAudioClassification"

    def examples(self) -> tuple[list[Any], np.ndarray, list[str]]:
        clips, labels = audio.synthesise_tones()
        return clips, np.array(labels), list(audio.TONES)

    def classes(self) -> tuple[list[int], list[int]]:
        return [0, 2, 4], [1, 3, 5]  # low-tone, up-chirp, noise -> high-tone, down-chirp, noise-bursts

    def model(self, num_labels: int) -> torch.nn.Module:
        import transformers as tf

        return tf.ASTForAudioClassification(tf.ASTConfig(**WIDTH, num_mel_bins=32, max_length=48, patch_size=8,
                                                         frequency_stride=8, time_stride=8, num_labels=num_labels))

    def encode(self, model: torch.nn.Module, items: list[Any]) -> dict[str, torch.Tensor]:
        extractor = audio.feature_extractor(model)
        return {"input_values": torch.stack([audio.input_values((x, audio.RATE), extractor) for x in items])}

    def write(self, path: Path, items: list[Any], names: list[str]) -> None:
        np.savez(path, audio=np.stack(items).astype(np.float32), label=np.array(names), sampling_rate=audio.RATE)


SETTINGS = {"digits": Digits(), "tones": Tones()}


# ---------------------------------------------------------------- pre-training


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held): ``fraction`` of every class held, seeded."""
    rng = np.random.default_rng(seed)
    rest, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, round(len(idx) * fraction))
        held.extend(idx[:k].tolist())
        rest.extend(idx[k:].tolist())
    return np.array(sorted(rest)), np.array(sorted(held))


def pretrain(setting: Setting, out: Path, *, quick: bool, log: Any) -> tuple[Path, dict[str, Any]]:
    """Full training of the tiny backbone on the pre-training classes; the body folder (cached) and a record."""
    items, labels, names = setting.examples()
    pre_classes, _ = setting.classes()
    epochs = 2 if quick else setting.pre_epochs
    settings = {"classes": [names[c] for c in pre_classes], "epochs": epochs, "batch_size": 64, "lr": 1e-3,
                "weight_decay": 0.01, "seed": 0, "config": setting.model(len(pre_classes)).config.to_dict()}
    folder = out / "pretrained" / setting.name
    record_file = folder / "pretrain.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("settings") == json.loads(json.dumps(settings)):
            log(f"{setting.name}: pre-trained body cached in {folder} (held-out accuracy "
                f"{record['heldout_accuracy']:.3f})")
            return folder, record
    start = time.time()
    chosen = np.flatnonzero(np.isin(labels, pre_classes))
    y_all = torch.tensor([pre_classes.index(int(labels[i])) for i in chosen])
    torch.manual_seed(0)
    model = setting.model(len(pre_classes))
    x_all = setting.encode(model, [items[i] for i in chosen])
    key = next(iter(x_all))
    fit, held = stratified_split(y_all.numpy(), 0.1, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    total = epochs * math.ceil(len(fit) / settings["batch_size"])
    warmup = max(1, total // 10)  # linear warm-up, then cosine decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min((step + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))))
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.from_numpy(fit)[torch.randperm(len(fit), generator=g)]
        for b in order.split(settings["batch_size"]):
            loss = F.cross_entropy(model(**{key: x_all[key][b]}).logits, y_all[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        h = torch.from_numpy(held)
        accuracy = float((model(**{key: x_all[key][h]}).logits.argmax(-1) == y_all[h]).float().mean())
    if folder.exists():
        shutil.rmtree(folder)
    model.base_model.save_pretrained(folder)  # the body only: adaptation starts from a fresh head
    record = {"settings": settings, "heldout_accuracy": accuracy, "examples": len(chosen),
              "parameters": sum(p.numel() for p in model.base_model.parameters()), "seconds": time.time() - start}
    record_file.write_text(json.dumps(record, indent=1))
    log(f"{setting.name}: pre-trained on {settings['classes']} in {record['seconds']:.0f} s, held-out accuracy "
        f"{accuracy:.3f}")
    return folder, record


# ---------------------------------------------------------------- adaptation


def adaptation_files(setting: Setting, out: Path) -> tuple[Path, Path, list[str]]:
    """The held-out classes' examples as a training file and a test file (seeded, stratified)."""
    items, labels, names = setting.examples()
    _, new = setting.classes()
    chosen = np.flatnonzero(np.isin(labels, new))
    sub = labels[chosen]
    train, test = stratified_split(sub, TEST_FRACTION, seed=0)
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for part, idx in (("train", train), ("test", test)):
        path = folder / f"{setting.name}-{part}.npz"
        setting.write(path, [items[chosen[i]] for i in idx], [names[int(sub[i])] for i in idx])
        paths.append(path)
    return paths[0], paths[1], [names[c] for c in new]


def data_section(setting: Setting, path: Path, names: list[str], eval_fraction: float) -> dict[str, Any]:
    return {"path": str(path), "task": setting.task, "labels": names, "eval_fraction": eval_fraction, "seed": 0}


def run_one(setting: Setting, body: Path, train_file: Path, names: list[str], method: dict[str, Any], lr: float,
            seed: int, steps: int, folder: Path) -> dict[str, Any]:
    summary = dt.train({
        "model": str(body), "data": data_section(setting, train_file, names, DEV_FRACTION),
        "method": method, "output": str(folder),
        "train": {"steps": steps, "batch_size": 32, "lr": lr, "warmup": 0.1, "schedule": "linear", "seed": seed,
                  "eval_every": 0, "save_every": 0, "progress": False},
    }, overwrite=True)
    return {"lr": lr, "seed": seed, "dev_accuracy": summary["final"]["eval_accuracy"],
            "dev_loss": summary["final"]["eval_loss"], "trainable": summary["trainable"],
            "seconds_per_step": summary["seconds_per_step"], "folder": str(folder)}


def test_accuracy(setting: Setting, body: Path, test_file: Path, names: list[str], run: Path) -> float:
    """The run's accuracy on the whole test file, from the artifact alone (base from its head record)."""
    meta = artifact.read_meta(run)
    model = models.load_base(*models.base_of(meta))
    if type(model).__name__ != setting.classifier:
        raise RuntimeError(f"the artifact's base loaded as {type(model).__name__}")
    tuned = dt.load(model, run)
    task = load_for_task(DataConfig(**data_section(setting, test_file, names, 0.5)), str(body)).task
    task.eval = task.train + task.eval  # every test example
    return float(task.evaluate(tuned, 128)["accuracy"])


def mean_se(values: list[float]) -> tuple[float, float]:
    m = float(np.mean(values))
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return m, se


def adapt(setting: Setting, body: Path, out: Path, *, seeds: int, quick: bool, methods: list[str],
          log: Any) -> dict[str, Any]:
    train_file, test_file, names = adaptation_files(setting, out)
    steps = 20 if quick else setting.steps
    results: dict[str, Any] = {}
    for name in methods:
        method, grid = METHODS[name]
        grid = [grid[len(grid) // 2]] if quick else grid
        start = time.time()
        runs = out / "runs" / setting.name / name
        tried = [run_one(setting, body, train_file, names, method, lr, 0, steps, runs / f"lr{lr:g}-seed0")
                 for lr in grid]
        best = max(tried, key=lambda r: (r["dev_accuracy"], -r["dev_loss"]))  # ties: the lower dev loss
        finals = [best] + [run_one(setting, body, train_file, names, method, best["lr"], s, steps,
                                   runs / f"lr{best['lr']:g}-seed{s}") for s in range(1, seeds)]
        accuracies = [test_accuracy(setting, body, test_file, names, Path(r["folder"])) for r in finals]
        mean, se = mean_se(accuracies)
        results[name] = {"method": method, "grid": [{k: r[k] for k in ("lr", "dev_accuracy", "dev_loss")}
                                                    for r in tried],
                         "lr": best["lr"], "test_accuracy": accuracies, "mean": mean, "se": se,
                         "trainable": best["trainable"], "seconds_per_step": best["seconds_per_step"],
                         "seconds": time.time() - start}
        log(f"{setting.name} {name:>9}: lr {best['lr']:g}, test accuracy {mean:.3f} +- {se:.3f} "
            f"({best['trainable']:,} trainable, {results[name]['seconds']:.0f} s)")
    return {"classes": names, "steps": steps, "train_file": str(train_file), "test_file": str(test_file),
            "methods": results}


# ---------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Transfer demo (small-scale analogue)", "",
             "Tiny backbones pre-trained inside `scripts/transfer_results.py` on some classes, adapted to the others "
             "with each method; learning rate chosen per method on a dev split of the training data; test accuracy "
             f"mean ± SE over {report['seeds']} training seed(s). Not comparable with the papers' ViT-B / AST "
             "figures." + (" **--quick: a smoke test, the figures mean nothing.**" if report["quick"] else ""), ""]
    for name, s in report["settings"].items():
        pre = s["pretrain"]
        lines += [f"## {name}: pre-trained on {', '.join(pre['settings']['classes'])} (held-out accuracy "
                  f"{pre['heldout_accuracy']:.3f}, {pre['parameters']:,} body parameters); adapted to "
                  f"{', '.join(s['classes'])}, {s['steps']} steps", "",
                  "| method | trainable | lr | test accuracy |", "|---|---:|---:|---:|"]
        for m, r in s["methods"].items():
            label = "probe (vqt, T=0)" if m == "probe" else m
            lines.append(f"| {label} | {r['trainable']:,} | {r['lr']:g} | {r['mean']:.3f} ± {r['se']:.3f} |")
        lines.append("")
    lines.append("Trainable counts include the fresh classification head (VQT and the probe: their own head).")
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    settings = list(report["settings"].items())
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 3.5), squeeze=False)
    for ax, (name, s) in zip(axes[0], settings, strict=True):
        methods = list(s["methods"])
        means = [s["methods"][m]["mean"] for m in methods]
        ses = [s["methods"][m]["se"] for m in methods]
        ax.bar(methods, means, yerr=ses, capsize=3, color="tab:blue")
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: {', '.join(s['classes'])}")
        ax.set_ylabel("test accuracy")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/transfer", help="output folder (pre-trained bodies are cached here)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per method at the chosen lr")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, one lr, 20 steps")
    parser.add_argument("--settings", default="digits,tones", help="comma-separated: digits, tones")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    # one thread: on a loaded 2-core machine an OpenMP team waiting for a busy core is ~30x slower on these tiny
    # matrices than one thread (measured); raise it on an idle machine
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = 1 if args.quick else args.seeds
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    chosen = [s.strip() for s in args.settings.split(",") if s.strip()]
    if unknown or any(s not in SETTINGS for s in chosen):
        parser.error(f"unknown method(s) {unknown} or setting(s) {chosen}")
    out = Path(args.out)
    # a folder holding anything but this script's earlier output is refused; its pre-trained bodies are reused
    with artifact.report_folder(out, "scripts/transfer_results.py", resume=True):
        return measure(args, out, seeds, chosen, methods)


def measure(args: argparse.Namespace, out: Path, seeds: int, chosen: list[str], methods: list[str]) -> int:
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    report: dict[str, Any] = {"quick": args.quick, "seeds": seeds, "threads": args.threads, "settings": {}}
    for name in chosen:
        setting = SETTINGS[name]
        body, pre = pretrain(setting, out, quick=args.quick, log=log)
        report["settings"][name] = {"pretrain": pre, **adapt(setting, body, out, seeds=seeds, quick=args.quick,
                                                             methods=methods, log=log)}
    report["seconds"] = time.time() - start
    (out / "transfer.json").write_text(json.dumps(report, indent=1))
    (out / "transfer.md").write_text(markdown(report))
    drew = chart(report, out / "transfer.png")
    log(f"wrote {out / 'transfer.json'}, {out / 'transfer.md'}" + (f", {out / 'transfer.png'}" if drew else ""))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    run_script(main)
