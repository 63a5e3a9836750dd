"""`cifarcnn audit` on small generated folders (planted copies, moved labels, a clean folder), its page in
Chromium, and `data.exclude` through training, evaluate and the split check."""

from __future__ import annotations

import csv
import io
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarcnn.cli import main
from cifarcnn.data.exclude import read_names

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def picture(rng: np.random.Generator, colour: tuple[int, int, int], amplitude: float = 60) -> Image.Image:
    """A 32 x 32 picture of `colour` with a random smooth pattern, unlike any other drawn this way."""
    pattern = rng.uniform(-amplitude, amplitude, (4, 4, 3))
    smooth = np.asarray(Image.fromarray(((pattern + amplitude) * 255 / (2 * amplitude)).astype(np.uint8))
                        .resize((32, 32), Image.BICUBIC), dtype=np.float64) * 2 * amplitude / 255 - amplitude
    return Image.fromarray(np.clip(np.array(colour) + smooth, 0, 255).astype(np.uint8))


def write_folder(root: Path, per_class: int, test_per_class: int = 0,
                 classes: tuple[str, ...] = tuple(COLOURS), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for side, count in (("train", per_class), ("test", test_per_class)):
        for name in classes:
            if not count:
                continue
            (root / side / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                picture(rng, COLOURS[name]).save(root / side / name / f"{i}.png")
    return root


def shifted_jpeg(source: Path, target: Path) -> None:
    """A re-encoded copy moved by one pixel: a near copy, not an exact one."""
    pixels = np.asarray(Image.open(source))
    moved = np.pad(pixels, ((1, 0), (1, 0), (0, 0)), mode="edge")[:32, :32]
    buffer = io.BytesIO()
    Image.fromarray(moved).save(buffer, "JPEG", quality=85)
    target.write_bytes(buffer.getvalue())


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """Distinct pictures plus: an exact and a near copy within a class, a copy in another class, a test copy
    of a training image, and an unreadable file."""
    root = write_folder(tmp_path_factory.mktemp("planted") / "pics", per_class=12, test_per_class=4,
                        classes=("red", "green", "blue"))
    train = root / "train"
    shutil.copyfile(train / "red/0.png", train / "red/exact.png")
    shifted_jpeg(train / "red/1.png", train / "red/near.jpg")
    shutil.copyfile(train / "green/0.png", train / "blue/conflict.png")
    shifted_jpeg(train / "blue/1.png", root / "test/blue/leak.jpg")
    (train / "green/broken.png").write_bytes(b"not a picture")
    return root


def run_audit(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["audit", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_copies_found_without_cleanlab(planted, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # `import cleanlab...` raises ImportError
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    code, out, err = run_audit([str(planted), "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert "pip install 'cifarcnn[audit]'" in err
    rows = read_csv(tmp_path / "out" / "audit.csv")
    assert list(rows[0]) == ["path", "issue", "score", "given_class", "suggested_class", "detail"]
    found = {(Path(r["path"]).relative_to(planted).as_posix(), r["issue"]) for r in rows}
    assert found == {("train/red/exact.png", "exact_duplicate"), ("train/red/near.jpg", "near_duplicate"),
                     ("train/green/0.png", "conflicting_labels"),
                     ("train/blue/conflict.png", "conflicting_labels"),
                     ("test/blue/leak.jpg", "train_test_leak"),
                     ("train/green/broken.png", "unreadable")}, rows
    conflict = next(r for r in rows if r["path"].endswith("blue/conflict.png"))
    assert (conflict["given_class"], conflict["suggested_class"]) == ("blue", "green")
    assert re.search(r"likely wrong labels: +not run\n", out) and re.search(r"outliers.*: +not run\n", out)
    assert "imbalance (largest / smallest training class): 1.2:1" in out  # red 14, green 12
    assert read_names(tmp_path / "out" / "audit.csv") == [r["path"] for r in rows]


def test_page_renders_in_chromium(planted, tmp_path, monkeypatch, capsys):
    from selenium.webdriver.common.by import By

    from tests.test_serve import chromium_and_driver

    browser, driver_path = chromium_and_driver()
    monkeypatch.setitem(sys.modules, "cleanlab", None)
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    assert run_audit([str(planted), "--out", str(tmp_path)], capsys)[0] == 0
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,800",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        driver.get((tmp_path / "audit.html").as_uri())
        images = driver.find_elements(By.TAG_NAME, "img")
        loaded = driver.execute_script(
            "return [...document.images].filter(i => i.complete && i.naturalWidth > 0).length")
        # 5 flagged images with pictures (not the unreadable file), each beside the image it copies
        assert len(images) == 10 and loaded == 10
        near = driver.find_element(By.CSS_SELECTOR, "#near_duplicate figure.finding")
        assert "red" in near.text and near.find_element(By.TAG_NAME, "img").size["width"] == 64
        assert "blue → green" in driver.find_element(By.CSS_SELECTOR, "#conflicting_labels").text
    finally:
        driver.quit()


# the seed recipe's small CNN learns the colours in a few epochs; quick's Muon steps cost more on a CPU
LEARN = ["--preset", "seed", "--folds", "3", "epochs=6", "batch_size=16", "tta=0", "precision=fp32"]


def test_moved_labels_found(tmp_path, capsys):
    root = write_folder(tmp_path / "pics", per_class=15)
    moves = [("red", 0, "green"), ("blue", 1, "yellow"), ("yellow", 2, "red")]
    for given, i, wrong in moves:
        (root / "train" / given / f"{i}.png").rename(root / "train" / wrong / f"moved{i}.png")
    code, out, err = run_audit([str(root), "--out", str(tmp_path / "out"), *LEARN], capsys)
    assert code == 0, err
    flagged = {Path(r["path"]).name: (r["given_class"], r["suggested_class"])
               for r in read_csv(tmp_path / "out" / "audit.csv") if r["issue"] == "label_issue"}
    assert flagged == {f"moved{i}.png": (wrong, given) for given, i, wrong in moves}, out
    saved = np.load(tmp_path / "out" / "out_of_sample.npz")
    names = [Path(n).name for n in saved["names"]]
    assert saved["probabilities"].shape == (len(names), 4) and len(saved["outlier"]) == len(names)
    assert np.allclose(saved["probabilities"].sum(1), 1, atol=1e-4)
    for given, i, wrong in moves:  # the moved image's given label is the wrong one, its probability low
        at = names.index(f"moved{i}.png")
        classes = sorted(COLOURS)  # a folder's classes: its class folders in sorted order
        assert saved["labels"][at] == classes.index(wrong)
        assert saved["probabilities"][at].argmax() == classes.index(given)


def test_clean_folder_flags_no_label(tmp_path, capsys):
    root = write_folder(tmp_path / "pics", per_class=15, seed=1)
    code, out, err = run_audit([str(root), "--out", str(tmp_path / "out"), *LEARN], capsys)
    assert code == 0, err
    assert [r for r in read_csv(tmp_path / "out" / "audit.csv") if r["issue"] == "label_issue"] == []


def test_exclusion_through_training_evaluate_and_split_check(tmp_path, capsys):
    root = write_folder(tmp_path / "pics", per_class=10, test_per_class=3, classes=("red", "green", "blue"))
    listed = tmp_path / "exclude.txt"
    listed.write_text(f"train/red/0.png\n{root / 'train/green/1.png'}\ntest/blue/2.png\ntrain/gone.png\n")
    small = ["data.dataset=folder", f"data.path={root}", f"data.exclude={listed}", "epochs=1", "batch_size=8",
             "data.val_size=0"]
    assert main(["train", "--preset", "quick", "--runs-dir", str(tmp_path), "--name", "run", "--test",
                 *small]) == 0
    out, err = capsys.readouterr()
    assert "left out 3 image(s) (2 training, 1 test)" in out
    assert "1 of the 4 names" in err
    checkpoint = torch.load(tmp_path / "run" / "best.pt", map_location="cpu", weights_only=False)
    assert checkpoint["split"]["exclude"]["train"] == 2 and checkpoint["split"]["exclude"]["test"] == 1
    assert checkpoint["split"]["train"]["count"] == 28 and checkpoint["split"]["test"]["count"] == 8

    assert main(["evaluate", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "exclude: the same 3 image(s) left out as in training" in out
    assert "split: unchanged since training (8 test images" in out

    listed.write_text("train/red/0.png\n")  # another exclusion: evaluate says so
    assert main(["evaluate", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "exclude: changed since training: 3 image(s) left out then, 1 now" in out
    assert "split:" in out and "unchanged" not in out.split("split:")[1].split("\n")[0]

    listed.unlink()
    assert main(["train", "--preset", "quick", "--runs-dir", str(tmp_path), "--name", "again", *small]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_weak_fold_models_are_named_and_a_long_wrong_label_list_is_called_their_mistakes(capsys):
    """The fold models' out-of-sample accuracy is printed; when more than a fifth of the training images are
    flagged, a note says the list mostly holds the models' own mistakes (a small folder's weak models)."""
    from cifarcnn.reports.audit import _judge_folds
    from cifarcnn.reports.findings import Audit

    labels = np.repeat(np.arange(2), 50)
    probs = np.full((100, 2), 0.2, dtype=np.float32)
    probs[np.arange(100), labels] = 0.8
    probs[:10] = probs[:10, ::-1]  # 10 of 100 wrong: 90% out of sample
    result = Audit("folder", ["a", "b"], {"train": [50, 50], "test": [0, 0]}, labels.tolist())
    _judge_folds(result, probs, labels, np.arange(10))
    assert "fold models: 90.00% out-of-sample accuracy on the training images (balanced 90.00%)" in (
        capsys.readouterr().out)
    assert result.notes == []
    _judge_folds(result, probs, labels, np.arange(30))  # 30 of 100 training images flagged
    assert len(result.notes) == 1 and result.notes[0].startswith("30% of the training images are flagged")
    with_test = Audit("f", ["a", "b"], {"train": [50, 50], "test": [15, 15]}, labels.tolist())
    _judge_folds(with_test, probs, labels, np.arange(100, 130))  # 30 test images: not training images
    assert with_test.notes == []
