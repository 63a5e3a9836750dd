import json
import re
import subprocess
import sys

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifarcnn.base.config import Config, make_config
from cifarcnn.base.errors import UserError
from cifarcnn.cli import main
from cifarcnn.training.checkpoint import load_checkpoint
from cifarcnn.training.schedule import learning_rate
from cifarcnn.training.train import train
from cifarcnn.use.evaluate import evaluate

TAGS = {"Loss/train", "Loss/val", "Accuracy/train", "Accuracy/val", "LearningRate", "GradientNorm"}
DETERMINISTIC = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "grad_norm")


def metrics_of(history):
    return [{k: m[k] for k in DETERMINISTIC} for m in history]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_resume_reproduces(cfg, full, run_dir, full_dir, data_dir) -> dict:
    """Train `cfg` into `run_dir` stopping after epoch 1, resume it, and check that its metrics (returned and
    in metrics.jsonl) and final weights equal the uninterrupted run `full` in `full_dir`; the resumed
    last.pt."""
    interrupted = train(cfg, run_dir, data_dir=data_dir, device="cpu",
                        on_epoch_end=lambda m: m["epoch"] == 1)
    assert len(interrupted["history"]) == 1
    resumed = train(cfg, run_dir, data_dir=data_dir, device="cpu", resume=True)
    assert metrics_of(resumed["history"]) == metrics_of(full["history"])
    assert metrics_of(read_metrics(run_dir)) == metrics_of(full["history"])
    a = load_checkpoint(full_dir / "last.pt")["model_state"]
    b = load_checkpoint(run_dir / "last.pt")
    assert all(torch.equal(a[k], b["model_state"][k]) for k in a)
    return b


@pytest.fixture(scope="module")
def trained_run(cifar_root, tmp_path_factory):
    """One short run shared by the artifact and evaluation tests."""
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    cfg = make_config({}, ["epochs=2", "batch_size=64", "eval_batch_size=50", "data.val_size=100",
                           "log_every=2"])
    state = train(cfg, run_dir, data_dir=cifar_root, device="cpu")
    return run_dir, state


