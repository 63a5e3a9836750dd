"""Training through imbalanced classes (`data.balance`), from the training images' class counts:
`weighted_loss` weighs each image's cross-entropy by its class's inverse frequency (normalized to mean 1 over
the classes); `logit_adjust` adds the log of the class prior to the logits in the training loss only (balanced
softmax: Ren et al. 2020; logit-adjusted loss with tau = 1: Menon et al. 2021), so the model
learns the logits of a balanced world and predicts as it is (label smoothing then spreads its share by the
prior: spread evenly, the adjusted loss's optimum would rank a 1%-prior class first for any image);
`sampling` draws each epoch's images with every class equally likely (the Loader, data/loader.py). On classes
of equal size each is exactly `none`. `auto` is `logit_adjust` when the training classes are imbalanced above
3:1 (base.metrics, where the banner warns), else `none`: the option measured best on CIFAR-10-LT, and CIFAR's
runs (a few images apart per class) as they were."""

from __future__ import annotations

import torch

from ..base.metrics import is_imbalanced


def resolve(balance: str, counts: torch.Tensor | list[int]) -> str:
    """The option `balance` trains with on these training class counts (`auto` chooses)."""
    if balance != "auto":
        return balance
    return "logit_adjust" if is_imbalanced([int(n) for n in counts]) else "none"


def loss_terms(balance: str, counts: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(class weights for the cross-entropy, log prior added to the logits): None where `balance` leaves
    that part of the loss as it is, or the classes are all the same size. An empty class counts as one
    image."""
    balance = resolve(balance, counts)
    counts = torch.as_tensor(counts).float().clamp(min=1)
    if bool((counts == counts[0]).all()):
        return None, None
    if balance == "weighted_loss":
        inverse = 1 / counts
        return inverse / inverse.mean(), None
    if balance == "logit_adjust":
        return None, (counts / counts.sum()).log()
    return None, None
