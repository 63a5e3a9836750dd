"""`cifarcnn export --format onnx`: an ONNX model with a dynamic batch axis, documented in its metadata, and
checked against PyTorch with ONNX Runtime before it is written."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .. import __version__
from ..base.config import closest_preset, data_config
from ..base.errors import UserError
from ..base.inference import TTA_LEVELS, TTA_RECIPE, TTA_RECIPE_NO_MIRROR, Settings, infer, tta_views
from ..base.storage import atomic_write
from ..data.dataset import MEAN, STD, DataError, Dataset, normalize_
from ..data.loader import training_split
from ..data.pixels import SCHEME
from ..data.sources import checkpoint_dataset, dataset_of_checkpoint
from ..data.splits import compare_split, untrained_test
from ..training.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from .runtime import PREPROCESSING_VERSION, file_digest, pack_ids

INSTALL_HINT = "pip install 'cifarcnn[export]' (onnx, onnxscript and onnxruntime)"
TOLERANCE = 1e-4
CHECK_BATCH = 256


def preprocessing(size: int) -> str:
    """The steps from an image file to the input tensor, for images of `size` pixels."""
    return ("RGB image -> first frame, EXIF orientation applied, transparency composited over white -> "
            f"centre crop to the largest square -> antialiased bicubic resize to {size}x{size} -> float32 in "
            f"[0, 1] (pixel / 255) -> (x - mean) / std per channel -> NCHW layout (batch, 3, {size}, {size})")


class ExportError(UserError):
    exit_code = 1


def _onnx_modules():
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as e:
        raise ExportError(f"ONNX export needs the optional 'export' extra ({e.name} is not installed): "
                          f"{INSTALL_HINT}") from None
    return onnx


def metadata(checkpoint: dict, path: Path) -> dict[str, str]:
    """What a consumer needs to feed the model and read its output, as ONNX metadata_props strings."""
    info = checkpoint_dataset(checkpoint)
    size = info["image_size"]
    tta = int(checkpoint["config"].get("tta", 0))
    mirror = bool(checkpoint.get("tta_mirror", True))
    preset, overrides = closest_preset(checkpoint["config"])
    return {
        "classes": json.dumps(info["classes"]),
        "mean": json.dumps(list(info["mean"])),
        "std": json.dumps(list(info["std"])),
        "image_size": str(size),
        "dataset": info["dataset"],
        "input": f"input: float32 (batch, 3, {size}, {size}), RGB, normalized: (pixel / 255 - mean) / std "
                 f"per channel",
        "output": "logits: float32 (batch, num_classes); softmax over axis 1 gives probabilities, index i is "
                  "classes[i]",
        "preprocessing": preprocessing(size),
        "test_time_augmentation":
            f"this graph is the bare network, one view in fp32; cifarcnn evaluates this checkpoint with tta "
            f"{tta} ({tta_views(tta, mirror)}). {TTA_RECIPE if mirror else TTA_RECIPE_NO_MIRROR}",
        "architecture": str(checkpoint["model"]),
        "num_classes": str(checkpoint["num_classes"]),
        "epoch": str(checkpoint.get("epoch")),
        "best_val_acc": str(checkpoint.get("best_val_acc")),
        "source_checkpoint": str(path),
        "exported_by": f"cifarcnn {__version__}, torch {torch.__version__}",
        # what `cifarcnn predict` and `serve` read to run the file as they run the checkpoint (use/runtime.py)
        "preprocessing_version": str(PREPROCESSING_VERSION),
        "checkpoint_digest": file_digest(path),
        "tta": str(tta),
        "tta_mirror": "true" if mirror else "false",
        "tta_levels": json.dumps({str(level): tta_views(level, mirror) for level in TTA_LEVELS}),
        "config": json.dumps(checkpoint["config"], default=str),
        "preset": preset or "",
        "preset_overrides": json.dumps(overrides, default=str),
        "weights": "fp32",
        **_calibration(checkpoint),
        **_split(checkpoint),
    }


def _calibration(checkpoint: dict) -> dict[str, str]:
    """The temperature the probabilities are divided by, when the run was calibrated (none: 1)."""
    temperature = (checkpoint.get("calibration") or {}).get("temperature")
    return {} if temperature is None else {"temperature": repr(float(temperature))}


def _split(checkpoint: dict) -> dict[str, str]:
    """A folder dataset's training side (paths and pixels, `splits.split_record`), for predict's split check
    on the file; nothing for CIFAR and for runs that did not record their split."""
    record = checkpoint.get("split") or {}
    if record.get("scheme") != SCHEME:
        return {}
    source = record.get("source_train")
    return {"split": json.dumps({
        "scheme": SCHEME, "root": str(checkpoint["config"]["data"]["path"]),
        "train_ids": pack_ids(record["train"]["ids"]), "train_pixels": pack_ids(record["train"]["pixels"]),
        "source_pixels": pack_ids(source["pixels"]) if source else ""})}


def to_onnx_bytes(model: nn.Module, meta: dict[str, str]) -> bytes:
    """Export with torch's dynamo exporter, a symbolic batch axis named 'batch', then attach `meta`."""
    onnx = _onnx_modules()
    model = model.cpu().eval()
    size = int(meta["image_size"])
    example = torch.zeros(2, 3, size, size)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns about every torchvision op it cannot register
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, input_names=["input"],
                                        output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        external_data=False, verbose=False)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    finally:
        quiet.setLevel(level)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = (f"{meta['dataset']} classifier ({meta['architecture']}). {meta['input']}. "
                        f"Preprocessing: {meta['preprocessing']}. {meta['output']}. Class names, mean and "
                        f"std: metadata_props.")
    return proto.SerializeToString()


