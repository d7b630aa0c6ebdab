#!/usr/bin/env bash
# Issue 29's GPU measurement, for a session with a GPU lent (`run` in the tool library):
# images/s of the reference linear probe and of the DeiT-recipe fine-tune on ViT-S/16 at
# 224 px (bf16, batch 256, one GPU), on an ImageNet-like folder of 4,000 JPEGs streamed by
# DataLoader workers. The ViT-S checkpoint is the vit_small_imagenet preset after 2 steps on
# synthetic images (its weights do not matter for speed). Run from the repository root;
# the commands' JSON lines go to OUTDIR.
# Usage: bash benchmarks/gpu_eval.sh OUTDIR
set -eu
OUTDIR=${1:?usage: gpu_eval.sh OUTDIR}
DATA=/tmp/in-like-gpu
RUN=/tmp/vit-s-gpu-eval
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR"
nvidia-smi -L
test -d "$DATA" || python3 benchmarks/imagenet_like.py --out "$DATA" --train 4000 --val 500 --jobs "$(nproc)"
python3 -m mocov3 pretrain --config configs/vit_small_imagenet.yaml --out "$RUN" --overwrite \
  --set data.name=synthetic --set data.image_size=224 --set data.channels=3 \
  --set data.synthetic_size=512 --set train.batch_size=256 --set train.epochs=1 \
  --set eval.knn_init=false --set eval.knn_final=false --set eval.monitor_every=0 \
  > "$OUTDIR/pretrain.json"
data=(--data "folder:$DATA" --set data.loader=stream --set data.image_size=224 --device cuda)
python3 -m mocov3 linear --checkpoint "$RUN" --recipe configs/eval/linear_reference.yaml \
  --epochs 2 --batch-size 256 "${data[@]}" | tee "$OUTDIR/linear_reference.json"
python3 -m mocov3 finetune --checkpoint "$RUN" --recipe configs/eval/finetune_deit_vit_small.yaml \
  --epochs 2 --warmup-epochs 0.5 --batch-size 256 "${data[@]}" | tee "$OUTDIR/finetune_deit.json"
python3 -m mocov3 knn --checkpoint "$RUN" "${data[@]}" | tee "$OUTDIR/knn.json"