def test_a_run_leaves_every_artifact(trained_run):
    run_dir, state = trained_run
    for name in ("best.pt", "last.pt", "config.yaml", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp files left behind
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert make_config(saved).epochs == 2
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(DETERMINISTIC) <= set(rows[0])
    assert rows == state["history"]
    last = load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == 2 and last["config"]["epochs"] == 2 and last["classes"][0] == "airplane"
    best = load_checkpoint(run_dir / "best.pt")
    assert best["best_val_acc"] == max(r["val_acc"] for r in rows)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert TAGS <= scalars and "Loss/train_step" in scalars
    assert len(events.Scalars("Accuracy/val")) == 2
    assert ([round(e.value, 6) for e in events.Scalars("GradientNorm")]
            == [round(r["grad_norm"], 6) for r in rows])
    assert all(r["grad_norm"] > 0 for r in rows)


def test_training_learns_something(trained_run):
    _, state = trained_run
    assert state["history"][-1]["val_acc"] > 0.2  # synthetic classes differ by colour: far above 10% chance


def test_same_seed_same_metrics_and_resume_reproduces_an_uninterrupted_run(cifar_root, tmp_path,
                                                                           small_config):
    full = train(small_config, tmp_path / "full", data_dir=cifar_root, device="cpu")
    again = train(small_config, tmp_path / "again", data_dir=cifar_root, device="cpu")
    assert metrics_of(full["history"]) == metrics_of(again["history"])
    assert_resume_reproduces(small_config, full, tmp_path / "resumed", tmp_path / "full", cifar_root)


def test_resume_of_a_finished_run_does_nothing(trained_run, cifar_root, capsys):
    run_dir, _ = trained_run
    before = (run_dir / "last.pt").stat().st_mtime_ns
    cfg = make_config(load_checkpoint(run_dir / "last.pt")["config"])
    train(cfg, run_dir, data_dir=cifar_root, device="cpu", resume=True)
    assert "nothing to do" in capsys.readouterr().out
    assert (run_dir / "last.pt").stat().st_mtime_ns == before


def test_a_run_folder_is_not_overwritten(trained_run, cifar_root, small_config):
    run_dir, _ = trained_run
    with pytest.raises(UserError, match="--resume"):
        train(small_config, run_dir, data_dir=cifar_root, device="cpu")


def test_early_stopping(cifar_root, tmp_path):
    # lr so small nothing changes: validation accuracy cannot improve after epoch 1
    cfg = make_config({}, ["epochs=6", "patience=2", "batch_size=200", "data.val_size=100",
                           "optimizer.lr=1e-12", "scheduler.name=constant"])
    state = train(cfg, tmp_path / "run", data_dir=cifar_root, device="cpu")
    assert state["stopped_early"] and len(state["history"]) == 3


def test_an_early_stopped_test_run_ends_with_the_kept_models_test_accuracy(cifar_root, tmp_path, capsys):
    """--test measures best.pt (the model evaluate uses) however the run ends, records it, and prints it
    last."""
    args = ["train", "epochs=6", "patience=2", "batch_size=200", "data.val_size=100", "optimizer.lr=1e-12",
            "scheduler.name=constant", "--data-dir", str(cifar_root), "--device", "cpu", "--runs-dir",
            str(tmp_path), "--name", "r", "--test"]
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[-1]["test"]["checkpoint"] == "best.pt" and rows[-1]["test"]["epoch"] == 1
    result = json.loads((tmp_path / "r" / "test.json").read_text())
    assert result == rows[-1]["test"]
    evaluated = evaluate(tmp_path / "r", data_dir=cifar_root, device="cpu", out_dir=tmp_path / "eval")
    assert result["test_acc"] == evaluated["test_accuracy"] and result["test_images"] == 200
    assert out[-1].startswith(f"test accuracy {result['test_acc']:.2%} on 200 test images, model of epoch 1")


def test_cosine_schedule_length_defaults_to_epochs():
    cfg = Config()
    assert learning_rate(cfg, 0) == pytest.approx(1e-3)
    assert learning_rate(cfg, 25) == pytest.approx(5e-4)
    assert learning_rate(cfg, 50) == pytest.approx(0.0)
    short = make_config({}, ["scheduler.epochs=10", "scheduler.min_lr=1e-5"])
    assert learning_rate(short, 10) == pytest.approx(1e-5) and learning_rate(short, 30) == pytest.approx(1e-5)
    assert learning_rate(make_config({}, ["scheduler.name=constant"]), 30) == pytest.approx(1e-3)


def test_the_default_recipe_trains_with_its_declared_l2_decay_in_adam(trained_run):
    """The original workflow's config declared weight_decay 1e-4 for Adam (and its code ignored it); the
    default recipe now applies it, as L2 added to the gradient (torch.optim.Adam), to every parameter."""
    run_dir, state = trained_run
    assert Config().optimizer.weight_decay == 1e-4 and Config().optimizer.name == "adam"
    groups = load_checkpoint(run_dir / "last.pt")["optimizer_state"]["param_groups"]
    assert ([g["weight_decay"] for g in groups] == [1e-4, 1e-4]
            and not any(g["decoupled_weight_decay"] for g in groups))
    first, last = state["history"]
    assert last["val_acc"] > 0.2 and last["train_loss"] < first["train_loss"]


def test_l2_in_adam_moves_a_weight_without_loss_gradient_by_about_the_learning_rate():
    """Adam normalizes the decay term with the gradient (L2); AdamW would shrink by lr x decay x weight
    only."""
    from cifarcnn.training.optimizers import build_optimizer

    model = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, -1.0, 0.5, 0.0]]))
    l2 = [2 - 1e-3, -1 + 1e-3, 0.5 - 1e-3, 0.0]  # lr 1e-3 against the sign of each weight
    decoupled = [2 * (1 - 1e-7), -1 * (1 - 1e-7), 0.5 * (1 - 1e-7), 0.0]  # x (1 - lr x decay)
    for name, expected in (("adam", l2), ("adamw", decoupled)):
        moved = torch.nn.Linear(4, 1, bias=False)
        moved.load_state_dict(model.state_dict())
        optimizer = build_optimizer(make_config({}, [f"optimizer.name={name}"]), moved, torch.device("cpu"))
        (0 * moved(torch.ones(1, 4))).sum().backward()  # a zero loss gradient: only the decay acts
        optimizer.step()
        assert torch.allclose(moved.weight, torch.tensor([expected]), atol=1e-9, rtol=1e-6), name


