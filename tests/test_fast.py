"""Presets, the fast recipe's pieces (FastNet, lookahead, schedules, TTA) and the bench command."""

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifarcnn.base.config import Config, make_config, preset_names
from cifarcnn.base.inference import Settings, infer, tta_logits
from cifarcnn.cli import main
from cifarcnn.models.registry import build_model
from cifarcnn.training.averages import Lookahead
from cifarcnn.training.optimizers import build_optimizer
from cifarcnn.training.schedule import learning_rate

TINY_FAST = ["epochs=2", "batch_size=256", "eval_batch_size=100", "data.val_size=100"]


def test_presets_are_listed_and_preset_seed_reads_the_file_the_root_config_links_to(
        tmp_path, capsys, monkeypatch, edited_seed_preset):
    assert {"seed", "fast"} <= set(preset_names())
    root = Path(__file__).resolve().parents[1]
    packaged_seed = Path(str(resources.files("cifarcnn") / "presets" / "seed.yaml"))
    assert (root / "config.yaml").resolve() == packaged_seed.resolve()
    monkeypatch.chdir(tmp_path)  # the packaged presets do not depend on the current folder...
    (tmp_path / "config.yaml").write_text("model: fastnet\n")  # ...nor on a ./config.yaml there
    assert main(["check", "--preset", "seed"]) == 0
    assert "model:      simple_cnn" in capsys.readouterr().out
    # a changed copy of the file --preset seed reads
    edited_seed_preset("model: simple_cnn", "model: fastnet")
    (tmp_path / "config.yaml").write_text("model: simple_cnn\n")
    assert main(["check", "--preset", "seed"]) == 0
    assert "model:      fastnet" in capsys.readouterr().out
    assert main(["check", "--preset", "fast"]) == 0
    out = capsys.readouterr().out
    assert "fastnet" in out and "(4, 10)" in out
    assert main(["check", "--preset", "nope"]) == 2
    assert "fast" in capsys.readouterr().err


def test_overrides_apply_on_top_of_a_preset(tmp_path, cifar_root):
    code = main(["train", "--preset", "fast", *TINY_FAST, "epochs=1", "optimizer.lr=0.5", "--data-dir",
                 str(cifar_root), "--runs-dir", str(tmp_path), "--name", "r", "--device", "cpu"])
    assert code == 0
    from cifarcnn.training.checkpoint import load_checkpoint

    cfg = load_checkpoint(tmp_path / "r" / "last.pt")["config"]
    assert cfg["model"] == "fastnet" and cfg["optimizer"]["lr"] == 0.5 and cfg["epochs"] == 1
    assert cfg["optimizer"]["name"] == "muon" and cfg["augment"]["flip"] == "alternate"


def test_fast_preset_runs_end_to_end_with_every_artifact(tmp_path, cifar_root, capsys):
    common = ["--data-dir", str(cifar_root), "--device", "cpu"]
    assert main(["train", "--preset", "fast", *TINY_FAST, "--runs-dir", str(tmp_path), "--name", "f",
                 "--test", *common]) == 0
    run = tmp_path / "f"
    for name in ("best.pt", "last.pt", "config.yaml", "metrics.jsonl"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[1]["val_acc"] is not None and 0 <= rows[-1]["test"]["test_acc"] <= 1
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"Loss/train", "Loss/val", "Accuracy/train", "Accuracy/val", "LearningRate",
            "GradientNorm"} <= set(events.Tags()["scalars"])
    assert main(["evaluate", str(run), "--out", str(tmp_path / "eval"), *common]) == 0
    saved = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())
    assert saved["tta"] == 2 and saved["num_images"] == 200


def test_training_without_a_validation_set(tmp_path, cifar_root):
    from cifarcnn.training.train import train

    cfg = make_config({}, ["epochs=2", "batch_size=200", "data.val_size=0", "patience=1"])
    state = train(cfg, tmp_path / "r", data_dir=cifar_root, device="cpu", test=True)
    assert state["epoch"] == 2 and state["best_epoch"] == 2 and not state["stopped_early"]
    assert state["history"][0]["val_acc"] is None and state["test"]["epoch"] == 2
    assert state["train_seconds"] > 0
    # the rest of the workflow copes with a run that has no validation metrics
    assert main(["report", str(tmp_path / "r"), "--data-dir", str(cifar_root), "--device", "cpu"]) == 0
    assert "no validation set" in (tmp_path / "r" / "report.html").read_text()


