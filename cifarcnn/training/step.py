"""One training step on a batch (`TrainStep`: forward, loss, backward, gradient norm, optimizer step; replayed
as a CUDA graph on one GPU), and the warm-up that compiles, autotunes and captures before the clock starts,
leaving no trace (`restored_afterwards`). The trainer and `bench` share them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base.config import Config
from ..base.inference import Settings, infer
from ..base.precision import autocast
from ..data.loader import Loader
from .balance import loss_terms
from .optimizers import frozen_at


@contextlib.contextmanager
def restored_afterwards(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Warm-up steps run inside leave no trace: every model and optimizer tensor is put back in place (in
    place, so captured CUDA graphs keep valid addresses), and optimizer state the warm-up created is zeroed,
    which steps exactly like a fresh optimizer's (Adam: zero moments at step 0; SGD: a zero momentum buffer).
    """
    optimizer_tensors = (v for state in optimizer.state.values() for v in state.values()
                         if isinstance(v, torch.Tensor))
    tensors = [*model.state_dict().values(), *optimizer_tensors]
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
    """One optimization step on a batch; returns (loss, logits, gradient norm), all left on the device.

    `precision` "bf16" runs the forward pass under autocast (`inference.settings_for` chooses it). On a single
    CUDA device, each batch shape's step (forward, backward, gradient norm, optimizer; compiled or not) is
    captured once as a CUDA graph and replayed (docs/speed.md says why); the outputs of a replayed step are
    overwritten by the next one, and learning rates live in device tensors: set them with `set_lr`.
    `train_mode(model)` puts the modules in the modes they train in (`finetune.train_mode`; default: all).
    `class_counts` (training images per class) set the loss's class weights or log prior under `data.balance`
    (balance.py), kept on the device.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, device: torch.device,
                 precision: str, train_mode: Callable[[nn.Module], object] = nn.Module.train,
                 class_counts: torch.Tensor | None = None):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.forward = torch.compile(model) if cfg.compile else model
        self.label_smoothing = cfg.label_smoothing
        weight, log_prior = None, None
        if class_counts is not None:
            weight, log_prior = loss_terms(cfg.data.balance, class_counts)
        self.class_weight = None if weight is None else weight.to(device)
        self.log_prior = None if log_prior is None else log_prior.to(device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.use_graphs = device.type == "cuda" and not self.distributed
        self.graphs: dict[tuple, tuple] = {}
        self.precision = precision
        self._train_mode = train_mode

    def set_train_mode(self) -> None:
        """Every module in the mode it trains in."""
        self._train_mode(self.model)

    def freeze(self, frozen: list[nn.Parameter]) -> None:
        """Compute no gradient for `frozen` (the other parameters train), which also skips the backward only
        they need (for FastNet's whitening bias, the first conv block's input gradient). Under
        DistributedDataParallel, which waits for every parameter's gradient, this does nothing; the trainer
        gives frozen parameters learning rate 0 either way."""
        if self.distributed:
            return
        frozen_ids = {id(p) for p in frozen}
        for p in self.params:
            p.requires_grad_(id(p) not in frozen_ids)

    def set_lr(self, group: dict, lr: float) -> None:
        """The learning rate of an optimizer parameter group (in place when a captured graph reads it)."""
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr

    def _step(self, x: torch.Tensor, y: torch.Tensor, cache: bool = True):
        with autocast(self.device, self.precision, cache):
            logits = self.forward(x)
        loss = self.loss(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # measured on this step's gradients, before the optimizer step
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        self.optimizer.step()
        return loss.detach(), logits.detach(), grad_norm

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss: cross-entropy with label smoothing, under `data.balance` weighted by class (a
        weighted mean divides by the batch's summed weights) or on the logits plus the log prior. Under the
        log prior the smoothing mass goes to the classes in proportion to the prior, not evenly: an even share
        would make the logits' optimum favour the rarest classes for every image (balance.py)."""
        if self.log_prior is None:
            return F.cross_entropy(logits, y, weight=self.class_weight, label_smoothing=self.label_smoothing)
        logp = F.log_softmax(logits + self.log_prior, dim=1)
        nll = -logp.gather(1, y[:, None]).squeeze(1)
        spread = -(logp * self.log_prior.exp()).sum(1)
        return ((1 - self.label_smoothing) * nll + self.label_smoothing * spread).mean()

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


def warm_up(step: TrainStep, train_loader: Loader, eval_loaders: list[Loader], settings: Settings,
            epochs: range = range(1)) -> None:
    """Run every batch shape and set of frozen parameters that training over `epochs` and evaluation will meet
    (torch.compile compiles, cuDNN autotunes, CUDA graphs are captured), then restore the state, so this
    one-time work happens before the clock starts and does not change the run. The modules train in the modes
    `step.set_train_mode` sets (the graphs are keyed on them). Call it after any checkpoint is loaded: graphs
    hold the optimizer state's addresses."""
    model = step.model
    modes = [m.training for m in model.modules()]
    trainable = [p.requires_grad for p in step.params]
    phases = {tuple(map(id, frozen)): frozen for frozen in (frozen_at(step.optimizer, e) for e in epochs)}
    with restored_afterwards(model, step.optimizer):
        x, y = next(iter(train_loader))
        step.set_train_mode()
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
