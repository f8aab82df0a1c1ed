"""LeMo token elimination at long context: peak memory and s/step, and held-out loss (docs/lemo.md).

    .venv/bin/python scripts/lemo_results.py                      # the full measurement (SmolLM2-135M; long)
    .venv/bin/python scripts/lemo_results.py --tiny --lengths 256 512 --steps 2 --train-steps 2 --out /tmp/lemo

For each sequence length (batch 1), gradient checkpointing off and on, and each variant -- deltatune LoRA, deltatune
LoRA with token elimination, PEFT LoRA (same rank, alpha and targets) -- one fresh process trains ``--steps`` steps on
the long-document task (``deltatune.data.long_documents``: BBC articles of one topic, the loss on the last 256 tokens)
and reports the bytes autograd saves for backward in one step (``saved_tensors_hooks``), the process's peak RSS (CUDA:
peak allocated memory) and the median seconds per step after the first. deltatune's variants use its chunked loss
(``train.chunked_loss``, the default); PEFT's the model's own loss (full logits), as a PEFT user runs it.

Then LoRA with and without elimination trains ``--train-steps`` steps at ``--loss-length`` tokens and the held-out loss
(mean NLL of the target tokens of every tenth document, dense) is compared. Writes ``OUT/lemo_results.json`` and
``OUT/lemo_memory.png`` (peak memory against sequence length).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA = 8, 16
VARIANTS = ("lora", "lora+lemo", "peft-lora")


def load_model(tiny: bool) -> torch.nn.Module:
    if not tiny:
        from deltatune.data.models import load

        return load("smollm2-135m").float()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def documents(length: int, target: int, seed: int = 0) -> list[Any]:
    from deltatune.data import long_documents
    from deltatune.data.models import load_tokenizer

    return long_documents.make(load_tokenizer("smollm2-135m"), min_tokens=length, max_tokens=length,
                               target_tokens=target, seed=seed)


def batches(docs: list[Any], length: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    from deltatune.data import long_documents

    out = []
    for d in docs:
        ex = long_documents.example(d, length)
        out.append({k: torch.tensor([v], device=device) for k, v in ex.items()})
    return out


def elimination_settings(args: argparse.Namespace) -> Any:
    from deltatune.train.token_elimination import TokenEliminationSettings

    return TokenEliminationSettings(sparsity=args.sparsity, segment=args.segment, predictor_every=args.predictor_every)


def prepare(variant: str, args: argparse.Namespace, device: torch.device, gc: bool) -> tuple[Any, Any, Any]:
    """(model to step, loss function, elimination or None)."""
    import deltatune as dt
    from deltatune.data import lm_loss
    from deltatune.train import token_elimination

    base = load_model(args.tiny).to(device)
    if gc:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if variant == "peft-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
        model.train()
        return model, lambda m, b: m(input_ids=b["input_ids"], labels=b["labels"], use_cache=False).loss, None
    tuned = dt.attach(base, "lora", r=RANK, alpha=ALPHA, targets=TARGETS, dropout=0.0).train()
    elim = token_elimination.install(tuned, elimination_settings(args)) if variant == "lora+lemo" else None

    def loss(m: Any, b: dict[str, torch.Tensor]) -> torch.Tensor:
        nll = lm_loss.token_nll(m, {"input_ids": b["input_ids"]}, b["labels"]).nll
        return nll.sum() / (b["labels"][:, 1:] != -100).sum()

    return tuned, loss, elim


def saved_bytes_of(fn: Any) -> tuple[Any, int]:
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            s = t.untyped_storage()
            seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def measure_one(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this process (its peak RSS is this configuration's)."""
    device = torch.device(args.device)
    length, variant, gc = spec["length"], spec["variant"], spec["gc"]
    data = batches(documents(length, args.target)[: args.steps], length, device)
    if len(data) < args.steps:
        data = (data * args.steps)[: args.steps]
    model, loss_fn, elim = prepare(variant, args, device, gc)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, saved = [], 0
    for i, b in enumerate(data):
        t0 = time.perf_counter()
        ctx = elim.batch(b) if elim is not None else torch.enable_grad()
        with ctx:
            loss, nbytes = saved_bytes_of(lambda b=b: loss_fn(model, b)) if i == 0 else (loss_fn(model, b), 0)
        saved = nbytes or saved
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {**spec, "saved_bytes": saved, "peak_bytes": peak, "peak_kind": "cuda_allocated" if device.type == "cuda"
            else "rss", "s_per_step": statistics.median(times[1:] or times)}


