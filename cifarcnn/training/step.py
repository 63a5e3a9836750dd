"""One optimisation step and what it needs: the model built and placed, the optimizer's parameter groups, the
learning-rate schedule, lookahead averaging, the step itself (replayed as a CUDA graph on one GPU) and the warm-up
that compiles, autotunes and captures before the clock starts. The trainer and `bench` share them."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base.config import Config, OptimizerConfig
from ..base.inference import Settings, infer
from ..base.precision import autocast
from ..data.dataset import MEAN, STD, normalize_
from ..data.loader import Loader
from ..models.contract import Model
from ..models.registry import build_model
from .muon import MuonSGD

CHANNELS_LAST = torch.channels_last


def build_optimizer(cfg: Config, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """Parameter groups: BatchNorm parameters (lr x bias_lr_scale, decay / bias_lr_scale), the rest, and one
    group per parameter the model trains only for its first epochs (`model.train_epochs`, name -> epochs)."""
    o = cfg.optimizer
    norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters()}
    limited = model.train_epochs if isinstance(model, Model) else {}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for n, p in named if n not in limited]
    groups = [
        {"params": [p for p in trainable if id(p) not in norm_ids], "lr_scale": 1.0, "weight_decay": o.weight_decay,
         "until_epoch": None},
        {"params": [p for p in trainable if id(p) in norm_ids], "lr_scale": o.bias_lr_scale,
         "weight_decay": o.weight_decay / o.bias_lr_scale, "until_epoch": None},
    ]
    groups += [{"params": [p], "lr_scale": 1.0, "weight_decay": o.weight_decay, "until_epoch": limited[n]}
               for n, p in named if n in limited]
    cuda = device.type == "cuda"
    if o.name == "muon":
        return MuonSGD(_muon_groups(groups, o), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, fused=cuda or None)
    optimizer_class = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    # capturable: the step may be recorded in a CUDA graph (TrainStep)
    return optimizer_class(groups, lr=o.lr, fused=cuda or None, capturable=cuda)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer `state` (momentum buffers, Adam moments, step counts) into `optimizer`,
    built from the current config, keeping the hyperparameters its groups were built with: torch's
    load_state_dict would restore the saved ones, silently dropping a resume's overrides (weight_decay,
    momentum, nesterov, bias_lr_scale, muon_lr, muon_momentum) and scaling the Muon group by the new lr over
    the old (its lr_scale is muon_lr / lr). The groups hold the same parameters in the same order
    (load_state_dict checks it)."""
    built = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, hyperparameters in zip(optimizer.param_groups, built):
        group.update(hyperparameters)


def _muon_groups(groups: list[dict], o: OptimizerConfig) -> list[dict]:
    """Each group split three ways, as the airbench94_muon recipe groups them: conv filters (4-D) to Muon at
    muon_lr and muon_momentum; biases (1-D: BatchNorm's and the whitening bias) to SGD at lr x bias_lr_scale; the
    rest (the classifier's weights) to SGD at lr. Weight decay stays per step what the group had (lr x decay)."""
    split = []
    for group in groups:
        filters = [p for p in group["params"] if p.ndim == 4]
        biases = [p for p in group["params"] if p.ndim == 1]
        rest = [p for p in group["params"] if p.ndim not in (1, 4)]
        per_step_decay = group["lr_scale"] * group["weight_decay"]
        split += [{**group, "params": rest, "muon": False}] if rest else []
        split += [{**group, "params": biases, "muon": False, "lr_scale": o.bias_lr_scale,
                   "weight_decay": per_step_decay / o.bias_lr_scale}] if biases else []
        split += [{**group, "params": filters, "muon": True, "lr_scale": o.muon_lr / o.lr,
                   "momentum": o.muon_momentum, "weight_decay": 0.0}] if filters else []
    return split


