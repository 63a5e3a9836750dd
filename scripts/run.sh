#!/usr/bin/env bash
# Set up, train a recipe, then evaluate it on the test set. Without --preset or --config it trains the quick
# preset (a good model in minutes on a CPU); `bash scripts/run.sh --preset seed` is the classic 50-epoch
# walkthrough. Any KEY=VALUE overrides and train options are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Offline machines that carry a local CIFAR-10 builder beside the project use it instead of the download.
if [ -z "${CIFAR10_DIR:-}" ] && [ ! -e data/cifar-10-batches-py ] &&
   [ -f ../shared/data/make_cifar10.py ]; then
  .venv/bin/python ../shared/data/make_cifar10.py data
fi
recipe=(--preset quick)
for arg in "$@"; do
  case "$arg" in --preset|--preset=*|--config|--config=*) recipe=() ;; esac
done
name="run-$(date +%Y%m%d-%H%M%S)"
.venv/bin/cifarcnn train "${recipe[@]}" "$@" --name "$name"
.venv/bin/cifarcnn evaluate "runs/$name"
echo "outputs in runs/$name (report: .venv/bin/cifarcnn report runs/$name;" \
  "TensorBoard: .venv/bin/tensorboard --logdir runs)"
