#!/usr/bin/env bash
# Set up, train the default recipe (config.yaml) with any KEY=VALUE overrides given, then evaluate it on the
# test set. `bash scripts/run.sh epochs=2` is a two-epoch demo; without arguments it runs the full recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Offline machines that carry a local CIFAR-10 builder beside the project use it instead of the download.
if [ -z "${CIFAR10_DIR:-}" ] && [ ! -e data/cifar-10-batches-py ] && [ -f ../shared/data/make_cifar10.py ]; then
  .venv/bin/python ../shared/data/make_cifar10.py data
fi
name="run-$(date +%Y%m%d-%H%M%S)"
.venv/bin/cifarcnn train "$@" --name "$name"
.venv/bin/cifarcnn evaluate "runs/$name"
echo "outputs in runs/$name (TensorBoard: .venv/bin/tensorboard --logdir runs)"
