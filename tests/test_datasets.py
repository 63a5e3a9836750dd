"""Datasets beyond CIFAR-10: the data.* config keys, CIFAR-100 in the official format, and folder datasets
(layout, preprocessing, cache, held-out split, statistics, memory check, what is left out)."""

import hashlib
import http.server
import os
import pickle
import shutil
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from cifarcnn.base.config import make_config
from cifarcnn.base.errors import ConfigError
from cifarcnn.cli import main
from cifarcnn.data import folders, splits
from cifarcnn.data.cifar import CIFAR100_FILES, CIFAR100_MEAN, CIFAR100_STD, locate_cifar
from cifarcnn.data.dataset import MEAN, STD, DataError
from cifarcnn.data.images import find_images, load_image
from cifarcnn.data.loader import Loader, validation_mask
from cifarcnn.data.sources import load_dataset

from .conftest import (
    CIFAR100_TEST,
    CIFAR100_TRAIN,
    COARSE_OF_FINE,
    FOLDER_CLASSES,
    write_cifar100,
    write_image_folder,
)

TOLERANCE_SIGMAS = 4  # the tolerance docs/datasets.md states for a class's held-out count


def within_tolerance(count: int, n: int, fraction: float) -> bool:
    """Whether a class of `n` images with `count` held out is within the stated tolerance of `fraction`."""
    return abs(count - n * fraction) <= TOLERANCE_SIGMAS * (n * fraction * (1 - fraction)) ** 0.5 + 1


def data_cfg(*overrides):
    return make_config({}, list(overrides)).data


# --------------------------------------------------------------------------- config keys

@pytest.mark.parametrize("override, key", [
    (["data.dataset=imagenet"], "data.dataset"),
    (["data.dataset=folder"], "data.path"),
    (["data.labels=coarse"], "data.labels"),
    (["data.image_size=64"], "data.image_size"),
    (["data.dataset=cifar100", "data.val_size=50000"], "data.val_size"),
    (["data.dataset=folder", "data.path=x", "data.test_fraction=1"], "data.test_fraction"),
    (["data.dataset=folder", "data.path=x", "data.image_size=8"], "data.image_size"),
])
def test_bad_data_keys_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        make_config({}, override)
    assert f"'{key}'" in str(e.value)


