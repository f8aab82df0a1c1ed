#!/usr/bin/env bash
# GPU check (issue 26): run on a CUDA machine, unattended, in under 8 minutes.
#  1. `deltatune bench`: LoRA vs PEFT's LoRA on SmolLM2-135M (bf16 autocast: train.precision "auto" on a GPU with
#     bf16, for deltatune's loop and the PEFT baseline alike), absolute step times and peak CUDA memory
#     (torch.cuda.max_memory_allocated, the bench's peak_memory_bytes on CUDA);
#  2. with more than one GPU: a 2-process FSDP2 LoRA smoke run (torchrun, DELTATUNE_FSDP=1), the same with bf16
#     compute (FSDP2's MixedPrecisionPolicy, fp32 delta) and the same run under DDP, each printing seconds per
#     step and max_memory_allocated per rank.
# Worst case (every timeout reached): 220 + 3 x 80 = 460 s.
# Without CUDA it says so and exits 0. Output folder: $GPU_CHECK_OUT (default: a fresh temporary folder).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
DT=("$PY" -m deltatune.cli)
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t deltatune-gpu-check-XXXX)}
mkdir -p "$OUT"
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
if [ "${NGPU:-0}" -lt 1 ]; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing to check; exiting cleanly."
  exit 0
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"gpu_check: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, bf16: {torch.cuda.is_bf16_supported()}")'
status=0

echo "== 1. bench: LoRA vs PEFT LoRA (bf16 autocast), 20 steps"
timeout 220 "${DT[@]}" bench --methods lora --steps 20 --batch-size 8 --seq-len 256 --device cuda \
    --json "$OUT/bench.json" || { echo "gpu_check: bench failed or timed out (exit $?)"; status=1; }
if [ -f "$OUT/bench.json" ]; then
  "$PY" - "$OUT/bench.json" <<'PYEOF'
import json, sys
for r in json.load(open(sys.argv[1])):
    name = r.get("name") or r.get("method")
    s, m = r.get("seconds_per_step"), r.get("peak_memory_bytes")
    print(f"  {name:>12}: {s if s is None else f'{s * 1000:.1f} ms/step'}, "
          f"max_memory_allocated {m if m is None else f'{m / 2**20:.0f} MiB'}  {r.get('error') or ''}")
PYEOF
fi

if [ "$NGPU" -gt 1 ]; then
  cat > "$OUT/driver.py" <<'PYEOF'
import json, sys
import torch, torch.distributed as dist
import deltatune as dt
summary = dt.train("lora", [f"output={sys.argv[1]}", "train.steps=20", "train.save_every=0", "train.eval_every=0",
                            "train.progress=false"], overwrite=True)
rank = dist.get_rank() if dist.is_initialized() else 0
print(json.dumps({"rank": rank, "fsdp": summary.get("fsdp"), "seconds_per_step": summary["seconds_per_step"],
                  "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / 2**20}), flush=True)
PYEOF
  for mode in fsdp fsdp-bf16 ddp; do
    echo "== 2. two GPUs: LoRA on SmolLM2-135M, 20 steps, $mode"
    flag=0; [ "$mode" != ddp ] && flag=1
    mixed=no; [ "$mode" = fsdp-bf16 ] && mixed=bf16
    DELTATUNE_FSDP=$flag DELTATUNE_FSDP_MIXED_PRECISION=$mixed timeout 80 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 \
        "$OUT/driver.py" "$OUT/run-$mode" 2> "$OUT/$mode.stderr" | grep '^{' \
      || { echo "gpu_check: the $mode run failed (tail of its stderr below)"; tail -5 "$OUT/$mode.stderr"; status=1; }
  done
else
  echo "== 2. one GPU: the 2-GPU FSDP smoke run is skipped"
fi
echo "gpu_check: done (exit $status); files in $OUT"
exit $status
