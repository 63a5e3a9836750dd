"""The rungs of the preset ladder besides seed and fast: `quick`, `resnet18` and `best` end to end on a tiny
synthetic CIFAR-10 (train, every artifact, evaluate and report on the checkpoint; predict and export on
quick's), and the recipes they declare."""

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifarcnn.base.config import load_preset
from cifarcnn.base.inference import Settings, infer, probabilities
from cifarcnn.cli import main
from cifarcnn.data.images import to_model_input
from cifarcnn.models.registry import build_model, count_parameters
from cifarcnn.training.build import make_model
from cifarcnn.training.checkpoint import load_checkpoint
from cifarcnn.training.optimizers import build_optimizer
from cifarcnn.training.schedule import learning_rate
from cifarcnn.training.step import TrainStep

from .conftest import write_cifar

# 120 training images (20 held out for validation) and 40 test images: a few seconds per step for these wide
# nets on a 2-core CPU, one training step of 64 and one of 36.
TINY = ["epochs=1", "batch_size=64", "eval_batch_size=100", "data.val_size=20", "log_every=1"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-cifar")
    write_cifar(root, per_batch=24, num_test=40)
    return root


@pytest.mark.parametrize("preset, model, tta", [("quick", "quicknet", 2), ("resnet18", "resnet18", 0),
                                               ("best", "fastnet96", 2)])
def test_preset_trains_evaluates_and_reports_with_every_artifact(preset, model, tta, tiny_root, tmp_path,
                                                                 capsys):
    common = ["--data-dir", str(tiny_root), "--device", "cpu"]
    assert main(["train", "--preset", preset, *TINY, "--runs-dir", str(tmp_path), "--name", "r",
                 *common]) == 0
    run = tmp_path / "r"
    for name in ("best.pt", "last.pt", "config.yaml", "metrics.jsonl", "environment.json"):
        assert (run / name).is_file(), name
    checkpoint = load_checkpoint(run / "best.pt")
    assert (checkpoint["model"] == model and checkpoint["config"]["model"] == model
            and checkpoint["epoch"] == 1)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0 <= rows[0]["val_acc"] <= 1 and math.isfinite(rows[0]["train_loss"])
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"Loss/train", "Accuracy/val", "LearningRate", "GradientNorm"} <= set(events.Tags()["scalars"])

    assert main(["evaluate", str(run), *common]) == 0
    for name in ("test_metrics.json", "confusion_matrix.png", "misclassified.png"):
        assert (run / "eval" / name).is_file(), name
    metrics = json.loads((run / "eval" / "test_metrics.json").read_text())
    assert metrics["num_images"] == 40 and metrics["tta"] == tta and 0 <= metrics["test_accuracy"] <= 1

    assert main(["report", str(run), "--no-evaluate"]) == 0
    page = (run / "report.html").read_text()
    assert f"{metrics['test_accuracy']:.2%}" in page and model in page


def test_check_builds_each_preset_model(capsys):
    for preset, parameters in (("quick", "323,640 total, 322,848 trainable"),
                               ("fast", "1,972,792 total, 1,971,352 trainable"),
                               ("best", "9,918,776 total, 9,915,416 trainable"),
                               ("resnet18", "11,173,962 total, 11,173,962 trainable")):
        assert main(["check", "--preset", preset]) == 0
        out = capsys.readouterr().out
        assert ("(4, 10)" in out and parameters in out
                and "every trainable parameter received a gradient" in out)


def test_resnet18_preset_is_the_classic_recipe():
    cfg = load_preset("resnet18")
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.eval_batch_size, cfg.patience) == (
        "resnet18", 200, 128, 1000, 0)
    o = cfg.optimizer
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay, o.bias_lr_scale) == (
        "sgd", 0.1, 0.9, False, 5e-4, 1)
    assert (cfg.scheduler.name, cfg.scheduler.warmup_epochs, cfg.label_smoothing, cfg.tta) == (
        "cosine", 0, 0, 0)
    a = cfg.augment
    assert (a.flip, a.crop_padding, a.padding_mode, a.brightness, a.contrast, a.cutout) == (
        "random", 4, "zeros", 0, 0, 0)
    assert learning_rate(cfg, 100) == pytest.approx(0.05) and learning_rate(cfg, 200) == 0
    groups = build_optimizer(cfg, torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)),
                             torch.device("cpu")).param_groups
    assert [g["weight_decay"] for g in groups] == [5e-4, 5e-4]  # BatchNorm parameters decay too


