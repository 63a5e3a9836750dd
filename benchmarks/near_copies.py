"""How well the audit's copy search finds planted copies, and how many of CIFAR-10's own images it joins.

    python benchmarks/near_copies.py --data-dir DIR

Plants 100 JPEG q50 re-encodings, 100 copies shifted by 1 pixel and re-encoded at q75, and 100 copies shifted
by 2 pixels (reflected border) of seeded training images among the copy's 60,000 images, and counts the copies
found in the same group as their original; then counts the groups on the copy alone, with the CPU seconds.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cifarcnn.data.cifar import load_cifar10
from cifarcnn.reports.duplicates import find_duplicates


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for pixels in images.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
        out.append(np.array(Image.open(buffer)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def shift(images: torch.Tensor, pixels: int) -> torch.Tensor:
    padded = F.pad(images.float(), (pixels,) * 4, mode="reflect")
    return padded[:, :, 2 * pixels:, 2 * pixels:].round().to(torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    args = parser.parse_args()
    data = load_cifar10(args.data_dir, download=False)
    images = torch.cat([data.train_images, data.test_images])
    started = time.process_time()
    groups = find_duplicates(images)
    print(f"the copy alone: {sum(len(g.members) for g in groups)} of {len(images)} images in {len(groups)} "
          f"groups ({sum(g.exact for g in groups)} exact), {time.process_time() - started:.0f} CPU seconds")
    picked = np.random.default_rng(1).choice(len(data.train_images), 300, replace=False)
    x = data.train_images[picked]
    planted = {"JPEG q50": jpeg(x[:100], 50), "shifted 1 pixel, JPEG q75": jpeg(shift(x[100:200], 1), 75),
               "shifted 2 pixels": shift(x[200:300], 2)}
    groups = find_duplicates(torch.cat([images, *planted.values()]))
    group_of = {m: g.members for g in groups for m in g.members}
    for n, (name, copies) in enumerate(planted.items()):
        found = sum(int(picked[n * 100 + k]) in group_of.get(len(images) + n * 100 + k, [])
                    for k in range(len(copies)))
        print(f"{name}: {found} of {len(copies)} found")


if __name__ == "__main__":
    main()