def test_a_folder_dataset_without_a_path_exits_2_naming_the_key(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "data.dataset=folder", "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'data.path'" in err[0]
    assert main(["train", "data.dataset=folder", "data.path=missing", "--runs-dir",
                 str(tmp_path / "runs")]) == 2
    assert "'data.path'" in capsys.readouterr().err and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- CIFAR-100

def test_cifar100_fine_and_coarse_labels(cifar100_root):
    fine = load_dataset(data_cfg("data.dataset=cifar100"), cifar100_root)
    assert fine.train_images.shape == (CIFAR100_TRAIN, 3, 32, 32) and fine.train_images.dtype == torch.uint8
    assert fine.test_images.shape == (CIFAR100_TEST, 3, 32, 32)
    assert len(fine.classes) == 100 and fine.classes[7] == "fine07" and int(fine.train_labels.max()) == 99
    assert (fine.mean, fine.std) == (CIFAR100_MEAN, CIFAR100_STD) and fine.name == "CIFAR-100"
    coarse = load_dataset(data_cfg("data.dataset=cifar100", "data.labels=coarse"), cifar100_root)
    assert len(coarse.classes) == 20 and coarse.classes[0] == "coarse00"
    # the generated files' shuffled map, not fine // 5: the superclass is read from the files, never derived
    assert torch.equal(coarse.train_labels, torch.from_numpy(COARSE_OF_FINE)[fine.train_labels])
    assert torch.equal(coarse.test_labels, torch.from_numpy(COARSE_OF_FINE)[fine.test_labels])
    assert torch.equal(coarse.train_images, fine.train_images)


def test_cifar100_data_root_is_data_dir_then_cifar100_dir(cifar100_root, monkeypatch):
    monkeypatch.setenv("CIFAR100_DIR", str(cifar100_root))
    assert len(load_dataset(data_cfg("data.dataset=cifar100")).classes) == 100
    # the batches folder itself works as the root too
    assert len(load_dataset(data_cfg("data.dataset=cifar100"),
                            cifar100_root / "cifar-100-python").classes) == 100


def cifar100_archive(root):
    src = root / "src"
    write_cifar100(src, num_train=200, num_test=100)
    archive = root / CIFAR100_FILES.archive
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    shutil.rmtree(src)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_cifar100_archive_is_checked_and_extracted(tmp_path):
    archive, md5 = cifar100_archive(tmp_path)
    with pytest.raises(DataError, match="MD5.*CIFAR-100"):
        locate_cifar(tmp_path, CIFAR100_FILES)  # the official MD5: a generated archive is refused
    folder = locate_cifar(tmp_path, CIFAR100_FILES, md5=md5)
    assert folder == tmp_path / "cifar-100-python" and (folder / "meta").is_file()


def test_cifar100_download_from_a_local_server(tmp_path):
    archive, md5 = cifar100_archive(tmp_path / "served")
    payload = archive.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/cifar-100-python.tar.gz"
        folder = locate_cifar(tmp_path / "fresh", CIFAR100_FILES, url=url, md5=md5)
        with pytest.raises(DataError, match="MD5"):
            locate_cifar(tmp_path / "other", CIFAR100_FILES, url=url)  # checked against the official MD5
    finally:
        server.shutdown()
    assert (tmp_path / "fresh" / CIFAR100_FILES.archive).exists() and (folder / "train").is_file()
    assert not (tmp_path / "other" / CIFAR100_FILES.archive).exists()


def test_cifar100_offline_names_its_files_and_variable(tmp_path):
    with pytest.raises(DataError) as e:
        locate_cifar(tmp_path, CIFAR100_FILES, url="http://127.0.0.1:9/cifar-100-python.tar.gz")
    assert "cifar-100-python" in str(e.value) and "CIFAR100_DIR" in str(e.value)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_cifar100_files_are_read_with_the_restricted_unpickler(tmp_path, monkeypatch):
    folder = write_cifar100(tmp_path / "copy", num_train=100, num_test=100)
    monkeypatch.chdir(tmp_path)
    with open(folder / "test", "wb") as f:
        pickle.dump({"data": _RunsCode()}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset(data_cfg("data.dataset=cifar100"), folder.parent)
    assert not (tmp_path / "pwned.txt").exists()
    with open(folder / "test", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 100]}, f, protocol=2)
    with pytest.raises(DataError, match="labels must be in 0..99"):
        load_dataset(data_cfg("data.dataset=cifar100"), folder.parent)


# --------------------------------------------------------------------------- folder datasets

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("pictures"))


def folder_cfg(path, *overrides):
    return data_cfg("data.dataset=folder", f"data.path={path}", *overrides)


