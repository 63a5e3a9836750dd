"""Every command on CIFAR-100 and on a folder dataset: checkpoints carry classes, mean, std and image size,
and evaluate, predict, export and report use them without extra flags; checkpoints from before keep
working."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cifarcnn.base.config import data_config
from cifarcnn.base.inference import Settings, checkpoint_settings, infer, predict_logits, probabilities
from cifarcnn.base.plots import save_confusion_matrix
from cifarcnn.cli import main
from cifarcnn.data import splits
from cifarcnn.data.dataset import MEAN, STD
from cifarcnn.data.images import load_image, walk_images
from cifarcnn.data.loader import Loader, validation_mask
from cifarcnn.data.sources import checkpoint_dataset, load_dataset
from cifarcnn.training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

from .conftest import FOLDER_CLASSES, write_image_folder

FOLDER_RECIPE = ["epochs=2", "batch_size=16", "eval_batch_size=20", "data.val_size=12", "log_every=2",
                 "data.image_size=16"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A run trained through the command line on a folder dataset at 16x16, and the folder."""
    base = tmp_path_factory.mktemp("folder-run")
    pictures = write_image_folder(base / "pictures")
    runs = base / "runs"
    assert main(["train", *FOLDER_RECIPE, "data.dataset=folder", f"data.path={pictures}", "--runs-dir",
                 str(runs), "--name", "r", "--device", "cpu", "--test"]) == 0
    return runs / "r", pictures


def test_the_checkpoint_carries_the_dataset(folder_run):
    run_dir, pictures = folder_run
    checkpoint = load_checkpoint(run_dir / "best.pt")
    data = load_dataset(data_config(checkpoint["config"]["data"]))
    assert checkpoint["classes"] == list(FOLDER_CLASSES) and checkpoint["num_classes"] == 3
    assert checkpoint["image_size"] == 16 and checkpoint["dataset"] == "pictures"
    assert tuple(checkpoint["mean"]) == data.mean and tuple(checkpoint["std"]) == data.std
    assert checkpoint["config"]["data"]["path"] == str(pictures.resolve())
    assert model_from_checkpoint(checkpoint)(torch.zeros(1, 3, 16, 16)).shape == (1, 3)


