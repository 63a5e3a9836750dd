"""Seeing class imbalance: the metrics on a hand-checked confusion matrix, the class counts and the imbalance
ratio, which metric a run follows (`monitor`) and the best epoch by it, and the counts and metrics in the
training banner, test.json, evaluate, the report and /v1/model, on small generated folders."""

import contextlib
import io
import json
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarcnn.base.config import make_config
from cifarcnn.base.errors import ConfigError
from cifarcnn.base.metrics import (
    class_counts,
    classification_metrics,
    describe_counts,
    imbalance_ratio,
    is_imbalanced,
)
from cifarcnn.cli import main
from cifarcnn.training.checkpoint import load_checkpoint
from cifarcnn.training.monitor import choose_monitor, track_best

# rows true, columns predicted: ant is never predicted, bee has no test image but is predicted once
CLASSES = ("cat", "dog", "ant", "bee")
MATRIX = [[5, 2, 0, 1],
          [1, 3, 0, 0],
          [1, 1, 0, 0],
          [0, 0, 0, 0]]
RECIPE = ["epochs=3", "batch_size=16", "eval_batch_size=20", "data.val_size=12", "log_every=2",
          "data.image_size=16", "data.dataset=folder"]


def test_metrics_on_a_hand_checked_matrix():
    m = classification_metrics(MATRIX)
    assert m["support"] == [8, 4, 2, 0]
    assert m["accuracy"] == pytest.approx(8 / 14)
    # recall per class with support: cat 5/8, dog 3/4, ant 0/2; bee has none and is left out
    assert m["recall"] == [pytest.approx(5 / 8), pytest.approx(3 / 4), 0.0, None]
    assert m["balanced_accuracy"] == pytest.approx(float((Fraction(5, 8) + Fraction(3, 4) + 0) / 3))
    # precision: cat 5 of 7 predicted, dog 3 of 6, ant never predicted, bee 0 of 1
    assert m["precision"] == [pytest.approx(5 / 7), pytest.approx(1 / 2), None, 0.0]
    # F1 = 2 tp / (support + predicted): cat 10/15, dog 6/10, ant 0 (support, no hit); bee none
    assert m["f1"] == [pytest.approx(2 / 3), pytest.approx(3 / 5), 0.0, None]
    assert m["macro_f1"] == pytest.approx(float((Fraction(2, 3) + Fraction(3, 5) + 0) / 3))
    assert classification_metrics(torch.tensor(MATRIX)) == m
    empty = classification_metrics(np.zeros((3, 3), dtype=np.int64))
    assert (empty["accuracy"], empty["balanced_accuracy"], empty["macro_f1"]) == (None, None, None)


