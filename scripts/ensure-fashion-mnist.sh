#!/usr/bin/env bash
# Make sure the Fashion-MNIST idx files exist (Debian package dataset-fashion-mnist, MIT).
set -euo pipefail
dir="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ -e "$dir/train-images-idx3-ubyte.gz" ] || [ -e "$dir/train-images-idx3-ubyte" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq dataset-fashion-mnist >/dev/null
  exit 0
fi
echo "Fashion-MNIST not found in $dir: run 'sudo apt-get install dataset-fashion-mnist'" \
     "(Debian/Ubuntu), or put the four idx files in a folder and pass --data-dir DIR" >&2
exit 1