def test_evaluate_and_predict_use_the_checkpoints_dataset(folder_run, tmp_path, capsys):
    run_dir, pictures = folder_run
    assert main(["evaluate", str(run_dir), "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())
    assert (evaluated["num_images"] == 24 and evaluated["dataset"] == "pictures"
            and evaluated["image_size"] == 16)
    out = tmp_path / "predictions.json"
    assert main(["predict", str(run_dir), str(pictures / "test"), "--labels-from-folders", "--output",
                 str(out), "--device", "cpu", "-q"]) == 0
    predicted = json.loads(out.read_text())
    assert predicted["accuracy"]["accuracy"] == pytest.approx(evaluated["test_accuracy"], abs=1e-12)
    for name, acc in evaluated["per_class_accuracy"].items():
        assert predicted["accuracy"]["per_class"][name]["accuracy"] == pytest.approx(acc)


def test_predict_shrinks_and_normalizes_as_the_run_was_trained(folder_run):
    """The probabilities predict reports are the model's on the loader's input, not on 32x32
    CIFAR-normalized."""
    from cifarcnn.use.predict import predict_files

    run_dir, pictures = folder_run
    checkpoint = load_checkpoint(run_dir / "best.pt")
    info = checkpoint_dataset(checkpoint)
    model = model_from_checkpoint(checkpoint).eval()
    data = load_dataset(data_config(checkpoint["config"]["data"]))
    loader = Loader(data.test_images[:8], data.test_labels[:8], 8, device="cpu", mean=info["mean"],
                    std=info["std"])
    logits, _ = predict_logits(model, loader, Settings())
    files, _ = walk_images(pictures / "test" / "cat")  # the dataset's first 8 test images, in its order
    results = predict_files(model, files, FOLDER_CLASSES, device=torch.device("cpu"), settings=Settings(),
                            workers=1, image_size=16, mean=info["mean"], std=info["std"])
    assert [r.top[0][1] for r in results] == pytest.approx(logits.softmax(1).max(1).values.tolist(), abs=1e-5)
    as_cifar = predict_files(model, files, FOLDER_CLASSES, device=torch.device("cpu"), settings=Settings(),
                             workers=1, image_size=16)
    assert [r.top[0][1] for r in as_cifar] != pytest.approx([r.top[0][1] for r in results], abs=1e-5)


def test_export_writes_the_datasets_size_mean_and_std(folder_run, tmp_path):
    onnx = pytest.importorskip("onnx", reason="the export extra is not installed")
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    run_dir, _ = folder_run
    out = tmp_path / "m.onnx"
    assert main(["export", str(run_dir), "--output", str(out)]) == 0
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    checkpoint = load_checkpoint(run_dir / "best.pt")
    assert json.loads(meta["classes"]) == list(FOLDER_CLASSES) and meta["image_size"] == "16"
    assert json.loads(meta["mean"]) == checkpoint["mean"] and json.loads(meta["std"]) == checkpoint["std"]
    assert "16x16" in meta["preprocessing"] and "(batch, 3, 16, 16)" in meta["input"]
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [3, 16, 16] and "pictures classifier" in model.doc_string


def test_report_names_the_dataset(folder_run, tmp_path):
    run_dir, _ = folder_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert main(["report", str(copy), "--device", "cpu"]) == 0
    text = (copy / "report.html").read_text()
    assert "<h1>pictures run run</h1>" in text
    table = text.split('id="per-class-table"')[1].split("</table>")[0]
    rows = table.split("<tr>")[2:]  # after the header's
    shown = [float(re.search(r'<td class="num">([\d.]+)%</td>', row).group(1)) for row in rows]  # recall
    assert len(shown) == 3 and shown == sorted(shown, reverse=True)


def test_bench_and_show_batch_on_a_folder_dataset(folder_run, tmp_path, capsys):
    _, pictures = folder_run
    data = ["data.dataset=folder", f"data.path={pictures}", "data.image_size=16", "data.val_size=12"]
    assert main(["show-batch", *data, "--count", "8", "--out", str(tmp_path / "b.png"), "--device",
                 "cpu"]) == 0
    assert Image.open(tmp_path / "b.png").size[0] > 100
    assert main(["bench", *data, "batch_size=16", "eval_batch_size=24", "--steps", "2", "--warmup", "1",
                 "--rounds", "1", "--out", str(tmp_path / "bench.json"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "bench.json").read_text())["image_size"] == 16


def test_a_folder_run_with_problem_files_goes_on(tmp_path, capsys):
    root = write_image_folder(tmp_path / "pics", per_class=12, test_per_class=None)
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "train" / "empty").mkdir()
    (root / "train" / "readme.txt").write_text("a file at the top level of train/")
    (root / "train" / "lonely").mkdir()
    shutil.copy(root / "train" / "cat" / "0.png", root / "train" / "lonely" / "0.png")
    assert main(["train", "epochs=1", "batch_size=8", "data.val_size=4", "data.image_size=16",
                 "data.dataset=folder", f"data.path={root}", "--runs-dir", str(tmp_path / "runs"), "--name",
                 "r", "--device", "cpu", "--test"]) == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "empty holds no image files" in captured.err
    assert "readme.txt" in captured.err and "single training image: lonely" in captured.err
    assert load_checkpoint(tmp_path / "runs" / "r" / "last.pt")["classes"] == ["cat", "dog", "fox", "lonely"]
    assert main(["evaluate", str(tmp_path / "runs" / "r"), "--device", "cpu"]) == 0
    table = capsys.readouterr().out.split("\n\n")[1].splitlines()
    lonely = table[-1].split()  # class, recall, precision, F1, correct, support
    assert lonely[:2] == ["lonely", "-"] and lonely[3:] == ["-", "0", "0"]  # untested: last, without a recall


# --------------------------------------------------------------------------- CIFAR-100

@pytest.fixture(scope="module")
def cifar100_run(cifar100_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("cifar100-runs")
    assert main(["train", "epochs=1", "batch_size=100", "eval_batch_size=100", "data.val_size=100",
                 "log_every=3", "data.dataset=cifar100", "--data-dir", str(cifar100_root), "--runs-dir",
                 str(runs), "--name", "r", "--device", "cpu"]) == 0
    return runs / "r"


def test_cifar100_evaluate_predict_and_report(cifar100_run, cifar100_root, tmp_path, capsys):
    checkpoint = load_checkpoint(cifar100_run / "best.pt")
    assert checkpoint["num_classes"] == 100 and checkpoint["dataset"] == "CIFAR-100"
    capsys.readouterr()
    assert main(["evaluate", str(cifar100_run), "--data-dir", str(cifar100_root), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.split("\n\n")[1].splitlines()[1:]]
    accuracies = [float(row[1].rstrip("%")) for row in rows]
    assert len(rows) == 100 and accuracies == sorted(accuracies, reverse=True)
    assert "most frequent confusions (true -> predicted):" in out and out.count(" -> fine") == 15
    matrix_png = Image.open(cifar100_run / "eval" / "confusion_matrix.png")
    assert 1000 < matrix_png.size[0] < 2500  # rendered, at a size a page can show
    image = cifar100_run / "x.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    assert main(["predict", str(cifar100_run), str(image), "--top-k", "3", "--device", "cpu"]) == 0
    assert "fine" in capsys.readouterr().out
    assert main(["report", str(cifar100_run)]) == 0
    text = (cifar100_run / "report.html").read_text()
    assert "<h1>CIFAR-100 run r</h1>" in text and text.count("&rarr;") == 15 + 1  # list items + the heading
    assert text.split('id="per-class-table"')[1].split("</table>")[0].count("<tr>") == 101


def test_cifar100_coarse_labels_train_20_classes(cifar100_root, tmp_path):
    assert main(["train", "epochs=1", "batch_size=200", "data.val_size=100", "data.dataset=cifar100",
                 "data.labels=coarse", "--data-dir", str(cifar100_root), "--runs-dir", str(tmp_path),
                 "--name", "c", "--device", "cpu"]) == 0
    checkpoint = load_checkpoint(tmp_path / "c" / "best.pt")
    assert checkpoint["num_classes"] == 20 and checkpoint["classes"][0] == "coarse00"
    assert tuple(checkpoint["mean"]) == (0.5071, 0.4865, 0.4409)


# --------------------------------------------------------------------------- older checkpoints, big matrices

def test_a_checkpoint_from_before_datasets_is_cifar10(trained_run_dir, cifar_root, tmp_path, capsys):
    checkpoint = load_checkpoint(trained_run_dir / "best.pt")
    for key in ("dataset", "mean", "std", "image_size"):
        checkpoint.pop(key)
    del checkpoint["config"]["data"]["dataset"]
    old = tmp_path / "old.pt"
    save_checkpoint(old, checkpoint)
    info = checkpoint_dataset(load_checkpoint(old))
    assert (info["mean"], info["std"], info["image_size"], info["dataset"]) == (MEAN, STD, 32, "CIFAR-10")
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(tmp_path / "x.png")
    assert main(["predict", str(old), str(tmp_path / "x.png"), "--device", "cpu"]) == 0
    assert main(["evaluate", str(old), "--data-dir", str(cifar_root), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "eval" / "test_metrics.json").read_text())["dataset"] == "CIFAR-10"


def test_a_100_class_confusion_matrix_renders_without_cell_numbers(tmp_path):
    matrix = np.random.default_rng(0).integers(0, 5, (100, 100)) + np.eye(100, dtype=int) * 60
    save_confusion_matrix(matrix, [f"class{i}" for i in range(100)], tmp_path / "m.png", title="100 classes")
    width, height = Image.open(tmp_path / "m.png").size
    assert 1000 < width < 2500 and 1000 < height < 2500
    save_confusion_matrix(matrix[:10, :10], [f"c{i}" for i in range(10)], tmp_path / "ten.png", title="10")
    assert Image.open(tmp_path / "ten.png").size[0] < width


def test_predict_on_the_command_line_uses_the_runs_size_mean_and_std(folder_run, tmp_path):
    """`cifarcnn predict` on a folder-trained run gives the model's probabilities on 16x16 images normalized
    with the run's mean and std (a predict using CIFAR's 32x32 or mean/std gives other ones)."""
    run_dir, pictures = folder_run
    checkpoint = load_checkpoint(run_dir / "best.pt")
    info = checkpoint_dataset(checkpoint)
    assert info["image_size"] == 16 and info["mean"] != MEAN
    files, _ = walk_images(pictures / "test" / "dog")
    out = tmp_path / "p.json"
    assert main(["predict", str(run_dir), *map(str, files), "--output", str(out), "--device", "cpu", "-q",
                 "--top-k", "3"]) == 0
    model = model_from_checkpoint(checkpoint).eval()
    x = torch.from_numpy(np.stack([load_image(f, 16) for f in files])).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(info["mean"])[:, None, None]) / torch.tensor(info["std"])[:, None, None]
    settings = checkpoint_settings(checkpoint, torch.device("cpu"), 0)  # as predict runs it
    assert settings.temperature is not None  # the run calibrated itself: predict divides by its temperature
    logits = infer(model, x.contiguous(memory_format=torch.channels_last), settings)
    for row, expected in zip(json.loads(out.read_text())["results"], probabilities(logits, settings)):
        got = {p["class"]: p["probability"] for p in row["predictions"]}
        assert [got[c] for c in FOLDER_CLASSES] == pytest.approx(expected.tolist(), abs=1e-5)


def test_a_run_without_mirroring_never_uses_mirrored_views(tmp_path, capsys):
    """augment.flip=none: the banner says so, the checkpoint records it, and evaluate's tta 2 takes x and its
    1-pixel shifts only; a checkpoint without the record (older runs) keeps its mirrored views."""
    from cifarcnn.base.inference import tta_logits

    pictures = write_image_folder(tmp_path / "pictures", per_class=8, test_per_class=4)
    assert main(["train", "epochs=1", "batch_size=8", "data.image_size=16", "data.dataset=folder", "tta=2",
                 "augment.flip=none", "precision=fp32", f"data.path={pictures}", "--runs-dir",
                 str(tmp_path / "runs"), "--name", "r", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "mirroring: augment.flip=none (no training image mirrored); test-time views: tta 2 (1-pixel " \
           "shifts, no mirror)" in out
    checkpoint = load_checkpoint(tmp_path / "runs" / "r" / "best.pt")
    assert checkpoint["tta_mirror"] is False
    assert main(["evaluate", str(tmp_path / "runs" / "r"), "--device", "cpu", "--out", str(tmp_path / "e")]) \
        == 0
    assert "tta 2 (1-pixel shifts, no mirror)" in capsys.readouterr().out
    info = checkpoint_dataset(checkpoint)
    data = load_dataset(data_config(checkpoint["config"]["data"]))
    model = model_from_checkpoint(checkpoint).eval()
    x, y = next(iter(Loader(data.test_images, data.test_labels, 100, device="cpu", mean=info["mean"],
                            std=info["std"])))
    with torch.no_grad():
        loss, mirrored = (torch.nn.functional.cross_entropy(tta_logits(model, x, 2, mirror=m), y).item()
                          for m in (False, True))
    saved = json.loads((tmp_path / "e" / "test_metrics.json").read_text())["test_loss"]
    assert saved == pytest.approx(loss, abs=1e-6) and saved != pytest.approx(mirrored, abs=1e-6)
    del checkpoint["tta_mirror"]
    assert checkpoint_settings(checkpoint, torch.device("cpu")).mirror


def test_a_folder_run_with_mirroring_says_how_to_turn_it_off(folder_run):
    run_dir, _ = folder_run
    assert load_checkpoint(run_dir / "best.pt")["tta_mirror"] is True


def save_noise(path, seed: int) -> None:
    """A 40x48 picture of random pixels: like no other image of the folder."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)


def train_on_folder(pictures, runs, *args: str) -> int:
    return main(["train", "epochs=1", "batch_size=8", "data.image_size=16", "data.dataset=folder",
                 f"data.path={pictures}", "--runs-dir", str(runs), "--name", "r", "--device", "cpu", *args])


def test_the_split_does_not_move_and_evaluate_says_what_changed(tmp_path, capsys):
    """A run on a folder without test/; files then added, removed, renamed and rewritten. No image the model
    trained on is measured as a test image; evaluate, report and predict --labels-from-folders count what
    changed."""
    root = write_image_folder(tmp_path / "pics", per_class=20, test_per_class=None)

    def held(key: str, fraction: float, side: bytes) -> bool:
        return bool(splits.hash_held_out([key, "x"], np.array([0, 0]), fraction, 0, side)[0])

    def test_side_name(stem: str) -> str:  # a file name whose hash puts it on the test side
        return next(f"{stem}-{i}.png" for i in range(1000) if held(f"{stem}-{i}.png", 0.2, b"test"))

    # a duplicate in the folder from the start: the same picture as a training image, on the test side
    source = next(f"train/fox/{i}.png" for i in (0, 8, 12, 16)  # PNG files at the class folder's top
                  if not held(f"train/fox/{i}.png", 0.2, b"test")
                  and not held(f"train/fox/{i}.png", 0.5, b"val"))
    shutil.copy(root / source, root / test_side_name("train/fox/dup"))
    run = tmp_path / "runs" / "r"
    assert train_on_folder(root, tmp_path / "runs") == 0
    checkpoint = load_checkpoint(run / "best.pt")
    split = checkpoint["split"]
    assert split["train"]["count"] + split["val"]["count"] + split["test"]["count"] == 61
    out = capsys.readouterr().out  # train says so before it starts
    assert f"split: 1 of the {split['test']['count']} test images have the pixels of a training image" in out
    assert main(["evaluate", str(run), "--device", "cpu", "--out", str(tmp_path / "e0")]) == 0
    # nothing moved: the duplicate is left out as a copy, not reported as a move
    out = capsys.readouterr().out
    assert "changed sides" not in out
    assert f"1 of the {split['test']['count']} test images have the pixels of a training image" in out
    assert "LEFT OUT: 1" in out
    cfg = data_config(checkpoint["config"]["data"])
    data = load_dataset(cfg)
    trained = [k for k, v in zip(data.train_ids, validation_mask(data, cfg).tolist()) if not v]
    assert len(trained) == split["train"]["count"]
    # a training image renamed to a name whose hash puts it on the test side; another rewritten in place (new
    # pixels, same path); a new picture on the test side; a training image and a test image removed
    cats = [k for k in trained if k.startswith("train/cat/") and k.endswith(".png")]
    victim, rewritten = cats[0], cats[1]
    new_name = test_side_name("train/cat/moved")
    Image.open(root / victim).save(root / new_name)  # png: the same pixels, decoded again
    (root / victim).unlink()
    save_noise(root / rewritten, 3)
    save_noise(root / test_side_name("train/dog/new"), 4)
    shutil.copy(root / data.test_ids[0], root / "train" / "dog" / "copy-of-a-test-image.png")
    (root / data.test_ids[1]).unlink()
    (root / next(k for k in trained if k.startswith("train/dog/"))).unlink()
    assert main(["evaluate", str(run), "--device", "cpu", "--out", str(tmp_path / "e1")]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "e1" / "test_metrics.json").read_text())
    now = load_dataset(cfg)
    assert new_name in now.test_ids  # the renamed training image is on the test side now: left out, said so
    # left out: the renamed training image and the duplicate, both by their pixels; one new test image, one
    # training image gone (the renamed one is not gone: its pixels are still there)
    counts = {k: saved["split"][k] for k in ("changed_sides", "were_validation", "copies_of_training_images",
                                             "trained_on_left_out", "new", "gone")}
    assert counts == {"changed_sides": 0, "were_validation": 0, "copies_of_training_images": 2,
                      "trained_on_left_out": 2, "new": 1, "gone": 1}
    assert f"2 of the {len(now.test_ids)} test images have the pixels of a training image" in out
    assert "1 test image(s) are new since training; 1 image(s) the model trained on are gone" in out
    assert "LEFT OUT: 2" in out and saved["num_images"] == len(now.test_ids) - 2
    assert main(["report", str(run), "--device", "cpu"]) == 0
    assert "have the pixels of a training image" in capsys.readouterr().out
    assert main(["predict", str(run), str(root / "train" / "cat"), "--labels-from-folders", "-q", "--device",
                 "cpu"]) == 0
    # trained on: the cat training images still there (the rewritten one by its path), and the renamed one
    cat_files = [k for k in trained if k.startswith("train/cat/") and (root / k).exists()]
    out = capsys.readouterr().out
    assert f"split: {len(cat_files) + 1} of these files are images the model trained on" in out


def test_train_test_and_evaluate_count_the_same_test_images(tmp_path, capsys):
    """A folder whose test/ holds copies of training images: train says so before it trains, and
    `train --test` and `evaluate` leave the copies out alike (the same images, accuracy and loss)."""
    pictures = write_image_folder(tmp_path / "pics", per_class=8, test_per_class=4)
    # each under another class's name, so that counting them would change the accuracy too
    for name, other in zip(FOLDER_CLASSES, FOLDER_CLASSES[1:] + FOLDER_CLASSES[:1]):
        shutil.copy(pictures / "train" / name / "0.png", pictures / "test" / other / f"{name}-0.png")
    assert train_on_folder(pictures, tmp_path / "runs", "data.val_size=0", "precision=fp32", "--test") == 0
    out = capsys.readouterr().out
    said = out.index("split: 3 of the 15 test images have the pixels of a training image (copies across the "
                     "split): test accuracies (--test, evaluate) count the 12 others")
    assert said < out.index("train loss")  # in the banner, before the first epoch
    tested = json.loads((tmp_path / "runs" / "r" / "test.json").read_text())
    assert tested["test_images"] == 12 and "on 12 test images (3 copies of training images left out)" in out
    run, out_dir = tmp_path / "runs" / "r", tmp_path / "e"
    assert main(["evaluate", str(run), "--device", "cpu", "--out", str(out_dir)]) == 0
    evaluated = json.loads((out_dir / "test_metrics.json").read_text())
    assert evaluated["num_images"] == 12 and evaluated["split"]["copies_of_training_images"] == 3
    assert evaluated["test_accuracy"] == tested["test_acc"]
    assert evaluated["test_loss"] == pytest.approx(tested["test_loss"], rel=1e-6)


def test_train_test_refuses_a_test_set_of_copies_before_it_trains(tmp_path, capsys):
    pictures = write_image_folder(tmp_path / "pics", per_class=4, test_per_class=None)
    for name in FOLDER_CLASSES:  # test/ holds nothing but training images
        shutil.copytree(pictures / "train" / name, pictures / "test" / name)
    assert train_on_folder(pictures, tmp_path / "runs", "batch_size=4", "data.val_size=0", "--test") == 1
    err = capsys.readouterr().err
    assert "every one of the 12 test images of pics is an image the model trained on" in err
    assert "Traceback" not in err and not (tmp_path / "runs" / "r" / "last.pt").exists()


def test_report_measures_again_when_a_test_file_is_swapped_for_another(tmp_path, capsys):
    """The same number of test images but another file, or other pixels under the same name: report does not
    reuse the saved evaluation (--no-evaluate refuses; otherwise it evaluates again)."""
    pictures = write_image_folder(tmp_path / "pics", per_class=8, test_per_class=4)
    run = tmp_path / "runs" / "r"
    assert train_on_folder(pictures, tmp_path / "runs") == 0
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    assert main(["report", str(run), "--device", "cpu", "--no-evaluate"]) == 0  # up to date: used as it is
    metrics = run / "eval" / "test_metrics.json"
    first = json.loads(metrics.read_text())
    capsys.readouterr()
    (pictures / "test" / "cat" / "1.jpg").unlink()  # swapped for another cat picture: 12 test images still
    save_noise(pictures / "test" / "cat" / "other.png", 5)
    assert main(["report", str(run), "--device", "cpu", "--no-evaluate"]) == 1
    assert "the test images (their files or pixels) changed since" in capsys.readouterr().err
    assert main(["report", str(run), "--device", "cpu"]) == 0
    assert "changed since" in capsys.readouterr().out
    second = json.loads(metrics.read_text())
    digests = [first["split"]["test_digest"], second["split"]["test_digest"]]
    assert second["num_images"] == first["num_images"] == 12 and digests[0] != digests[1]
    save_noise(pictures / "test" / "dog" / "1.jpg", 6)
    assert main(["report", str(run), "--device", "cpu", "--no-evaluate"]) == 1  # same names, other pixels
    del second["split"]["test_digest"]  # as evaluations before the digest was recorded: measured again
    metrics.write_text(json.dumps(second))
    assert main(["report", str(run), "--device", "cpu"]) == 0
    assert "does not record which test images it measured" in capsys.readouterr().out
    assert json.loads(metrics.read_text())["split"]["test_digest"] not in digests
