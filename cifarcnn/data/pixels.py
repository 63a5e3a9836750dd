"""The data layer's pieces that need no torch (the ONNX runtime imports them): CIFAR-10's normalization
constants, the normalization on numpy arrays, and the identities the split check compares images by (a
relative path's, decoded pixels')."""

from __future__ import annotations

import hashlib

import numpy as np

MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10's training-set mean and std per channel
STD = (0.2470, 0.2435, 0.2616)
SCHEME = "blake2b-path-v1"  # how a folder dataset's split record keys its images (data.splits)


def normalized(images: np.ndarray, mean: tuple[float, ...] = MEAN,
               std: tuple[float, ...] = STD) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1] less `mean`, over `std`, per channel: in float32,
    operation by operation the arithmetic of `dataset.normalize_` (so the same numbers)."""
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32)
    x /= np.float32(255)
    x -= np.asarray(mean, dtype=np.float32)[None, :, None, None]
    x /= np.asarray(std, dtype=np.float32)[None, :, None, None]
    return x


def path_ids(keys: list[str] | tuple[str, ...]) -> np.ndarray:
    """An int64 identity per relative path."""
    return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8, person=b"id").digest(), "big",
                                    signed=True) for k in keys], dtype=np.int64)


def pixel_ids(images) -> np.ndarray:
    """An int64 identity per image from its decoded uint8 pixels, laid out (N, 3, S, S) as a Dataset holds
    them (a numpy array or a CPU tensor): the same picture under another name is recognized."""
    array = np.ascontiguousarray(np.asarray(images))
    return np.array([int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "big",
                                    signed=True) for row in array], dtype=np.int64)
