"""Duplicate images for the audit: exact copies (identical decoded pixels) and near copies (a re-encoded,
resized, slightly shifted or retouched copy), found among all images of both sides together.

Near copies are found in two steps. Candidates: each image's CANDIDATES nearest others by a coarse colour
thumbnail (3 x 4 x 4 averages). Check: both images at 32 x 32, one shifted against the other by up to SHIFT
pixels each way; for the best shift, the difference averaged over 4 x 4 blocks (which drops what JPEG
re-encoding or rescaling change pixel by pixel) has a root-mean-square of at most NEAR_RMS (pixel values
0-255). docs/commands.md ("audit") gives the rates measured on the CIFAR-10 copy. Copies are joined into
groups (a copy of a copy is in the same group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.splits import pixel_ids

CANDIDATES = 5
SHIFT = 2
NEAR_RMS = 6.0
CHUNK = 512


@dataclass
class Group:
    """Images that are copies of one another (positions in the pooled train + test list); exact when all
    have identical pixels; `distance` the largest near-copy distance within the group (0 when exact)."""

    members: list[int]
    exact: bool
    distance: float


def small(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) copies of uint8 (N, 3, S, S) images (the same tensor at 32 pixels)."""
    if images.shape[-1] == 32:
        return images
    parts = [F.adaptive_avg_pool2d(c.float(), 32).round().to(torch.uint8) for c in images.split(CHUNK)]
    return torch.cat(parts) if parts else torch.zeros(0, 3, 32, 32, dtype=torch.uint8)


def candidates(images: torch.Tensor, count: int = CANDIDATES) -> torch.Tensor:
    """(P, 2) pairs i < j: each image with its `count` nearest others by coarse thumbnail."""
    thumbs = F.adaptive_avg_pool2d(images.float(), 4).flatten(1)
    norms = thumbs.square().sum(1)
    count = min(count, len(images) - 1)
    pairs = []
    # one block of distances at a time, always in the same buffer: with the CLI's malloc settings
    # (base.device.keep_freed_memory) a fresh block per step fragments the heap to several GB
    buffer = torch.empty(min(CHUNK, len(thumbs)), len(thumbs))
    for start in range(0, len(thumbs), CHUNK):
        block = thumbs[start:start + CHUNK]
        squared = torch.mm(block, thumbs.T, out=buffer[:len(block)]).mul_(-2).add_(norms[None, :])
        squared.add_(norms[start:start + CHUNK, None])
        rows = torch.arange(start, start + len(squared))
        squared[rows - start, rows] = float("inf")
        nearest = squared.topk(count, dim=1, largest=False).indices
        pairs.append(torch.stack([rows[:, None].expand_as(nearest), nearest], -1).reshape(-1, 2))
    if not pairs:
        return torch.zeros(0, 2, dtype=torch.int64)
    pairs = torch.cat(pairs).sort(dim=1).values
    return torch.unique(pairs, dim=0)


def aligned_distance(a: torch.Tensor, b: torch.Tensor, shift: int = SHIFT) -> torch.Tensor:
    """Per pair of uint8 (P, 3, 32, 32) images: the least, over shifts of b by up to `shift` pixels, of the
    root-mean-square of the 4 x 4 block averages of their difference."""
    a, b = a.float(), b.float()
    inner = a[:, :, shift:32 - shift, shift:32 - shift]
    best = torch.full((len(a),), float("inf"))
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            moved = b[:, :, shift + dy:32 - shift + dy, shift + dx:32 - shift + dx]
            best = torch.minimum(best, F.avg_pool2d(inner - moved, 4).square().mean((1, 2, 3)).sqrt())
    return best


def near_pairs(images: torch.Tensor, threshold: float = NEAR_RMS) -> list[tuple[int, int, float]]:
    """(i, j, distance) for the candidate pairs i < j of uint8 (N, 3, 32, 32) images that are near copies."""
    pairs = candidates(images)
    found = []
    for part in pairs.split(CHUNK):
        distance = aligned_distance(images[part[:, 0]], images[part[:, 1]])
        near = distance <= threshold
        found += [(i, j, d) for (i, j), d in zip(part[near].tolist(), distance[near].tolist())]
    return found


def find_duplicates(images: torch.Tensor, threshold: float = NEAR_RMS) -> list[Group]:
    """Groups of exact and near copies among uint8 (N, 3, S, S) images, each group's members in order. Runs
    on one thread: its many small element-wise steps took 10x the CPU time on two threads of a busy 2-core
    machine (the threads waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _groups(images, threshold)
    finally:
        torch.set_num_threads(threads)


def _groups(images: torch.Tensor, threshold: float) -> list[Group]:
    parent = list(range(len(images)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[int, int] = {}
    for i, key in enumerate(pixel_ids(images).tolist()):
        parent[root(i)] = root(first.setdefault(key, i))
    distance: dict[int, float] = {}
    for i, j, d in near_pairs(small(images), threshold) if len(images) > 1 else []:
        parent[root(j)] = root(i)
        distance[i], distance[j] = max(distance.get(i, 0.0), d), max(distance.get(j, 0.0), d)
    members: dict[int, list[int]] = {}
    for i in range(len(images)):
        members.setdefault(root(i), []).append(i)
    groups = []
    for group in (sorted(m) for m in members.values() if len(m) > 1):
        ids = pixel_ids(images[group])
        exact = bool((ids == ids[0]).all())
        groups.append(Group(group, exact, 0.0 if exact else max(distance.get(i, 0.0) for i in group)))
    return sorted(groups, key=lambda g: g.members[0])