def test_best_preset_follows_the_published_96_percent_method():
    cfg = load_preset("best")
    assert (cfg.model, cfg.batch_size, cfg.label_smoothing, cfg.tta, cfg.patience) == (
        "fastnet96", 1024, 0.2, 2, 0)
    assert 30 <= cfg.epochs <= 46
    a = cfg.augment
    assert (a.flip, a.crop_padding, a.padding_mode, a.cutout, a.brightness, a.contrast) == (
        "alternate", 4, "reflect", 12, 0, 0)
    o = cfg.optimizer
    assert (o.name, o.nesterov, o.momentum, o.bias_lr_scale, o.lookahead_steps) == ("sgd", True, 0.85, 64, 5)
    # the method's decoupled lr 9.0 and decay 0.012 per 1024 images of summed loss, for the mean loss in
    # PyTorch
    assert o.lr == pytest.approx(9.0 / (1 + 1 / (1 - 0.85)), rel=1e-3)
    assert o.weight_decay == pytest.approx(0.012 / 9.0, rel=1e-3)
    # warm-up from 0.2x over the first 10% of training, then linear decay to zero
    assert learning_rate(cfg, 0) == pytest.approx(0.2 * o.lr)
    assert learning_rate(cfg, 0.1 * cfg.epochs) == pytest.approx(o.lr)
    assert learning_rate(cfg, cfg.epochs) == 0


def test_fast_preset_follows_the_published_muon_method():
    cfg = load_preset("fast")
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.label_smoothing, cfg.tta, cfg.patience) == (
        "fastnet", 8, 1000, 0.2, 2, 0)
    a = cfg.augment
    assert (a.flip, a.crop_padding, a.padding_mode, a.cutout, a.brightness, a.contrast) == (
        "alternate", 2, "reflect", 0, 0, 0)
    o = cfg.optimizer
    assert (o.name, o.nesterov, o.momentum, o.muon_lr, o.muon_momentum, o.lookahead_steps) == (
        "muon", True, 0.85, 0.24, 0.6, 0)
    # The method's rates per summed loss, on a unit-std head divided by 256, converted to the mean loss of
    # 1000 images and this head's 1/9 scale: classifier 0.67, biases 0.053, decay 2e-6 x batch per step.
    assert o.lr == pytest.approx(0.67 * 1000 * (9 / 256) ** 2, rel=1e-3)
    assert o.lr * o.bias_lr_scale == pytest.approx(0.053 * 1000, rel=1e-2)
    assert o.lr * o.weight_decay == pytest.approx(2e-6 * 1000, rel=1e-3)
    assert build_model(cfg.model).config.logit_scale == pytest.approx(1 / 9)
    # no warm-up: the peak at step 0, then linear decay to zero
    assert learning_rate(cfg, 0) == pytest.approx(o.lr) and learning_rate(cfg, 4) == pytest.approx(o.lr / 2)
    assert learning_rate(cfg, 8) == 0


def test_quick_preset_is_quicknet_at_48_96_96_with_a_frozen_whitening_bias_and_its_schedule():
    cfg = load_preset("quick")
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.eval_batch_size, cfg.patience) == (
        "quicknet", 5, 256, 1000, 0)
    assert (cfg.label_smoothing, cfg.tta, cfg.ema_decay, cfg.compile) == (0.2, 2, 0.99, False)
    a = cfg.augment
    assert (a.flip, a.crop_padding, a.padding_mode, a.brightness, a.contrast, a.cutout) == (
        "alternate", 2, "reflect", 0, 0, 0)
    o = cfg.optimizer
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay, o.bias_lr_scale, o.lookahead_steps) == (
        "muon", 0.375, 0.85, True, 0.00133, 64, 5)
    assert (o.muon_lr, o.muon_momentum) == (0.1, 0.6)
    assert o.lr == pytest.approx(1.5 * 256 / 1024)  # airbench94's rate per batch of 1024, scaled to 256
    # warm-up from 0.2x over the first epoch, then linear decay to zero at the end of the 5
    assert learning_rate(cfg, 0) == pytest.approx(0.2 * o.lr) and learning_rate(cfg, 1) == pytest.approx(o.lr)
    assert learning_rate(cfg, 3) == pytest.approx(o.lr / 2) and learning_rate(cfg, 5) == 0

    model = build_model(cfg.model)
    assert model.whiten.out_channels == 24
    assert [(b.conv1.out_channels, b.conv2.out_channels) for b in model.blocks] == [
        (48, 48), (96, 96), (96, 96)]
    # whitening 24*3*2*2 + 24 (all frozen); convs 9*(24*48 + 48*48 + 48*96 + 96*96 + 96*96 + 96*96) = 321,408;
    # BatchNorm 2*(48 + 48 + 96 + 96 + 96 + 96) = 960, of which the scales (480) are frozen; the head 96*10,
    # no bias
    assert count_parameters(model) == (323_640, 322_848) == (312 + 321_408 + 960 + 960, 323_640 - 312 - 480)