def heldout(args: argparse.Namespace, with_elimination: bool) -> float:
    """Train LoRA (± elimination) on the long-document task, then the dense held-out NLL of the targets."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)  # LoRA's init (and the predictors'); the same for both runs of a seed
    docs = documents(args.loss_length, args.target)
    train_docs = [d for i, d in enumerate(docs) if i % 10]
    eval_docs = [d for i, d in enumerate(docs) if not i % 10][: args.eval_docs]
    model, loss_fn, elim = prepare("lora+lemo" if with_elimination else "lora", args, device, args.loss_gc)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    train = batches(train_docs, args.loss_length, device)
    if args.seed:  # another seed: another order of the training documents too (seed 0 keeps the made order)
        import random

        random.Random(args.seed).shuffle(train)
    for step in range(args.train_steps):
        b = train[step % len(train)]
        with elim.batch(b) if elim is not None else torch.enable_grad():
            loss = loss_fn(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        losses = [float(loss_fn(model, b)) for b in batches(eval_docs, args.loss_length, device)]
    return sum(losses) / len(losses)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in VARIANTS:
        for gc in (False, True):
            pts = sorted((r["length"], r["peak_bytes"] / 2**30) for r in rows
                         if r["variant"] == variant and r["gc"] == gc and "peak_bytes" in r)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", linestyle="--" if gc else "-",
                        label=f"{variant}{' + grad. ckpt' if gc else ''}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens, batch 1)")
    ax.set_ylabel(f"peak memory (GiB, {rows[0].get('peak_kind', '')})")
    ax.set_title("LoRA fine-tuning memory with and without LeMo token elimination")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--steps", type=int, default=3, help="steps per memory/speed configuration")
    p.add_argument("--target", type=int, default=256, help="target (loss) tokens per document")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--segment", type=int, default=64)
    p.add_argument("--predictor-every", type=int, default=10)
    p.add_argument("--loss-length", type=int, default=8192)
    p.add_argument("--loss-gc", action="store_true", help="gradient checkpointing in the held-out-loss runs")
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="the held-out-loss runs' seed (init and document order)")
    p.add_argument("--loss-only", action="store_true", help="skip the memory rows: only the held-out-loss runs")
    p.add_argument("--eval-docs", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (smoke test)")
    p.add_argument("--out", default="docs/lemo_results")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a JSON spec: measure it in this process, print the result
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one), args)), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    passthrough = [a for a in sys.argv[1:]]
    for length in [] if args.loss_only else args.lengths:
        for gc in (False, True):
            for variant in VARIANTS:
                spec = {"length": length, "gc": gc, "variant": variant}
                proc = subprocess.run([sys.executable, __file__, *passthrough, "--one", json.dumps(spec)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    row = {**spec, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
    result: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "one"}, "memory": rows}
    t0 = time.perf_counter()
    dense = heldout(args, False)
    t1 = time.perf_counter()
    lemo = heldout(args, True)
    t2 = time.perf_counter()
    result["heldout_loss"] = {"length": args.loss_length, "train_steps": args.train_steps, "seed": args.seed,
                              "lora": dense, "lora+lemo": lemo, "relative": lemo / dense - 1,
                              "seconds": {"lora": t1 - t0, "lora+lemo": t2 - t1}}
    print(json.dumps(result["heldout_loss"]), flush=True)
    (out / "lemo_results.json").write_text(json.dumps(result, indent=2) + "\n")
    if rows:
        plot([r for r in rows if "peak_bytes" in r] or [{}], out / "lemo_memory.png")
    print(f"wrote {out / 'lemo_results.json'}" + (f" and {out / 'lemo_memory.png'}" if rows else ""))


if __name__ == "__main__":
    main()