def _session(onnx_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


@torch.inference_mode()
def check_export(onnx_bytes: bytes, model: nn.Module, test_images: torch.Tensor, batch_size: int = 1000,
                 tolerance: float = TOLERANCE, mean: tuple[float, ...] = MEAN,
                 std: tuple[float, ...] = STD) -> dict:
    """Compare ONNX Runtime with PyTorch: logits on one batch within `tolerance`, top-1 on every test image.

    A top-1 disagreement only counts where PyTorch's two best logits differ by more than `tolerance`;
    closer than that, either answer is within the numerical error of the check.
    """
    session = _session(onnx_bytes)
    model = model.cpu().eval()

    def both(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = normalize_(images.float().div_(255), mean, std)
        # the file holds the bare network: one view (tta 0), in fp32
        reference = infer(model, x, Settings()).numpy()  # one view, fp32
        return reference, session.run(["logits"], {"input": x.numpy()})[0]

    reference, onnx_out = both(test_images[:CHECK_BATCH])
    max_diff = float(np.abs(reference - onnx_out).max())
    single_ref, single_onnx = both(test_images[:1])  # the batch axis must really be dynamic
    max_diff = max(max_diff, float(np.abs(single_ref - single_onnx).max()))
    agree = disagree = near_ties = 0
    for start in range(0, len(test_images), batch_size):
        reference, onnx_out = both(test_images[start:start + batch_size])
        same = reference.argmax(1) == onnx_out.argmax(1)
        top2 = np.sort(reference, axis=1)[:, -2:]
        tie = (top2[:, 1] - top2[:, 0]) <= tolerance
        agree += int(same.sum())
        disagree += int((~same & ~tie).sum())
        near_ties += int((~same & tie).sum())
    return {"max_abs_diff": max_diff, "tolerance": tolerance,
            "check_batch": min(CHECK_BATCH, len(test_images)), "top1_agree": agree,
            "top1_disagree": disagree, "top1_near_ties": near_ties, "num_images": len(test_images),
            "passed": max_diff <= tolerance and disagree == 0}


def _accuracy_side(checkpoint: dict, data: Dataset) -> tuple[str, np.ndarray, np.ndarray]:
    """The images `--int8` scores both models on: the test side less the images the model trained on (the
    rule of `train --test` and `evaluate`), or, for a folder without test images, the validation side."""
    if len(data.test_images):
        images, labels = untrained_test(data, compare_split(checkpoint.get("split"), data))
        return "test", images.numpy(), labels.numpy()
    _, val = training_split(data, data_config(checkpoint["config"].get("data") or {}))
    if val is None or not len(val[0]):
        raise ExportError(f"--int8 checks the int8 model's accuracy, but {data.name} has no test or "
                          f"validation images to check it on")
    return "validation", val[0].numpy(), val[1].numpy()


def int8_model(float_model: bytes, checkpoint: dict, data_dir: str | Path | None, output: Path,
               result: dict) -> bytes:
    """The int8 quantization of `float_model` (`quantize`), its metadata saying so, once its accuracy is
    within `quantize.MAX_DROP` of the float model's on the same images; an ExportError otherwise."""
    from . import quantize

    onnx = _onnx_modules()
    try:
        data = dataset_of_checkpoint(checkpoint, data_dir)
    except DataError as e:
        raise ExportError(f"--int8 calibrates on the training images and checks on the test images: {e}") \
            from None
    (train_images, _), _ = training_split(data, data_config(checkpoint["config"].get("data") or {}))
    side, images, labels = _accuracy_side(checkpoint, data)
    calibration = quantize.calibration_images(train_images.numpy())
    meta = {p.key: p.value for p in onnx.load_from_string(float_model).metadata_props}
    try:
        int8 = quantize.quantize(float_model, calibration, {**meta, "weights": "int8"})
    except Exception as e:  # onnxruntime.quantization raises plain exceptions of many types
        raise ExportError(f"int8 quantization failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    float_accuracy, int8_accuracy = quantize.compare(float_model, int8, images, labels)
    drop = float_accuracy - int8_accuracy
    report = {"calibration_images": len(calibration), "calibration_seed": quantize.CALIBRATION_SEED,
              "side": side, "images": len(images), "tta": int(meta["tta"]), "float_accuracy": float_accuracy,
              "int8_accuracy": int8_accuracy, "max_drop": quantize.MAX_DROP,
              "passed": drop <= quantize.MAX_DROP}
    result["int8"] = report
    print(f"int8: calibrated on {len(calibration)} training images (seed {quantize.CALIBRATION_SEED}); "
          f"accuracy on {len(images)} {side} images at tta {meta['tta']}: int8 {int8_accuracy:.2%}, float "
          f"{float_accuracy:.2%} ({(int8_accuracy - float_accuracy) * 100:+.2f} points; the limit is "
          f"-{quantize.MAX_DROP * 100:g})")
    if not report["passed"]:
        raise ExportError(f"the int8 model scores {drop * 100:.2f} points below the float model on the "
                          f"{side} images, more than the {quantize.MAX_DROP * 100:g}-point limit; {output} "
                          f"was not written")
    model = onnx.load_from_string(int8)
    onnx.helper.set_model_props(model, {**meta, "weights": "int8", "int8_check": json.dumps(report)})
    model.doc_string = onnx.load_from_string(float_model).doc_string
    return model.SerializeToString()


def export(target: str | Path, fmt: str = "onnx", output: str | Path | None = None, *,
           data_dir: str | Path | None = None, check: bool = True, int8: bool = False) -> dict:
    """The `export` command: write the ONNX file (after checking it, when onnxruntime is installed); with
    `int8`, its int8 quantization instead, once its accuracy is checked."""
    if fmt != "onnx":
        raise ExportError(f"--format {fmt}: only onnx is supported")
    _onnx_modules()
    path = resolve_checkpoint(target)
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint, path)
    output = Path(output) if output else path.with_suffix(".int8.onnx" if int8 else ".onnx")
    if not output.parent.is_dir():
        raise ExportError(f"--output {output}: folder {output.parent} does not exist")

    onnx_bytes = to_onnx_bytes(model, metadata(checkpoint, path))
    result: dict = {"output": str(output), "checked": False}
    if check:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            print(f"note: onnxruntime is not installed, so the export was not checked against PyTorch; "
                  f"for the check, {INSTALL_HINT}")
        else:
            info = checkpoint_dataset(checkpoint)
            try:
                test_images = dataset_of_checkpoint(checkpoint, data_dir).test_images
            except DataError as e:
                raise ExportError(f"the export check needs the {info['dataset']} test set: {e} (or skip the "
                                  f"check with --no-check)") from None
            report = check_export(onnx_bytes, model, test_images, mean=info["mean"], std=info["std"])
            result.update(report, checked=True)
            print(f"check: ONNX Runtime vs PyTorch max |logit difference| {report['max_abs_diff']:.2e} on "
                  f"{report['check_batch']} test images (tolerance {report['tolerance']:.0e}); top-1 agrees "
                  f"on {report['top1_agree']}/{report['num_images']} test images"
                  + (f" ({report['top1_near_ties']} near-tie(s) within tolerance)" if report["top1_near_ties"]
                     else ""))
            if not report["passed"]:
                raise ExportError(f"the ONNX model does not match PyTorch (max difference "
                                  f"{report['max_abs_diff']:.2e}, {report['top1_disagree']} top-1 "
                                  f"disagreements); {output} was not written")
    if int8:
        onnx_bytes = int8_model(onnx_bytes, checkpoint, data_dir, output, result)
    atomic_write(output, lambda f: f.write(onnx_bytes))
    size = checkpoint_dataset(checkpoint)["image_size"]
    print(f"wrote {output} ({len(onnx_bytes) / 1e6:.1f} MB; input 'input' float32 (batch, 3, {size}, {size}) "
          f"normalized with the training data's mean/std, output 'logits' "
          f"(batch, {checkpoint['num_classes']}); classes, mean, std and preprocessing are in the model "
          f"metadata)")
    return result
