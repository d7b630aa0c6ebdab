#!/usr/bin/env bash
# Issue 9's recipe search on one GPU: studies/recipe_search.yaml in N processes sharing one
# study directory (`mocov3 study --shard I/N`), then the report. Run from the repository
# root on a machine with torch, torchvision, matplotlib and PyYAML; Fashion-MNIST's .gz
# files in DATA (default .fmnist). Results go to OUTDIR as a tarball (checkpoints left out).
# Usage: bash docs/experiments/scripts/gpu_recipe_search.sh OUTDIR [SECONDS] [PROCESSES]
set -u
OUTDIR=${1:?usage: gpu_recipe_search.sh OUTDIR [SECONDS] [PROCESSES]}
SECONDS_LIMIT=${2:-420}
N=${3:-8}
DATA=${DATA:-.fmnist}
STUDY=${STUDY:-studies/recipe_search.yaml}
WORK=/tmp/recipe_search
export PYTHONPATH=$PWD OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR" "$WORK"
nvidia-smi -L
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
common=(--out "$WORK" --set train.device=cuda --set train.precision=fp32 --set "data.data_dir=$DATA")
for ((i = 0; i < N; i++)); do
  timeout "$SECONDS_LIMIT" python3 -m mocov3 study "$STUDY" "${common[@]}" --shard "$i/$N" \
    > "$WORK/shard$i.log" 2>&1 &
done
wait
python3 -m mocov3 study "$STUDY" "${common[@]}" --report > "$WORK/report.log" 2>&1
tail -n 3 "$WORK"/shard*.log
cat "$WORK/report.md" 2>/dev/null | head -70
tar czf "$OUTDIR/recipe_search.tgz" -C "$WORK" --exclude='*.pt' --exclude=tensorboard .
ls -la "$OUTDIR"