def test_quick_preset_never_changes_the_whitening_bias():
    """Frozen from the start: no gradient, no optimizer group, and training steps leave it where it began."""
    cfg = load_preset("quick")
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    model = make_model(cfg, 10, images, torch.device("cpu"))
    assert not model.whiten.bias.requires_grad and model.train_epochs == {}
    step = TrainStep(model, build_optimizer(cfg, model, torch.device("cpu")), cfg, torch.device("cpu"),
                     "fp32")
    assert all(p is not model.whiten.bias for g in step.optimizer.param_groups for p in g["params"])
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = (images[:32].float() / 255 - 0.5) / 0.25, torch.arange(32) % 10
    for _ in range(2):
        for group in step.optimizer.param_groups:
            step.set_lr(group, cfg.optimizer.lr * group["lr_scale"])
        step(x.contiguous(memory_format=torch.channels_last), y)
    assert torch.equal(model.whiten.bias, start["whiten.bias"])
    # the other shifts do train
    assert not torch.equal(model.blocks[0].norm1.bias, start["blocks.0.norm1.bias"])


def per_image_probabilities(state: dict, checkpoint: dict, images: torch.Tensor, precision: str,
                            temperature: float) -> torch.Tensor:
    """Class probabilities of the quicknet weights `state` for uint8 images (N, 3, H, W), with the
    checkpoint's TTA and `temperature`, computed here rather than through the checkpoint loader predict
    uses."""
    model = build_model(checkpoint["model"], checkpoint["num_classes"])
    model.load_state_dict(state)
    x = to_model_input(images.permute(0, 2, 3, 1), "cpu", tuple(checkpoint["mean"]), tuple(checkpoint["std"]))
    settings = Settings(2, precision, temperature=temperature)
    logits = infer(model.eval(), x.contiguous(memory_format=torch.channels_last), settings)
    return probabilities(logits, settings)


def test_quick_preset_checkpoint_predicts_as_evaluate_and_exports(tiny_root, tmp_path, capsys):
    from cifarcnn.data.cifar import load_cifar10

    from .test_predict import write_pngs

    common = ["--data-dir", str(tiny_root), "--device", "cpu"]
    # Stopped at the end of warm-up on a 2-epoch schedule: the rate is at its peak, so the average (decay
    # 0.99 x lr / peak) is still far from the trained weights; with the full schedule the two end equal.
    args = ["train", "--preset", "quick", *TINY, "scheduler.epochs=2", "--runs-dir", str(tmp_path), "--name",
            "q"]
    assert main([*args, *common]) == 0
    run = tmp_path / "q"
    checkpoint = load_checkpoint(run / "last.pt")
    assert checkpoint["model"] == "quicknet" and checkpoint["config"]["ema_decay"] == 0.99
    average, trained = checkpoint["model_state"], checkpoint["train_model_state"]  # model_state: the average
    assert any(not torch.equal(v, trained[k]) for k, v in average.items())
    assert main(["evaluate", str(run), *common]) == 0
    evaluated = json.loads((run / "eval" / "test_metrics.json").read_text())

    data = load_cifar10(tiny_root)
    write_pngs(data.test_images, data.test_labels, tmp_path / "pngs")
    out = tmp_path / "predictions.json"
    assert main(["predict", str(run), str(tmp_path / "pngs"), "--labels-from-folders", "-q", "--output",
                 str(out), "--top-k", "10", "--device", "cpu"]) == 0
    predictions = json.loads(out.read_text())
    assert predictions["accuracy"]["num_images"] == 40
    assert predictions["accuracy"]["accuracy"] == evaluated["test_accuracy"]
    classes = checkpoint["classes"]
    predicted = torch.zeros(40, len(classes))
    for record in predictions["results"]:
        for p in record["predictions"]:
            predicted[int(record["path"].rsplit("/", 1)[1][:-4]),
                      classes.index(p["class"])] = p["probability"]
    precision, temperature = predictions["precision"], predictions["temperature"]
    assert temperature == load_checkpoint(run / "best.pt")["calibration"]["temperature"]
    expected = per_image_probabilities(average, checkpoint, data.test_images, precision, temperature)
    assert torch.allclose(predicted, expected, atol=1e-5)
    # the trained weights would predict measurably different probabilities, so the check above can tell them
    # apart
    other = per_image_probabilities(trained, checkpoint, data.test_images, precision, temperature)
    assert (predicted - other).abs().max() > 1e-3

    assert main(["export", str(run), "--output", str(tmp_path / "quick.onnx"), "--data-dir",
                 str(tiny_root)]) == 0
    assert (tmp_path / "quick.onnx").stat().st_size > 0
