#!/usr/bin/env bash
# Make sure the Fashion-MNIST idx files exist where mocov3 looks for them: $FASHION_MNIST_DIR,
# the Debian package's folder, or the download cache (mocov3/data/datasets.py). As root on
# Debian/Ubuntu: the Debian package dataset-fashion-mnist (MIT); elsewhere, with PYTHON set to
# an interpreter that has mocov3 installed: torchvision's download into the cache.
set -euo pipefail
cache="${XDG_CACHE_HOME:-$HOME/.cache}/mocov3/fashion-mnist"
for dir in ${FASHION_MNIST_DIR:-} /usr/share/datasets/fashion-mnist "$cache" "$cache/FashionMNIST/raw"; do
  if [ -e "$dir/train-images-idx3-ubyte.gz" ] || [ -e "$dir/train-images-idx3-ubyte" ]; then
    exit 0
  fi
done
if [ -n "${FASHION_MNIST_DIR:-}" ]; then
  echo "Fashion-MNIST not found in FASHION_MNIST_DIR=$FASHION_MNIST_DIR:" \
       "put the four idx files there, or unset it" >&2
  exit 1
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  export DEBIAN_FRONTEND=noninteractive
  if apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
    exit 0
  fi
  echo "the Debian package could not be installed; trying the download" >&2
fi
if [ -n "${PYTHON:-}" ]; then
  echo "downloading Fashion-MNIST with torchvision into $cache"
  "$PYTHON" -c "from mocov3.data.datasets import download_fashion_mnist as d, fashion_mnist_cache as c; d(c())" && exit 0
fi
echo "Fashion-MNIST not found: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu)," \
     "or put the four idx files in a folder and pass --data-dir DIR or set FASHION_MNIST_DIR," \
     "or add --set data.download=true (torchvision, needs the network)" >&2
exit 1
