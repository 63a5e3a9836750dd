#!/usr/bin/env bash
# The GPU figures the README's speed table quotes, in one run of 3 to 7 minutes on an H100/H200:
#
#     bash benchmarks/gpu_suite.sh DATA_DIR [OUT_DIR]
#
# DATA_DIR holds cifar-10-batches-py/. Runs: the default recipe for 50 epochs with --test, the fast preset
# over 5 seeds (benchmarks/fast_preset.py), `cifarcnn bench` for both recipes, and last (it compiles for a minute
# or two) the fast preset with compile=true over 2 seeds. Logs and JSON go to
# OUT_DIR (default gpu-suite/); the lines worth quoting are printed. Needs only the project on PYTHONPATH.
set -uo pipefail
data=${1:?usage: bash benchmarks/gpu_suite.sh DATA_DIR [OUT_DIR]}
out=${2:-gpu-suite}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(cd "$(dirname "$0")/.." && pwd) PYTHONUNBUFFERED=1
runs=$(mktemp -d)
quiet() { tr '\r' '\n' | grep -v -E 'it/s\]|s/it\]|^\s*$'; }

python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
echo "== default recipe, 50 epochs, --test"
timeout 120 python3 -m cifarcnn train --test --data-dir "$data" --runs-dir "$runs" --name seed50 2>&1 | quiet \
  > "$out/seed50.log"
grep -E '^epoch +(1|2|50)/|best|trained|graph|rror' "$out/seed50.log"
cp "$runs/seed50/metrics.jsonl" "$out/seed50_metrics.jsonl"
echo "== fast preset, 5 seeds"
timeout 120 python3 benchmarks/fast_preset.py --seeds 5 --data-dir "$data" --runs-dir "$runs" \
  --out "$out/fast5.json" 2>&1 | quiet > "$out/fast5.log"
grep -E '^\{|^fast|graph|rror' "$out/fast5.log"
echo "== bench, default recipe"
timeout 90 python3 -m cifarcnn bench --data-dir "$data" --steps 300 --out "$out/bench_seed.json" 2>&1 | quiet
echo "== bench, fast preset"
timeout 90 python3 -m cifarcnn bench --preset fast --data-dir "$data" --steps 40 --out "$out/bench_fast.json" 2>&1 \
  | quiet
echo "== fast preset, compile=true, 2 seeds"
timeout 240 python3 benchmarks/fast_preset.py --seeds 2 compile=true --data-dir "$data" --runs-dir "$runs" \
  --out "$out/fast2_compile.json" 2>&1 | quiet > "$out/fast2_compile.log"
grep -E '^\{|^fast|warm-up|graph|rror' "$out/fast2_compile.log"
rm -rf "$runs"
