"""`export --int8`, and `predict` and `serve` on an exported .onnx file through ONNX Runtime: the accuracy
check and its refusal, the metadata, the same answers as the checkpoint, no torch imported, and one-line
errors for files that are not cifarcnn exports."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarcnn.base.config import make_config
from cifarcnn.cli import main
from cifarcnn.data.cifar import load_cifar10
from cifarcnn.data.dataset import normalize_
from cifarcnn.training.train import train

from .serve_client import ServerProcess, request
from .test_predict import write_pngs

onnx = pytest.importorskip("onnx", reason="the export extra is not installed")
pytest.importorskip("onnxruntime", reason="the export extra is not installed")
ROOT = Path(__file__).resolve().parents[1]
# On PYTHONPATH, a sitecustomize that makes `import torch` fail, and says so on stderr: the runtime install
NO_TORCH = '''import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            print(f"TORCH IMPORT ATTEMPTED: {name}", file=sys.stderr)
            raise ImportError(f"No module named {name!r} (this test's runtime has no torch)")
        return None

sys.meta_path.insert(0, NoTorch())
'''


@pytest.fixture(scope="module")
def run_dir(cifar_root, tmp_path_factory) -> Path:
    """A run with TTA 2 computed in fp32 (the precision ONNX Runtime runs the float export in)."""
    run = tmp_path_factory.mktemp("onnx-run") / "run"
    cfg = make_config({}, ["epochs=2", "batch_size=64", "eval_batch_size=50", "data.val_size=100",
                           "log_every=2", "tta=2", "precision=fp32"])
    train(cfg, run, data_dir=cifar_root, device="cpu")
    return run


@pytest.fixture(scope="module")
def exported(run_dir, cifar_root, tmp_path_factory):
    """The float and int8 exports of the run, and what `export --int8` printed."""
    from cifarcnn.use.export import export

    folder = tmp_path_factory.mktemp("onnx-files")
    export(run_dir, "onnx", folder / "float.onnx", data_dir=cifar_root)
    result = export(run_dir, "onnx", folder / "int8.onnx", data_dir=cifar_root, int8=True)
    return folder / "float.onnx", folder / "int8.onnx", result


@pytest.fixture(scope="module")
def pngs(cifar_root, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("onnx-pngs")
    data = load_cifar10(cifar_root)
    write_pngs(data.test_images, data.test_labels, root)
    return root


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def no_torch_env(tmp_path: Path) -> dict:
    shim = tmp_path / "no-torch"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(NO_TORCH)
    return {"PYTHONPATH": os.pathsep.join([str(shim), str(ROOT)])}


def run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifarcnn", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


# --------------------------------------------------------------------------- export --int8


def test_int8_export_is_quantized_and_checked_against_the_float_model(exported, cifar_root):
    _, int8, result = exported
    check = result["int8"]
    assert check["passed"] and check["side"] == "test" and check["tta"] == 2
    assert check["images"] == len(load_cifar10(cifar_root).test_labels)
    assert check["float_accuracy"] - check["int8_accuracy"] <= check["max_drop"] == 0.01
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = [t for t in onnx.load(str(int8)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(weights) >= 3  # the convolutions' and the classifier's weights are stored as int8
    meta = metadata(int8)
    assert meta["weights"] == "int8" and json.loads(meta["int8_check"]) == check


def test_a_broken_calibration_is_refused_and_no_file_is_kept(run_dir, cifar_root, tmp_path, capsys,
                                                             monkeypatch):
    from cifarcnn.use import quantize

    # every calibration image a flat grey: the activation ranges it measures clip the real images' activations
    monkeypatch.setattr(quantize, "calibration_images",
                        lambda images: np.full((64, 32, 32, 3), 128, dtype=np.uint8))
    target = tmp_path / "int8.onnx"
    assert main(["export", str(run_dir), "--int8", "--output", str(target), "--data-dir",
                 str(cifar_root)]) == 1
    out, err = capsys.readouterr()
    assert "int8: calibrated on 64 training images" in out
    assert err.count("\n") == 1 and "points below the float model" in err and "was not written" in err
    assert not target.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- metadata


def test_metadata_round_trip(exported, run_dir, tmp_path, cifar_root):
    from cifarcnn.training.checkpoint import load_checkpoint
    from cifarcnn.use.runtime import load_onnx

    float_path, int8_path, _ = exported
    checkpoint = load_checkpoint(run_dir / "best.pt")
    digest = "sha256:" + hashlib.sha256((run_dir / "best.pt").read_bytes()).hexdigest()
    for path in (float_path, int8_path):
        model = load_onnx(path)
        assert model.classes == list(checkpoint["classes"]) and model.image_size == 32
        assert model.mean == tuple(checkpoint["mean"]) and model.std == tuple(checkpoint["std"])
        # the run fitted its temperature when training ended (calibrate: true): it travels in the metadata
        assert (model.tta, model.mirror) == (2, True)
        assert model.temperature == checkpoint["calibration"]["temperature"] != 1.0
        assert model.meta["checkpoint_digest"] == digest and model.meta["preprocessing_version"] == "1"
        assert model.meta["preset"] == "seed" and "tta" in json.loads(model.meta["preset_overrides"])
    assert load_onnx(float_path, tta=0).tta == 0

    # a calibrated checkpoint: its temperature travels, and the probabilities are softmax(logits / T)
    calibrated = tmp_path / "calibrated.pt"
    torch.save({**checkpoint, "calibration": {"temperature": 2.5, "fitted_on": "validation"}}, calibrated)
    assert main(["export", str(calibrated), "--output", str(tmp_path / "t.onnx"), "--no-check"]) == 0
    hot, plain = load_onnx(tmp_path / "t.onnx"), load_onnx(float_path)
    assert hot.temperature == 2.5 and metadata(tmp_path / "t.onnx")["temperature"] == "2.5"
    images = load_cifar10(cifar_root).test_images[:8].permute(0, 2, 3, 1).numpy()
    logits = plain.logits(normalize_(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy())
    want = torch.softmax(torch.from_numpy(logits) / 2.5, 1).numpy()
    np.testing.assert_allclose(hot.probabilities(images), want, atol=1e-5)


# --------------------------------------------------------------------------- the same answers


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_predict_on_the_float_export_answers_as_the_checkpoint(exported, run_dir, pngs, tmp_path, capsys):
    float_path, _, _ = exported
    answers = {}
    for name, target in (("checkpoint", run_dir), ("onnx", float_path)):
        assert main(["predict", str(target), str(pngs), "--labels-from-folders", "--top-k", "3", "--quiet",
                     "--device", "cpu", "--output", str(tmp_path / f"{name}.csv")]) == 0
        out = capsys.readouterr().out
        answers[name] = read_csv(tmp_path / f"{name}.csv"), out[out.index("accuracy:"):out.index("wrote ")]
    (ours, our_table), (theirs, their_table) = answers["onnx"], answers["checkpoint"]
    assert our_table == their_table  # the accuracy and the per-class table, as printed
    assert len(ours) == len(theirs) == 200
    for a, b in zip(ours, theirs):
        assert [a[k] for k in ("path", "label", "class_1", "class_2", "class_3")] == \
            [b[k] for k in ("path", "label", "class_1", "class_2", "class_3")]
        for k in ("probability_1", "probability_2", "probability_3"):
            assert abs(float(a[k]) - float(b[k])) <= 2e-6  # the 6 printed digits, up to the last one


def test_serve_on_the_int8_export_answers_as_predict_without_importing_torch(exported, pngs, tmp_path):
    _, int8, _ = exported
    env = no_torch_env(tmp_path)
    files = sorted(pngs.rglob("*.png"))[:5]
    done = run_cli(["predict", str(int8), *map(str, files), "--top-k", "3", "--output",
                    str(tmp_path / "p.json")], env)
    assert done.returncode == 0 and "TORCH IMPORT ATTEMPTED" not in done.stderr, done.stderr
    records = json.loads((tmp_path / "p.json").read_text())["results"]
    server = ServerProcess(int8, env=env)
    try:
        for path, record in zip(files, records):
            status, body, _ = request(server.port, "POST", "/v1/predict?top_k=3", path.read_bytes(),
                                      {"Content-Type": "image/png"})
            assert status == 200 and body["model"]["precision"] == "int8" and body["model"]["tta"] == 2
            assert body["results"][0]["predictions"] == record["predictions"]
        status, described, _ = request(server.port, "GET", "/v1/model")
        assert status == 200 and described["device"] == "cpu (ONNX Runtime)" and described["preset"] == "seed"
        assert described["test_accuracy"] == json.loads(metadata(int8)["int8_check"])["int8_accuracy"]
    finally:
        assert server.stop() == 0, server.output
    assert "TORCH IMPORT ATTEMPTED" not in server.output and "int8 ONNX model" in server.output


def test_the_no_torch_shim_does_stop_torch(run_dir, pngs, tmp_path):
    """The control for the test above: under the same environment the checkpoint cannot be used."""
    done = run_cli(["predict", str(run_dir), str(pngs)], no_torch_env(tmp_path))
    assert done.returncode != 0 and "TORCH IMPORT ATTEMPTED" in done.stderr


# --------------------------------------------------------------------------- files that are not exports


def stripped(source: Path, target: Path, drop: tuple[str, ...] = (), **replace: str) -> Path:
    model = onnx.load(str(source))
    meta = {p.key: p.value for p in model.metadata_props if p.key not in drop}
    onnx.helper.set_model_props(model, {**meta, **replace})
    target.write_bytes(model.SerializeToString())
    return target


def other_input_model(path: Path, source: Path) -> Path:
    """A valid ONNX model (an identity on a (batch, 1, 28, 28) input) carrying a cifarcnn export's
    metadata."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Flatten", ["input"], ["logits"])], "foreign",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 784])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.helper.set_model_props(model, metadata(source))
    path.write_bytes(model.SerializeToString())
    return path


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case, words", [
    ("no metadata", "not a cifarcnn export"),
    ("wrong input shape", "cifarcnn runs one float input (batch, 3, 32, 32)"),
    ("not onnx", "not an ONNX model ONNX Runtime can load"),
    ("other preprocessing", "preprocessing version 99"),
], ids=["no_metadata", "wrong_input", "not_onnx", "other_preprocessing"])
def test_a_file_that_is_not_a_cifarcnn_export_gets_one_line(exported, pngs, tmp_path, case, words):
    float_path = exported[0]
    target = {
        "no metadata": lambda: stripped(float_path, tmp_path / "bare.onnx",
                                        drop=tuple(metadata(float_path))),
        "wrong input shape": lambda: other_input_model(tmp_path / "mnist.onnx", float_path),
        "not onnx": lambda: written(tmp_path / "x.onnx", b"\x89PNG\r\n\x1a\n not a model"),
        "other preprocessing": lambda: stripped(float_path, tmp_path / "v99.onnx",
                                                preprocessing_version="99"),
    }[case]()
    for command in (["predict", str(target), str(pngs)], ["serve", str(target), "--port", "0"]):
        done = run_cli(command)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
        assert words in done.stderr and "Traceback" not in done.stderr


