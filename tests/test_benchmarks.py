"""The benchmark scripts run end to end on the small synthetic data (their figures mean nothing there)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "seed", "epochs=2", "batch_size=100", "eval_batch_size=100"]


def run_script(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_fast_preset_reports_every_seed(cifar_root, tmp_path):
    out = tmp_path / "seeds.json"
    printed = run_script("fast_preset.py", *TINY, "--seeds", "2", "--data-dir", str(cifar_root), "--device",
                         "cpu", "--runs-dir", str(tmp_path / "runs"), "--out", str(out))
    summary = json.loads(out.read_text())
    assert [r["seed"] for r in summary["runs"]] == [0, 1]
    assert all(0 <= r["test_acc"] <= 1 and r["seconds"] > 0 and r["epochs"] == 2 for r in summary["runs"])
    assert all(len(r["epoch_seconds"]) == 2 and sum(r["epoch_seconds"]) <= r["seconds"]
               for r in summary["runs"])
    assert summary["mean_test_acc"] == pytest.approx(sum(r["test_acc"] for r in summary["runs"]) / 2)
    assert "over 2 seeds" in printed


@pytest.mark.parametrize("target", [0.0, 1.01])
def test_time_to_accuracy_stops_at_the_target_or_reports_it_missed(cifar_root, tmp_path, target):
    out = tmp_path / "tta.json"
    printed = run_script("time_to_accuracy.py", *TINY, "--target", str(target), "--data-dir", str(cifar_root),
                         "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--out", str(out))
    summary = json.loads(out.read_text())
    curve = summary["curve"]
    assert all(0 <= p["test_acc"] <= 1 and p["eval_seconds"] > 0 for p in curve)
    assert curve[-1]["train_seconds"] > (curve[0]["train_seconds"] if len(curve) > 1 else 0)
    if target == 0.0:  # reached by the first checkpoint: the run stops there
        assert [p["epoch"] for p in curve] == [1]
        assert summary["epochs_to_target"] == 1 and summary["seconds_to_target"] == curve[0]["train_seconds"]
    else:  # unreachable: every epoch is evaluated and no time is claimed
        assert [p["epoch"] for p in curve] == [1, 2]
        assert summary["seconds_to_target"] is None and "never reached" in printed


def test_time_to_accuracy_reports_each_target_and_can_run_the_whole_schedule(cifar_root, tmp_path):
    out = tmp_path / "tta.json"
    printed = run_script("time_to_accuracy.py", *TINY, "--target", "1.01", "--target", "0.0",
                         "--whole-schedule", "--data-dir", str(cifar_root), "--device", "cpu", "--runs-dir",
                         str(tmp_path / "runs"), "--out", str(out))
    summary = json.loads(out.read_text())
    assert [p["epoch"] for p in summary["curve"]] == [1, 2]  # past the reached target: the whole schedule
    low, high = summary["reached"]
    assert (low["target"] == 0.0 and low["epoch"] == 1
            and low["seconds"] == summary["curve"][0]["train_seconds"])
    assert high["target"] == 1.01 and high["epoch"] is None and summary["seconds_to_target"] is None
    assert ">= 0.0% after epoch 1" in printed and "never reached 101.0%" in printed
    assert summary["precision"] in ("fp32", "bf16")


def test_flops_counts_forward_and_backward_per_training_image(tmp_path):
    out = tmp_path / "flops.json"
    printed = run_script("flops.py", "--batch", "2", "--out", str(out))
    rows = {r["model"]: r for r in json.loads(out.read_text())["models"]}
    assert {"simple_cnn", "fastnet", "fastnet96", "resnet18"} <= set(rows) and "fastnet96" in printed
    for r in rows.values():  # the backward costs about twice the forward
        assert 2.5 < r["train_gflops_per_image"] / r["forward_gflops_per_image"] < 3.5
    # ResNet-18 for CIFAR: 0.56 G multiply-adds forward, the figure usually quoted
    assert rows["resnet18"]["forward_gflops_per_image"] == pytest.approx(1.11, abs=0.01)
    assert rows["fastnet96"]["train_gflops_per_image"] > 3 * rows["fastnet"]["train_gflops_per_image"]


def test_finetune_head_check_passes_on_a_linear_probe_and_names_what_moved(cifar_root, tmp_path):
    """The check gpu_suite.sh runs on CUDA (issue 27, point 5), here on the CPU: the frozen body, BatchNorm
    buffers included, is compared with the source's, and the head must have trained."""
    out = tmp_path / "finetune.json"
    small = ["batch_size=64", "eval_batch_size=100", "tta=0"]  # 9 steps an epoch: lookahead (every 5) syncs
    printed = run_script("finetune_head_check.py", *small, "--data-dir", str(cifar_root), "--device", "cpu",
                         "--runs-dir", str(tmp_path / "runs"), "--out", str(out))
    result = json.loads(out.read_text())
    assert result["moved"] == [] and result["head_change"] > 1e-3 and result["batchnorm_buffers"] >= 18
    assert "none of the 44 frozen tensors moved" in printed  # 38 weights and buffers, 6 BatchNorm eps


