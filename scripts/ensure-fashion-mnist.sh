#!/usr/bin/env bash
# Make sure the Fashion-MNIST idx files are where mocov3 looks (mocov3/data/datasets.py):
# $FASHION_MNIST_DIR when set, else the Debian package's folder or the download cache. As
# root on Debian/Ubuntu without FASHION_MNIST_DIR: the Debian package dataset-fashion-mnist
# (MIT); otherwise, with PYTHON set to an interpreter that has mocov3: torchvision's download.
set -euo pipefail
cache="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/mocov3/fashion-mnist"
if [ -n "${FASHION_MNIST_DIR:-}" ]; then
  folders=("$FASHION_MNIST_DIR")
else
  folders=(/usr/share/datasets/fashion-mnist "$cache")
fi
for dir in "${folders[@]}"; do
  for where in "$dir" "$dir/FashionMNIST/raw"; do
    if [ -e "$where/train-images-idx3-ubyte.gz" ] || [ -e "$where/train-images-idx3-ubyte" ]; then
      exit 0
    fi
  done
done
if [ -z "${FASHION_MNIST_DIR:-}" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  export DEBIAN_FRONTEND=noninteractive
  if apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
    exit 0
  fi
  echo "the Debian package could not be installed; trying torchvision's download" >&2
fi
if [ -n "${PYTHON:-}" ]; then
  target="${folders[-1]}"
  echo "downloading Fashion-MNIST with torchvision into $target"
  "$PYTHON" - "$target" <<'PY' && exit 0
import sys
from pathlib import Path

from mocov3.data.datasets import download_fashion_mnist
from mocov3.errors import DatasetError

try:
    download_fashion_mnist(Path(sys.argv[1]))
except DatasetError as error:
    sys.exit(f"error: {error}")
PY
fi
echo "Fashion-MNIST not found in ${folders[*]}: run 'sudo apt-get install dataset-fashion-mnist'" \
     "(Debian/Ubuntu), or put the four idx files in a folder and pass --data-dir DIR or set" \
     "FASHION_MNIST_DIR, or add --set data.download=true (torchvision, needs the network)" >&2
exit 1
