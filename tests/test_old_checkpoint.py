"""A checkpoint written before the package moved into job folders (cifarcnn 0b474f4, flat layout) still loads:
predict gives the probabilities that version printed, and evaluate and export run on it. It runs with the
BatchNorm eps it was trained with (1e-12; new checkpoints record theirs).

The fixture is that version's best.pt of a quicknet trained 1 epoch on `write_image_folder(per_class=12,
test_per_class=4, size=12)` at 16x16, with the resume-only entries (optimizer, lookahead, training weights)
dropped to keep it small."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cifarcnn.cli import main
from cifarcnn.models.fastnet import FastBatchNorm
from cifarcnn.models.registry import build_model
from cifarcnn.training.checkpoint import FORMAT, load_checkpoint, model_from_checkpoint, save_checkpoint

from .conftest import write_image_folder

FIXTURES = Path(__file__).parent / "fixtures"


def old_run(tmp_path: Path) -> tuple[Path, Path]:
    """The old checkpoint as a run folder whose config points at the regenerated images, and the image
    folder."""
    folder = write_image_folder(tmp_path / "folder", per_class=12, test_per_class=4, size=12)
    checkpoint = torch.load(FIXTURES / "old_layout_quicknet.pt", map_location="cpu", weights_only=True)
    checkpoint["config"]["data"]["path"] = str(folder)  # it was written in another temp folder
    run = tmp_path / "run"
    run.mkdir()
    torch.save(checkpoint, run / "best.pt")
    return run, folder


def batchnorms(model: torch.nn.Module) -> dict[str, FastBatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FastBatchNorm)}


def largest_difference_from_the_recorded_probabilities(run: Path, folder: Path, out: Path) -> float:
    """`predict` on the run's checkpoint and the folder's test images: the largest difference from the
    probabilities the old layout printed."""
    assert main(["predict", str(run), str(folder / "test"), "--top-k", "3", "--output", str(out), "-q"]) == 0
    expected = json.loads((FIXTURES / "old_layout_quicknet_predict.json").read_text())["probabilities"]
    results = json.loads(out.read_text())["results"]
    assert len(results) == len(expected) == 12
    worst = 0.0
    for record in results:
        got = {p["class"]: p["probability"] for p in record["predictions"]}
        want = expected[Path(record["path"]).relative_to(folder).as_posix()]
        assert got.keys() == want.keys()
        worst = max(worst, *(abs(got[c] - want[c]) for c in want))
    return worst


def test_the_old_checkpoint_loads_with_its_weights():
    checkpoint = load_checkpoint(FIXTURES / "old_layout_quicknet.pt")
    model = model_from_checkpoint(checkpoint)
    state = model.state_dict()
    for name, tensor in checkpoint["model_state"].items():
        assert torch.equal(tensor, state[name]), name
    stored_eps = sorted(f"{name}.eps" for name in batchnorms(model))
    assert sorted(set(state) - set(checkpoint["model_state"])) == stored_eps


def test_predict_on_the_old_checkpoint_gives_what_the_old_layout_printed(tmp_path):
    run, folder = old_run(tmp_path)
    assert largest_difference_from_the_recorded_probabilities(run, folder, tmp_path / "out.json") < 5e-3


def test_an_old_checkpoint_runs_with_the_batchnorm_eps_it_was_trained_with(tmp_path):
    """The fixture's BatchNorm statistics are all 1, so its eps makes no difference to its probabilities
    (1e-12, 1e-5 and 1e-3 all move them by under 1e-6). Scaled down, its first block's feature is nearly
    constant (std 1e-3, running variance 1e-6): the model computes the same function with the eps it was
    trained with, 1e-12, but loaded with 1e-5 its probabilities move by 0.05."""
    run, folder = old_run(tmp_path)
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    state, scale = checkpoint["model_state"], 1e-3
    state["blocks.0.conv1.weight"] *= scale
    state["blocks.0.norm1.running_mean"] *= scale
    state["blocks.0.norm1.running_var"] *= scale**2
    torch.save(checkpoint, run / "best.pt")
    model = model_from_checkpoint(load_checkpoint(run / "best.pt"))
    assert {m.eps for m in batchnorms(model).values()} == {1e-12}
    assert largest_difference_from_the_recorded_probabilities(run, folder, tmp_path / "out.json") < 5e-3


def test_a_new_checkpoint_keeps_its_batchnorm_eps(tmp_path):
    """A checkpoint records its eps: 1e-5, the value new models train with, or any other it was given."""
    model = build_model("quicknet", 3)
    assert {m.eps for m in batchnorms(model).values()} == {1e-5}
    for eps in (1e-5, 3e-4):
        for module in batchnorms(model).values():
            module.eps = eps
        checkpoint = {"format": FORMAT, "model": "quicknet", "num_classes": 3, "classes": list("abc"),
                      "config": {}, "model_state": model.state_dict()}
        save_checkpoint(tmp_path / "c.pt", checkpoint)
        loaded = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
        assert [m.eps for m in batchnorms(loaded).values()] == [eps] * 6  # the float itself, not float32's


def test_evaluate_and_export_on_the_old_checkpoint(tmp_path):
    run, _ = old_run(tmp_path)
    assert main(["evaluate", str(run)]) == 0
    metrics = json.loads((run / "eval" / "test_metrics.json").read_text())
    # What the old layout's evaluate wrote for this checkpoint and these images (bf16 on an Intel Xeon with
    # AMX).
    assert metrics["num_images"] == 12 and metrics["classes"] == ["cat", "dog", "fox"]
    assert sum(map(sum, metrics["confusion_matrix"])) == 12
    assert main(["export", str(run)]) == 0
    assert (run / "best.onnx").stat().st_size > 0
