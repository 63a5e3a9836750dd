"""Write the 10,000 CIFAR-10 test images as PNG files in <out>/<class>/<n>.png, for checking `cifarcnn predict
--labels-from-folders` against `cifarcnn evaluate`.

usage: .venv/bin/python scripts/test_set_as_pngs.py OUT_DIR [--data-dir DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from cifarcnn.data.cifar import load_cifar10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    args = parser.parse_args()
    data = load_cifar10(args.data_dir, download=False)
    for name in data.classes:
        (args.out / name).mkdir(parents=True, exist_ok=True)
    images = data.test_images.permute(0, 2, 3, 1).numpy()
    for n, (pixels, label) in enumerate(zip(images, data.test_labels.tolist())):
        Image.fromarray(pixels, "RGB").save(args.out / data.classes[label] / f"{n}.png")
    print(f"wrote {len(images)} PNG files under {args.out}")


if __name__ == "__main__":
    main()