def test_onnx_usage_errors(exported, pngs, tmp_path, capsys):
    float_path = exported[0]
    assert main(["predict", str(float_path), str(pngs), "--device", "cuda"]) == 2
    assert "runs on the CPU through ONNX Runtime" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing.onnx"), str(pngs)]) == 2
    assert "no such ONNX file" in capsys.readouterr().err
    assert main(["predict", str(float_path), str(pngs), "--tta", "3"]) == 2


def test_the_split_check_travels_in_the_file(run_dir, pngs, tmp_path, capsys):
    """A folder run's training side (paths and pixels) is in the metadata: `predict --labels-from-folders` on
    the file leaves out the same trained-on images as on the checkpoint."""
    from cifarcnn.data.images import load_image
    from cifarcnn.data.pixels import SCHEME, path_ids, pixel_ids
    from cifarcnn.training.checkpoint import load_checkpoint

    files = sorted(pngs.rglob("*.png"))
    by_path, by_pixels = files[:3], files[10:15]  # trained on under their names, and copies of trained images
    pixels = pixel_ids(np.stack([load_image(f) for f in by_pixels]).transpose(0, 3, 1, 2))
    record = {"scheme": SCHEME, "train": {
        "ids": torch.from_numpy(path_ids([f.relative_to(pngs).as_posix() for f in by_path])),
        "pixels": torch.from_numpy(pixels)}}
    checkpoint = load_checkpoint(run_dir / "best.pt")
    config = {**checkpoint["config"], "data": {**checkpoint["config"]["data"], "path": str(pngs.resolve())}}
    torch.save({**checkpoint, "split": record, "config": config}, tmp_path / "folder.pt")
    assert main(["export", str(tmp_path / "folder.pt"), "--no-check"]) == 0
    assert json.loads(metadata(tmp_path / "folder.onnx")["split"])["root"] == str(pngs.resolve())
    for target in (tmp_path / "folder.pt", tmp_path / "folder.onnx"):
        capsys.readouterr()
        assert main(["predict", str(target), str(pngs), "--labels-from-folders", "--quiet", "--device",
                     "cpu"]) == 0
        out = capsys.readouterr().out
        assert "split: 8 of these files are images the model trained on" in out
        assert "on 192 labelled images (8 file(s) left out" in out


def test_the_deployment_benchmark_runs_end_to_end(run_dir, pngs, cifar_root, tmp_path):
    out = tmp_path / "bench.json"
    script = ROOT / "benchmarks" / "onnx_runtime.py"
    done = subprocess.run([sys.executable, str(script), str(run_dir), "--pngs", str(pngs), "--data-dir",
                           str(cifar_root), "--rounds", "1", "--no-checkpoint-tta", "--requests", "20",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = json.loads(out.read_text())["runs"]
    assert set(result["predict"]["tta0"]) == {"checkpoint", "float", "int8"}
    assert all(r[0]["images"] == 200 for r in result["predict"]["tta0"].values())
    served = result["serve"]
    assert served["int8"][0]["errors"] == served["checkpoint"][0]["errors"] == 0
    assert served["checkpoint"][0]["torch_loaded"] and not served["int8"][0]["torch_loaded"]
    assert result["bytes"]["int8"] < result["bytes"]["float"]
