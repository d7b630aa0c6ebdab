#!/usr/bin/env bash
# Issue 28's GPU measurement, for a session with a GPU lent (`run` in the tool library):
# ViT-S/16 at 224 px, batch 256, bf16, training step beside the streamed input pipeline
# (`mocov3 bench --data`), with CPU decoding at the machine's core count and with nvJPEG.
# Writes an ImageNet-like folder of 4,000 JPEGs from scikit-image's photos first (about a
# minute on 16 cores; needs scikit-image and webdataset, which `pip install -e .[dev]` brings).
# Run from the repository root; results (JSON lines) go to OUTDIR.
# Usage: bash benchmarks/gpu_input.sh OUTDIR
set -eu
OUTDIR=${1:?usage: gpu_input.sh OUTDIR}
DATA=/tmp/in-like-gpu
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR"
nvidia-smi -L
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
test -d "$DATA" || python3 benchmarks/imagenet_like.py --out "$DATA" --train 4000 --val 100 --jobs "$(nproc)"
common=(--config configs/vit_small_imagenet.yaml --set train.batch_size=256 --set data.channels=3
  --precision bf16 --steps 5 --device cuda --json --quiet --data "folder:$DATA")
python3 -m mocov3 bench "${common[@]}" | tee "$OUTDIR/cpu_decode.txt"
python3 -m mocov3 bench "${common[@]}" --set data.decode=gpu | tee "$OUTDIR/gpu_decode.txt"
