"""Where cifarcnn changes malloc for its process (base.device.keep_freed_memory): only in the `cifarcnn`
command on a CPU, never through the library, and not with CIFARCNN_KEEP_FREED_MEMORY=0. Each case runs in a
fresh interpreter (tests/malloc_probe.py), so no earlier test in this process can have changed malloc."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from .helpers import child_env

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = {"mapped": True, "kept": False}  # glibc's own settings: a large block is mmapped, nothing kept
KEPT = {"mapped": False, "kept": True}  # keep_freed_memory: from the heap, and the heap is not trimmed

pytestmark = pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"),
                                reason="needs glibc 2.33 or later")


def probe(*args: str, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.malloc_probe", *args], cwd=ROOT,
                          env={**child_env(), **(env or {})}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("exit") == 0, proc.stdout + proc.stderr
    return result


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "cat.png"
    Image.new("RGB", (32, 32), (200, 120, 40)).save(path)
    return path


def test_the_library_leaves_malloc_as_it_is(trained_run_dir, image):
    """select_device("cpu") and predict, as a notebook or a web app calls them: a large block is still a
    mapping of its own, returned when freed."""
    assert probe("library", str(trained_run_dir), str(image)) == DEFAULT


def test_the_command_keeps_freed_memory_on_a_cpu(trained_run_dir, image, cifar_root, tmp_path):
    """`cifarcnn predict` and `cifarcnn train` on a CPU: large blocks come from the heap (M_MMAP_MAX 0), and a
    freed one stays with the process (M_TRIM_THRESHOLD 2 GB, not glibc's 128 kB)."""
    assert probe("cli", "predict", str(trained_run_dir), str(image), "--device", "cpu", "-q") == KEPT
    assert probe("cli", "train", "--device", "cpu", "--data-dir", str(cifar_root),
                 "--runs-dir", str(tmp_path), "epochs=1", "batch_size=64", "eval_batch_size=50",
                 "data.val_size=100") == KEPT


def test_the_environment_variable_turns_it_off(trained_run_dir, image):
    assert probe("cli", "predict", str(trained_run_dir), str(image), "--device", "cpu", "-q",
                 env={"CIFARCNN_KEEP_FREED_MEMORY": "0"}) == DEFAULT


def test_another_value_of_the_variable_is_a_one_line_error(trained_run_dir, image):
    proc = subprocess.run([sys.executable, "-m", "cifarcnn", "predict", str(trained_run_dir), str(image),
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**child_env(), "CIFARCNN_KEEP_FREED_MEMORY": "off"})
    assert proc.returncode == 2
    assert proc.stderr == ("error: CIFARCNN_KEEP_FREED_MEMORY='off': use 1 (keep freed memory for reuse on a "
                           "CPU, the default) or 0 (leave malloc's settings as they are)\n")
