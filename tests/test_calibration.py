"""Temperature scaling: the fit on over- and under-confident logits, ECE and NLL on hand-checked examples, the
temperature a run stores at the end of training and `cifarcnn calibrate` stores later, and how evaluate,
predict and serve use it (and say when a checkpoint has none)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from cifarcnn.base.calibration import (
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability,
    top1_log_loss,
)
from cifarcnn.base.inference import checkpoint_settings, predict_logits, probabilities
from cifarcnn.cli import main
from cifarcnn.data.cifar import load_cifar10
from cifarcnn.data.loader import Loader
from cifarcnn.training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from cifarcnn.use.evaluate import evaluate
from cifarcnn.use.predict import load_model
from cifarcnn.use.serve import describe_model

from .conftest import write_image_folder
from .test_predict import write_pngs

RECORD_KEYS = {"temperature", "fitted_on", "tta", "images", "ece_before", "ece_after", "nll_before",
               "nll_after"}
SMALL = ["epochs=2", "batch_size=64", "eval_batch_size=50", "data.val_size=100", "log_every=2"]


def calibrated_logits(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is calibrated by construction: each label is drawn from softmax(logits)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 10, generator=generator) * 2.5
    labels = torch.multinomial(logits.softmax(1), 1, generator=generator).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("scale", [3.0, 1 / 3])
def test_the_temperature_undoes_over_and_under_confidence(scale):
    """Logits scaled by 3 (over-confident) get T near 3, by 1/3 (under-confident) T near 1/3; ECE and NLL fall
    to those of the calibrated logits."""
    logits, labels = calibrated_logits(20000)
    distorted = logits * scale
    t = fit_temperature(distorted, labels)
    assert t == pytest.approx(scale, rel=0.05) and (t > 1) == (scale > 1)
    before = expected_calibration_error(distorted.softmax(1), labels)
    after = expected_calibration_error((distorted / t).softmax(1), labels)
    assert before > 0.1 and after < 0.015
    assert nll((distorted / t).softmax(1), labels) < nll(distorted.softmax(1), labels)
    # deterministic: the same logits give the same temperature
    assert fit_temperature(distorted, labels) == t


def test_the_temperature_fits_the_top1_probability_where_the_nll_fit_does_not():
    """Calibrated logits whose runner-up classes are squashed toward zero (a shape one T cannot undo): the fit
    minimizes the top-1 probability's log loss (checked on a grid by hand), and its ECE is about half the NLL
    fit's (2.6% against 4.9% here)."""
    logits, labels = calibrated_logits(20000, seed=2)
    top = logits.argmax(1, keepdim=True)
    bent = logits.scatter(1, top, 0.0) * 0.3 + logits.gather(1, top) * torch.nn.functional.one_hot(
        top.squeeze(1), 10)
    t = fit_temperature(bent, labels)
    grid = torch.linspace(0.2, 3.0, 561).tolist()
    by_hand = min(grid, key=lambda g: top1_log_loss(bent.double(), labels, g))
    assert t == pytest.approx(by_hand, abs=0.01)
    nll_t = min(grid, key=lambda g: nll((bent.double() / g).softmax(1), labels))
    assert abs(nll_t - t) > 0.05
    ece = expected_calibration_error((bent / t).softmax(1), labels)
    assert ece < 0.6 * expected_calibration_error((bent / nll_t).softmax(1), labels)


def test_a_calibrated_model_keeps_a_temperature_near_1():
    logits, labels = calibrated_logits(20000, seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.05)


def test_ece_and_nll_on_a_hand_checked_example():
    """Top-1 confidences 0.9 (right), 0.9 (wrong), 0.62 (right), 0.58 (wrong). 15 bins: (0.8667, 0.9333] holds
    the two 0.9s (accuracy 1/2, gap 0.4, weight 1/2), (0.6, 0.6667] the 0.62 (gap 0.38, weight 1/4),
    (0.5333, 0.6] the 0.58 (gap 0.58, weight 1/4): ECE = 0.2 + 0.095 + 0.145 = 0.44 (an unweighted mean over
    the bins would give 0.4533). One bin: mean confidence 0.75, accuracy 1/2, ECE 0.25."""
    top = torch.tensor([0.9, 0.9, 0.62, 0.58], dtype=torch.float64)
    probs = torch.stack([top, 1 - top], 1)
    labels = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.44, abs=1e-9)
    assert expected_calibration_error(probs, labels, bins=1) == pytest.approx(0.25, abs=1e-9)
    table = reliability(probs, labels)
    assert table["count"][13] == 2 and table["count"][9] == 1 and table["count"][8] == 1
    assert sum(table["count"]) == 4
    assert table["accuracy"][13] == 0.5 and table["accuracy"][8] == 0.0
    assert table["confidence"][9] == pytest.approx(0.62) and table["accuracy"][0] is None
    # a bin holds (lo, hi]: 0.5 with 2 bins is in the lower one
    assert reliability(torch.tensor([[0.5, 0.5]]), torch.tensor([0]), bins=2)["count"] == [1, 0]
    # NLL: -(ln 0.9 + ln 0.1 + ln 0.62 + ln 0.42) / 4
    expected = -(math.log(0.9) + math.log(0.1) + math.log(0.62) + math.log(0.42)) / 4
    assert nll(probs, labels) == pytest.approx(expected, rel=1e-6)


