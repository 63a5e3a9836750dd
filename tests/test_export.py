"""`cifarcnn export --format onnx`: dynamic batch axis, metadata, and the ONNX Runtime self-check."""

import json
import sys

import numpy as np
import pytest
import torch

from cifarcnn.base.inference import Settings, infer
from cifarcnn.cli import main
from cifarcnn.data.cifar import CLASSES, load_cifar10
from cifarcnn.data.dataset import MEAN, STD, normalize_
from cifarcnn.training.checkpoint import load_checkpoint, model_from_checkpoint
from cifarcnn.use.export import check_export

onnx = pytest.importorskip("onnx", reason="the export extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed")


@pytest.fixture(scope="module")
def exported(trained_run_dir, cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    from cifarcnn.use.export import export

    result = export(trained_run_dir, "onnx", out, data_dir=cifar_root)
    return out, result


def test_export_checks_itself_on_the_whole_test_set(exported):
    out, result = exported
    assert result["checked"] and result["passed"]
    assert result["max_abs_diff"] <= 1e-4
    assert result["num_images"] == 200 and result["top1_agree"] + result["top1_near_ties"] == 200
    assert result["top1_disagree"] == 0


def test_onnx_model_has_a_dynamic_batch_axis_and_matches_pytorch(exported, trained_run_dir, cifar_root):
    out, _ = exported
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("input", "logits")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]
    model = model_from_checkpoint(load_checkpoint(trained_run_dir / "best.pt")).eval()
    images = load_cifar10(cifar_root).test_images
    for n in (1, 5, 37):
        x = normalize_(images[:n].float() / 255)
        got = session.run(None, {"input": x.numpy()})[0]
        with torch.inference_mode():
            want = model(x).numpy()
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_metadata_documents_classes_and_preprocessing(exported):
    out, _ = exported
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == list(CLASSES)
    assert json.loads(meta["mean"]) == list(MEAN) and json.loads(meta["std"]) == list(STD)
    assert "32x32" in meta["preprocessing"] and "/ 255" in meta["preprocessing"]
    assert meta["architecture"] == "simple_cnn"
    assert "bare network" in meta["test_time_augmentation"] and "tta 0" in meta["test_time_augmentation"]
    assert "normalized" in model.doc_string
    onnx.checker.check_model(model)


def test_the_check_catches_a_model_that_does_not_match(exported, trained_run_dir, cifar_root):
    out, _ = exported
    model = model_from_checkpoint(load_checkpoint(trained_run_dir / "best.pt"))
    with torch.no_grad():
        model.fc2.bias[3] += 0.5  # PyTorch side now differs from what was exported
    report = check_export(out.read_bytes(), model, load_cifar10(cifar_root).test_images)
    assert not report["passed"] and report["max_abs_diff"] > 0.4


def readme_tta(session, x: np.ndarray, level: int) -> np.ndarray:
    """The recipe in docs/predict-export-report.md for the TTA logits from the ONNX model, with numpy only."""
    def logits(v):
        return session.run(["logits"], {"input": np.ascontiguousarray(v, dtype=np.float32)})[0]

    def mirror(v):
        return v[..., ::-1]

    tta1 = (logits(x) + logits(mirror(x))) / 2
    if level == 1:
        return tta1
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    shifted = [padded[:, :, :32, :32], padded[:, :, 2:, 2:]]
    return (tta1 + sum(logits(s) + logits(mirror(s)) for s in shifted) / 4) / 2


@pytest.mark.parametrize("level", [1, 2])
def test_the_readme_recipe_gives_cifarcnns_tta_logits_from_the_onnx_model(exported, trained_run_dir,
                                                                           cifar_root, level):
    out, _ = exported
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = model_from_checkpoint(load_checkpoint(trained_run_dir / "best.pt")).eval()
    x = normalize_(load_cifar10(cifar_root).test_images[:64].float() / 255)
    want = infer(model, x, Settings(level)).numpy()
    assert np.abs(want - infer(model, x, Settings(0)).numpy()).max() > 1e-3  # the views do change the logits
    np.testing.assert_allclose(readme_tta(session, x.numpy(), level), want, atol=1e-4, rtol=0)


def perturbed_export(monkeypatch):
    """Make `export` write a model whose classifier bias differs from the checkpoint's, so its check must
    fail."""
    import cifarcnn.use.export

    real = cifarcnn.use.export.to_onnx_bytes

    def to_onnx_bytes(model, meta):
        with torch.no_grad():
            model.fc2.bias[3] += 0.5
        onnx_bytes = real(model, meta)
        with torch.no_grad():
            model.fc2.bias[3] -= 0.5
        return onnx_bytes

    monkeypatch.setattr(cifarcnn.use.export, "to_onnx_bytes", to_onnx_bytes)


def test_a_failing_check_exits_1_and_writes_nothing(trained_run_dir, cifar_root, tmp_path, capsys,
                                                    monkeypatch):
    perturbed_export(monkeypatch)
    target = tmp_path / "m.onnx"
    assert main(["export", str(trained_run_dir), "--output", str(target), "--data-dir", str(cifar_root)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match PyTorch" in err[0] and "was not written" in err[0]
    assert list(tmp_path.iterdir()) == []  # no model, no temp file


def test_no_check_writes_the_model_unchecked(trained_run_dir, cifar_root, tmp_path, capsys, monkeypatch):
    perturbed_export(monkeypatch)  # the check would fail
    target = tmp_path / "m.onnx"
    assert main(["export", str(trained_run_dir), "--output", str(target), "--data-dir", str(cifar_root),
                 "--no-check"]) == 0
    out = capsys.readouterr().out
    assert "check:" not in out and f"wrote {target}" in out
    assert onnx.load(str(target)).graph.output[0].name == "logits"


def test_missing_extra_is_one_clear_error(trained_run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    assert main(["export", str(trained_run_dir), "--format", "onnx", "--output",
                 str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'cifarcnn[export]'" in err[0] and "onnxscript" in err[0]
    assert not (tmp_path / "m.onnx").exists()


def test_without_onnxruntime_the_export_is_written_unchecked(trained_run_dir, cifar_root, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", str(trained_run_dir), "--output", str(tmp_path / "m.onnx"), "--data-dir",
                 str(cifar_root)]) == 0
    out = capsys.readouterr().out
    assert "not checked" in out and "pip install 'cifarcnn[export]'" in out
    assert onnx.load(str(tmp_path / "m.onnx")).graph.input[0].name == "input"


def test_export_usage_errors(trained_run_dir, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert main(["export", str(trained_run_dir), "--output", str(tmp_path / "no" / "m.onnx")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export", str(trained_run_dir), "--format", "tflite"])
    assert e.value.code == 2