def test_folder_dataset_classes_splits_and_preprocessing(image_folder, tmp_path):
    root = tmp_path / "pics"
    shutil.copytree(image_folder, root)
    data = load_dataset(folder_cfg(root))
    assert data.classes == FOLDER_CLASSES and data.name == "pics"
    assert data.train_images.shape == (72, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (24, 3, 32, 32)
    assert data.train_labels.tolist() == [0] * 24 + [1] * 24 + [2] * 24
    # every file (any depth, any format) through predict's preprocessing, in predict's file order
    def as_predict_reads(split, size):
        return np.stack([load_image(f, size)
                         for c in FOLDER_CLASSES for f in find_images([root / split / c])[0]])

    assert np.array_equal(data.train_images.permute(0, 2, 3, 1).numpy(), as_predict_reads("train", 32))
    small = load_dataset(folder_cfg(root, "data.image_size=16"))
    assert small.train_images.shape == (72, 3, 16, 16) and small.image_size == 16
    assert np.array_equal(small.test_images.permute(0, 2, 3, 1).numpy(), as_predict_reads("test", 16))


def test_mean_and_std_come_from_the_training_images(image_folder, tmp_path):
    root = tmp_path / "pics"
    shutil.copytree(image_folder, root)
    data = load_dataset(folder_cfg(root))
    x = data.train_images.double() / 255
    assert data.mean == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-4)
    assert data.std == pytest.approx(x.std((0, 2, 3), unbiased=False).tolist(), abs=1e-4)
    assert data.mean != MEAN and data.std != STD
    loader = Loader(data.test_images, data.test_labels, 100, device="cpu", mean=data.mean, std=data.std)
    batch, _ = next(iter(loader))
    mean, std = torch.tensor(data.mean)[:, None, None], torch.tensor(data.std)[:, None, None]
    assert torch.allclose(batch, (data.test_images.float() / 255 - mean) / std, atol=1e-6)


def test_the_second_load_reads_the_cache_and_a_changed_file_is_decoded_again(image_folder, tmp_path,
                                                                              monkeypatch, capsys):
    root = tmp_path / "pics"
    shutil.copytree(image_folder, root)
    first = load_dataset(folder_cfg(root))
    assert (root / ".cifarcnn-cache" / "images-32.npz").is_file()
    assert "decoding 96 images" in capsys.readouterr().out
    decoded = []
    real = folders.read_image
    monkeypatch.setattr(folders, "read_image", lambda path, size: decoded.append(path) or real(path, size))
    second = load_dataset(folder_cfg(root))
    assert decoded == [] and "decoding" not in capsys.readouterr().out
    assert (torch.equal(first.train_images, second.train_images)
            and torch.equal(first.test_images, second.test_images))
    changed = root / "train" / "fox" / "0.png"
    Image.new("RGB", (32, 32), (255, 255, 255)).save(changed)
    os.utime(changed, ns=(1, 1))  # a new modification time, whatever the clock's resolution
    third = load_dataset(folder_cfg(root))
    assert decoded == [changed]
    assert (bool((third.train_images[48] == 255).all())
            and torch.equal(third.train_images[:48], first.train_images[:48]))
    load_dataset(folder_cfg(root, "data.image_size=16"))  # another size: its own cache file, all decoded
    assert len(decoded) == 1 + 96 and (root / ".cifarcnn-cache" / "images-16.npz").is_file()


def test_a_read_only_dataset_folder_caches_in_the_user_cache(image_folder, tmp_path, monkeypatch, capsys):
    root = tmp_path / "pics"
    shutil.copytree(image_folder, root)
    (root / ".cifarcnn-cache").write_text("a file where the cache folder would go: nothing can be written "
                                          "there")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    load_dataset(folder_cfg(root))
    cached = list((tmp_path / "user-cache" / "cifarcnn" / "folders").glob("pics-*/images-32.npz"))
    assert len(cached) == 1 and str(cached[0]) in capsys.readouterr().out
    monkeypatch.setattr(folders, "read_image", lambda *a: pytest.fail("decoded although cached"))
    assert load_dataset(folder_cfg(root)).classes == FOLDER_CLASSES


def test_a_corrupt_cache_is_ignored_and_rewritten(image_folder, tmp_path, capsys):
    root = tmp_path / "pics"
    shutil.copytree(image_folder, root)
    (root / ".cifarcnn-cache").mkdir()
    (root / ".cifarcnn-cache" / "images-32.npz").write_bytes(b"PK\x03\x04 not really a zip")
    data = load_dataset(folder_cfg(root))
    assert len(data.train_images) == 72 and "ignoring the unreadable cache" in capsys.readouterr().err
    with np.load(root / ".cifarcnn-cache" / "images-32.npz") as saved:
        assert saved["images"].shape == (96, 32, 32, 3)