def test_metrics_agree_with_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    truth = [i for i, row in enumerate(MATRIX) for j, n in enumerate(row) for _ in range(n)]
    predicted = [j for row in MATRIX for j, n in enumerate(row) for _ in range(n)]
    m = classification_metrics(MATRIX)
    with pytest.warns(UserWarning):  # scikit-learn warns about bee, predicted but never true
        assert m["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(truth, predicted))
    # macro-F1 over the classes with support, a class never predicted counting 0
    expected = metrics.f1_score(truth, predicted, labels=[0, 1, 2], average="macro", zero_division=0)
    assert m["macro_f1"] == pytest.approx(expected)


def test_class_counts_and_the_imbalance_ratio():
    assert class_counts(torch.tensor([0, 0, 2, 2, 2, 2]), 4) == [2, 0, 4, 0]
    assert imbalance_ratio([2, 0, 4, 0]) == 2.0  # over the classes present
    assert imbalance_ratio([0, 0]) is None
    assert not is_imbalanced([30, 10]) and is_imbalanced([31, 10])  # above 3:1, not at it
    assert describe_counts(["cat", "dog", "fox"], [24, 24, 6]) == "cat 24, dog 24, fox 6 (4.0:1)"
    assert describe_counts(["cat", "dog"], [5000, 5000]) == "5,000 each"
    assert describe_counts(["cat", "dog", "fox"], [7, 5, 0]) == "cat 7, dog 5 (1.4:1, none of fox)"
    many = [f"c{i}" for i in range(12)]
    assert describe_counts(many, [50] * 11 + [10]) == "10 (c11) to 50 (c9) (5.0:1)"


def test_auto_monitor_follows_balanced_accuracy_above_3_to_1_only():
    assert choose_monitor("auto", [40, 40, 8])[0] == "balanced_accuracy"
    assert choose_monitor("auto", [40, 40, 14])[0] == "accuracy"
    assert choose_monitor("auto", [30, 10])[0] == "accuracy"
    assert choose_monitor("accuracy", [40, 40, 8]) == ("accuracy", "monitor=accuracy")
    assert choose_monitor("balanced_accuracy", [5, 5])[0] == "balanced_accuracy"
    with pytest.raises(ConfigError, match="monitor"):
        make_config({}, ["monitor=recall"])


def _tracked(monitor: str, rows: list[tuple[float, float]], patience: int = 0) -> dict:
    state = {"history": [], "best_val_acc": -1.0, "best_epoch": 0, "epochs_since_best": 0}
    for epoch, (acc, balanced) in enumerate(rows, 1):
        metrics = {"epoch": epoch, "val_acc": acc, "val_balanced_acc": balanced}
        state["history"].append(metrics)
        track_best(state, metrics, monitor, patience, validated=True)
    return state


def test_the_best_epoch_and_early_stopping_follow_the_monitor():
    # epoch 2 loses plain accuracy (the large classes) and gains balanced accuracy (the small ones)
    rows = [(0.90, 0.50), (0.85, 0.70), (0.86, 0.60)]
    by_accuracy, by_balanced = _tracked("accuracy", rows), _tracked("balanced_accuracy", rows)
    assert (by_accuracy["best_epoch"], by_accuracy["best_val_acc"]) == (1, 0.90)
    assert (by_balanced["best_epoch"], by_balanced["best_val_acc"]) == (2, 0.85)
    assert by_accuracy["epochs_since_best"] == 2 and by_balanced["epochs_since_best"] == 1
    assert _tracked("accuracy", rows, patience=2)["stopped_early"]
    assert not _tracked("balanced_accuracy", rows, patience=2)["stopped_early"]


def write_folder(root: Path, train: dict[str, int], test_per_class: int = 8) -> Path:
    """root/train/<class>/*.png with `train` images per class and test_per_class test images, each class a
    colour shifted per image (so that some images are misclassified), with noise."""
    rng = np.random.default_rng(3)
    palette = {"cat": (200, 60, 40), "dog": (40, 180, 60), "fox": (50, 70, 210)}
    for side, counts in (("train", train), ("test", dict.fromkeys(train, test_per_class))):
        for name, count in counts.items():
            folder = root / side / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                colour = np.array(palette[name]) + rng.normal(0, 90, 3)  # the classes' colours overlap
                pixels = np.clip(colour + rng.normal(0, 30, (20, 20, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def _train(tmp_path: Path, name: str, counts: dict[str, int], capsys, *extra: str) -> tuple[Path, str]:
    pictures = write_folder(tmp_path / f"{name}-pictures", counts)
    assert main(["train", *RECIPE, f"data.path={pictures}", *extra, "--runs-dir", str(tmp_path / "runs"),
                 "--name", name, "--device", "cpu", "--test"]) == 0
    return tmp_path / "runs" / name, capsys.readouterr().out


@pytest.fixture(scope="module")
def imbalanced_run(tmp_path_factory):
    """A run trained with --test on a 40:40:8 folder, and what it printed."""
    base = tmp_path_factory.mktemp("imbalanced")
    pictures = write_folder(base / "pictures", {"cat": 40, "dog": 40, "fox": 8})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", *RECIPE, f"data.path={pictures}", "--runs-dir", str(base / "runs"), "--name",
                     "r", "--device", "cpu", "--test"]) == 0
    return base / "runs" / "r", printed.getvalue()


def test_the_banner_counts_the_classes_and_warns_above_3_to_1(imbalanced_run):
    run_dir, out = imbalanced_run
    counts = load_checkpoint(run_dir / "best.pt")["class_counts"]
    assert set(counts) == {"train", "val", "test"} and sum(counts["train"]) + sum(counts["val"]) == 88
    assert counts["test"] == [8, 8, 8]
    train = describe_counts(["cat", "dog", "fox"], counts["train"])
    assert f"class counts: train {train}; val " in out and "; test 8 each" in out
    warning = next(line for line in out.splitlines() if line.startswith("WARNING: imbalanced classes"))
    assert "data.balance=auto trains through it with logit adjustment" in warning  # the default
    assert "monitor: validation balanced accuracy (auto: the training classes are" in out


def test_no_warning_on_balanced_classes_and_auto_follows_accuracy(tmp_path, capsys):
    run_dir, out = _train(tmp_path, "even", {"cat": 20, "dog": 20, "fox": 20}, capsys)
    assert "class counts: train " in out and "WARNING: imbalanced" not in out
    assert "monitor: validation accuracy (auto: the training classes are" in out
    checkpoint = load_checkpoint(run_dir / "best.pt")
    assert checkpoint["monitor"] == "accuracy"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][:-1]
    assert checkpoint["best_epoch"] == max(rows, key=lambda r: r["val_acc"])["epoch"]


def test_the_best_checkpoint_follows_balanced_accuracy_on_imbalanced_data(imbalanced_run):
    run_dir, _ = imbalanced_run
    checkpoint = load_checkpoint(run_dir / "best.pt")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][:-1]
    assert checkpoint["monitor"] == "balanced_accuracy"
    assert all(0 <= row["val_balanced_acc"] <= 1 for row in rows)
    assert checkpoint["best_epoch"] == max(rows, key=lambda r: r["val_balanced_acc"])["epoch"]