def test_weight_decay_from_the_config_is_applied(cifar_root, tmp_path):
    base = ["epochs=1", "batch_size=200", "data.val_size=100", "augment.flip=none"]
    plain = train(make_config({}, base), tmp_path / "a", data_dir=cifar_root, device="cpu")
    decayed = train(make_config({}, [*base, "optimizer.weight_decay=0.5"]), tmp_path / "b",
                    data_dir=cifar_root, device="cpu")
    wa = load_checkpoint(tmp_path / "a" / "last.pt")["optimizer_state"]["param_groups"][0]["weight_decay"]
    wb = load_checkpoint(tmp_path / "b" / "last.pt")["optimizer_state"]["param_groups"][0]["weight_decay"]
    assert (wa, wb) == (1e-4, 0.5)  # the default recipe's declared decay, and the override
    assert plain["history"][0]["train_loss"] != decayed["history"][0]["train_loss"]


def test_evaluation_outputs(trained_run, cifar_root, tmp_path, capsys):
    run_dir, _ = trained_run
    results = evaluate(run_dir, data_dir=cifar_root, device="cpu", out_dir=tmp_path / "eval")
    out = capsys.readouterr().out
    assert "test accuracy" in out and "airplane" in out and "truck" in out
    for name in ("confusion_matrix.png", "misclassified.png"):
        data = (tmp_path / "eval" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    saved = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())
    assert saved["test_accuracy"] == results["test_accuracy"]
    assert sum(map(sum, saved["confusion_matrix"])) == 200 == saved["num_images"]
    assert set(saved["per_class_accuracy"]) == set(saved["classes"])
    correct = sum(saved["confusion_matrix"][i][i] for i in range(10))
    assert saved["test_accuracy"] == pytest.approx(correct / 200)


