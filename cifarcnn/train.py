"""The training loop: optimiser, schedule, validation, early stopping, checkpoints, resume and TensorBoard."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import FORMAT, load_checkpoint, save_checkpoint
from .config import Config, UsageError, make_config, save_config
from .data import Loader, load_cifar10, split_train_val
from .device import select_device
from .environment import record_session
from .evaluate import predict_logits
from .model import build_model
from .storage import atomic_write_text


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    optimizer_class = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return optimizer_class(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def learning_rate(cfg: Config, epoch_progress: float) -> float:
    """The learning rate after `epoch_progress` epochs (fractional); a pure function, so resume needs no state."""
    s = cfg.scheduler
    if s.name == "constant":
        return cfg.optimizer.lr
    length = s.epochs or cfg.epochs
    t = min(epoch_progress / length, 1.0)
    return s.min_lr + (cfg.optimizer.lr - s.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def default_run_dir(runs_dir: Path, name: str | None) -> Path:
    return Path(runs_dir) / (name or datetime.now().strftime("%Y%m%d-%H%M%S"))


def _validate(model: nn.Module, loader: Loader, desc: str) -> tuple[float, float]:
    logits, labels = predict_logits(model, loader, desc=desc)
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return loss, accuracy


def train(cfg: Config, run_dir: Path, *, data_dir: str | Path | None = None, device: str | None = None,
          resume: bool = False, on_epoch_end: Callable[[dict], bool] | None = None) -> dict:
    """Train `cfg` into `run_dir` (or continue the run there when `resume`); returns the last checkpoint state.

    `on_epoch_end(metrics)` is called after each epoch's checkpoint; returning True stops the run there.
    """
    from torch.utils.tensorboard import SummaryWriter  # slow import, only needed here

    run_dir = Path(run_dir)
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(run_dir / "last.pt")
    elif (run_dir / "last.pt").exists():
        raise UsageError(f"run folder {run_dir} already holds a run: continue it with --resume {run_dir}, "
                        f"or pick another --name")
    device = select_device(device)

    data = load_cifar10(data_dir)
    (train_x, train_y), (val_x, val_y) = split_train_val(data.train_images, data.train_labels,
                                                         cfg.data.val_size, cfg.data.split_seed)
    train_loader = Loader(train_x, train_y, cfg.batch_size, device=device, augment=cfg.augment, shuffle=True,
                          seed=cfg.seed)
    val_loader = Loader(val_x, val_y, cfg.eval_batch_size, device=device)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, len(data.classes)).to(device)
    optimizer = build_optimizer(cfg, model)
    state = {
        "format": FORMAT, "model": cfg.model, "num_classes": len(data.classes),
        "classes": list(data.classes), "epoch": 0, "best_val_acc": -1.0, "best_epoch": 0,
        "epochs_since_best": 0, "stopped_early": False, "history": [],
    }
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model_state"])
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        state.update({k: checkpoint[k] for k in ("epoch", "best_val_acc", "best_epoch", "epochs_since_best",
                                                 "stopped_early", "history")})
    if state["stopped_early"] or state["epoch"] >= cfg.epochs:
        print(f"{run_dir}: training already finished after {state['epoch']} epochs; nothing to do")
        return state

    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    record_session(run_dir, device, state["epoch"] + 1)
    steps_per_epoch = len(train_loader)
    # On resume, drop events an interrupted run logged after its last checkpoint.
    writer = SummaryWriter(str(run_dir / "tensorboard"),
                           purge_step=state["epoch"] * steps_per_epoch if resume else None)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"training {cfg.model} on {device} for {cfg.epochs} epochs ({len(train_x)} train / {len(val_x)} val "
          f"images, {steps_per_epoch} steps per epoch) -> {run_dir}")
    try:
        for epoch in range(state["epoch"], cfg.epochs):
            started = time.perf_counter()
            model.train()
            lr_at_start = learning_rate(cfg, epoch)
            # Running sums stay on the device; they are read once per logging interval.
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            grad_norm_sum = torch.zeros((), device=device)
            seen = 0
            bar = tqdm(train_loader.epoch(epoch), total=steps_per_epoch, leave=False, dynamic_ncols=True,
                       miniters=cfg.log_every, mininterval=0, desc=f"epoch {epoch + 1}/{cfg.epochs} train")
            for step, (x, y) in enumerate(bar):
                lr = learning_rate(cfg, epoch + step / steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm_sum += torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                optimizer.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                if (step + 1) % cfg.log_every == 0 or step + 1 == steps_per_epoch:
                    writer.add_scalar("Loss/train_step", loss.item(), epoch * steps_per_epoch + step + 1)
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.2%}",
                                    refresh=False)
            bar.close()
            model.eval()
            val_loss, val_acc = _validate(model, val_loader, f"epoch {epoch + 1}/{cfg.epochs} val")
            metrics = {
                "epoch": epoch + 1, "train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
                "val_loss": val_loss, "val_acc": val_acc, "lr": lr_at_start,
                "grad_norm": grad_norm_sum.item() / steps_per_epoch, "seconds": time.perf_counter() - started,
            }
            improved = val_acc > state["best_val_acc"]
            state["history"].append(metrics)
            state["epoch"] = epoch + 1
            if improved:
                state.update(best_val_acc=val_acc, best_epoch=epoch + 1, epochs_since_best=0)
            else:
                state["epochs_since_best"] += 1
            state["stopped_early"] = bool(cfg.patience) and state["epochs_since_best"] >= cfg.patience
            state.update(config=cfg.to_dict(), model_state=model.state_dict(),
                         optimizer_state=optimizer.state_dict(), rng={"torch": torch.get_rng_state()})
            if improved:
                save_checkpoint(run_dir / "best.pt", state)
            save_checkpoint(run_dir / "last.pt", state)
            atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in state["history"]))
            _log_epoch(writer, metrics, (epoch + 1) * steps_per_epoch)
            tqdm.write(f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {metrics['train_loss']:.4f} "
                       f"acc {metrics['train_acc']:.2%}  val loss {val_loss:.4f} acc {val_acc:.2%}  "
                       f"lr {lr_at_start:.2e}  {metrics['seconds']:.1f}s" + ("  *best*" if improved else ""))
            if state["stopped_early"]:
                tqdm.write(f"early stopping: no validation improvement for {cfg.patience} epochs "
                           f"(best {state['best_val_acc']:.2%} at epoch {state['best_epoch']})")
                break
            if on_epoch_end is not None and on_epoch_end(metrics):
                break
    finally:
        writer.close()
    print(f"best validation accuracy {state['best_val_acc']:.2%} at epoch {state['best_epoch']}; "
          f"checkpoints in {run_dir} (evaluate with: cifarcnn evaluate {run_dir})")
    return state


def _log_epoch(writer, metrics: dict, step: int) -> None:
    """Epoch scalars at the global step where the epoch ended, so a resume's purge_step applies to all tags."""
    for tag, key in (("Loss/train", "train_loss"), ("Loss/val", "val_loss"), ("Accuracy/train", "train_acc"),
                     ("Accuracy/val", "val_acc"), ("LearningRate", "lr"), ("GradientNorm", "grad_norm")):
        writer.add_scalar(tag, metrics[key], step)
    writer.flush()


def resume_config(run_dir: Path, overrides: list[str] = ()) -> Config:
    """The config a run was trained with (from its last checkpoint), with overrides on top."""
    checkpoint = load_checkpoint(Path(run_dir) / "last.pt")
    return make_config(checkpoint["config"], overrides)
