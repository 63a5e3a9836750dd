"""Write the CIFAR-10 training and test images as a folder dataset, DIR/train/<class>/<n>.jpg and
DIR/test/<class>/<n>.jpg, for training with `data.dataset=folder data.path=DIR` and comparing with the native files.

usage: .venv/bin/python scripts/cifar_as_folder.py DIR [--data-dir DIR] [--format jpg|png] [--quality 95]

JPEG re-encoding changes pixels (quality 95 by default); --format png keeps them identical to the source files.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from cifarcnn.data.cifar import load_cifar10


def write_split(root: Path, images: np.ndarray, labels: list[int], classes: tuple[str, ...], fmt: str,
                quality: int) -> None:
    """images (N, 32, 32, 3) uint8 as root/<class>/<n>.<fmt>."""
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
    options = {"quality": quality} if fmt == "jpg" else {}

    def save(n: int) -> None:
        Image.fromarray(images[n], "RGB").save(root / classes[labels[n]] / f"{n}.{fmt}", **options)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(save, range(len(images)), chunksize=256))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default: 95)")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; pick a new folder")
    data = load_cifar10(args.data_dir, download=False)
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        write_split(args.out / split, images.permute(0, 2, 3, 1).numpy(), labels.tolist(), data.classes,
                    args.format, args.quality)
        print(f"wrote {len(images)} {args.format.upper()} files under {args.out / split}")


if __name__ == "__main__":
    main()
