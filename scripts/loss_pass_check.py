"""How much of the fused loss's head goes to the passes over the vocabulary? (issue 23, LoRA against PEFT)

    .venv/bin/python scripts/loss_pass_check.py            # 1 thread, SmolLM2's head, 4 x 127 labelled positions
    .venv/bin/python scripts/loss_pass_check.py --threads 2

Times, in this process and on the same random hidden states, the three ways of getting a chunk's NLL and its
gradient with respect to the hidden states from SmolLM2-135M's head (49,152 x 576), chunked as ``token_nll`` chunks:

- ``two-pass``: ``cross_entropy``, ``argmax`` and ``softmax`` on each chunk's logits (the fused loss before
  2026-12-05: two log-sum-exps, an argmax for the hits and two fresh chunk-sized tensors);
- ``one-pass``: ``lm_loss._nll_in_place`` (one ``amax``, one exp, one sum, in place; the hits only when a metric
  asks for them);
- ``matmuls``: the two head products alone (the floor both share).

Prints the median of ``--repeats`` of each, interleaved so that load on the machine hits all three alike, and the
largest difference of the NLL and of the gradient between the first two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deltatune.data import lm_loss  # noqa: E402

Result = tuple[torch.Tensor, torch.Tensor]


def two_pass(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, chunk: int) -> Result:
    nll, grad = torch.empty(len(h)), torch.empty_like(h)
    for s in range(0, len(h), chunk):
        logits = F.linear(h[s:s + chunk], w)
        nll[s:s + chunk] = F.cross_entropy(logits, t[s:s + chunk], reduction="none")
        _ = logits.argmax(-1) == t[s:s + chunk]
        d = torch.softmax(logits, -1)
        d[torch.arange(len(d)), t[s:s + chunk]] -= 1.0
        grad[s:s + chunk] = d @ w
    return nll, grad


def one_pass(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, chunk: int) -> Result:
    nll, grad = torch.empty(len(h)), torch.empty_like(h)
    for s in range(0, len(h), chunk):
        logits = F.linear(h[s:s + chunk], w)
        nll[s:s + chunk] = lm_loss._nll_in_place(logits, t[s:s + chunk], grad=True)
        grad[s:s + chunk] = logits @ w
    return nll, grad


def matmuls(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, chunk: int) -> Result:
    grad = torch.empty_like(h)
    for s in range(0, len(h), chunk):
        grad[s:s + chunk] = F.linear(h[s:s + chunk], w) @ w
    return torch.empty(0), grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--positions", type=int, default=4 * 127, help="labelled positions (batch 4 x 128)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    vocab, width = 49_152, 576
    h = torch.randn(args.positions, width, generator=g)
    w = torch.randn(vocab, width, generator=g) * 0.05
    t = torch.randint(0, vocab, (args.positions,), generator=g)
    chunk = lm_loss.chunk_size(vocab)
    (a, ga), (b, gb) = two_pass(h, w, t, chunk), one_pass(h, w, t, chunk)
    print(f"largest difference: NLL {float((a - b).abs().max()):.2e} (of {float(a.abs().max()):.2f}), "
          f"gradient {float((ga - gb).abs().max()):.2e} (of {float(ga.abs().max()):.2f})")
    ways: dict[str, Callable[..., Result]] = {"two-pass": two_pass, "one-pass": one_pass, "matmuls": matmuls}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():
            start = time.perf_counter()
            way(h, w, t, chunk)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["two-pass"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{name:>9}: {median:.3f} s ({median / base:.2f}x two-pass)")


if __name__ == "__main__":
    main()