def sides(data) -> dict[str, str]:
    """Relative path -> side ("train" or "test") of every image of a folder dataset."""
    return {**{k: "train" for k in data.train_ids}, **{k: "test" for k in data.test_ids}}


def test_without_test_folder_each_image_is_held_out_by_its_path_hash(tmp_path, capsys):
    root = write_image_folder(tmp_path / "pics", per_class=20, test_per_class=None)
    data = load_dataset(folder_cfg(root, "data.test_fraction=0.25"))
    for c in range(3):  # stratified within the stated tolerance, each class keeping training images
        n = 20
        held = int((data.test_labels == c).sum())
        assert within_tolerance(held, n, 0.25) and held < n
    every = torch.cat([data.train_images, data.test_images]).flatten(1)
    assert len(torch.unique(every, dim=0)) == 60  # disjoint: each image once
    other = load_dataset(folder_cfg(root, "data.test_fraction=0.25", "data.split_seed=1"))
    assert sides(other) != sides(data)  # the seed keys the hash
    before = sides(data)
    # add files, remove files, rename files: no other image changes sides
    for i in range(6):
        shutil.copy(root / "train" / "cat" / "0.png", root / "train" / "dog" / f"added-{i}.png")
    (root / "train" / "fox" / "1.jpg").unlink()
    (root / "train" / "cat" / "3.webp").rename(root / "train" / "cat" / "renamed.webp")
    after = sides(load_dataset(folder_cfg(root, "data.test_fraction=0.25")))
    kept = set(before) & set(after)
    assert len(kept) == 58 and all(before[k] == after[k] for k in kept)


def test_the_validation_split_of_a_folder_dataset_does_not_move(tmp_path):
    root = write_image_folder(tmp_path / "pics", per_class=30, test_per_class=4)
    cfg = folder_cfg(root)  # val_size auto: a tenth, by each path's hash

    def validation(config) -> set[str]:
        data = load_dataset(config)
        mask = validation_mask(data, config)
        return {k for k, v in zip(data.train_ids, mask.tolist()) if v}

    before = validation(cfg)
    assert 0 < len(before) < 90
    (root / "train" / "dog" / "2.bmp").unlink()
    shutil.copy(root / "train" / "cat" / "0.png", root / "train" / "fox" / "new.png")
    after = validation(cfg)
    assert before - {"train/dog/2.bmp"} == after - {"train/fox/new.png"}


def on_test_side(stem: str) -> str:
    """A file name `stem`-i.png whose path hash puts it on the test side (test_fraction 0.2, split_seed 0)."""
    def held(key: str) -> bool:  # a second key keeps the one-image class exception out of the way
        return bool(splits.hash_held_out([key, "x"], np.array([0, 0]), 0.2, 0, b"test")[0])

    return next(f"{stem}-{i}.png" for i in range(1000) if held(f"{stem}-{i}.png"))


