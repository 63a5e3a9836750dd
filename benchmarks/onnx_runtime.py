"""The deployment figures of docs/predict-export-report.md: for each run, its checkpoint against its float
and int8 ONNX exports, measured side by side in one go on this machine.

For each run folder (copied first: the original is never touched): `cifarcnn export` and `export --int8`;
`cifarcnn predict --labels-from-folders` on the test PNG files (scripts/test_set_as_pngs.py) with the
checkpoint, the float ONNX and the int8 ONNX at --tta 0 and at the checkpoint's level, the variants
interleaved (A, B, C, A, B, C) so that a change in the machine's load hits each alike; `cifarcnn serve` under
the load of benchmarks/serve_load.py (16 clients, single-image requests) for the checkpoint and the int8 ONNX,
interleaved the same way; file sizes. Each predict and serve figure comes with the CPU time (user + system)
its process used, the fairer measure on a shared machine.

    .venv/bin/python scripts/test_set_as_pngs.py /tmp/cifar-pngs --data-dir .cache/cifar10
    .venv/bin/python benchmarks/onnx_runtime.py /work/runs/quick0 /work/runs/fast0 --pngs /tmp/cifar-pngs \\
        --data-dir .cache/cifar10 --out benchmarks/results/onnx_runtime.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import onnx  # noqa: E402
from serve_load import load, rss_mb, start_server  # noqa: E402

from cifarcnn.data.images import walk_images  # noqa: E402


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cifarcnn(*args: str) -> tuple[str, float]:
    """Run `python -m cifarcnn ARGS`; its output and the CPU seconds it used (it must exit 0)."""
    before = children_cpu()
    done = subprocess.run([sys.executable, "-m", "cifarcnn", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"cifarcnn {' '.join(args)} failed (exit {done.returncode}):\n"
                         f"{(done.stdout + done.stderr)[-2000:]}")
    return done.stdout, children_cpu() - before


def export(run: Path, data_dir: str, work: Path) -> dict:
    models = {"checkpoint": run / "best.pt", "float": work / "float.onnx", "int8": work / "int8.onnx"}
    out, cpu = cifarcnn("export", str(run), "--output", str(models["float"]), "--data-dir", data_dir)
    out8, cpu8 = cifarcnn("export", str(run), "--int8", "--output", str(models["int8"]), "--data-dir",
                          data_dir)
    print(out.strip().splitlines()[0], "\n" + out8.strip().splitlines()[-2], flush=True)
    return {"models": models, "export_cpu_s": cpu, "export_int8_cpu_s": cpu8,
            "int8_check": next(line for line in out8.splitlines() if line.startswith("int8:")),
            "bytes": {name: path.stat().st_size for name, path in models.items()}}


def predict(model: Path, pngs: Path, tta: int, work: Path) -> dict:
    result = work / "predict.json"
    extra = ["--device", "cpu"] if model.suffix == ".pt" else []
    out, cpu = cifarcnn("predict", str(model), str(pngs), "--labels-from-folders", "--quiet", "--tta",
                        str(tta), "--output", str(result), *extra)
    found = re.search(r"predicted (\d+) of (\d+) files .* in ([\d.]+)s", out)
    images, seconds = int(found.group(1)), float(found.group(3))
    saved = json.loads(result.read_text())
    inference = next(line for line in out.splitlines() if line.startswith("inference:"))
    return {"images": images, "seconds": seconds, "images_per_second": images / seconds, "process_cpu_s": cpu,
            "accuracy": saved["accuracy"]["accuracy"], "inference": inference}


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (USER_HZ 100)


def serve(model: Path, bodies: list[bytes], clients: int) -> dict:
    proc, port = start_server(str(model), "cpu", 64, 5.0)
    try:
        asyncio.run(load(port, bodies[: 4 * clients], clients))  # warm-up
        cpu = proc_cpu(proc.pid)
        result = asyncio.run(load(port, bodies, clients))
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        result.update(server_cpu_s=proc_cpu(proc.pid) - cpu, rss_mb=rss_mb(proc.pid),
                      torch_loaded="libtorch" in maps)
    finally:
        proc.terminate()
        proc.wait(60)
    return result


def measure_run(run: Path, args: argparse.Namespace, bodies: list[bytes], scratch: Path) -> dict:
    copy = scratch / run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("tensorboard"))
    work = scratch / f"{run.name}-work"
    work.mkdir()
    exported = export(copy, args.data_dir, work)
    models = exported.pop("models")
    checkpoint_tta = int({p.key: p.value for p in onnx.load(str(models["float"])).metadata_props}["tta"])
    levels = sorted({0, checkpoint_tta} if args.at_checkpoint_tta else {0})
    runs: dict = {f"tta{t}": {name: [] for name in models} for t in levels}
    for t in levels:  # A, B, C, A, B, C at each level
        for _ in range(args.rounds if t == 0 else args.rounds_tta):
            for name, model in models.items():
                got = predict(model, args.pngs, t, work)
                runs[f"tta{t}"][name].append(got)
                print(f"{run.name} predict tta {t} {name:<10}: {got['images_per_second']:7.1f} images/s "
                      f"(wall), process CPU {got['process_cpu_s']:6.1f} s, accuracy {got['accuracy']:.2%}",
                      flush=True)
    served: dict = {"checkpoint": [], "int8": []}
    for _ in range(args.rounds):
        for name in served:
            got = serve(models[name], bodies, args.clients)
            served[name].append(got)
            print(f"{run.name} serve {name:<10}: {got['requests_per_second']:7.1f} req/s, p99 "
                  f"{got['p99_ms']:.0f} ms, RSS {got['rss_mb']:.0f} MB, server CPU {got['server_cpu_s']:.1f} "
                  f"s, {got['errors']} errors", flush=True)
    return {"run": str(run), "checkpoint_tta": checkpoint_tta, **exported, "predict": runs, "serve": served}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (copied, never changed)")
    parser.add_argument("--pngs", type=Path, required=True, help="the test set as PNG files in class folders")
    parser.add_argument("--data-dir", required=True, help="the CIFAR-10 copy (export's checks)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds at tta 0 and for serve")
    parser.add_argument("--rounds-tta", type=int, default=1, help="rounds at the checkpoint's tta")
    parser.add_argument("--no-checkpoint-tta", dest="at_checkpoint_tta", action="store_false",
                        help="predict at --tta 0 only (then the export check gives the accuracy)")
    parser.add_argument("--requests", type=int, default=2000, help="serve: single-image requests per round")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    found = walk_images(args.pngs)[0]
    bodies = [found[i * len(found) // args.requests].read_bytes() for i in range(args.requests)]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as scratch:
        results = [measure_run(run, args, bodies, Path(scratch)) for run in args.runs]
    machine = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
               "wall_s": time.time() - started, "total_children_cpu_s": children_cpu()}
    args.out.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                    "runs": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
