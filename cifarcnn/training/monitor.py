"""Which validation metric a run follows (the `monitor` key), the best epoch by it, and the lines a run starts
with about its classes: the counts per side, the imbalance warning, the metric followed and why.

`monitor: auto` follows balanced accuracy when the training side is imbalanced above 3:1 (base.metrics), plain
accuracy otherwise, so a balanced dataset keeps the best checkpoint and early stopping it always had."""

from __future__ import annotations

from collections.abc import Sequence

from ..base.config import BALANCE
from ..base.metrics import IMBALANCED, describe_counts, imbalance_ratio, is_imbalanced

HISTORY_KEYS = {"accuracy": "val_acc", "balanced_accuracy": "val_balanced_acc"}  # monitor -> history key
NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy"}
BALANCE_OPTIONS = " | ".join(b for b in BALANCE if b != "none")  # the values of data.balance that act


def choose_monitor(monitor: str, train_counts: Sequence[int]) -> tuple[str, str]:
    """(the metric followed: accuracy or balanced_accuracy, why)."""
    ratio = imbalance_ratio(train_counts) or 1.0
    if monitor != "auto":
        return monitor, f"monitor={monitor}"
    if is_imbalanced(train_counts):
        return "balanced_accuracy", f"auto: the training classes are {ratio:.1f}:1, above {IMBALANCED:.0f}:1"
    return "accuracy", f"auto: the training classes are {ratio:.1f}:1, not above {IMBALANCED:.0f}:1"


def best_so_far(history: Sequence[dict], monitor: str) -> float:
    """The best value of the monitored metric over `history` (-1 before any)."""
    key = HISTORY_KEYS[monitor]
    return max((row[key] for row in history if row.get(key) is not None), default=-1.0)


def track_best(state: dict, metrics: dict, monitor: str, patience: int, validated: bool) -> bool:
    """Whether the epoch of `metrics` (already last in state["history"]) has the best model so far by
    `monitor`; updates best_epoch, best_val_acc (the validation accuracy of the best epoch), the epochs
    since the best and stopped_early. Without a validation set the latest model is the best one."""
    if not validated:
        state["best_epoch"] = metrics["epoch"]
        return True
    improved = metrics[HISTORY_KEYS[monitor]] > best_so_far(state["history"][:-1], monitor)
    if improved:
        state.update(best_val_acc=metrics["val_acc"], best_epoch=metrics["epoch"], epochs_since_best=0)
    else:
        state["epochs_since_best"] += 1
    state["stopped_early"] = bool(patience) and state["epochs_since_best"] >= patience
    return improved


def best_text(state: dict) -> str:
    """The best epoch's validation figure by the run's monitor: `balanced accuracy 81.20% (accuracy
    88.00%)`, or `accuracy 88.00%`."""
    monitor = state.get("monitor", "accuracy")
    row = next((r for r in state.get("history", []) if r["epoch"] == state["best_epoch"]), {})
    if monitor == "balanced_accuracy" and row.get("val_balanced_acc") is not None:
        return f"balanced accuracy {row['val_balanced_acc']:.2%} (accuracy {state['best_val_acc']:.2%})"
    return f"accuracy {state['best_val_acc']:.2%}"


def class_lines(classes: Sequence[str], counts: dict[str, list[int]], monitor: str, why: str,
                balance: str, validated: bool) -> list[str]:
    """The lines a run starts with about its classes: counts per side, the imbalance warning (above 3:1 on
    the training side, naming data.balance), and which metric the best checkpoint and early stopping follow.
    """
    sides = "; ".join(f"{side} {describe_counts(classes, n)}" for side, n in counts.items())
    lines = [f"class counts: {sides}"]
    train = counts["train"]
    if is_imbalanced(train):
        smallest = min((n, name) for name, n in zip(classes, train) if n)
        largest = max((n, name) for name, n in zip(classes, train))
        if balance == "none":
            advice = f"to train through it, set data.balance={BALANCE_OPTIONS}"
        elif balance == "auto":  # above 3:1, auto is logit adjustment (balance.resolve)
            advice = ("data.balance=auto trains through it with logit adjustment (data.balance=none to leave "
                      "it)")
        else:
            advice = f"data.balance={balance} trains through it"
        lines.append(f"WARNING: imbalanced classes: {largest[1]} has {largest[0]:,} training images, "
                     f"{smallest[1]} {smallest[0]:,} ({imbalance_ratio(train):.1f}:1, above "
                     f"{IMBALANCED:.0f}:1); plain accuracy hides the small classes; {advice}")
    if validated:
        lines.append(f"monitor: validation {NAMES[monitor]} ({why}) picks best.pt and early stopping")
    return lines
