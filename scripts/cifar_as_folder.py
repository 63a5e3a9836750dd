"""Write the CIFAR-10 training and test images as a folder dataset, DIR/train/<class>/<n>.jpg and
DIR/test/<class>/<n>.jpg, for training with `data.dataset=folder data.path=DIR` and comparing with the native
files.

usage: .venv/bin/python scripts/cifar_as_folder.py DIR [--data-dir DIR] [--format jpg|png] [--quality 95]
       [--grey] [--size S] [--black-below V] [--train-count N] [--no-test]

JPEG re-encoding changes pixels (quality 95 by default); --format png keeps them identical to the source
files. The other options make a folder like a user's: --grey writes grey-scale pictures (ITU-R 601-2 luma,
Pillow's "L" mode), --size shrinks them to SxS, --black-below sets every pixel under V to 0 (a plain black
background), --train-count keeps the first N training images, --no-test writes no test/ folder (the loader
then holds out data.test_fraction of the images). The folder benchmarks/own_folder.sh trains on:
--grey --size 8 --black-below 110 --train-count 3000 --no-test --format png.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from cifarcnn.data.cifar import load_cifar10


def picture(pixels: np.ndarray, args: argparse.Namespace) -> Image.Image:
    """One (32, 32, 3) uint8 image as written: grey-scale, shrunk and with a black background when asked."""
    image = Image.fromarray(pixels, "RGB")
    if args.grey:
        image = image.convert("L")
    if args.size:
        image = image.resize((args.size, args.size), Image.BILINEAR)
    if args.black_below:
        image = image.point(lambda v: 0 if v < args.black_below else v)
    return image


def write_split(root: Path, images: np.ndarray, labels: list[int], classes: tuple[str, ...],
                args: argparse.Namespace) -> None:
    """images (N, 32, 32, 3) uint8 as root/<class>/<n>.<format>."""
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
    options = {"quality": args.quality} if args.format == "jpg" else {}

    def save(n: int) -> None:
        picture(images[n], args).save(root / classes[labels[n]] / f"{n}.{args.format}", **options)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(save, range(len(images)), chunksize=256))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default: 95)")
    parser.add_argument("--grey", action="store_true", help="grey-scale pictures (ITU-R 601-2 luma)")
    parser.add_argument("--size", type=int, help="shrink the pictures to SIZExSIZE")
    parser.add_argument("--black-below", type=int, default=0, help="set pixels under this value to 0")
    parser.add_argument("--train-count", type=int, help="keep only the first N training images")
    parser.add_argument("--no-test", action="store_true", help="write no test/ folder")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; pick a new folder")
    data = load_cifar10(args.data_dir, download=False)
    splits = [("train", data.train_images[:args.train_count], data.train_labels[:args.train_count])]
    if not args.no_test:
        splits.append(("test", data.test_images, data.test_labels))
    for split, images, labels in splits:
        write_split(args.out / split, images.permute(0, 2, 3, 1).numpy(), labels.tolist(), data.classes, args)
        print(f"wrote {len(images)} {args.format.upper()} files under {args.out / split}")


if __name__ == "__main__":
    main()