def validation_logits(run_dir, data_root) -> tuple[torch.Tensor, torch.Tensor]:
    """The best checkpoint's logits on CIFAR's seeded validation images, with its TTA."""
    from cifarcnn.base.config import data_config
    from cifarcnn.data.loader import validation_mask

    checkpoint = load_checkpoint(run_dir / "best.pt")
    data = load_cifar10(data_root)
    mask = validation_mask(data, data_config(checkpoint["config"]["data"]))
    loader = Loader(data.train_images[mask], data.train_labels[mask], 50, device="cpu",
                    memory_format=torch.channels_last)
    model = model_from_checkpoint(checkpoint).to(memory_format=torch.channels_last)
    return predict_logits(model, loader, checkpoint_settings(checkpoint, torch.device("cpu")))


def test_training_stores_the_temperature_fitted_on_the_validation_split(trained_run_dir, cifar_root):
    best = load_checkpoint(trained_run_dir / "best.pt")
    record = best["calibration"]
    assert set(record) == RECORD_KEYS and record["fitted_on"] == "validation" and record["images"] == 100
    assert record["tta"] == best["config"]["tta"]
    logits, labels = validation_logits(trained_run_dir, cifar_root)
    assert record["temperature"] == pytest.approx(fit_temperature(logits, labels), rel=1e-3)
    last = load_checkpoint(trained_run_dir / "last.pt")
    if best["best_epoch"] == last["epoch"]:  # the same model: the same temperature
        assert last["calibration"] == record


def test_evaluate_predict_and_serve_use_the_temperature(trained_run_dir, cifar_root, tmp_path, capsys):
    """The probabilities are softmax(logits / T) everywhere: they differ from the plain softmax, the argmax
    (and so the accuracy) does not."""
    t = load_checkpoint(trained_run_dir / "best.pt")["calibration"]["temperature"]
    results = evaluate(trained_run_dir, data_dir=cifar_root, device="cpu", out_dir=tmp_path / "eval")
    printed = capsys.readouterr().out
    scores = results["calibration"]
    assert scores["calibrated"] and scores["temperature"] == t
    assert f"ECE {scores['ece_before']:.2%} -> {scores['ece_after']:.2%}" in printed
    assert f"softmax(logits / {t:.4f})" in printed
    assert (tmp_path / "eval" / "reliability.png").stat().st_size > 0

    data = load_cifar10(cifar_root)
    write_pngs(data.test_images, data.test_labels, tmp_path / "pngs")
    out = tmp_path / "p.json"
    assert main(["predict", str(trained_run_dir), str(tmp_path / "pngs"), "--labels-from-folders", "-q",
                 "--top-k", "10", "--output", str(out), "--device", "cpu"]) == 0
    assert f"softmax(logits / {t:.4f})" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["temperature"] == t and saved["accuracy"]["accuracy"] == results["test_accuracy"]

    loaded = load_model(trained_run_dir, "cpu")
    loader = Loader(data.test_images, data.test_labels, 50, device="cpu", memory_format=torch.channels_last)
    logits, _ = predict_logits(loaded.model, loader, loaded.settings)
    calibrated, plain = probabilities(logits, loaded.settings), logits.softmax(1)
    assert (calibrated - plain).abs().max() > 1e-3
    assert torch.equal(calibrated.argmax(1), plain.argmax(1))
    predicted = torch.zeros_like(calibrated)
    for record in saved["results"]:
        n = int(record["path"].rsplit("/", 1)[1][:-4])
        for p in record["predictions"]:
            predicted[n, loaded.classes.index(p["class"])] = p["probability"]
    assert torch.allclose(predicted, calibrated, atol=1e-5)
    # expected_calibration_error from predict's files equals evaluate's
    assert expected_calibration_error(predicted, data.test_labels) == pytest.approx(scores["ece_after"],
                                                                                     abs=1e-4)

    # serve: GET /v1/model names the temperature, and each answer (LoadedModel.classify) uses it
    details = describe_model(loaded)[1]
    assert details["calibration"]["temperature"] == t and "calibrated" in details["probabilities"]
    served = loaded.classify(data.test_images[:4].permute(0, 2, 3, 1).numpy(), top_k=1)
    assert [top[0][1] for top in served] == pytest.approx(calibrated[:4].max(1).values.tolist(), abs=1e-5)