def _scripted_matrix(hits: tuple[int, int, int]) -> torch.Tensor:
    """A validation confusion matrix of 10 cats, 10 dogs and 2 foxes, `hits` of each right, the misses
    predicted as the next class."""
    matrix = torch.zeros(3, 3, dtype=torch.int64)
    for i, (right, total) in enumerate(zip(hits, (10, 10, 2))):
        matrix[i, i], matrix[i, (i + 1) % 3] = right, total - right
    return matrix


# per epoch: accuracy 20/22, 19/22, 20/22, 19/22; balanced accuracy 0.67, 0.90, 0.80, 0.77
SCRIPT = [(10, 10, 0), (8, 9, 2), (10, 9, 1), (9, 9, 1)]


@pytest.mark.parametrize(("monitor", "best", "epochs"), [("auto", 2, 4), ("accuracy", 1, 3)])
def test_the_trainer_keeps_the_best_model_by_the_monitor(monitor, best, epochs, tmp_path, monkeypatch):
    """The validation results scripted so that the two metrics disagree: best.pt and early stopping
    (patience 2) follow balanced accuracy on a 40:40:8 folder, and plain accuracy with monitor=accuracy."""
    import cifarcnn.training.train as train_module

    original, script = train_module.evaluate_split, iter(SCRIPT)

    def scripted(forward, loader, dist, desc, settings):
        if desc == "test":
            return original(forward, loader, dist, desc, settings)
        matrix = _scripted_matrix(next(script))
        return 0.5, matrix.trace().item() / 22, 22, matrix

    monkeypatch.setattr(train_module, "evaluate_split", scripted)
    pictures = write_folder(tmp_path / "pictures", {"cat": 40, "dog": 40, "fox": 8})
    assert main(["train", *RECIPE, "epochs=4", "patience=2", f"monitor={monitor}", f"data.path={pictures}",
                 "--runs-dir", str(tmp_path), "--name", "r", "--device", "cpu", "--test"]) == 0
    kept, last = load_checkpoint(tmp_path / "r" / "best.pt"), load_checkpoint(tmp_path / "r" / "last.pt")
    assert (kept["epoch"], last["best_epoch"], last["epoch"]) == (best, best, epochs)
    assert json.loads((tmp_path / "r" / "test.json").read_text())["epoch"] == best
    balanced = [row["val_balanced_acc"] for row in last["history"]]
    assert balanced == pytest.approx([2 / 3, 0.9, 0.8, 23 / 30][:epochs])


