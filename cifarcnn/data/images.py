"""Image files to model input: find them, decode any common format and mode, and shrink them to square RGB.

Preprocessing (the same for every file, in `predict` and for folder datasets): decode the first frame, apply
the EXIF orientation, flatten transparency onto white, convert to 8-bit RGB (16-bit channels scaled down, not
clipped), crop the largest centred square, resize it to the model's image size (32x32 for CIFAR) with Pillow's
antialiased bicubic filter. Then `to_model_input` scales to [0, 1] and normalizes with the dataset's mean/std
exactly as the training and test loaders do; `pixels.normalized` does the same on numpy arrays. This module
does not import torch (the ONNX runtime reads images without it); only `to_model_input` does.
"""

from __future__ import annotations

import glob
import io
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..base.errors import UsageError
from .pixels import MEAN, STD

SIZE = 32
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".dib", ".gif", ".webp")
_GLOB_CHARS = set("*?[")


class ImageReadError(Exception):
    """One file could not be turned into an image; the message says why, in a few words."""


def walk_images(folder: Path) -> tuple[list[Path], int]:
    """The image files under `folder` (recursively, by extension, any letter case; hidden files and folders
    left out), sorted folder by folder, and how many other files were skipped."""
    found: list[Path] = []
    skipped = 0
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(root) / name)
            else:
                skipped += 1
    return found, skipped


def find_images(paths: Iterable[str | Path]) -> tuple[list[Path], int]:
    """Expand files, folders (recursively, image extensions only) and globs into a sorted, de-duplicated list.

    A file named directly is always taken, whatever its extension (a bad one becomes an error record later).
    Returns (files, number of non-image files skipped inside folders). A path that names nothing is a
    UsageError.
    """
    found: list[Path] = []
    skipped = 0

    def walk(folder: Path) -> None:
        nonlocal skipped
        files, others = walk_images(folder)
        found.extend(files)
        skipped += others

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            walk(path)
        elif path.exists():
            found.append(path)
        elif _GLOB_CHARS & set(str(raw)):
            matches = sorted(glob.glob(str(raw), recursive=True))
            if not matches:
                raise UsageError(f"{raw}: the pattern matches no file")
            for match in map(Path, matches):
                if match.is_dir():
                    walk(match)
                elif match.is_file():
                    found.append(match)
        else:
            raise UsageError(f"{raw}: no such file or folder")
    seen: set[str] = set()
    unique = []
    for path in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique, skipped


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparent pixels are composited over white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit data (and 32-bit ints holding it) spans 0..65535; keep the picture instead of clipping at
        # 255.
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257
        elif image.mode == "F" and values.max(initial=0) <= 1:
            values = values * 255
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _decode(source: str | Path | bytes, size: int, max_pixels: int | None) -> Image.Image:
    """The first frame of a file (or of its bytes: an upload), upright, in 8-bit RGB, not yet resized."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageReadError("empty file")
        opened = Image.open(io.BytesIO(source))
    else:
        if Path(source).stat().st_size == 0:
            raise ImageReadError("empty file")
        opened = Image.open(source)
    with opened as image:
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise ImageReadError(f"image too large to decode safely ({image.width}x{image.height} pixels; "
                                 f"the limit is {max_pixels:,})")
        image.seek(0)  # GIF/WebP animations: the first frame
        if image.format == "JPEG":
            image.draft("RGB", (size * 2, size * 2))  # let the JPEG decoder downscale big photos for free
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)


def load_image(source: str | Path | bytes, size: int = SIZE, max_pixels: int | None = None) -> np.ndarray:
    """Decode one file (a path, or its bytes) to a (size, size, 3) uint8 RGB array; raises ImageReadError with
    a short reason. `max_pixels`: a larger image is refused before decoding (default: Pillow's bomb limit)."""
    try:
        image = _decode(source, size, max_pixels)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError("not an image file (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"image too large to decode safely ({e})") from None
    except PermissionError:
        raise ImageReadError("permission denied") from None
    except OSError as e:
        message = str(e) or type(e).__name__
        if any(word in message.lower() for word in ("truncated", "broken", "incomplete")):
            raise ImageReadError(f"truncated or corrupt image ({message})") from None
        raise ImageReadError(f"cannot read the image ({message})") from None
    except (SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        raise ImageReadError(f"corrupt image ({type(e).__name__}: {e})") from None
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    # Pillow's filters widen with the scale factor, so this bicubic resize is antialiased; at 32x32 it is a
    # copy.
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


def read_image(source: str | Path | bytes, size: int = SIZE,
               max_pixels: int | None = None) -> np.ndarray | str:
    """`load_image`, or the reason the file (or upload) could not be read as a string (never raises for a bad
    one)."""
    try:
        return load_image(source, size, max_pixels)
    except ImageReadError as e:
        return str(e)
    except Exception as e:  # a decoder bug on a hostile file must not stop the other files
        return f"cannot read the image ({type(e).__name__}: {e})"


def to_model_input(images, device="cpu", mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD):
    """(N, H, W, 3) uint8 (numpy or tensor) -> (N, 3, H, W) float32 tensor on `device` (a torch device or its
    name) normalized with `mean` and `std` (the checkpoint's dataset's; default CIFAR-10's), the same
    arithmetic as `data.Loader`."""
    import torch

    from .dataset import normalize_

    x = torch.as_tensor(images).to(device).permute(0, 3, 1, 2).contiguous()
    return normalize_(x.float().div_(255), mean, std)
