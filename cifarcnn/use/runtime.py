"""`predict` and `serve` on an exported `.onnx` file, through ONNX Runtime, without torch: this module, and
what it imports, never import it (the runtime install has no torch: docs/serve.md).

The file's metadata (`export.metadata`) says how to feed it: classes, image size, mean/std, the preprocessing
version, the test-time augmentation its checkpoint runs and the temperature its probabilities are divided by.
Images are decoded by `images.read_image` and normalized by `pixels.normalized`, the numbers `predict` feeds a
checkpoint; the TTA views are the ones `inference.tta_logits` averages, taken here in numpy and run as one
batch; probabilities are softmax(logits / temperature).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..base.errors import UsageError, UserError
from ..data.pixels import normalized
from .results import (
    check_output,
    check_top_k,
    classify_files,
    finish,
    folder_label,
    image_files,
    mark_trained_on,
)

# Bumped whenever the steps from an image file to the input array change (decoding, crop, resize,
# normalization): a file exported for other steps is refused rather than fed wrong numbers.
PREPROCESSING_VERSION = 1
INSTALL_HINT = "pip install onnxruntime (the runtime install: docs/serve.md)"
REQUIRED = ("classes", "image_size", "mean", "std", "preprocessing_version", "tta", "tta_mirror")


class ModelFileError(UserError):
    exit_code = 1


def is_onnx(target: str | Path) -> bool:
    """Whether a command's model argument names an ONNX file (by its extension) rather than a run or a
    checkpoint."""
    return str(target).lower().endswith(".onnx")


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return f"sha256:{sha.hexdigest()}"


def pack_ids(values: Any) -> str:
    """int64 identities (numpy or a CPU tensor) as base64 text for metadata; `unpack_ids` reverses it."""
    return base64.b64encode(np.asarray(values, dtype="<i8").tobytes()).decode("ascii")


def unpack_ids(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<i8")


def session(model: bytes | str | Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session (`threads` 0: its default, one per core), or a one-line error."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"running an .onnx model needs ONNX Runtime: {INSTALL_HINT}") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for a file that is not a model it can run
        line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        name = "the model" if isinstance(model, bytes) else model
        raise ModelFileError(f"{name}: not an ONNX model ONNX Runtime can load ({line})") from None


def tta_views(x: np.ndarray, level: int, mirror: bool) -> list[np.ndarray]:
    """The views `inference.tta_logits` runs the network on, in its order: x, its mirror (level >= 1, with
    mirror), then each 1-pixel shift of the reflection-padded x (level 2), each followed by its mirror."""
    views = [x]
    if level >= 1 and mirror:
        views.append(x[..., ::-1])
    if level >= 2:
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
        for shifted in (padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]):
            views += [shifted, shifted[..., ::-1]] if mirror else [shifted]
    return views


def average_views(logits: list[np.ndarray], level: int, mirror: bool) -> np.ndarray:
    """The weighted average of the views' float32 logits, in `inference.tta_logits`'s arithmetic."""
    out = logits[0]
    if level >= 1 and mirror:
        out = (out + logits[1]) / np.float32(2)
    if level >= 2:
        rest = logits[2:] if mirror else logits[1:]
        if mirror:
            shifted = (rest[0] + rest[1]) + (rest[2] + rest[3])
            shifted = shifted / np.float32(4)
        else:
            shifted = (rest[0] + rest[1]) / np.float32(2)
        out = (out + shifted) / np.float32(2)
    return out


@dataclass
class OnnxModel:
    """An exported model ready to classify images, as `predict` and `serve` run it."""

    path: Path
    session: Any
    meta: dict[str, str]
    classes: list[str]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tta: int
    mirror: bool
    temperature: float
    weights: str  # "fp32" or "int8"

    def logits(self, x: np.ndarray, tta: int | None = None) -> np.ndarray:
        """Float32 logits for normalized (N, 3, S, S) images, averaged over the TTA views: a run per view, so
        that ONNX Runtime's buffers (which it keeps at their largest) hold one view's batch, not six."""
        level = self.tta if tta is None else tta
        name = self.session.get_inputs()[0].name
        out = [self.session.run(None, {name: np.ascontiguousarray(view)})[0].astype(np.float32, copy=False)
               for view in tta_views(x, level, self.mirror)]
        return average_views(out, level, self.mirror)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """softmax(logits / temperature) for (N, H, W, 3) uint8 images."""
        z = self.logits(normalized(images, self.mean, self.std)) / np.float32(self.temperature)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def classify(self, images: np.ndarray, top_k: int) -> list[list[tuple[str, float]]]:
        """Each image's top-k (class, probability), most likely first; exact ties go to the lower class index
        (a stable sort, as the checkpoint's `classify`)."""
        p = self.probabilities(images)
        order = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
        return [[(self.classes[c], float(row[c])) for c in idx] for row, idx in zip(p, order)]

    def describe(self) -> str:
        views = json.loads(self.meta.get("tta_levels", "{}")).get(str(self.tta), "")
        return (f"tta {self.tta}{f' ({views})' if views else ''}, {self.weights} ONNX model on the CPU "
                f"(ONNX Runtime), "
                + (f"temperature {self.temperature:g}" if "temperature" in self.meta
                   else "probabilities UNCALIBRATED (plain softmax)"))

    def split_record(self) -> tuple[dict | None, str | None]:
        """The training side the export recorded (for `results.mark_trained_on`) and its dataset folder."""
        if "split" not in self.meta:
            return None, None
        split = json.loads(self.meta["split"])
        record = {"scheme": split["scheme"], "train": {"ids": unpack_ids(split["train_ids"]),
                                                       "pixels": unpack_ids(split["train_pixels"])}}
        if split.get("source_pixels"):
            record["source_train"] = {"pixels": unpack_ids(split["source_pixels"])}
        return record, split["root"]


def _metadata(path: Path, sess: Any) -> dict[str, str]:
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise ModelFileError(f"{path}: not a cifarcnn export (its metadata lacks {', '.join(missing)}); "
                             f"export the run with `cifarcnn export RUN`")
    if meta["preprocessing_version"] != str(PREPROCESSING_VERSION):
        raise ModelFileError(f"{path}: exported for preprocessing version {meta['preprocessing_version']}, "
                             f"this cifarcnn feeds version {PREPROCESSING_VERSION}; export it again with "
                             f"this version")
    return meta


def _check_shapes(path: Path, sess: Any, size: int, num_classes: int) -> None:
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    want = f"one float input (batch, 3, {size}, {size}) and one output (batch, {num_classes})"
    if len(inputs) != 1 or len(outputs) != 1 or inputs[0].type != "tensor(float)":
        raise ModelFileError(f"{path}: the model has {len(inputs)} input(s) and {len(outputs)} output(s); "
                             f"cifarcnn runs {want}")
    shape, out = inputs[0].shape, outputs[0].shape
    fixed = [d if isinstance(d, int) else None for d in shape]  # a named or unknown axis: None
    right_output = len(out) == 2 and (not isinstance(out[1], int) or out[1] == num_classes)
    if fixed != [None, 3, size, size] or not right_output:
        raise ModelFileError(f"{path}: the model takes {shape} and gives {out}; cifarcnn runs {want} "
                             f"(its metadata's image size and classes)")


def load_onnx(target: str | Path, tta: int | None = None, threads: int = 0) -> OnnxModel:
    """An exported model from its file, checked against its metadata; `tta` overrides the level it
    records."""
    path = Path(target)
    if not path.is_file():
        raise UsageError(f"{path}: no such ONNX file")
    if tta is not None and tta not in (0, 1, 2):
        raise UsageError(f"--tta must be 0 (none), 1 (mirror) or 2 (mirror + 1-pixel shifts), got {tta}")
    return model_of_session(path, session(path, threads), tta)


def model_of_session(path: Path, sess: Any, tta: int | None = None) -> OnnxModel:
    """The OnnxModel of a session on the file `path` (a name, for messages), checked against its metadata."""
    meta = _metadata(path, sess)
    try:
        classes, size = list(json.loads(meta["classes"])), int(meta["image_size"])
        mean, std = tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"]))
        level, mirror = int(meta["tta"]), meta["tta_mirror"] == "true"
        temperature = float(meta.get("temperature", 1.0))
    except (ValueError, TypeError) as e:
        raise ModelFileError(f"{path}: unreadable cifarcnn metadata ({e})") from None
    _check_shapes(path, sess, size, len(classes))
    return OnnxModel(path, sess, meta, classes, size, mean, std, level if tta is None else tta, mirror,
                     temperature, meta.get("weights", "fp32"))


def check_device(device: str | None) -> None:
    if device not in (None, "cpu"):
        raise UsageError(f"--device {device}: an .onnx model runs on the CPU through ONNX Runtime; leave out "
                         f"--device (or give cpu)")


def predict_onnx(target: str | Path, paths: Sequence[str], *, device: str | None = None,
                 batch_size: int = 256, top_k: int = 1, output: Path | None = None,
                 labels_from_folders: bool = False, quiet: bool = False, workers: int | None = None,
                 tta: int | None = None) -> int:
    """`predict` with an .onnx file: the checkpoint's command (`predict.predict`), its output, exit code."""
    check_output(output)
    check_device(device)
    files, skipped = image_files(paths)
    model = load_onnx(target, tta)
    classes = model.classes
    check_top_k(top_k, classes)
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)

    started = time.perf_counter()
    results = classify_files(lambda images: model.classify(images, top_k), files, batch_size=batch_size,
                             workers=workers, progress=not quiet and sys.stderr.isatty(),
                             image_size=model.image_size)
    seconds = time.perf_counter() - started
    trained, root = None, None
    if labels_from_folders:
        for r in results:
            r.label = folder_label(r.path, classes)
        record, root = model.split_record()
        trained = mark_trained_on(results, record, root)
    summary = {"checkpoint": str(model.path), "classes": classes, "top_k": top_k, "tta": model.tta,
               "precision": model.weights}
    return finish(results, classes, top_k=top_k, quiet=quiet, ran=f"{model.path} on cpu in {seconds:.1f}s",
                  inference=[f"inference: {model.describe()}"], skipped=skipped, summary=summary,
                  trained=trained, root=root, output=output)
