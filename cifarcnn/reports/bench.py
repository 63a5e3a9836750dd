"""`cifarcnn bench`: training throughput of the full pipeline against compute alone, and evaluation
throughput.

The pipeline rate covers everything training does per image (batch selection, augmentation, normalization,
forward, backward, optimizer step): each round is one whole epoch over the first `steps` x batch training
images, so the loader's once-per-epoch augmentation is paid in every round, in proportion. The compute-only
rate runs the same step of the same model on one fixed random batch. Both are measured in alternating rounds
in the same process, and the median round counts, so their ratio is fair even on a busy machine.
"""

from __future__ import annotations

import copy
import functools
import itertools
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..base.config import Config
from ..base.device import select_device
from ..base.errors import ConfigError
from ..base.inference import predict_logits, settings_for
from ..base.storage import atomic_write_json
from ..data.loader import training_split
from ..data.sources import load_dataset
from ..training.build import CHANNELS_LAST, eval_loader, make_model, make_step, train_loader
from ..training.step import sync, warm_up


def _rate(fn: Callable[[], object], calls: int, images_per_call: int, device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return calls * images_per_call / (time.perf_counter() - started)


def train_flops_per_image(model: torch.nn.Module, image_size: int = 32, batch: int = 8) -> float:
    """FLOPs of one training step's forward and backward per image (convolutions and matmuls, as
    torch.utils.flop_counter counts them), on a CPU copy of `model` in fp32: the count does not depend on the
    precision or the device."""
    replica = copy.deepcopy(model).float().cpu().train()
    x = torch.randn(batch, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        replica(x).float().logsumexp(1).sum().backward()
    return counter.get_total_flops() / batch


def matmul_flops_per_s(device: torch.device, precision: str, size: int = 2048, repeats: int = 5) -> float:
    """The device's dense matmul rate (size x size, in `precision`), the ceiling model FLOPs utilization is
    measured against: the median of `repeats` timed products after one warm-up."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    rates = [_rate(lambda: a @ b, 1, 1, device) * 2 * size**3 for _ in range(repeats)]
    return statistics.median(rates)


def bench(cfg: Config, *, data_dir: str | Path | None = None, device: str | None = None, steps: int = 30,
          warmup: int = 5, rounds: int = 3) -> dict:
    """The throughput of `cfg`'s training (full pipeline and compute only, `rounds` rounds of `steps` steps
    after `warmup` of each) and evaluation on `device`, with the model's FLOPs and utilization; `report`
    prints it."""
    device = select_device(device)
    data = load_dataset(cfg.data, data_dir, device=device)
    (train_x, train_y), _ = training_split(data, cfg.data)
    steps = min(steps, len(train_x) // cfg.batch_size)
    if not steps:
        raise ConfigError(f"config key 'batch_size' is {cfg.batch_size}, more than the {len(train_x)} "
                          f"training images: bench needs at least one full batch")
    images = steps * cfg.batch_size  # each round, an epoch over the first `steps` batches' worth
    loader = train_loader(cfg, train_x[:images], train_y[:images], data, device)
    test_loader = eval_loader(cfg, data.test_images, data.test_labels, data, device)
    model = make_model(cfg, len(data.classes), train_x, device, mean=data.mean, std=data.std)
    settings = settings_for(cfg.to_dict(), device)  # the views and precision evaluate would use
    step = make_step(cfg, model, device, settings.precision)
    if cfg.compile:
        warm_up(step, loader, [test_loader], settings)
    model.train()

    size = data.image_size
    fixed_x = torch.randn(cfg.batch_size, 3, size, size, device=device)
    fixed_x = fixed_x.contiguous(memory_format=CHANNELS_LAST)
    fixed_y = torch.randint(0, len(data.classes), (cfg.batch_size,), device=device)
    for x, y in itertools.islice(loader.epoch(0), warmup):
        step(x, y)
        step(fixed_x, fixed_y)
    epochs = itertools.count(1)

    def one_epoch() -> None:
        for x, y in loader.epoch(next(epochs)):
            step(x, y)

    pipeline, compute = [], []
    for _ in range(rounds):
        pipeline.append(_rate(one_epoch, 1, len(loader.images), device))
        compute.append(_rate(lambda: step(fixed_x, fixed_y), steps, cfg.batch_size, device))
    evaluate = functools.partial(predict_logits, step.forward, test_loader, settings)
    evaluate()  # warm-up
    evaluation = _rate(evaluate, 1, len(data.test_images), device)
    result = {
        "model": cfg.model, "dataset": data.name, "image_size": size, "device": str(device),
        "device_name": _device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "batch_size": cfg.batch_size, "eval_batch_size": cfg.eval_batch_size, "tta": cfg.tta,
        "compile": cfg.compile,
        "precision": settings.precision, "precision_reason": settings.precision_reason,
        "steps_per_round": steps, "rounds": rounds,
        "train_images_per_s": statistics.median(pipeline),
        "compute_only_images_per_s": statistics.median(compute),
        "eval_images_per_s": evaluation,
        "train_rounds": pipeline, "compute_only_rounds": compute,
    }
    result["pipeline_over_compute"] = result["train_images_per_s"] / result["compute_only_images_per_s"]
    result.update(utilization(model, device, settings.precision, result["train_images_per_s"], size))
    return result


def utilization(model: torch.nn.Module, device: torch.device, precision: str, images_per_s: float,
                image_size: int = 32) -> dict:
    """FLOPs per training image, the training FLOP/s they make at `images_per_s`, the device's matmul FLOP/s
    in the same precision, and their ratio: model FLOPs utilization (MFU)."""
    flops = train_flops_per_image(model, image_size)
    peak = matmul_flops_per_s(device, precision)
    achieved = flops * images_per_s
    return {"train_flops_per_image": flops, "train_flops_per_s": achieved, "matmul_flops_per_s": peak,
            "matmul_precision": precision, "mfu": achieved / peak}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def report(result: dict, out: Path | None) -> None:
    size = f"{result['image_size']}x{result['image_size']}"
    print(f"bench {result['model']} on {result['dataset']} ({size}) on {result['device']} "
          f"({result['device_name']}, torch {result['torch']}, {result['threads']} threads), "
          f"batch {result['batch_size']}")
    print(f"  precision: {result['precision']} ({result['precision_reason']})")
    print(f"  training, full pipeline:  {result['train_images_per_s']:>10,.0f} images/s")
    print(f"  training, compute only:   {result['compute_only_images_per_s']:>10,.0f} images/s")
    print(f"  pipeline / compute only:  {result['pipeline_over_compute']:>10.1%}")
    print(f"  evaluation (batch {result['eval_batch_size']}, tta {result['tta']}): "
          f"{result['eval_images_per_s']:,.0f} images/s")
    print(f"  model FLOPs per training image: {result['train_flops_per_image'] / 1e6:,.1f} MFLOP "
          f"(forward + backward)")
    print(f"  training, full pipeline: {result['train_flops_per_s'] / 1e9:,.1f} GFLOP/s of "
          f"{result['matmul_flops_per_s'] / 1e9:,.1f} GFLOP/s ({result['matmul_precision']} dense matmul "
          f"here): MFU {result['mfu']:.1%}")
    if out is not None:
        atomic_write_json(out, result)
        print(f"wrote {out}")
