"""Training through imbalanced classes (`data.balance`), from the training images' class counts:
`weighted_loss` weighs each image's cross-entropy by its class's inverse frequency (normalized to mean 1 over
the classes); `logit_adjust` adds the log of the class prior to the logits in the training loss only (balanced
softmax: Ren et al. 2020; logit-adjusted loss with tau = 1: Menon et al. 2021), so the model
learns the logits of a balanced world and predicts as it is (label smoothing then spreads its share by the
prior: spread evenly, the adjusted loss's optimum would rank a 1%-prior class first for any image);
`sampling` draws each epoch's images with every class equally likely (the Loader, data/loader.py). On classes
of equal size each is exactly `none`."""

from __future__ import annotations

import torch


def loss_terms(balance: str, counts: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(class weights for the cross-entropy, log prior added to the logits): None where `balance` leaves
    that part of the loss as it is, or the classes are all the same size. An empty class counts as one
    image."""
    counts = torch.as_tensor(counts).float().clamp(min=1)
    if bool((counts == counts[0]).all()):
        return None, None
    if balance == "weighted_loss":
        inverse = 1 / counts
        return inverse / inverse.mean(), None
    if balance == "logit_adjust":
        return None, (counts / counts.sum()).log()
    return None, None
