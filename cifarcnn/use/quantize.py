"""`cifarcnn export --int8`: static int8 quantization of the exported float model by ONNX Runtime
(`quantize_static`: QDQ format, per-channel weights, activation ranges calibrated on a seeded sample of the
run's own training images, preprocessed as `predict` preprocesses), and the accuracy that keeps or refuses it:
int8 against float, on the same images at the same test-time augmentation."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..data.pixels import normalized
from .runtime import OnnxModel, model_of_session, session

CALIBRATION_IMAGES = 512  # training images the activation ranges are calibrated on
CALIBRATION_SEED = 0  # which ones: a fixed draw, so that an export is repeatable
CALIBRATION_BATCH = 64
MAX_DROP = 0.01  # the int8 model may score at most 1 point below the float model, else it is refused
ACCURACY_BATCH = 500


def calibration_images(train_images: np.ndarray, count: int = CALIBRATION_IMAGES,
                       seed: int = CALIBRATION_SEED) -> np.ndarray:
    """`count` training images (N, 3, S, S uint8, as a Dataset holds them) drawn without replacement by
    `seed`, as (count, S, S, 3): the layout `predict` decodes files to."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(train_images), size=min(count, len(train_images)), replace=False))
    return np.ascontiguousarray(train_images[chosen].transpose(0, 2, 3, 1))


def _reader(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], input_name: str):
    """A CalibrationDataReader over `images`, normalized by `pixels.normalized` (predict's numbers)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = (normalized(images[i:i + CALIBRATION_BATCH], mean, std)
                                                  for i in range(0, len(images), CALIBRATION_BATCH))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    return Reader()


def quantize(float_model: bytes, images: np.ndarray, meta: dict[str, str]) -> bytes:
    """The int8 model (QDQ, per-channel int8 weights, uint8 activations with ranges from `images`, min-max)
    of `float_model`, with the metadata `meta` (its mean and std normalize `images`)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="cifarcnn-int8-") as tmp:
        source, prepared, target = (Path(tmp) / name for name in ("float.onnx", "prepared.onnx", "int8.onnx"))
        source.write_bytes(float_model)
        # folds BatchNorm into the convolutions and infers shapes, as ONNX Runtime recommends before
        # quantizing
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        input_name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
        mean, std = tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"]))
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # it warns on the root logger about every BatchNorm it does not fold
        try:
            quantize_static(str(prepared), str(target), _reader(images, mean, std, input_name),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        finally:
            root.setLevel(level)
        model = onnx.load(str(target))
    onnx.helper.set_model_props(model, meta)
    return model.SerializeToString()


def accuracy(model: OnnxModel, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of `model` (at its TTA level) on `images` (N, 3, S, S uint8) with `labels`."""
    correct = 0
    for i in range(0, len(images), ACCURACY_BATCH):
        batch = np.ascontiguousarray(images[i:i + ACCURACY_BATCH].transpose(0, 2, 3, 1))
        logits = model.logits(normalized(batch, model.mean, model.std))
        correct += int((logits.argmax(1) == labels[i:i + ACCURACY_BATCH]).sum())
    return correct / len(images)


def compare(float_model: bytes, int8_model: bytes, images: np.ndarray, labels: np.ndarray
            ) -> tuple[float, float]:
    """(float accuracy, int8 accuracy) on the same images, at the TTA level the models' metadata records."""
    scores = []
    for blob, name in ((float_model, "the float model"), (int8_model, "the int8 model")):
        scores.append(accuracy(model_of_session(Path(name), session(blob)), images, labels))
    return scores[0], scores[1]