def test_train_test_records_balanced_accuracy_macro_f1_and_the_counts(imbalanced_run):
    run_dir, out = imbalanced_run
    test = json.loads((run_dir / "test.json").read_text())
    per_class = test["test_per_class"]
    assert set(per_class) == {"cat", "dog", "fox"} and [r["support"] for r in per_class.values()] == [8] * 3
    recalls = [r["recall"] for r in per_class.values()]
    assert test["test_balanced_acc"] == pytest.approx(sum(recalls) / 3)
    assert test["test_acc"] == pytest.approx(sum(recalls) / 3)  # equal test classes: the two agree
    assert test["test_macro_f1"] == pytest.approx(sum(r["f1"] for r in per_class.values()) / 3)
    assert test["class_counts"]["test"] == [8, 8, 8] and test["monitor"] == "balanced_accuracy"
    assert out.strip().splitlines()[-1].endswith(
        f"best.pt); balanced accuracy {test['test_balanced_acc']:.2%}, macro-F1 {test['test_macro_f1']:.2%}")


def test_evaluate_prints_and_saves_the_metrics_and_counts(imbalanced_run, tmp_path, capsys):
    run_dir, _ = imbalanced_run
    assert main(["evaluate", str(run_dir), "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())
    scores = classification_metrics(saved["confusion_matrix"])
    assert saved["balanced_accuracy"] == scores["balanced_accuracy"]
    assert saved["macro_f1"] == scores["macro_f1"]
    assert saved["per_class"]["fox"] == {"precision": scores["precision"][2], "recall": scores["recall"][2],
                                         "f1": scores["f1"][2], "support": 8}
    counts = load_checkpoint(run_dir / "best.pt")["class_counts"]
    assert saved["class_counts"] == counts and saved["monitor"] == "balanced_accuracy"
    assert f"balanced accuracy (mean per-class recall): {scores['balanced_accuracy']:.2%}" in out
    assert f"class counts: train {describe_counts(['cat', 'dog', 'fox'], counts['train'])}; val" in out
    assert re.search(r"^class\s+recall\s+precision\s+F1\s+correct\s+support$", out, re.M)
    fox = scores["recall"][2], scores["precision"][2], scores["f1"][2]
    shown = r"\s+".join(re.escape(f"{v:.2%}" if v is not None else "-") for v in fox)
    assert re.search(rf"^fox\s+{shown}\s+\d+\s+8$", out, re.M)


def test_the_report_shows_the_counts_and_metrics(imbalanced_run, tmp_path):
    run_dir, _ = imbalanced_run
    assert main(["report", str(run_dir), "--device", "cpu", "--out", str(tmp_path / "r.html")]) == 0
    text = (tmp_path / "r.html").read_text()
    saved = json.loads((run_dir / "eval" / "test_metrics.json").read_text())
    assert f"{saved['balanced_accuracy']:.2%}</div><div class=\"label\">test balanced accuracy" in text
    assert f"{saved['macro_f1']:.2%}</div><div class=\"label\">test macro-F1" in text
    assert "Class counts: train " in text and "imbalanced (above 3:1)" in text
    table = text.split('id="per-class-table"')[1].split("</table>")[0]
    for header in ("recall", "precision", "F1", "support", "train images"):
        assert f">{header}</th>" in table
    train = load_checkpoint(run_dir / "best.pt")["class_counts"]["train"]
    fox = table.split("<td>fox</td>")[1].split("</tr>")[0]
    assert f'<td class="num">8</td><td class="num">{train[2]}</td>' in fox


def test_the_model_endpoint_gives_the_counts_and_metrics(imbalanced_run):
    from cifarcnn.use import serve
    from cifarcnn.use.predict import load_model

    run_dir, _ = imbalanced_run
    details = serve.describe_model(load_model(run_dir, "cpu"))[1]
    test = json.loads((run_dir / "test.json").read_text())
    checkpoint = load_checkpoint(run_dir / "best.pt")
    assert details["class_counts"] == checkpoint["class_counts"] and details["monitor"] == "balanced_accuracy"
    assert details["test_balanced_accuracy"] == test["test_balanced_acc"] is not None
    assert details["test_macro_f1"] == test["test_macro_f1"]
    assert details["validation_balanced_accuracy"] == checkpoint["history"][-1]["val_balanced_acc"]