def test_fastnet_whitening_makes_patches_uncorrelated():
    torch.manual_seed(0)
    model = build_model("fastnet")
    images = torch.randn(200, 3, 32, 32) @ torch.randn(32, 32) * 0.3 + 0.1  # correlated pixels
    model.init_from_data(images)
    out = model.whiten(images) - model.whiten.bias[None, :, None, None]
    first_half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = first_half.T @ first_half / len(first_half)
    assert torch.allclose(covariance, torch.eye(12), atol=0.05)
    assert not model.whiten.weight.requires_grad
    assert model(images[:4]).shape == (4, 10)


def test_fastnet_blocks_start_as_identity_and_norm_scales_are_frozen():
    model = build_model("fastnet")
    conv = model.blocks[1].conv2
    x = torch.randn(1, conv.in_channels, 8, 8)
    assert torch.allclose(conv(x)[:, : conv.in_channels], x, atol=1e-6)
    assert not model.blocks[0].norm1.weight.requires_grad and model.blocks[0].norm1.bias.requires_grad


def test_batchnorm_parameters_get_their_own_learning_rate_and_decay():
    cfg = make_config({}, ["optimizer.name=sgd", "optimizer.bias_lr_scale=64", "optimizer.weight_decay=0.01"])
    model = build_model("fastnet")
    others, norms, whiten_bias = build_optimizer(cfg, model, torch.device("cpu")).param_groups
    assert whiten_bias["until_epoch"] == 3
    assert (others["lr_scale"], norms["lr_scale"]) == (1.0, 64)
    assert norms["weight_decay"] == pytest.approx(0.01 / 64) and others["weight_decay"] == 0.01
    norm_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
                   for p in m.parameters() if p.requires_grad}
    assert {id(p) for p in norms["params"]} == norm_params


def test_linear_schedule_with_warm_up():
    cfg = make_config({}, ["epochs=10", "scheduler.name=linear", "scheduler.warmup_epochs=2",
                           "scheduler.warmup_factor=0.2", "optimizer.lr=1.5"])
    assert learning_rate(cfg, 0) == pytest.approx(0.3)
    assert learning_rate(cfg, 1) == pytest.approx(0.9)
    assert learning_rate(cfg, 2) == pytest.approx(1.5)
    assert learning_rate(cfg, 6) == pytest.approx(0.75)
    assert learning_rate(cfg, 10) == pytest.approx(0.0)
    assert learning_rate(Config(), 0) == pytest.approx(1e-3)  # no warm-up by default


def test_lookahead_pulls_weights_toward_their_average():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    lookahead = Lookahead(model, every=1)
    with torch.no_grad():
        model.weight.fill_(3.0)
    lookahead.update(decay=0.5)
    assert torch.allclose(model.weight, torch.full((1, 2), 2.0))  # halfway between 1 and 3, copied back
    with torch.no_grad():
        model.weight.fill_(10.0)
    lookahead.update(decay=1.0)
    assert torch.allclose(model.weight, torch.full((1, 2), 2.0))  # decay 1: the model takes the average


def test_tta_levels_1_and_0():
    model = build_model("simple_cnn").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tta_logits(model, x, 0), model(x))
        assert torch.allclose(tta_logits(model, x, 1), (model(x) + model(x.flip(3))) / 2, atol=1e-6)
    mirror_symmetric = x + x.flip(3)  # for a mirror-symmetric image, flipping changes nothing
    with torch.no_grad():
        assert torch.allclose(tta_logits(model, mirror_symmetric, 1), model(mirror_symmetric), atol=1e-5)


def test_tta_level_2_is_the_mirror_and_one_pixel_shifts_in_both_directions():
    model = build_model("simple_cnn").eval()
    x = torch.randn(3, 3, 32, 32)
    # The image moved one pixel down and right, and one pixel up and left, along both axes, the row or column
    # that comes in taken from the reflection: rows (and columns) of x in the order each shifted image reads
    # them.
    down, up = [1, *range(31)], [*range(1, 32), 30]
    shifted = [x[:, :, down][:, :, :, down], x[:, :, up][:, :, :, up]]
    assert (torch.equal(shifted[0][:, :, 5, 7], x[:, :, 4, 6])
            and torch.equal(shifted[1][:, :, 5, 7], x[:, :, 6, 8]))
    views = [(x, 1 / 4), (x.flip(3), 1 / 4), *((v, 1 / 8) for s in shifted for v in (s, s.flip(3)))]
    with torch.no_grad():
        expected = sum(weight * model(view) for view, weight in views)
        assert torch.allclose(tta_logits(model, x, 2), expected, atol=1e-5)
        assert not torch.allclose(tta_logits(model, x, 1), expected, atol=1e-3)


