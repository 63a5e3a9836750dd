#!/usr/bin/env bash
# A folder like a user's (issue 19): 3,000 CIFAR-10 training images as small grey-scale pictures (8x8, scaled back
# to 32 by the loader) on a plain black background, one folder per class, no test/ folder. Every preset row of the
# issue's table trains on it, then evaluate runs before and after a file is copied into a class folder.
# usage: bash benchmarks/own_folder.sh CIFAR10_DIR [OUT]      (OUT: default /tmp/own-folder, replaced)
set -uo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: bash benchmarks/own_folder.sh CIFAR10_DIR [OUT]}
out=${2:-/tmp/own-folder}
py=.venv/bin/python
rm -rf "$out" && mkdir -p "$out"
$py scripts/cifar_as_folder.py "$out/pics" --data-dir "$data" --grey --size 8 --black-below 110 \
  --train-count 3000 --no-test --format png
lscpu | grep "Model name"
run() {
  local name=$1; shift
  echo "== $name: cifarcnn train $* --test"
  $py -m cifarcnn train data.dataset=folder "data.path=$out/pics" "$@" --test --runs-dir "$out/runs" \
    --name "$name" --device cpu > "$out/$name.log" 2>&1
  echo "exit $?"; grep -E "^precision|^mirroring|early|^test accuracy|error" "$out/$name.log" | tail -4
}
run quick --preset quick
run quick-val300 --preset quick data.val_size=300
run fast-val300 --preset fast data.val_size=300
run quick-fp32 --preset quick data.val_size=300 precision=fp32
run seed-noflip --preset seed epochs=30 augment.flip=none data.val_size=300
echo "== evaluate seed-noflip"
$py -m cifarcnn evaluate "$out/runs/seed-noflip" --device cpu 2>&1 | grep -E "split|accuracy" | head -3
first=$(ls "$out/pics/train/cat" | head -1)
cp "$out/pics/train/cat/$first" "$out/pics/train/dog/copied-$first"
echo "== evaluate seed-noflip after copying train/cat/$first into train/dog/"
$py -m cifarcnn evaluate "$out/runs/seed-noflip" --device cpu 2>&1 | grep -E "split|accuracy" | head -3
