"""`optimizer.name: muon`: Muon (momentum orthogonalized by a Newton-Schulz iteration, Jordan et al. 2024) for
the convolution filters, SGD (Nesterov if set) for every other parameter, in one optimizer object, as the
airbench94_muon recipe splits them. One object keeps the trainer unchanged: its parameter groups carry
`lr_scale` and `until_epoch` like the other optimizers' (the schedule sets each group's lr), and its
state_dict is what checkpoints save and exact resume loads.

Why not `torch.optim.Muon`: it accepts only 2-D parameters (it raises on a 4-D conv weight), and it would need
a second optimizer object for the other parameters, which the checkpoint, Lookahead, schedule and CUDA-graph
code (each written for one optimizer) would all have to learn about. Reshaping views into it would still leave
the second object. The orthogonalization itself is a few lines, written here."""

from __future__ import annotations

import torch

# The quintic Newton-Schulz coefficients of the Muon write-up: they push every singular value of a matrix with
# norm <= 1 into roughly [0.7, 1.2] in 5 steps (fast rather than exact convergence to 1).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """An approximation of U V^T for a 2-D `g` = U S V^T: the same singular vectors, singular values near 1.
    The iteration runs in fp32 and returns `g`'s dtype (docs/presets.md compares the published bf16 one)."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the wide form: X X^T is then the smaller product
        x = x.T
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x.T if tall else x).to(g.dtype)


class MuonSGD(torch.optim.Optimizer):
    """Groups with `muon: True` (4-D conv filters): momentum (Nesterov if `nesterov`), the result
    orthogonalized as an (out_channels, in_channels x kh x kw) matrix and scaled by sqrt(max(1, rows / cols));
    before each step the filter is rescaled to norm sqrt(out_channels), as the published recipe does, in place
    of weight decay (every conv here feeds a BatchNorm, so a filter's scale only sets its effective learning
    rate). Other groups: exactly torch.optim.SGD with dampening 0 (L2 decay added to the gradient, then
    momentum, Nesterov if set). Each group has its own momentum. The learning rate may be a device tensor
    (CUDA graph replay), so it only ever multiplies tensors."""

    def __init__(self, params, lr: float, momentum: float, nesterov: bool, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      muon=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if wd and not group["muon"]:
                    g = g.add(p, alpha=wd)
                state = self.state[p]
                if "momentum_buffer" not in state:  # zero, so a first step is the gradient, as in SGD
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.mul_(m).add_(g)
                d = g.add(buf, alpha=m) if group["nesterov"] else buf
                if group["muon"]:
                    matrix = d.reshape(d.shape[0], -1)
                    scale = max(1.0, matrix.shape[0] / matrix.shape[1]) ** 0.5
                    d = orthogonalize(matrix).reshape(d.shape) * scale
                    p.mul_(p.shape[0] ** 0.5 / (p.norm() + 1e-12))
                p.sub_(d * lr)
        return loss
