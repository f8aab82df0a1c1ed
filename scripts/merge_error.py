"""Trainable counts and merge / unmerge error of the foundation methods on the shipped SmolLM2-135M.

    .venv/bin/python scripts/merge_error.py

Each delta is filled with small random values (as after training), then: max |logits(merged) -
logits(unmerged)| and, after unmerge, max |W - W0| over every base tensor.
"""

import torch

import deltatune as dt

RUNS = [
    ("lora", {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}),
    ("lora", {"r": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"]}),
    ("full", {}),
    ("lightweight", {}),
]


def main() -> None:
    model = dt.models.load("smollm2-135m")
    tok = dt.models.load_tokenizer("smollm2-135m")
    x = tok(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    for method, options in RUNS:
        tuned = dt.attach(model, method, **options)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in tuned.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.01)
            unmerged = tuned(**x).logits
            merged = tuned.merge()(**x).logits
        tuned.unmerge()
        tuned.detach()
        err = max((p - w0[n]).abs().max().item() for n, p in model.named_parameters())
        print(f"{method:12s} {options.get('targets', '')}: trainable {tuned.num_trainable():,}, "
              f"stored {tuned.stored_bytes():,} B, merged vs unmerged max|dlogit| {(merged - unmerged).abs().max():.2e}"
              f" (logits up to {unmerged.abs().max():.1f}), after unmerge max|W - W0| {err:.2e}")
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(w0[n])


if __name__ == "__main__":
    main()
