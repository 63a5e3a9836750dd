#!/usr/bin/env bash
# The GPU figures the tables in docs/speed.md quote, in one run of at most SUITE_SECONDS (default 570, under the
# 10 minutes a device session allows one command) on an H100/H200:
#
#     bash benchmarks/gpu_suite.sh DATA_DIR [OUT_DIR]
#
# DATA_DIR holds cifar-10-batches-py/. Runs, first, a check that `finetune: head` on the GPU (its step
# replayed as a CUDA graph) leaves the frozen body and its BatchNorm statistics as they were
# (benchmarks/finetune_head_check.py, exit code 1 and "MOVED" when not); then, in order of importance: the
# default recipe for 50 epochs with --test, the fast preset (Muon) over 5 seeds, the best preset over 3 seeds
# and the quick preset over 2
# (benchmarks/fast_preset.py: all 50,000 training images, accuracy and time of each run), `cifarcnn bench` for
# both small recipes, the fast preset with compile=true over 2 seeds (it compiles for a minute or two), and last, optional, resnet18 once on a SHORTENED
# schedule: RESNET18_EPOCHS (default 30) epochs of the preset's recipe, cosine over those epochs, not the
# preset's 200 (its per-epoch seconds give the 200-epoch time). Each step has its own timeout, cut to the time
# left, so a slow step cannot starve the ones after it; resnet18 gets what is left. Logs and JSON go to OUT_DIR
# (default gpu-suite/); the lines worth quoting are printed. Needs only the project on PYTHONPATH.
set -uo pipefail
data=${1:?usage: bash benchmarks/gpu_suite.sh DATA_DIR [OUT_DIR]}
out=${2:-gpu-suite}
budget=${SUITE_SECONDS:-570}
resnet_epochs=${RESNET18_EPOCHS:-30}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(cd "$(dirname "$0")/.." && pwd) PYTHONUNBUFFERED=1
runs=$(mktemp -d)
quiet() { tr '\r' '\n' | grep -v -E 'it/s\]|s/it\]|^\s*$'; }
# limit N: N seconds, or what is left of the budget (keeping 10 s to print and clean up) when that is less
limit() { local left=$((budget - SECONDS - 10)); echo $(( left < $1 ? (left > 0 ? left : 1) : $1 )); }
# ran STEP RC: say when a step was cut by its timeout (exit 124), so a missing figure is not read as a crash
ran() { [ "$2" -eq 124 ] && echo "$1: TIMED OUT (cut by its timeout; the figures above are partial)"; true; }

python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
echo "== finetune: head, the step a CUDA graph: the frozen body and its BatchNorm statistics must not move"
timeout "$(limit 90)" python3 benchmarks/finetune_head_check.py --data-dir "$data" \
  --runs-dir "$runs/finetune" --out "$out/finetune_head.json" 2>&1 | quiet > "$out/finetune_head.log"
ran finetune_head "${PIPESTATUS[0]}"
grep -E '^finetune head|graph|rror' "$out/finetune_head.log"
echo "== default recipe, 50 epochs, --test"
timeout "$(limit 120)" python3 -m cifarcnn train --test --data-dir "$data" --runs-dir "$runs" --name seed50 2>&1 \
  | quiet > "$out/seed50.log"; ran seed50 "${PIPESTATUS[0]}"
grep -E '^epoch +(1|2|50)/|best|trained|graph|rror' "$out/seed50.log"
cp "$runs/seed50/metrics.jsonl" "$out/seed50_metrics.jsonl" 2>/dev/null
echo "== fast preset, 5 seeds (target: >= 90.7% mean, <= 2.1 s per run on an H200)"
timeout "$(limit 120)" python3 benchmarks/fast_preset.py --seeds 5 --data-dir "$data" --runs-dir "$runs" \
  --out "$out/fast5.json" 2>&1 | quiet > "$out/fast5.log"; ran fast5 "${PIPESTATUS[0]}"
grep -E '^\{|^fast|graph|rror' "$out/fast5.log"
echo "== best preset, 3 seeds (target: >= 93.4% mean, <= 16 s per run on an H200)"
timeout "$(limit 180)" python3 benchmarks/fast_preset.py --preset best --seeds 3 --data-dir "$data" \
  --runs-dir "$runs" --out "$out/best3.json" 2>&1 | quiet > "$out/best3.log"; ran best3 "${PIPESTATUS[0]}"
grep -E '^\{|^best|warm-up|graph|rror' "$out/best3.log"
echo "== quick preset (made for CPUs), 2 seeds"
timeout "$(limit 60)" python3 benchmarks/fast_preset.py --preset quick --seeds 2 --data-dir "$data" \
  --runs-dir "$runs" --out "$out/quick2.json" 2>&1 | quiet > "$out/quick2.log"; ran quick2 "${PIPESTATUS[0]}"
grep -E '^\{|^quick|graph|rror' "$out/quick2.log"
echo "== bench, default recipe"
timeout "$(limit 90)" python3 -m cifarcnn bench --data-dir "$data" --steps 300 --out "$out/bench_seed.json" 2>&1 \
  | quiet; ran bench_seed "${PIPESTATUS[0]}"
echo "== bench, fast preset"
timeout "$(limit 90)" python3 -m cifarcnn bench --preset fast --data-dir "$data" --steps 40 \
  --out "$out/bench_fast.json" 2>&1 | quiet; ran bench_fast "${PIPESTATUS[0]}"
echo "== fast preset, compile=true, 2 seeds"
timeout "$(limit 240)" python3 benchmarks/fast_preset.py --seeds 2 compile=true --data-dir "$data" \
  --runs-dir "$runs" --out "$out/fast2_compile.json" 2>&1 | quiet > "$out/fast2_compile.log"
ran fast2_compile "${PIPESTATUS[0]}"
grep -E '^\{|^fast|warm-up|graph|rror' "$out/fast2_compile.log"
echo "== resnet18, 1 run, SHORTENED to $resnet_epochs epochs (the preset trains 200), $(limit 600)s left"
if [ "$(limit 600)" -ge 60 ]; then
  timeout "$(limit 600)" python3 benchmarks/fast_preset.py --preset resnet18 --seeds 1 "epochs=$resnet_epochs" \
    --data-dir "$data" --runs-dir "$runs" --out "$out/resnet18.json" 2>&1 | quiet > "$out/resnet18.log"
  ran resnet18 "${PIPESTATUS[0]}"
  grep -E '^\{|^resnet18|warm-up|graph|rror' "$out/resnet18.log"
  grep -E '^epoch ' "$out/resnet18.log" | tail -2
else
  echo "resnet18: skipped, less than a minute of the budget left"
fi
echo "suite: ${SECONDS}s of the ${budget}s budget"
rm -rf "$runs"