def test_a_checkpoint_without_calibration_works_uncalibrated_and_says_so(trained_run_dir, cifar_root,
                                                                        tmp_path, capsys):
    old = load_checkpoint(trained_run_dir / "best.pt")
    del old["calibration"]
    save_checkpoint(tmp_path / "old.pt", old)
    results = evaluate(tmp_path / "old.pt", data_dir=cifar_root, device="cpu", out_dir=tmp_path / "eval")
    assert "probabilities: UNCALIBRATED" in capsys.readouterr().out
    assert results["calibration"]["calibrated"] is False and results["calibration"]["temperature"] is None
    assert "ece_after" not in results["calibration"]

    data = load_cifar10(cifar_root)
    write_pngs(data.test_images[:20], data.test_labels[:20], tmp_path / "pngs")
    out = tmp_path / "p.json"
    assert main(["predict", str(tmp_path / "old.pt"), str(tmp_path / "pngs"), "-q", "--output", str(out),
                 "--device", "cpu"]) == 0
    assert "probabilities: UNCALIBRATED" in capsys.readouterr().out
    assert json.loads(out.read_text())["temperature"] is None

    loaded = load_model(tmp_path / "old.pt", "cpu")
    details = describe_model(loaded)[1]
    assert details["calibration"] is None and "UNCALIBRATED" in details["probabilities"]
    loader = Loader(data.test_images[:4], data.test_labels[:4], 4, device="cpu",
                    memory_format=torch.channels_last)
    plain = predict_logits(loaded.model, loader, loaded.settings)[0].softmax(1)
    served = loaded.classify(data.test_images[:4].permute(0, 2, 3, 1).numpy(), top_k=1)
    assert [top[0][1] for top in served] == pytest.approx(plain.max(1).values.tolist(), abs=1e-5)


def test_calibrate_fits_what_training_would_have_fitted(cifar_root, tmp_path, capsys):
    """A run trained with calibrate=false has no temperature; `cifarcnn calibrate` stores the one the same
    run trained with calibrate=true stored (same seed, same weights, same validation images) in best.pt and
    last.pt (the same model here), and says so."""
    common = ["--data-dir", str(cifar_root), "--device", "cpu", "--runs-dir", str(tmp_path)]
    assert main(["train", *SMALL, "calibrate=false", *common, "--name", "off"]) == 0
    assert main(["train", *SMALL, *common, "--name", "on"]) == 0
    assert "calibration: temperature" in capsys.readouterr().out
    assert "calibration" not in load_checkpoint(tmp_path / "off" / "best.pt")
    trained = load_checkpoint(tmp_path / "on" / "best.pt")["calibration"]
    assert main(["calibrate", str(tmp_path / "off"), "--data-dir", str(cifar_root), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for name in ("best.pt", "last.pt"):
        record = load_checkpoint(tmp_path / "off" / name)["calibration"]
        assert record["temperature"] == pytest.approx(trained["temperature"], rel=1e-3)
        assert record["images"] == trained["images"] == 100
    assert f"temperature {record['temperature']:.4f}" in printed and "NLL" in printed and "ECE" in printed


def test_calibrate_on_a_folder_run_uses_the_recorded_validation_images(tmp_path, capsys):
    pictures = write_image_folder(tmp_path / "pictures")
    recipe = ["epochs=2", "batch_size=16", "eval_batch_size=20", "data.val_size=12", "log_every=2",
              "data.image_size=16", "data.dataset=folder", f"data.path={pictures}"]
    common = ["--device", "cpu", "--runs-dir", str(tmp_path / "runs")]
    assert main(["train", *recipe, "calibrate=false", *common, "--name", "off"]) == 0
    assert main(["train", *recipe, *common, "--name", "on"]) == 0
    trained = load_checkpoint(tmp_path / "runs" / "on" / "best.pt")["calibration"]
    # a file added to the folder since training changes no side, and is not a validation image
    shutil.copy(next((pictures / "train" / "cat").glob("*.png")), pictures / "train" / "cat" / "new.png")
    assert main(["calibrate", str(tmp_path / "runs" / "off"), "--device", "cpu"]) == 0
    record = load_checkpoint(tmp_path / "runs" / "off" / "best.pt")["calibration"]
    assert record["images"] == trained["images"] > 0
    assert record["temperature"] == pytest.approx(trained["temperature"], rel=1e-3)


def test_without_a_validation_split_training_says_so_and_calibrate_refuses(cifar_root, tmp_path, capsys):
    common = ["--data-dir", str(cifar_root), "--device", "cpu"]
    assert main(["train", "epochs=1", "batch_size=64", "data.val_size=0", *common, "--runs-dir",
                 str(tmp_path), "--name", "r"]) == 0
    assert "no validation split (data.val_size=0)" in capsys.readouterr().out
    assert "calibration" not in load_checkpoint(tmp_path / "r" / "best.pt")
    assert main(["calibrate", str(tmp_path / "r"), *common]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "without a validation split" in err and len(err.splitlines()) == 1
    assert "calibration" not in load_checkpoint(tmp_path / "r" / "best.pt")