def test_the_split_check_counts_sides_changed_new_gone_and_copies(tmp_path):
    """Recorded with a test/ folder; then test/ removed (the test side is held out of train/ by path hash:
    images that were training and validation images), 2 new pictures added on the test side, a training image
    copied under a test-side name, 3 training images removed. compare_split counts each exactly, says each."""
    root = write_image_folder(tmp_path / "pics", per_class=20, test_per_class=4, size=16)
    cfg = folder_cfg(root, "data.image_size=16")
    data = load_dataset(cfg)
    val = validation_mask(data, cfg)
    record = splits.split_record(data.train_ids, data.train_images, val, data.test_ids, data.test_images)
    was_val = {k for k, v in zip(data.train_ids, val.tolist()) if v}
    was_train = set(data.train_ids) - was_val
    unchanged = splits.compare_split(record, data).describe()
    assert unchanged == "split: unchanged since training (12 test images, none trained on)"
    shutil.rmtree(root / "test")
    rng = np.random.default_rng(1)
    for i in range(2):
        picture = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        picture.save(root / on_test_side(f"train/dog/n{i}"))
    copied = next(k for k in sorted(was_train) if k.endswith(".png"))
    copy = on_test_side("train/fox/copy")
    shutil.copy(root / copied, root / copy)
    for key in [k for k in sorted(was_train) if k != copied][:3]:
        (root / key).unlink()
    now = load_dataset(cfg)
    change = splits.compare_split(record, now)
    from_train, from_val = len(set(now.test_ids) & was_train), len(set(now.test_ids) & was_val)
    assert from_train > 0 and from_val > 0  # the scenario moves images of both sides
    assert (change.was_train, change.was_val, change.moved) == (from_train, from_val, from_train + from_val)
    assert (change.copies, change.new, change.gone, change.test_images) == (1, 2, 3, len(now.test_ids))
    trained = {k for k, t in zip(now.test_ids, change.trained_on.tolist()) if t}
    assert trained == (set(now.test_ids) & was_train) | {copy}
    n = change.test_images
    assert change.describe() == (
        f"split: {change.moved} of the {n} test images changed sides since training ({from_train} were "
        f"training images, {from_val} validation images); 1 of the {n} test images have the pixels of a "
        f"training image (the same picture under another name, at the decoded size); 2 test image(s) are new "
        f"since training; 3 image(s) the model trained on are gone or renamed")


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_hash_split_is_stratified_within_the_stated_tolerance(fraction):
    """Classes of 1 to 1,000 images under 30 seeds: each class's held-out count within the tolerance
    docs/datasets.md states, and never a class without a training image."""
    sizes = [1, 2, 3, 5, 10, 24, 50, 100, 300, 1000]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    keys = [f"train/c{c}/img_{i}.png" for c, n in enumerate(sizes) for i in range(n)]
    for seed in range(30):
        held = splits.hash_held_out(keys, labels, fraction, seed, b"test")
        for c, n in enumerate(sizes):
            count = int(held[labels == c].sum())
            assert count < n and within_tolerance(count, n, fraction), (seed, n, count)


def test_a_file_that_failed_to_decode_is_tried_again(tmp_path, monkeypatch, capsys):
    root = write_image_folder(tmp_path / "pics", per_class=6, test_per_class=2)
    real = folders.read_image
    failing = root / "train" / "dog" / "1.jpg"
    monkeypatch.setattr(folders, "read_image", lambda path, size: "permission denied" if path == failing
                        else real(path, size))
    assert len(load_dataset(folder_cfg(root)).train_images) == 17
    decoded = []
    monkeypatch.setattr(folders, "read_image", lambda path, size: decoded.append(path) or real(path, size))
    assert len(load_dataset(folder_cfg(root)).train_images) == 18
    assert decoded == [failing]  # only the failed file: the rest comes from the cache


def test_the_cache_with_added_removed_and_renamed_files(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "pics", per_class=6, test_per_class=2)
    first = load_dataset(folder_cfg(root))
    decoded = []
    real = folders.read_image
    monkeypatch.setattr(folders, "read_image", lambda path, size: decoded.append(path) or real(path, size))
    added = root / "train" / "cat" / "added.png"
    Image.new("RGB", (40, 40), (255, 255, 255)).save(added)
    (root / "train" / "dog" / "2.bmp").unlink()
    renamed = root / "train" / "fox" / "renamed.jpg"
    (root / "train" / "fox" / "1.jpg").rename(renamed)
    second = load_dataset(folder_cfg(root))
    assert sorted(decoded) == sorted([added, renamed])  # only the new names are decoded
    assert "train/dog/2.bmp" not in second.train_ids + second.test_ids
    old = dict(zip(first.train_ids + first.test_ids, torch.cat([first.train_images, first.test_images])))
    new = dict(zip(second.train_ids + second.test_ids, torch.cat([second.train_images, second.test_images])))
    # the same pixels under its new name
    assert torch.equal(new["train/fox/renamed.jpg"], old["train/fox/1.jpg"])
    assert bool((new["train/cat/added.png"] == 255).all())
    assert all(torch.equal(new[k], old[k]) for k in set(old) & set(new))
    with np.load(root / ".cifarcnn-cache" / "images-32.npz") as saved:  # the cache forgets the removed file
        assert "train/dog/2.bmp" not in saved["paths"].tolist() and len(saved["paths"]) == 24