def make_model(cfg: Config, num_classes: int, train_images: torch.Tensor, device: torch.device, *,
               mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> nn.Module:
    """The configured model for `num_classes` classes at the training images' size, seeded, initialised from
    training images (normalised with the dataset's `mean` and `std`) where it needs them (FastNet's whitening uses
    the first 5,000), in channels_last on `device`."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes, train_images.shape[-1])
    if model.init_image_count:
        model.init_from_data(normalize_(train_images[:model.init_image_count].float() / 255, mean, std))
    return model.to(device, memory_format=CHANNELS_LAST)


def learning_rate(cfg: Config, epoch_progress: float) -> float:
    """The learning rate after `epoch_progress` epochs (fractional); a pure function, so resume needs no state."""
    s, peak = cfg.scheduler, cfg.optimizer.lr
    if epoch_progress < s.warmup_epochs:
        return peak * (s.warmup_factor + (1 - s.warmup_factor) * epoch_progress / s.warmup_epochs)
    if s.name == "constant":
        return peak
    length = (s.epochs or cfg.epochs) - s.warmup_epochs
    t = min((epoch_progress - s.warmup_epochs) / length, 1.0) if length > 0 else 1.0
    shape = 1 - t if s.name == "linear" else 0.5 * (1 + math.cos(math.pi * t))
    return s.min_lr + (peak - s.min_lr) * shape


class Lookahead:
    """Every `every` steps the running average of the weights moves toward the model and the model is reset to
    it (Zhang et al. 2019; the cubic decay schedule of Jordan 2024). At the end the model takes the average."""

    def __init__(self, model: nn.Module, every: int):
        self.every = every
        live = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        self._live = list(live.values())  # share storage with the model's parameters and buffers
        self.average = {k: v.detach().clone() for k, v in live.items()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        average = list(self.average.values())
        torch._foreach_lerp_(average, self._live, 1 - decay)
        torch._foreach_copy_(self._live, average)

    def maybe_update(self, model: nn.Module, step: int, total_steps: int) -> None:
        if step % self.every == 0:
            self.update(model, 0.95**self.every * (step / total_steps) ** 3)


class WeightAverage:
    """An exponential moving average of the model's weights and BatchNorm statistics, updated after every step
    (`ema_decay`). At a high learning rate it is a much better model than the weights being trained (+6 to +15
    points of test accuracy after the first epochs of the quick preset), so a run validates, tests and saves it;
    with a decay proportional to the learning rate it meets the trained weights as the rate falls to 0."""

    def __init__(self, model: nn.Module, decay: float):
        live = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        self._live = list(live.values())  # share storage with the model's parameters and buffers
        self.average = {k: v.detach().clone() for k, v in live.items()}
        self.decay = decay

    @torch.no_grad()
    def update(self, lr_fraction: float) -> None:
        """One step with decay `decay` x `lr_fraction` (the learning rate over its peak)."""
        torch._foreach_lerp_(list(self.average.values()), self._live, 1 - self.decay * lr_fraction)

    def state_dict(self, model: nn.Module) -> dict:
        """The model's state dict with the averaged tensors in place of the trained ones."""
        return {k: self.average.get(k, v) for k, v in model.state_dict().items()}

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside, the model holds the average (copied in place, so CUDA graphs stay valid); the trained weights
        are put back afterwards."""
        with torch.no_grad():
            trained = [t.clone() for t in self._live]
            torch._foreach_copy_(self._live, list(self.average.values()))
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._live, trained)


@contextlib.contextmanager
def restored_afterwards(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Warm-up steps run inside leave no trace: every model and optimizer tensor is put back in place (in place,
    so captured CUDA graphs keep valid addresses), and optimizer state the warm-up created is zeroed, which
    steps exactly like a fresh optimizer's (Adam: zero moments at step 0; SGD: a zero momentum buffer)."""
    tensors = [*model.state_dict().values(),
               *(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))]
    saved = [t.detach().clone() for t in tensors]
    fresh = not optimizer.state
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved):
                tensor.copy_(value)
            if fresh:
                for state in optimizer.state.values():
                    for value in state.values():
                        if isinstance(value, torch.Tensor):
                            value.zero_()


