"""A checkpoint written before the package moved into job folders (cifarcnn 0b474f4, flat layout) still loads:
predict gives the probabilities that version printed, and evaluate and export run on it.

The fixture is that version's best.pt of a quicknet trained 1 epoch on `write_image_folder(per_class=12,
test_per_class=4, size=12)` at 16x16, with the resume-only entries (optimizer, lookahead, training weights)
dropped to keep it small."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cifarcnn.cli import main
from cifarcnn.training.checkpoint import load_checkpoint, model_from_checkpoint

from .conftest import write_image_folder

FIXTURES = Path(__file__).parent / "fixtures"


def old_run(tmp_path: Path) -> tuple[Path, Path]:
    """The old checkpoint as a run folder whose config points at the regenerated images, and the image folder."""
    folder = write_image_folder(tmp_path / "folder", per_class=12, test_per_class=4, size=12)
    checkpoint = torch.load(FIXTURES / "old_layout_quicknet.pt", map_location="cpu", weights_only=True)
    checkpoint["config"]["data"]["path"] = str(folder)  # it was written in another temp folder
    run = tmp_path / "run"
    run.mkdir()
    torch.save(checkpoint, run / "best.pt")
    return run, folder


def test_the_old_checkpoint_loads_with_its_weights():
    checkpoint = load_checkpoint(FIXTURES / "old_layout_quicknet.pt")
    model = model_from_checkpoint(checkpoint)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, checkpoint["model_state"][name]), name


def test_predict_on_the_old_checkpoint_gives_what_the_old_layout_printed(tmp_path, capsys):
    run, folder = old_run(tmp_path)
    out = tmp_path / "predictions.json"
    assert main(["predict", str(run), str(folder / "test"), "--top-k", "3", "--output", str(out), "-q"]) == 0
    expected = json.loads((FIXTURES / "old_layout_quicknet_predict.json").read_text())["probabilities"]
    results = json.loads(out.read_text())["results"]
    assert len(results) == len(expected) == 12
    for record in results:
        got = {p["class"]: p["probability"] for p in record["predictions"]}
        want = expected[Path(record["path"]).relative_to(folder).as_posix()]
        assert got.keys() == want.keys()
        assert all(abs(got[c] - want[c]) < 5e-3 for c in want), (record["path"], got, want)


def test_evaluate_and_export_on_the_old_checkpoint(tmp_path):
    run, _ = old_run(tmp_path)
    assert main(["evaluate", str(run)]) == 0
    metrics = json.loads((run / "eval" / "test_metrics.json").read_text())
    # What the old layout's evaluate wrote for this checkpoint and these images (bf16 on an Intel Xeon with AMX).
    assert metrics["num_images"] == 12 and metrics["classes"] == ["cat", "dog", "fox"]
    assert sum(map(sum, metrics["confusion_matrix"])) == 12
    assert main(["export", str(run)]) == 0
    assert (run / "best.onnx").stat().st_size > 0
