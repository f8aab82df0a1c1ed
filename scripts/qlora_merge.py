"""Logit error of each way to merge a LoRA trained on an nf4 base, against the unmerged model (nf4 base +
LoRA), on the shipped SmolLM2-135M:

    OMP_NUM_THREADS=2 .venv/bin/python scripts/qlora_merge.py

The LoRA (r 8, alpha 16, q_proj / v_proj) gets factors of N(0, 0.01²) added, as after training (as
scripts/merge_error.py does). Rows: ``merge()`` (every quantized layer dequantized, ΔW added: a plain fp32
model); ``merge(quantize="nf4")`` and ``merge(quantize="int8")`` (that model quantized again with
bitsandbytes); and, for scale, the same LoRA on the fp32 base the nf4 one was quantized from. Each row: max
and mean |Δlogit| over a dozen sentences' tokens, relative to the largest |logit|, and the agreement of the
next-token argmax.
"""

from __future__ import annotations

import torch

import deltatune as dt

MODEL = "smollm2-135m"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of", "def fibonacci(n):",
         "I loved this movie, it was", "The weather today is", "Water boils at a temperature of",
         "Once upon a time, there was a", "The stock market fell sharply after", "My favourite food is",
         "To be or not to be, that is", "The mitochondria is the powerhouse of",
         "Translate to French: cheese"]
LORA = {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}


def lora_on(model: torch.nn.Module, delta: dict[str, torch.Tensor] | None) -> dt.Tuned:
    """LoRA r8 on ``model``: the given factors, or fresh ones moved by N(0, 0.01²) (seeded)."""
    tuned = dt.attach(model, "lora", **LORA)
    if delta is not None:
        tuned.load_delta_state_dict(delta)
        return tuned
    torch.manual_seed(0)
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return tuned


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch).logits
    return out[batch["attention_mask"].bool()]  # real tokens only


def main() -> None:
    tok = dt.models.load_tokenizer(MODEL)
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    tuned = lora_on(dt.models.load(MODEL, quantize="nf4"), None)
    delta = {k: v.clone() for k, v in tuned.delta_state_dict().items()}
    reference = logits(tuned, batch)
    scale = reference.abs().max().item()
    rows = {"merge() (plain fp32)": lambda: tuned.merge()}
    for scheme in ("nf4", "int8"):
        rows[f'merge(quantize="{scheme}")'] = lambda s=scheme: lora_on(dt.models.load(MODEL, quantize="nf4"),
                                                                       delta).merge(quantize=s)
    rows["same LoRA on the fp32 base (for scale)"] = lambda: lora_on(dt.models.load(MODEL), delta)
    print(f"reference: nf4 SmolLM2-135M + unmerged LoRA r8 (q, v); max |logit| {scale:.2f}, "
          f"{reference.shape[0]} tokens")
    for name, make in rows.items():
        out = logits(make(), batch)
        diff = (out - reference).abs()
        agree = (out.argmax(-1) == reference.argmax(-1)).float().mean().item()
        print(f"{name:40s} max |Δlogit| {diff.max():.3g} ({diff.max() / scale:.2%}), mean {diff.mean():.3g}, "
              f"argmax agrees on {agree:.1%} of tokens")


if __name__ == "__main__":
    main()
