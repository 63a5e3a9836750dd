"""What a model's probabilities are worth, and one number that makes them mean what they say.

Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks"): the probabilities become
softmax(logits / T) with one scalar T > 0 fitted on held-out logits. T > 1 softens an over-confident model,
T < 1 sharpens an under-confident one; the argmax, and so every accuracy, is unchanged.

T minimizes the log loss of the top-1 probability as a forecast of the top-1 class being right (a proper
scoring rule for the number `predict` prints and ECE judges), not Guo et al.'s NLL of the true class: where
label smoothing bends the logits, one T cannot fit both, and the NLL fit left the top-1 probabilities
mis-stated (docs/messy-folders.md, "What the probabilities mean"). A golden-section search on log T over a
bounded interval finds it deterministically (float64, no random start, no learning rate).

Expected calibration error: the top-1 confidences fall into `bins` equal-width bins over [0, 1] (a bin holds
confidences in (lo, hi]); ECE is the image-weighted mean over bins of |accuracy - mean confidence|.
"""

from __future__ import annotations

import math

import torch

LOG_T_RANGE = (math.log(0.05), math.log(20.0))  # the temperatures searched; a fit at an end is clipped there
TOLERANCE = 1e-5  # on log T: the fitted T is exact to about 0.001%


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true classes under (N, C) probabilities (each at least 1e-12)."""
    true = probs.double().gather(1, labels.long().view(-1, 1)).squeeze(1)
    return float(-true.clamp_min(1e-12).log().mean())


def top1_log_loss(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean log loss of the top-1 probability of softmax(logits / temperature) as the chance that the top-1
    class is the label: -[right * log p + (1 - right) * log(1 - p)], p clipped to [1e-12, 1 - 1e-12]."""
    top = (logits / temperature).softmax(1).max(1)
    right = (top.indices == labels).double()
    p = top.values.double().clamp(1e-12, 1 - 1e-12)
    return float(-(right * p.log() + (1 - right) * (-p).log1p()).mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimizing `top1_log_loss` on (N, C) held-out `logits` and their `labels`: a
    golden-section search on log T within LOG_T_RANGE, in float64."""
    if len(labels) == 0:
        raise ValueError("fit_temperature needs at least one image")
    logits, labels = logits.detach().double().cpu(), labels.detach().long().cpu()
    ratio = (math.sqrt(5) - 1) / 2
    lo, hi = LOG_T_RANGE
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = top1_log_loss(logits, labels, math.exp(a)), top1_log_loss(logits, labels, math.exp(b))
    while hi - lo > TOLERANCE:
        if fa <= fb:  # the minimum lies in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = top1_log_loss(logits, labels, math.exp(a))
        else:  # in [a, hi]
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = top1_log_loss(logits, labels, math.exp(b))
    return math.exp((lo + hi) / 2)


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict:
    """Per equal-width bin of top-1 confidence: `edges` (bins + 1), and per bin `confidence` (mean top-1
    probability; None when empty), `accuracy` (share of top-1 predictions that are right; None when empty)
    and `count` (images)."""
    confidence, predicted = probs.double().max(1)
    correct = (predicted.cpu() == labels.long().cpu()).double()
    confidence = confidence.cpu()
    # bin i holds (i/bins, (i+1)/bins]; a confidence of exactly 0 cannot occur for a top-1 probability
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins)
    conf_sum = torch.bincount(index, weights=confidence, minlength=bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=bins)
    return {
        "edges": [i / bins for i in range(bins + 1)],
        "confidence": [float(s / n) if n else None for s, n in zip(conf_sum, count)],
        "accuracy": [float(s / n) if n else None for s, n in zip(correct_sum, count)],
        "count": [int(n) for n in count],
    }


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE over `bins` equal-width bins of top-1 confidence: sum over bins of (images in the bin / all images)
    x |accuracy - mean confidence|."""
    table = reliability(probs, labels, bins)
    total = sum(table["count"])
    return sum(n / total * abs(acc - conf) for n, acc, conf
               in zip(table["count"], table["accuracy"], table["confidence"]) if n)


def summary(logits: torch.Tensor, labels: torch.Tensor, temperature: float, bins: int = 15) -> dict:
    """ECE, NLL, mean top-1 probability and the reliability table of `logits`, before (T = 1) and after
    dividing them by `temperature`."""
    out: dict = {"temperature": temperature, "bins": bins}
    for when, t in (("before", 1.0), ("after", temperature)):
        probs = (logits.double() / t).softmax(1)
        out[f"ece_{when}"] = expected_calibration_error(probs, labels, bins)
        out[f"nll_{when}"] = nll(probs, labels)
        out[f"mean_confidence_{when}"] = float(probs.max(1).values.mean())
        out[f"reliability_{when}"] = reliability(probs, labels, bins)
    return out


def calibration_record(logits: torch.Tensor, labels: torch.Tensor, tta: int) -> dict:
    """What a checkpoint stores under `calibration`: the temperature fitted on these validation `logits`
    (computed with TTA level `tta`), how many images, and ECE and NLL before and after it."""
    temperature = fit_temperature(logits, labels)
    scores = summary(logits, labels, temperature)
    return {"temperature": temperature, "fitted_on": "validation", "tta": int(tta),
            "images": int(len(labels)),
            **{key: scores[key] for key in ("ece_before", "ece_after", "nll_before", "nll_after")}}


def describe(record: dict) -> str:
    """One line about a `calibration_record`."""
    return (f"calibration: temperature {record['temperature']:.4f} fitted on {record['images']} "
            f"{record['fitted_on']} images (tta {record['tta']}): ECE {record['ece_before']:.2%} -> "
            f"{record['ece_after']:.2%}, NLL {record['nll_before']:.4f} -> {record['nll_after']:.4f}")