def test_cli_train_evaluate_show_batch(cifar_root, tmp_path, small_overrides, capsys):
    runs = tmp_path / "runs"
    common = ["--data-dir", str(cifar_root), "--device", "cpu"]
    assert main(["train", *small_overrides, "epochs=1", "--runs-dir", str(runs), "--name", "r", *common]) == 0
    out = capsys.readouterr().out
    assert "epoch   1/1" in out and "val loss" in out
    assert main(["train", "--resume", str(runs / "r"), "epochs=2", *common]) == 0
    assert len(read_metrics(runs / "r")) == 2
    assert main(["evaluate", str(runs / "r" / "best.pt"), *common]) == 0
    assert (runs / "r" / "eval" / "test_metrics.json").exists()
    assert main(["show-batch", "data.val_size=100", "--out", str(tmp_path / "b.png"), "--count", "16",
                 *common]) == 0
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, code, words", [
    (["evaluate", "no/such/run"], 2, "no/such/run"),
    (["train", "--resume", "no/such/run"], 2, "no/such/run"),
    (["train", "--device", "cuda:7", "epochs=1"], 2, "cuda"),
    (["train", "--device", "gpu", "epochs=1"], 2, "gpu"),
    (["train", "--config", "missing.yaml"], 2, "missing.yaml"),
])
def test_cli_user_errors(argv, code, words, cifar_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "cuda:7" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main([*argv, "--data-dir", str(cifar_root)]) == code
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_evaluate_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a checkpoint")
    assert main(["evaluate", str(bogus)]) != 0
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_missing_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("cifarcnn.data.cifar.URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    assert main(["train", "epochs=1", "--data-dir", str(tmp_path / "empty"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "CIFAR10_DIR" in err and "--data-dir" in err
    assert not (tmp_path / "runs").exists()


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_checkpoint_cannot_run_code(trained_run, tmp_path, capsys):
    run_dir, _ = trained_run
    state = load_checkpoint(run_dir / "best.pt")
    state["payload"] = _RunsCode()
    torch.save(state, tmp_path / "evil.pt")
    assert main(["evaluate", str(tmp_path / "evil.pt")]) == 1
    captured = capsys.readouterr()
    assert "this ran" not in captured.out and "weights_only" in captured.err


def test_a_checkpoint_for_another_architecture_names_the_mismatch(trained_run, tmp_path, capsys):
    run_dir, _ = trained_run
    state = load_checkpoint(run_dir / "best.pt")
    state["num_classes"] = 7
    torch.save(state, tmp_path / "other.pt")
    assert main(["evaluate", str(tmp_path / "other.pt")]) == 1
    err = capsys.readouterr().err
    assert "7 classes" in err and "fc2" in err


def test_output_redirected_to_a_file_holds_plain_lines_and_every_epoch_summary(tmp_path, cifar_root,
                                                                              small_overrides):
    from tests.helpers import child_env

    args = ["train", *small_overrides, "epochs=3", "--data-dir", str(cifar_root), "--runs-dir", str(tmp_path),
            "--name", "r", "--device", "cpu"]
    # stdout and stderr are pipes, not terminals; read as bytes, since text mode would turn \r into \n
    done = subprocess.run([sys.executable, "-m", "cifarcnn", *args], cwd=tmp_path, env=child_env(),
                          capture_output=True, timeout=240)
    out = (done.stdout + done.stderr).decode()
    assert done.returncode == 0, out
    assert "\r" not in out  # no progress-bar frames
    for epoch in (1, 2, 3):
        summary = (rf"^epoch +{epoch}/3  train loss [\d.]+ acc [\d.]+%  "
                   r"val loss [\d.]+ acc [\d.]+%  lr \S+  [\d.]+s")
        assert re.search(summary, out, re.M), out
    assert "it/s" not in out and "train:" not in out  # neither the training nor the validation bar


def test_a_log_gets_one_progress_line_per_interval_at_most(tmp_path, cifar_root, small_overrides, capsys,
                                                           monkeypatch):
    from cifarcnn.base import progress

    monkeypatch.setattr(progress, "PLAIN_LINE_SECONDS", 0.0)  # every logging interval is due
    train(make_config({}, [*small_overrides, "epochs=1"]), tmp_path / "r", data_dir=cifar_root, device="cpu")
    err = capsys.readouterr().err
    assert "\r" not in err
    # 500 training images in batches of 64: 8 steps, logged every 2
    assert (re.findall(r"^epoch 1/1 train (\d)/8  loss \d\.\d{4}  acc [\d.]+%$", err, re.M)
            == ["2", "4", "6", "8"])
    monkeypatch.setattr(progress, "PLAIN_LINE_SECONDS", 3600.0)
    train(make_config({}, [*small_overrides, "epochs=1"]), tmp_path / "r2", data_dir=cifar_root, device="cpu")
    assert "train 2/8" not in capsys.readouterr().err


def test_a_terminal_gets_a_live_bar(monkeypatch, capsys):
    from cifarcnn.base import progress

    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    bar = progress.Progress(range(4), total=4, desc="epoch 1/1 train")
    for i in bar:
        bar.show(i + 1, loss="0.5")
    bar.close()
    assert "\r" in capsys.readouterr().err


@pytest.mark.parametrize("threshold, shown", [(0, True), (10**9, False)])
def test_a_long_cpu_run_says_how_long_and_points_at_the_quick_preset(tmp_path, cifar_root, small_overrides,
                                                                     capsys, monkeypatch, threshold, shown):
    from cifarcnn.training import train as train_module

    monkeypatch.setattr(train_module, "LONG_RUN_SECONDS", threshold)
    train(make_config({}, small_overrides), tmp_path / "r", data_dir=cifar_root, device="cpu")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("estimated time")]
    if shown:  # once per session, timed from the first logging interval to the second (steps 2 and 4 of 16)
        assert len(lines) == 1 and "for 2 epochs (timed over steps 3-4)" in lines[0]
        assert "cifarcnn train --preset quick" in lines[0]
    else:
        assert lines == []
