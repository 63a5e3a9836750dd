"""`cifarcnn predict`: batches of real files, error records for bad ones, outputs, accuracy from folder
labels."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cifarcnn.base.config import make_config
from cifarcnn.base.inference import checkpoint_settings, predict_logits, probabilities
from cifarcnn.cli import main
from cifarcnn.data.cifar import CLASSES, load_cifar10
from cifarcnn.data.loader import Loader
from cifarcnn.training.checkpoint import load_checkpoint, model_from_checkpoint
from cifarcnn.training.train import train
from cifarcnn.use.evaluate import evaluate


def write_pngs(images: torch.Tensor, labels: torch.Tensor, root):
    """Test images as root/<class>/<n>.png, the layout --labels-from-folders reads."""
    for n, (pixels, label) in enumerate(zip(images.permute(0, 2, 3, 1).numpy(), labels.tolist())):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{n}.png")


@pytest.fixture(scope="module")
def png_test_set(cifar_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("pngs")
    data = load_cifar10(cifar_root)
    write_pngs(data.test_images, data.test_labels, root)
    return root, data


def loader_probabilities(run_dir, data, tta: int) -> torch.Tensor:
    """Probabilities of the run's best checkpoint for each test image, through the test loader and the run's
    own precision and temperature, as evaluate computes them."""
    checkpoint = load_checkpoint(run_dir / "best.pt")
    settings = checkpoint_settings(checkpoint, torch.device("cpu"), tta)
    model = model_from_checkpoint(checkpoint).to(memory_format=torch.channels_last)
    loader = Loader(data.test_images, data.test_labels, 50, device="cpu", memory_format=torch.channels_last)
    logits, _ = predict_logits(model, loader, settings)
    return probabilities(logits, settings)


def assert_records_match(records: list[dict], data, probabilities: torch.Tensor) -> None:
    """Each file's label and top-1 class and probability are those of the same test image's
    `probabilities`."""
    assert len(records) == len(data.test_labels)
    for record in records:
        n = int(record["path"].rsplit("/", 1)[1].split(".")[0])
        assert record["label"] == CLASSES[data.test_labels[n]] and record["error"] is None
        top = record["predictions"]
        assert all(a["probability"] >= b["probability"] for a, b in zip(top, top[1:]))
        assert top[0]["class"] == CLASSES[int(probabilities[n].argmax())]
        assert top[0]["probability"] == pytest.approx(float(probabilities[n].max()), abs=1e-6)


def test_folder_labels_give_the_same_accuracy_and_probabilities_as_evaluate(trained_run_dir, png_test_set,
                                                                            cifar_root, tmp_path, capsys):
    root, data = png_test_set
    out = tmp_path / "results.json"
    assert main(["predict", str(trained_run_dir), str(root), "--labels-from-folders", "--top-k", "3",
                 "--output", str(out), "--device", "cpu", "--batch-size", "64"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    expected = evaluate(trained_run_dir, data_dir=cifar_root, device="cpu", out_dir=tmp_path / "eval")
    assert saved["accuracy"]["accuracy"] == pytest.approx(expected["test_accuracy"], abs=1e-12)
    assert saved["accuracy"]["num_images"] == len(data.test_labels) == saved["num_files"]
    assert f"accuracy: {expected['test_accuracy']:.2%}" in printed
    for name, acc in expected["per_class_accuracy"].items():
        row = saved["accuracy"]["per_class"][name]
        assert (row["accuracy"] or 0.0) == pytest.approx(acc)
    assert all(len(record["predictions"]) == 3 for record in saved["results"])
    # every file's probabilities are what the model gives the same image through the test loader
    assert_records_match(saved["results"], data, loader_probabilities(trained_run_dir, data, tta=0))


@pytest.fixture(scope="module")
def tta_run_dir(cifar_root, tmp_path_factory):
    """The shared recipe trained with test-time augmentation level 2 (mirror + 1-pixel shifts)."""
    run_dir = tmp_path_factory.mktemp("tta-run") / "run"
    cfg = make_config({}, ["epochs=2", "batch_size=64", "eval_batch_size=50", "data.val_size=100",
                           "log_every=2", "tta=2"])
    train(cfg, run_dir, data_dir=cifar_root, device="cpu")
    return run_dir


def test_a_tta_2_checkpoint_gives_exactly_evaluates_accuracy_and_per_class_counts(
        tta_run_dir, png_test_set, cifar_root, tmp_path, capsys):
    root, data = png_test_set
    out = tmp_path / "results.json"
    assert main(["predict", str(tta_run_dir), str(root), "--labels-from-folders", "--output", str(out),
                 "--device", "cpu", "--batch-size", "64", "-q"]) == 0
    printed = capsys.readouterr().out
    expected = evaluate(tta_run_dir, data_dir=cifar_root, device="cpu", out_dir=tmp_path / "eval")
    saved = json.loads(out.read_text())
    assert expected["tta"] == saved["tta"] == 2 and saved["precision"] == expected["precision"]
    assert "inference: tta 2 (mirror + 1-pixel shifts)" in printed
    scores, matrix = saved["accuracy"], np.array(expected["confusion_matrix"])
    assert scores["num_images"] == int(matrix.sum()) == len(data.test_labels)
    assert [scores["per_class"][c]["correct"] for c in CLASSES] == matrix.diagonal().tolist()
    assert [scores["per_class"][c]["total"] for c in CLASSES] == matrix.sum(1).tolist()
    assert scores["accuracy"] == expected["test_accuracy"]
    # TTA changes this checkpoint's probabilities, and predict gives the TTA ones
    with_tta, bare = (loader_probabilities(tta_run_dir, data, tta) for tta in (2, 0))
    assert (with_tta - bare).abs().max() > 1e-3
    assert_records_match(saved["results"], data, with_tta)


def test_tta_override_gives_the_bare_networks_probabilities(tta_run_dir, png_test_set, tmp_path, capsys):
    root, data = png_test_set
    out = tmp_path / "results.json"
    assert main(["predict", str(tta_run_dir), str(root), "--labels-from-folders", "--tta", "0", "--output",
                 str(out), "--device", "cpu", "-q"]) == 0
    assert "inference: tta 0 (none)" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["tta"] == 0
    assert_records_match(saved["results"], data, loader_probabilities(tta_run_dir, data, tta=0))


def make_mixed_folder(folder):
    """Good images of many kinds, and bad files; returns (good names, bad names)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "small.png")
    ys, xs = np.indices((3000, 4000))
    huge = np.stack([xs % 256, ys % 256, (xs + ys) % 256, (xs // 16) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(huge, "RGBA").save(folder / "huge-rgba.png", compress_level=1)
    Image.fromarray(rng.integers(0, 256, (120, 90), dtype=np.uint8), "L").save(folder / "gray.jpg")
    Image.new("RGB", (50, 50), (200, 30, 30)).save(folder / "photo.bmp")
    Image.new("RGB", (64, 48), (30, 30, 200)).save(folder / "anim.gif")
    Image.new("RGB", (33, 77), (30, 200, 30)).save(folder / "tall.webp")
    (folder / "notes.jpg").write_text("shopping list: milk, eggs\n")
    (folder / "empty.png").write_bytes(b"")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "whole.png")
    whole = (folder / "whole.png").read_bytes()
    (folder / "whole.png").unlink()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return ({"small.png", "huge-rgba.png", "gray.jpg", "photo.bmp", "anim.gif", "tall.webp"},
            {"notes.jpg", "empty.png", "truncated.png"})


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed") / "mixed"
    good, bad = make_mixed_folder(folder)
    return folder, good, bad


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_bad_files_get_error_records_and_the_rest_are_still_predicted(trained_run_dir, mixed_folder, tmp_path,
                                                                      capsys, fmt):
    folder, good, bad = mixed_folder
    out = tmp_path / f"results.{fmt}"
    assert main(["predict", str(trained_run_dir), str(folder), "--output", str(out), "--top-k", "2",
                 "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == len(bad) and "Traceback" not in captured.err
    assert all(line.startswith("error: ") for line in errors)
    for name in bad:
        assert sum(name in line for line in errors) == 1
    assert "predicted 6 of 9 files" in captured.out and "3 could not be read" in captured.out
    for name in good:  # each good file is a row of the printed table
        assert any(line.split()[0].endswith(name) for line in captured.out.splitlines() if line.strip())

    if fmt == "json":
        records = {r["path"].rsplit("/", 1)[1]: r for r in json.loads(out.read_text())["results"]}
        for name in good:
            assert records[name]["error"] is None
            assert [p["class"] in CLASSES for p in records[name]["predictions"]] == [True, True]
            assert sum(p["probability"] for p in records[name]["predictions"]) <= 1 + 1e-6
        for name in bad:
            assert records[name]["error"] and records[name]["predictions"] == []
        assert records["empty.png"]["error"] == "empty file"
        assert "truncated" in records["truncated.png"]["error"]
        assert "not an image" in records["notes.jpg"]["error"]
    else:
        with open(out, newline="") as f:
            rows = {r["path"].rsplit("/", 1)[1]: r for r in csv.DictReader(f)}
        assert set(rows) == good | bad
        assert list(next(iter(rows.values()))) == ["path", "class_1", "probability_1", "class_2",
                                                   "probability_2", "error"]
        for name in good:
            assert rows[name]["error"] == "" and rows[name]["class_1"] in CLASSES
            assert float(rows[name]["probability_1"]) >= float(rows[name]["probability_2"]) > 0
        for name in bad:
            assert rows[name]["error"] and rows[name]["class_1"] == ""


def test_a_glob_and_single_files_and_quiet_mode(trained_run_dir, mixed_folder, capsys):
    folder, _, _ = mixed_folder
    assert main(["predict", str(trained_run_dir / "best.pt"), str(folder / "*.png"), str(folder / "gray.jpg"),
                 "-q", "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "predicted 3 of 5 files" in captured.out  # small, huge-rgba, gray; empty and truncated fail
    assert "small.png" not in captured.out  # no per-file table with -q
    assert len(captured.err.strip().splitlines()) == 2


def test_all_good_files_exit_0_and_print_top_k(trained_run_dir, tmp_path, capsys):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    assert main(["predict", str(trained_run_dir), str(tmp_path / "red.png"), "--top-k", "10"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(str(tmp_path)))
    assert all(name in line for name in CLASSES)


def test_files_outside_class_folders_are_left_out_of_the_accuracy(trained_run_dir, tmp_path, capsys):
    # One picture in every class folder: whatever the model predicts for it, exactly one of the ten is right.
    for rel in (*(f"{name}/a.png" for name in CLASSES), "misc/c.png"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        Image.new("RGB", (32, 32), (90, 90, 90)).save(tmp_path / rel)
    out_file = tmp_path / "results.json"
    assert main(["predict", str(trained_run_dir), str(tmp_path), "--labels-from-folders", "-q", "--output",
                 str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "on 10 labelled images" in out
    assert "1 file(s) left out: unreadable, outside class folders or trained on" in out
    assert "accuracy: 10.00%" in out
    scores = json.loads(out_file.read_text())["accuracy"]
    assert [row["total"] for row in scores["per_class"].values()] == [1] * 10
    assert sum(row["correct"] for row in scores["per_class"].values()) == 1


@pytest.mark.parametrize("args, words", [
    (["{run}", "{tmp}/missing.png"], "no such file"),
    (["{run}", "{tmp}/*.nothing"], "matches no file"),
    (["{run}", "{tmp}/empty-folder"], "no image files"),
    (["{run}", "{tmp}/a.png", "--output", "{tmp}/out.txt"], ".csv or .json"),
    (["{run}", "{tmp}/a.png", "--output", "{tmp}/no/such/out.csv"], "does not exist"),
    (["{run}", "{tmp}/a.png", "--top-k", "11"], "--top-k"),
    (["{run}", "{tmp}/a.png", "--top-k", "0"], "--top-k"),
    (["{run}", "{tmp}/a.png", "--workers", "0"], "--workers"),
    (["{run}", "{tmp}/a.png", "--tta", "3"], "--tta"),
    (["{tmp}/no-run", "{tmp}/a.png"], "no such run folder"),
])
def test_usage_errors_exit_2_with_one_line(trained_run_dir, tmp_path, capsys, args, words):
    (tmp_path / "empty-folder").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    argv = [a.format(run=trained_run_dir, tmp=tmp_path) for a in args]
    assert main(["predict", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and err[0].startswith("error: ")
    assert not (tmp_path / "out.txt").exists()