def test_gpu_suite_parses_and_runs_every_recipe_within_its_budget():
    suite = ROOT / "benchmarks" / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(suite)], capture_output=True).returncode == 0
    text = suite.read_text()
    commands = ["finetune_head_check.py --data-dir", "fast_preset.py --seeds 5",
                "fast_preset.py --preset best --seeds 3",
                "fast_preset.py --preset quick --seeds 2", "compile=true --data-dir",
                "fast_preset.py --preset resnet18 --seeds 1"]
    assert all(c in text for c in commands)
    assert sorted(commands, key=text.index) == commands  # best before the optional steps, resnet18 last
    assert text.count('timeout "$(limit ') == 9  # every step has its own timeout, cut to the time left


def benchmark_module(name: str):
    """A benchmark script imported as a module (benchmarks/ on the path, as when it runs)."""
    import importlib

    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module(name)


def test_cifar10_lt_keeps_cao_et_al_counts_and_the_first_images_of_each_class(cifar_root, tmp_path):
    lt = benchmark_module("cifar10_lt")
    assert lt.lt_counts() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(lt.lt_counts()) == 12406
    folder_runs = benchmark_module("folder_runs")
    counts = lt.lt_counts(largest=40, factor=10)  # 40 down to 4 images of a class
    folder = folder_runs.write_folder(tmp_path / "lt", counts, str(cifar_root))
    from cifarcnn.data.cifar import load_cifar10

    data = load_cifar10(str(cifar_root), download=False)
    labels = data.train_labels.numpy()
    classes = sorted(p.name for p in (folder / "train").iterdir())
    for c, name in enumerate(data.classes):
        kept = sorted(int(p.stem) for p in (folder / "train" / name).iterdir())
        assert kept == [int(i) for i in (labels == c).nonzero()[0][:counts[c]]], name
    assert len(classes) == 10 and sum(1 for _ in (folder / "test").rglob("*.png")) == 200


def test_cifar10_lt_refuses_a_folder_or_results_file_made_for_other_counts(cifar_root, tmp_path):
    lt = benchmark_module("cifar10_lt")
    folder_runs = benchmark_module("folder_runs")
    folder = folder_runs.write_folder(tmp_path / "lt", lt.lt_counts(largest=20, factor=10), str(cifar_root))
    assert folder_runs.write_folder(folder, lt.lt_counts(largest=20, factor=10), str(cifar_root)) == folder
    with pytest.raises(SystemExit, match="other class counts"):  # its extra images would stay in the folder
        folder_runs.write_folder(folder, lt.lt_counts(largest=20, factor=4), str(cifar_root))
    out = tmp_path / "lt.json"
    assert lt.earlier_runs(out, lt.lt_counts(factor=4)) == []
    out.write_text(json.dumps({"train_counts": lt.lt_counts(), "runs": [{"preset": "quick"}]}))
    assert lt.earlier_runs(out, lt.lt_counts()) == [{"preset": "quick"}]
    with pytest.raises(SystemExit, match="pick another --out"):
        lt.earlier_runs(out, lt.lt_counts(factor=4))


def test_label_noise_moves_the_stated_share_each_to_another_class(cifar_root, tmp_path):
    import pickle

    import numpy as np

    noise = benchmark_module("label_noise")
    moved = noise.write_noisy(cifar_root / "cifar-10-batches-py", tmp_path / "noisy", 0.1, seed=0)
    source = cifar_root / "cifar-10-batches-py"

    def labels(folder: Path, names: list[str]) -> np.ndarray:
        return np.concatenate([pickle.loads((folder / n).read_bytes(), encoding="latin1")["labels"]
                               for n in names])

    old = labels(source, noise.BATCHES)
    new = labels(tmp_path / "noisy" / "cifar-10-batches-py", noise.BATCHES)
    assert len(moved) == round(0.1 * len(old)) == int((old != new).sum())
    assert all(m["old"] == old[m["position"]] != m["new"] == new[m["position"]] for m in moved)
    test = ["test_batch"]
    assert (labels(source, test) == labels(tmp_path / "noisy" / "cifar-10-batches-py", test)).all()
