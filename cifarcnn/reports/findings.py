"""What an audit found: one `Finding` per flagged image, the `Audit` that holds them with the class counts,
and the kinds of issue (`ISSUES`, in the order the console and the page list them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Finding:
    """One flagged image: its position in the pooled train + test list (-1: not loaded), name and issue."""

    index: int
    path: str
    issue: str
    score: float
    given: str
    suggested: str = ""
    detail: str = ""


@dataclass
class Audit:
    """Everything an audit found, for the console, the CSV and the page."""

    name: str
    classes: list[str]
    counts: dict[str, list[int]]
    labels: list[int]  # per image, pooled train + test
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    groups: list[list[int]] = field(default_factory=list)  # duplicate groups, pooled positions
    cross_validated: bool = False  # whether the k-fold models ran (wrong labels and outliers)

    @property
    def imbalance(self) -> float:
        train = [n for n in self.counts["train"] if n]
        return max(train) / min(train) if train else 1.0

    def count(self, issue: str) -> int:
        return sum(f.issue == issue for f in self.findings)

    def shown_count(self, issue: str) -> str:
        """The count, or "not run" for the model's findings when the k-fold models did not run."""
        if issue in MODEL_ISSUES and not self.cross_validated:
            return "not run"
        return str(self.count(issue))


ISSUES = {"unreadable": "unreadable files", "exact_duplicate": "exact copies within a class",
          "near_duplicate": "near copies within a class",
          "conflicting_labels": "copies with different labels",
          "train_test_leak": "test images that copy a training image",
          "label_issue": "likely wrong labels", "outlier": "outliers (unlike any class)"}
MODEL_ISSUES = ("label_issue", "outlier")