class TrainStep:
    """One optimisation step on a batch; returns (loss, logits, gradient norm), all left on the device.

    On a single CUDA device, each batch shape's step (forward, backward, gradient norm, optimizer; compiled or
    not) is captured once as a CUDA graph and replayed: for small models the GPU otherwise waits on hundreds of
    kernel launches per step. The outputs of a replayed step are overwritten by the next one.
    Learning rates then live in device tensors: set them with `set_lr`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, device: torch.device,
                 precision: str):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.forward = torch.compile(model) if cfg.compile else model
        self.label_smoothing = cfg.label_smoothing
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.use_graphs = device.type == "cuda" and not self.distributed
        self.graphs: dict[tuple, tuple] = {}
        self.precision = precision  # "bf16": autocast (`inference.settings_for` chose it)

    def freeze(self, frozen: list[nn.Parameter]) -> None:
        """Compute no gradient for `frozen` (the other parameters train), which also skips the backward only they
        need: for FastNet's whitening bias, the first conv block's input gradient (3.8% of a step's FLOPs).
        Under DistributedDataParallel, which waits for every parameter's gradient, this does nothing; the
        trainer gives frozen parameters learning rate 0 either way."""
        if self.distributed:
            return
        frozen_ids = {id(p) for p in frozen}
        for p in self.params:
            p.requires_grad_(id(p) not in frozen_ids)

    def set_lr(self, group: dict, lr: float) -> None:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr

    def _step(self, x: torch.Tensor, y: torch.Tensor, cache: bool = True):
        with autocast(self.device, self.precision, cache):
            logits = self.forward(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Measured on the fresh gradients, before the step (the original workflow read stale ones).
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        self.optimizer.step()
        return loss.detach(), logits.detach(), grad_norm

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.use_graphs:
            return self._step(x, y)
        key = self.graph_key(x)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(x, y)
            except Exception as e:  # an op or optimizer that cannot be captured: run eagerly instead
                print(f"CUDA graph capture failed, continuing without graphs ({str(e).splitlines()[0]})")
                self.use_graphs = False
                for group in self.optimizer.param_groups:
                    group["lr"] = float(group["lr"])
                return self._step(x, y)
        graph, static_x, static_y, outputs, _ = self.graphs[key]
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        return outputs

    def graph_key(self, x: torch.Tensor) -> tuple:
        """What a captured step depends on besides the values: the batch's shape and strides, which parameters
        train, every module's train/eval mode (a graph recorded with BatchNorm in train mode updates its
        running statistics on every replay; `finetune: head` keeps them in eval mode) and the precision."""
        return (tuple(x.shape), x.stride(), tuple(p.requires_grad for p in self.params),
                tuple(m.training for m in self.model.modules()), self.precision)

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """Warm up on a side stream (as CUDA graph capture requires), put every tensor the warm-up changed
        back in place, then record one step."""
        # Every graph reads the learning rates from the same device tensors, created once and kept alive here:
        # a graph holds raw addresses, and a replaced tensor's memory would be reused for something else.
        for group in self.optimizer.param_groups:
            if not (isinstance(group["lr"], torch.Tensor) and group["lr"].is_cuda):
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
        static_x, static_y = x.clone(), y.clone()
        with restored_afterwards(self.model, self.optimizer):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side):
                    for _ in range(3):
                        self._step(static_x, static_y, cache=False)
            finally:
                torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._step(static_x, static_y, cache=False)
        return graph, static_x, static_y, outputs, [group["lr"] for group in self.optimizer.param_groups]


def trains_in(group: dict, epoch: int) -> bool:
    """Whether a parameter group still learns in epoch `epoch` (0-based): its `until_epoch`, if any, is not over."""
    return group["until_epoch"] is None or epoch < group["until_epoch"]


def frozen_at(optimizer: torch.optim.Optimizer, epoch: int) -> list[nn.Parameter]:
    """The parameters whose training epochs are over in epoch `epoch` (0-based)."""
    return [p for group in optimizer.param_groups if not trains_in(group, epoch) for p in group["params"]]


def warm_up(step: TrainStep, train_loader: Loader, eval_loaders: list[Loader], settings: Settings,
            epochs: range = range(1), train_mode: Callable[[nn.Module], object] = nn.Module.train) -> None:
    """Run every batch shape and set of frozen parameters that training over `epochs` and evaluation will meet
    (torch.compile compiles, cuDNN autotunes, CUDA graphs are captured), then restore the state, so this
    one-time work happens before the clock starts and does not change the run. `train_mode(model)` sets the
    modules' modes as training will (the graphs are keyed on them). Call it after any checkpoint is loaded:
    graphs hold the optimizer state's addresses."""
    model = step.model
    modes = [m.training for m in model.modules()]
    trainable = [p.requires_grad for p in step.params]
    phases = {tuple(map(id, frozen)): frozen for frozen in (frozen_at(step.optimizer, e) for e in epochs)}
    with restored_afterwards(model, step.optimizer):
        x, y = next(iter(train_loader))
        train_mode(model)
        for frozen in phases.values():
            step.freeze(frozen)
            for size in _batch_sizes(train_loader):
                for _ in range(2):
                    step(x[:size], y[:size])
        model.eval()
        for loader in eval_loaders:
            x, _ = next(iter(loader))
            for size in _batch_sizes(loader):
                infer(step.forward, x[:size], settings)
    for module, training in zip(model.modules(), modes):
        module.training = training
    for p, requires_grad in zip(step.params, trainable):
        p.requires_grad_(requires_grad)


def _batch_sizes(loader: Loader) -> set[int]:
    """The full batch size and that of the last, partial batch."""
    return {loader.batch_size, len(loader.images) % loader.batch_size or loader.batch_size}


def sync(device: torch.device) -> None:
    """Wait for the GPU to finish the work queued so far (clocks are read after it); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
