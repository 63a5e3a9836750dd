"""Load test for `cifarcnn serve`: concurrent clients send single-image requests (PNG files, one per request,
as the raw body), with batching and with --max-batch 1, then `cifarcnn predict` classifies the same files.

Reports requests/s, p50/p99 latency, errors and the server's memory (RSS) at start and end, and checks the
targets: zero errors, throughput >= 0.3x predict's images/s, p99 <= 250 ms, memory growth < 50 MB, batching
>= 1.5x max-batch 1. The PNG files come from scripts/test_set_as_pngs.py. The full measurement:

    .venv/bin/python scripts/test_set_as_pngs.py /tmp/cifar-pngs --data-dir .cache/cifar10
    .venv/bin/python benchmarks/serve_load.py RUN_DIR /tmp/cifar-pngs --requests 5000 --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cifarcnn.data.images import walk_images  # noqa: E402


def start_server(run: str, device: str, max_batch: int, max_wait_ms: float) -> tuple[subprocess.Popen, int]:
    """`cifarcnn serve` on a free 127.0.0.1 port; the process and its port once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "cifarcnn", "serve", run, "--port", "0", "--device",
                             device, "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        found = re.search(r" on http://127\.0\.0\.1:(\d+)/", line)
        if found:  # keep reading its log, so that a full pipe never stalls it
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, int(found.group(1))
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc status")


async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> tuple[int, bytes]:
    """One POST /v1/predict on a kept-alive HTTP/1.1 connection: (status, response body)."""
    writer.write(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    return status, await reader.readexactly(length)


async def client(port: int, bodies: list[bytes], jobs: asyncio.Queue, latencies: list[float],
                 errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while not jobs.empty():
            n = jobs.get_nowait()
            started = time.perf_counter()
            try:
                status, answer = await post(reader, writer, bodies[n])
                if status != 200 or b'"predictions"' not in answer:
                    errors.append(f"request {n}: HTTP {status}: {answer[:200]!r}")
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                errors.append(f"request {n}: {type(e).__name__}: {e}")
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


async def load(port: int, bodies: list[bytes], clients: int) -> dict:
    jobs: asyncio.Queue = asyncio.Queue()
    for n in range(len(bodies)):
        jobs.put_nowait(n)
    latencies: list[float] = []
    errors: list[str] = []
    started = time.perf_counter()
    await asyncio.gather(*(client(port, bodies, jobs, latencies, errors) for _ in range(clients)))
    seconds = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"requests": len(bodies), "seconds": seconds, "requests_per_second": len(bodies) / seconds,
            "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
            "errors": len(errors), "first_errors": errors[:5]}


def measure_server(args: argparse.Namespace, bodies: list[bytes], max_batch: int) -> dict:
    proc, port = start_server(args.run, args.device, max_batch, args.max_wait_ms)
    try:
        asyncio.run(load(port, bodies[: min(len(bodies), 4 * args.clients)], args.clients))  # warm-up
        rss_start = rss_mb(proc.pid)
        result = asyncio.run(load(port, bodies, args.clients))
        result.update(max_batch=max_batch, rss_start_mb=rss_start, rss_end_mb=rss_mb(proc.pid))
    finally:
        proc.terminate()
        proc.wait(60)
    print(f"serve --max-batch {max_batch:<3}: {result['requests_per_second']:7.1f} req/s, p50 "
          f"{result['p50_ms']:6.1f} ms, p99 {result['p99_ms']:6.1f} ms, {result['errors']} errors, RSS "
          f"{result['rss_start_mb']:.0f} -> {result['rss_end_mb']:.0f} MB")
    return result


def measure_predict(args: argparse.Namespace, files: list[Path]) -> dict:
    """`cifarcnn predict` on the same files; its own timing line (decoding and inference, not start-up)."""
    done = subprocess.run([sys.executable, "-m", "cifarcnn", "predict", args.run, *map(str, files), "--quiet",
                           "--device", args.device], capture_output=True, text=True)
    found = re.search(r"predicted (\d+) of (\d+) files .* in ([\d.]+)s", done.stdout)
    if done.returncode != 0 or not found:
        raise SystemExit(f"cifarcnn predict failed (exit {done.returncode}): {done.stderr[-1000:]}")
    images, seconds = int(found.group(1)), max(float(found.group(3)), 0.05)  # printed to 0.1 s
    print(f"cifarcnn predict      : {images / seconds:7.1f} images/s ({images} files in {seconds:.1f} s)")
    return {"images": images, "seconds": seconds, "images_per_second": images / seconds}


def targets(batched: dict, single: dict, predict: dict) -> dict:
    return {
        "zero errors": batched["errors"] == 0 and single["errors"] == 0,
        "throughput >= 0.3x predict": batched["requests_per_second"] >= 0.3 * predict["images_per_second"],
        "p99 <= 250 ms": batched["p99_ms"] <= 250,
        "memory growth < 50 MB": batched["rss_end_mb"] - batched["rss_start_mb"] < 50,
        "batching >= 1.5x max-batch 1": batched["requests_per_second"] >= 1.5 * single["requests_per_second"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder or checkpoint (e.g. one trained with --preset quick)")
    parser.add_argument("pngs", type=Path,
                        help="folder of PNG files (scripts/test_set_as_pngs.py writes one)")
    parser.add_argument("--requests", type=int, default=5000, help="single-image requests (default: 5000)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default: 16)")
    parser.add_argument("--max-batch", type=int, default=64,
                        help="the batched server's --max-batch (default: 64)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="the servers' --max-wait-ms (default: 5)")
    parser.add_argument("--device", default="cpu", help="device for the server and predict (default: cpu)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    found = walk_images(args.pngs)[0]
    if len(found) < args.requests:
        raise SystemExit(f"{args.pngs} holds {len(found)} image files, fewer than --requests {args.requests}")
    files = [found[i * len(found) // args.requests] for i in range(args.requests)]  # spread over the classes
    bodies = [f.read_bytes() for f in files]
    batched = measure_server(args, bodies, args.max_batch)
    single = measure_server(args, bodies, 1)
    predict = measure_predict(args, files)
    checks = targets(batched, single, predict)
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'MISS'}  {name}")
    if args.out:
        args.out.write_text(json.dumps({"batched": batched, "max_batch_1": single, "predict": predict,
                                        "targets": checks}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