class BF16Logits(torch.nn.Module):
    """A model whose logits come out in bf16, as a model without an fp32 head gives them under autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.flatten(1)
        return (256 + pixels[:, :10] + 0.01 * pixels[:, -10:]).to(torch.bfloat16)


def test_tta_views_are_averaged_in_fp32():
    model, x = BF16Logits(), torch.randn(4, 3, 32, 32)
    logits = infer(model, x, Settings(2, "bf16"))
    assert logits.dtype == torch.float32
    # the same views from a model that hands its bf16 logits over in fp32: summed in fp32 whatever tta_logits
    # does
    expected = tta_logits(lambda v: model(v).float(), x, 2)
    # (near 256, bf16 steps by 2: summed in bf16, the six views would be rounded again at every addition)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_bench_prints_both_throughputs_and_their_ratio(tmp_path, cifar_root, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "batch_size=32", "eval_batch_size=100", "data.val_size=100", "--steps", "2",
                 "--warmup", "1", "--rounds", "2", "--data-dir", str(cifar_root), "--device", "cpu",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "full pipeline" in printed and "compute only" in printed and "pipeline / compute only" in printed
    result = json.loads(out.read_text())
    for key in ("train_images_per_s", "compute_only_images_per_s", "eval_images_per_s"):
        assert result[key] > 0
    assert len(result["train_rounds"]) == 2
    assert result["pipeline_over_compute"] == pytest.approx(
        result["train_images_per_s"] / result["compute_only_images_per_s"])
    assert ("MFU" in printed and result["matmul_flops_per_s"] > 0
            and result["matmul_precision"] == result["precision"])
    assert result["train_flops_per_s"] == pytest.approx(
        result["train_flops_per_image"] * result["train_images_per_s"])
    assert result["mfu"] == pytest.approx(result["train_flops_per_s"] / result["matmul_flops_per_s"])


def test_training_flops_are_counted_for_forward_and_backward():
    from cifarcnn.reports.bench import train_flops_per_image

    def conv(size, c_in, c_out):
        return 2 * size * size * c_in * c_out * 9

    first = conv(32, 3, 32)
    forward = first + conv(16, 32, 64) + conv(8, 64, 128) + 2 * 2048 * 512 + 2 * 512 * 10
    # backward: weight gradients of every layer, input gradients of all but the first (its input needs none)
    assert train_flops_per_image(build_model("simple_cnn")) == 3 * forward - first == 66_484_224


def test_bench_rejects_zero_steps(capsys):
    assert main(["bench", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_a_parameter_with_limited_epochs_stops_learning_after_them(tmp_path, cifar_root):
    from cifarcnn.training.checkpoint import load_checkpoint
    from cifarcnn.training.train import train

    cfg = make_config({}, ["model=fastnet", "epochs=4", "batch_size=250", "data.val_size=100",
                           "optimizer.name=sgd", "optimizer.lr=0.1"])
    model = build_model("fastnet")
    model.train_epochs = {"whiten.bias": 1}
    groups = build_optimizer(cfg, model, torch.device("cpu")).param_groups
    assert [g["until_epoch"] for g in groups] == [None, None, 1]
    assert groups[2]["params"][0] is model.whiten.bias
    assert all(p is not model.whiten.bias for g in groups[:2] for p in g["params"])

    seen = []
    train(cfg, tmp_path / "r", data_dir=cifar_root, device="cpu",
          on_epoch_end=lambda m: seen.append(
              load_checkpoint(tmp_path / "r" / "last.pt")["model_state"]) or False)
    # FastNet trains its whitening bias for its first 3 epochs only
    assert not torch.equal(seen[1]["whiten.bias"], seen[2]["whiten.bias"])
    assert torch.equal(seen[2]["whiten.bias"], seen[3]["whiten.bias"])
    assert not torch.equal(seen[2]["blocks.0.conv1.weight"], seen[3]["blocks.0.conv1.weight"])


def test_training_split_and_show_batch_without_a_validation_set(tmp_path, cifar_root):
    from cifarcnn.data.cifar import load_cifar10
    from cifarcnn.data.loader import training_split

    data = load_cifar10(cifar_root)
    (train_x, _), held_out = training_split(data, make_config({}, ["data.val_size=0"]).data)
    assert held_out is None and len(train_x) == len(data.train_images)
    (train_x, _), (val_x, _) = training_split(data, make_config({}, ["data.val_size=100"]).data)
    assert (len(train_x), len(val_x)) == (len(data.train_images) - 100, 100)
    assert main(["show-batch", "data.val_size=0", "--count", "8", "--out", str(tmp_path / "b.png"),
                 "--data-dir", str(cifar_root), "--device", "cpu"]) == 0
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def _fresh_cpu_step(cfg, train_epochs=None):
    """A seeded SimpleCNN and its TrainStep on the CPU: two calls give identical starting points.
    `train_epochs` (parameter name -> epochs) limits how long some parameters train."""
    from cifarcnn.training.step import TrainStep

    torch.manual_seed(0)
    model = build_model("simple_cnn")
    model.train_epochs = train_epochs or {}
    return model, TrainStep(model, build_optimizer(cfg, model, torch.device("cpu")), cfg, torch.device("cpu"),
                            "fp32")


def _assert_same_state(reference, other):
    for (name, a), b in zip(reference.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam", "muon"])
def test_warm_up_steps_leave_no_trace(optimizer_name):
    """Compile warm-up and CUDA graph capture run throwaway steps inside restored_afterwards: the run must go
    on exactly as if they never happened, from a fresh optimizer and from one mid-training."""
    from cifarcnn.training.step import restored_afterwards

    cfg = make_config({}, [f"optimizer.name={optimizer_name}", "optimizer.nesterov=true", "optimizer.lr=0.01",
                           "optimizer.weight_decay=0.001"])
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))

    reference, ref_step = _fresh_cpu_step(cfg)
    warmed, warm_step = _fresh_cpu_step(cfg)
    for _ in range(2):  # from a fresh optimizer, then from one with state
        with restored_afterwards(warmed, warm_step.optimizer):
            for _ in range(3):
                warm_step(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
        ref_step(x, y)
        warm_step(x, y)
        _assert_same_state(reference, warmed)


def test_the_warm_up_before_the_clock_changes_nothing(cifar_root):
    """warm_up runs every train and eval batch shape and set of frozen parameters (as compile and CUDA graphs
    need); the run must not notice."""
    from cifarcnn.data.cifar import load_cifar10
    from cifarcnn.data.loader import Loader
    from cifarcnn.training.step import warm_up

    cfg = make_config({}, ["optimizer.name=sgd", "optimizer.nesterov=true", "optimizer.lr=0.01", "tta=2"])
    data = load_cifar10(cifar_root)
    train_loader = Loader(data.train_images[:90], data.train_labels[:90], 32, device="cpu",
                          augment=cfg.augment, shuffle=True)
    eval_loader = Loader(data.test_images[:50], data.test_labels[:50], 20, device="cpu")

    reference, ref_step = _fresh_cpu_step(cfg, {"fc2.bias": 1})
    warmed, warm_step = _fresh_cpu_step(cfg, {"fc2.bias": 1})
    frozen_during_warm_up = []
    real_freeze = warm_step.freeze
    warm_step.freeze = lambda frozen: frozen_during_warm_up.append(frozen) or real_freeze(frozen)
    warm_up(warm_step, train_loader, [eval_loader], Settings(cfg.tta), range(2))
    assert frozen_during_warm_up == [[], [warmed.fc2.bias]]
    assert all(p.requires_grad for p in warmed.parameters())
    assert not warm_step.optimizer.state or all(
        not v.any() for s in warm_step.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    for x, y in train_loader.epoch(1):
        ref_step(x, y)
        warm_step(x, y)
    _assert_same_state(reference, warmed)


def test_freezing_the_whitening_bias_skips_its_backward_and_changes_no_update():
    """After its epochs the whitening bias stops getting a gradient, so the backward into the first layer is
    skipped: the same weights as giving it learning rate 0, for fewer FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from cifarcnn.training.optimizers import frozen_at
    from cifarcnn.training.step import TrainStep

    cfg = make_config({}, ["model=fastnet", "optimizer.name=sgd", "optimizer.nesterov=true",
                           "optimizer.lr=0.05", "optimizer.weight_decay=0.001"])
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    models, flops = [], []
    for freeze in (False, True):
        torch.manual_seed(0)
        model = build_model("fastnet")
        step = TrainStep(model, build_optimizer(cfg, model, torch.device("cpu")), cfg, torch.device("cpu"),
                         "fp32")
        frozen = frozen_at(step.optimizer, 3)
        assert frozen == [model.whiten.bias] and frozen_at(step.optimizer, 2) == []
        step.freeze(frozen if freeze else [])
        for group in step.optimizer.param_groups:
            step.set_lr(group, 0.0 if group["until_epoch"] is not None else 0.05)
        with FlopCounterMode(display=False) as counter:
            step(x, y)
        step(x, y)
        models.append(model)
        flops.append(counter.get_total_flops())
    assert models[1].whiten.bias.grad is None
    assert flops[1] < 0.97 * flops[0]
    _assert_same_state(*models)