def test_left_out_files_are_listed_and_the_rest_is_loaded(tmp_path, capsys):
    """An unreadable image, an empty class folder, files at the top level and a class with a single image."""
    root = write_image_folder(tmp_path / "pics", per_class=10, test_per_class=None)
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "train" / "empty").mkdir()
    (root / "train" / "notes.txt").write_text("loose file")
    (root / "train" / "stray.png").write_bytes((root / "train" / "dog" / "0.png").read_bytes())
    (root / "train" / "lonely").mkdir()
    shutil.copy(root / "train" / "fox" / "0.png", root / "train" / "lonely" / "only.png")
    data = load_dataset(folder_cfg(root, "data.test_fraction=0.2"))
    err = capsys.readouterr().err
    assert data.classes == ("cat", "dog", "fox", "lonely")  # 'empty' is not a class
    assert "broken.jpg: not an image file" in err and "left out 1 unreadable file(s)" in err
    assert "class folder" in err and "empty holds no image files: left out" in err
    assert "outside any class folder (notes.txt, stray.png)" in err
    assert "single training image: lonely" in err and "without test images" in err and "lonely" in err
    counts = torch.bincount(data.train_labels, minlength=4).tolist()  # by path hash: about 8 of 10 per class
    assert counts[3] == 1 and all(within_tolerance(10 - n, 10, 0.2) and n >= 1 for n in counts[:3])
    assert [a + b for a, b in zip(counts, torch.bincount(data.test_labels, minlength=4).tolist())
            ] == [10, 10, 10, 1]


def test_class_folders_directly_under_the_path_and_top_level_files(tmp_path, capsys):
    root = write_image_folder(tmp_path / "pics", per_class=10, test_per_class=None)
    for name in FOLDER_CLASSES:
        (root / "train" / name).rename(root / name)
    (root / "train").rmdir()
    data = load_dataset(folder_cfg(root))
    assert data.classes == FOLDER_CLASSES and len(data.train_images) + len(data.test_images) == 30
    assert "no train/ folder" in capsys.readouterr().err
    write_image_folder(tmp_path / "both", per_class=4, test_per_class=2)
    (tmp_path / "both" / "README.md").write_text("hello")
    load_dataset(folder_cfg(tmp_path / "both"))
    err = capsys.readouterr().err
    assert "top level" in err and "README.md" in err


def test_a_folder_with_fewer_than_two_classes_is_a_clear_error(tmp_path):
    (tmp_path / "pics" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files found"):
        load_dataset(folder_cfg(tmp_path / "pics"))
    Image.new("RGB", (8, 8)).save(tmp_path / "pics" / "train" / "cat" / "a.png")
    with pytest.raises(DataError, match="at least 2 class folders"):
        load_dataset(folder_cfg(tmp_path / "pics"))


def test_a_dataset_too_large_for_memory_fails_before_decoding(image_folder, tmp_path, monkeypatch):
    root = tmp_path / "pics"
    shutil.copytree(image_folder, root)
    monkeypatch.setattr(folders, "read_image", lambda *a: pytest.fail("decoding started"))
    need_at_64 = folders.memory_needed(96, 72, 64, torch.device("cpu"))
    monkeypatch.setattr(folders, "_available_bytes", lambda device: need_at_64 + 1)
    with pytest.raises(DataError) as e:
        load_dataset(folder_cfg(root, "data.image_size=128"), device=torch.device("cpu"))
    message = str(e.value)
    assert "96 images at 128x128" in message and "on cpu" in message
    assert "data.image_size=64" in message  # the largest size that fits
    assert not (root / ".cifarcnn-cache").exists()
