#!/usr/bin/env bash
# Issue 31's GPU measurement, for a session with a GPU lent (`run` in the tool library):
# `mocov3 bench` on ViT-S/16 and ViT-B/16 at 224 px, batch 256, with the reference-mirroring
# row (fp16 autocast, as the reference trains) beside our bf16 rows, then the compiled row.
# 5 interleaved rounds per preset, 3 warm-up steps per row. Run from the repository root; the
# JSON lines go to OUTDIR (bench's table goes to the log).
# Usage: bash benchmarks/gpu_bench.sh OUTDIR [PRESET ...]
set -eu
OUTDIR=${1:?usage: gpu_bench.sh OUTDIR [PRESET ...]}
shift
PRESETS=${*:-vit_small_imagenet vit_base_imagenet}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR"
nvidia-smi -L
for preset in $PRESETS; do
  python3 -m mocov3 bench --config "$preset" --device cuda --set train.batch_size=256 \
    --set data.channels=3 --precision fp32 bf16 --steps 5 --compile --json \
    | tee "$OUTDIR/$preset.txt" | tail -n 1 > "$OUTDIR/$preset.json"
done
