"""An imbalanced class folder cut from the CIFAR-10 copy, the one docs/messy-folders.md measures `monitor`
on: class i keeps round(LARGEST * FACTOR**(-i/9)) of its training images, the first in the files' order, as
PNG files under OUT/train/<class>/, and no test/ folder (training holds out `data.test_fraction` of each
class, as imbalanced as the rest).

    python benchmarks/imbalanced_folder.py lt20 --largest 2500 --factor 20 --data-dir .cache/cifar10
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from cifarcnn.data.cifar import load_cifar10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--largest", type=int, default=2500, help="images of the first class")
    parser.add_argument("--factor", type=float, default=20, help="largest class over smallest")
    parser.add_argument("--data-dir", required=True, help="the CIFAR-10 copy (python format)")
    args = parser.parse_args()
    data = load_cifar10(args.data_dir)
    images, labels = data.train_images.numpy(), data.train_labels.numpy()
    for i, name in enumerate(data.classes):
        keep = int(round(args.largest * args.factor ** (-i / 9)))
        folder = args.out / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for n, index in enumerate(np.flatnonzero(labels == i)[:keep]):
            Image.fromarray(images[index].transpose(1, 2, 0)).save(folder / f"{n}.png")
        print(name, keep)


if __name__ == "__main__":
    main()
