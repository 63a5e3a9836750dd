import dataclasses
import hashlib
import http.server
import io
import os
import pickle
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarcnn.base.config import AugmentConfig, DataConfig
from cifarcnn.base.errors import ConfigError
from cifarcnn.data.cifar import (
    MD5,
    download_file,
    load_cifar10,
    locate_cifar10,
    read_batch,
    resolve_data_root,
)
from cifarcnn.data.dataset import MEAN, STD, DataError, Dataset, normalize_
from cifarcnn.data.loader import Loader, augment, training_split

from .conftest import NUM_TEST, PER_TRAIN_BATCH, write_cifar


def make_archive(root: Path) -> tuple[Path, str]:
    """A cifar-10-python.tar.gz of the synthetic data, and its MD5."""
    src = root / "src"
    write_cifar(src)
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    shutil.rmtree(src)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_reads_the_official_folder_layout(cifar_root):
    data = load_cifar10(cifar_root)
    assert data.train_images.shape == (5 * PER_TRAIN_BATCH, 3, 32, 32)
    assert data.train_images.dtype == torch.uint8
    assert data.train_labels.dtype == torch.int64 and len(data.train_labels) == 5 * PER_TRAIN_BATCH
    assert data.test_images.shape == (NUM_TEST, 3, 32, 32)
    assert data.classes[0] == "airplane" and len(data.classes) == 10
    # the batches folder itself works as the data root too
    assert torch.equal(load_cifar10(cifar_root / "cifar-10-batches-py").test_labels, data.test_labels)


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "env"))
    assert resolve_data_root("given") == Path("given")
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("CIFAR10_DIR")
    assert resolve_data_root(None) == Path("data")


def test_archive_is_extracted_once_and_checked(tmp_path):
    archive, md5 = make_archive(tmp_path)
    folder = locate_cifar10(tmp_path, md5=md5, download=False)
    assert folder == tmp_path / "cifar-10-batches-py" and (folder / "data_batch_5").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".extracting")]
    (folder / "marker").touch()
    assert locate_cifar10(tmp_path, md5=md5) == folder and (folder / "marker").exists()  # not re-extracted


def test_archive_with_wrong_md5_is_refused(tmp_path):
    make_archive(tmp_path)
    with pytest.raises(DataError, match="MD5"):
        locate_cifar10(tmp_path, md5="0" * 32)


class _OneFileHandler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def local_server(tmp_path):
    archive, md5 = make_archive(tmp_path / "served")
    _OneFileHandler.payload = archive.read_bytes()
    server = http.server.HTTPServer(("127.0.0.1", 0), _OneFileHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/cifar-10-python.tar.gz", md5
    server.shutdown()


def test_download_from_a_local_server_checks_md5_and_extracts(local_server, tmp_path):
    url, md5 = local_server
    root = tmp_path / "fresh"
    folder = locate_cifar10(root, url=url, md5=md5)
    assert (root / "cifar-10-python.tar.gz").exists()
    assert read_batch(folder / "data_batch_1")[0].shape == (PER_TRAIN_BATCH, 3, 32, 32)


def test_download_with_bad_md5_leaves_nothing(local_server, tmp_path):
    url, _ = local_server
    root = tmp_path / "fresh"
    with pytest.raises(DataError, match="MD5"):
        locate_cifar10(root, url=url, md5="0" * 32)
    assert list(root.iterdir()) == []


def test_offline_download_says_how_to_point_at_a_copy(tmp_path):
    with pytest.raises(DataError) as e:
        download_file("http://127.0.0.1:9/cifar-10-python.tar.gz", tmp_path / "x.tar.gz", "0" * 32)
    assert "--data-dir" in str(e.value) and "CIFAR10_DIR" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_no_copy_and_no_download(tmp_path):
    with pytest.raises(DataError, match="CIFAR10_DIR"):
        locate_cifar10(tmp_path, download=False)


def test_archive_members_outside_the_target_are_refused(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(DataError, match="unsafe"):
        locate_cifar10(tmp_path, md5=md5)
    assert not (tmp_path.parent / "escaped.txt").exists()


def _crafted_archive(root: Path, member: tarfile.TarInfo) -> tuple[Path, str]:
    """An archive holding a harmless file plus `member`, and its MD5."""
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        ok = tarfile.TarInfo("cifar-10-batches-py/readme.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        tar.addfile(member, io.BytesIO(b"evil") if member.isfile() else None)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = 4 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("member", [
    pytest.param(lambda outside: _member(str(outside / "abs.txt")), id="absolute-path"),
    pytest.param(lambda outside: _member("cifar-10-batches-py/sub/../../../x.txt"), id="dotdot-inside-path"),
    pytest.param(lambda outside: _member("cifar-10-batches-py/link", tarfile.SYMTYPE, str(outside)),
                 id="symlink-absolute-out"),
    pytest.param(lambda outside: _member("cifar-10-batches-py/link", tarfile.SYMTYPE, "../../outside"),
                 id="symlink-relative-out"),
    pytest.param(lambda outside: _member("cifar-10-batches-py/hard", tarfile.LNKTYPE,
                                         str(outside / "victim")),
                 id="hardlink-absolute-out"),
    pytest.param(lambda outside: _member("cifar-10-batches-py/hard", tarfile.LNKTYPE, "../../outside/victim"),
                 id="hardlink-relative-out"),
])
def test_crafted_archives_cannot_write_outside_the_data_root(tmp_path, member):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    archive, md5 = _crafted_archive(root, member(outside))
    with pytest.raises(DataError, match="unsafe"):
        locate_cifar10(root, md5=md5)
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_text() == "untouched"
    assert sorted(p.name for p in root.iterdir()) == [archive.name]  # nothing extracted, no temp folder left
    assert not (tmp_path / "x.txt").exists()


@pytest.fixture
def cifar_copy(cifar_root, tmp_path):
    shutil.copytree(cifar_root, tmp_path / "copy")
    return tmp_path / "copy" / "cifar-10-batches-py"


def test_truncated_batch_names_the_file(cifar_copy):
    path = cifar_copy / "data_batch_3"
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(DataError) as e:
        load_cifar10(cifar_copy.parent)
    assert "data_batch_3" in str(e.value) and "truncated" in str(e.value)


def test_missing_batch_names_the_file(cifar_copy):
    (cifar_copy / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10(cifar_copy.parent)


def test_malformed_batch_names_the_file_and_the_problem(cifar_copy):
    with open(cifar_copy / "data_batch_2", "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_2.*\(N, 3072\)"):
        load_cifar10(cifar_copy.parent)
    with open(cifar_copy / "data_batch_2", "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2]}, f, protocol=2)
    with pytest.raises(DataError, match="data_batch_2.*labels"):
        load_cifar10(cifar_copy.parent)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_batch_file_cannot_run_code(cifar_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(cifar_copy / "data_batch_1", "wb") as f:
        pickle.dump({"data": _RunsCode()}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load posix.system|refusing to load os.system"):
        load_cifar10(cifar_copy.parent)
    assert not (tmp_path / "pwned.txt").exists()


def test_split_sizes_disjoint_and_reproducible(cifar_root):
    data = load_cifar10(cifar_root)
    ids = torch.arange(len(data.train_labels))  # split the indices to see which images went where
    data = dataclasses.replace(data, train_images=ids)
    (train_a, _), (val_a, _) = training_split(data, DataConfig(val_size=100, split_seed=3))
    (train_b, _), (val_b, _) = training_split(data, DataConfig(val_size=100, split_seed=3))
    (_, _), (val_c, _) = training_split(data, DataConfig(val_size=100, split_seed=4))
    assert len(train_a) == 500 and len(val_a) == 100
    assert torch.equal(val_a, val_b) and torch.equal(train_a, train_b)
    assert not torch.equal(val_a, val_c)
    assert set(train_a.tolist()).isdisjoint(val_a.tolist())
    assert set(train_a.tolist()) | set(val_a.tolist()) == set(ids.tolist())
    with pytest.raises(ConfigError, match="data.val_size"):
        training_split(data, DataConfig(val_size=600))


def test_default_split_is_45k_5k():
    ids = torch.arange(50_000)
    (train, _), (val, _) = training_split(Dataset(ids, ids, ids[:0], ids[:0], ("a",)), DataConfig())
    assert len(train) == 45_000 and len(val) == 5000


def test_loader_shapes_dtypes_and_normalization(cifar_root):
    data = load_cifar10(cifar_root)
    loader = Loader(data.test_images, data.test_labels, 64, device="cpu")
    batches = list(loader)
    assert len(loader) == len(batches) == 4  # 200 images: 64 + 64 + 64 + 8
    x, y = batches[0]
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    assert len(batches[-1][1]) == 8
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    expected = (data.test_images[:64].float() / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-6)
    assert torch.equal(torch.cat([b[1] for b in batches]), data.test_labels)  # unshuffled, every image once


def test_shuffled_epochs_cover_every_image_once_and_differ(cifar_root):
    data = load_cifar10(cifar_root)
    loader = Loader(data.train_images, torch.arange(len(data.train_images)), 64, device="cpu",
                    augment=AugmentConfig(), shuffle=True, seed=0)
    epoch0 = torch.cat([y for _, y in loader.epoch(0)])
    epoch1 = torch.cat([y for _, y in loader.epoch(1)])
    assert sorted(epoch0.tolist()) == list(range(len(data.train_images)))
    assert not torch.equal(epoch0, epoch1)


def test_augmentation_varies_per_image():
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    batch = image.repeat(64, 1, 1, 1)
    out = augment(batch, AugmentConfig(), torch.Generator().manual_seed(0))
    distinct = {tuple(o.flatten()[::97].tolist()) for o in out}
    assert len(distinct) > 50  # 64 copies of one image, (almost) all augmented differently
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("cfg", [
    AugmentConfig(flip="random", crop_padding=0, brightness=0, contrast=0),
    AugmentConfig(flip="none", crop_padding=4, brightness=0, contrast=0),
    AugmentConfig(flip="none", crop_padding=2, padding_mode="reflect", brightness=0, contrast=0),
    AugmentConfig(flip="none", crop_padding=0, brightness=0.2, contrast=0),
    AugmentConfig(flip="none", crop_padding=0, brightness=0, contrast=0.2),
])
def test_each_augmentation_alone_changes_images_and_keeps_them_valid(cfg):
    batch = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    out = augment(batch, cfg, torch.Generator().manual_seed(0))
    plain = batch.float() / 255
    changed = (out - plain).abs().flatten(1).amax(1) > 1e-6
    assert 0 < changed.sum()
    if not cfg.brightness and not cfg.contrast:  # geometry only moves pixels: a subset of the values
        assert (set(torch.unique(out * 255).round().tolist())
                <= set(torch.unique(batch.float()).tolist()) | {0.0})


@pytest.mark.parametrize("kind", ["brightness", "contrast"])
def test_brightness_and_contrast_factors_stay_within_their_range(kind):
    """Images built so that each image's factor can be read back: brightness scales a flat grey image,
    contrast moves a two-tone image (all channels alike, so its grey level is its mean) toward or away from
    its mean."""
    spread, n = 0.3, 2000
    image = torch.full((n, 3, 32, 32), 64, dtype=torch.uint8)
    if kind == "contrast":
        image[:, :, :, 16:] = 192
    cfg = AugmentConfig(flip="none", crop_padding=0, **{"brightness": 0, "contrast": 0, kind: spread})
    out = augment(image, cfg, torch.Generator().manual_seed(0))
    x = image.float() / 255
    centre = x.mean((1, 2, 3), keepdim=True) if kind == "contrast" else torch.zeros(n, 1, 1, 1)
    factors = (out - centre)[:, 0, 0, 0] / (x - centre)[:, 0, 0, 0]
    # one factor per image
    assert torch.allclose(out, centre + factors[:, None, None, None] * (x - centre), atol=1e-5)
    assert factors.min() >= 1 - spread - 1e-5 and factors.max() <= 1 + spread + 1e-5
    # and the whole range is used
    assert factors.min() < 1 - 0.95 * spread and factors.max() > 1 + 0.95 * spread


def test_normalization_constants_and_archive_md5_are_the_official_ones(tmp_path):
    # The CIFAR-10 training set's per-channel mean and std (tests/test_integration.py measures them on the
    # real copy), and the MD5 of cifar-10-python.tar.gz published on
    # https://www.cs.toronto.edu/~kriz/cifar.html.
    assert MEAN == (0.4914, 0.4822, 0.4465) and STD == (0.2470, 0.2435, 0.2616)
    assert MD5 == "c58f30108f718f92721af3b95e74349a"
    make_archive(tmp_path)  # not the official archive: refused by default
    with pytest.raises(DataError, match=f"MD5 does not match the official archive \\({MD5}\\)"):
        locate_cifar10(tmp_path, download=False)


def test_flip_is_a_mirror_and_crop_is_a_shift():
    image = torch.arange(3 * 32 * 32, dtype=torch.int32).reshape(1, 3, 32, 32).to(torch.uint8)
    no_jitter = {"brightness": 0, "contrast": 0}
    flips = augment(image.repeat(16, 1, 1, 1), AugmentConfig(flip="random", crop_padding=0, **no_jitter),
                    torch.Generator().manual_seed(1))
    plain, mirrored = image.float() / 255, image.flip(3).float() / 255
    assert all(torch.equal(f, plain[0]) or torch.equal(f, mirrored[0]) for f in flips)
    crops = augment(image.repeat(16, 1, 1, 1), AugmentConfig(flip="none", crop_padding=4, **no_jitter),
                    torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(plain, (4, 4, 4, 4))
    windows = {(dy, dx): padded[0, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)}
    assert all(any(torch.equal(c, w) for w in windows.values()) for c in crops)


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_a_flipped_crop_is_the_mirror_of_a_padded_window(mode):
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    cfg = AugmentConfig(flip="random", crop_padding=3, padding_mode=mode, brightness=0, contrast=0)
    out = augment(image.repeat(64, 1, 1, 1), cfg, torch.Generator().manual_seed(2))
    pad_mode = "reflect" if mode == "reflect" else "constant"
    padded = torch.nn.functional.pad(image.float() / 255, (3, 3, 3, 3), mode=pad_mode)
    windows = [padded[0, :, dy:dy + 32, dx:dx + 32] for dy in range(7) for dx in range(7)]
    kinds = [next((flipped for w in windows for flipped in (False, True)
                   if torch.equal(o, w.flip(2) if flipped else w)), None) for o in out]
    assert None not in kinds and 10 < sum(kinds) < 54  # every output is a window, about half of them mirrored


def test_training_batches_are_augmented_validation_and_test_never(cifar_root):
    """The workflow this replaces switched training augmentation off by sharing a dataset with validation."""
    data = load_cifar10(cifar_root)
    (train_x, train_y), (val_x, val_y) = training_split(data, DataConfig(val_size=100))
    train = Loader(train_x, train_y, 500, device="cpu", augment=AugmentConfig(), shuffle=True, seed=0)
    val = Loader(val_x, val_y, 100, device="cpu")
    test = Loader(data.test_images, data.test_labels, 200, device="cpu")
    # built in any order, used in any order: each loader keeps its own transform
    for _ in range(2):
        x_val, _ = next(iter(val))
        assert torch.equal(x_val, normalize_(val_x.float() / 255))
        x_test, _ = next(iter(test))
        assert torch.equal(x_test, normalize_(data.test_images.float() / 255))
        order = train.order(0)
        x_train, _ = next(train.epoch(0))
        unaugmented = normalize_(train_x[order[:500]].float() / 255)
        differs = (x_train - unaugmented).abs().flatten(1).amax(1) > 1e-4
        assert differs.float().mean() > 0.9


def test_an_epoch_resumed_half_way_sees_the_same_batches(cifar_root):
    data = load_cifar10(cifar_root)
    loader = Loader(data.train_images, data.train_labels, 64, device="cpu", augment=AugmentConfig(),
                    shuffle=True, seed=7)
    whole = list(loader.epoch(2))
    tail = list(loader.epoch(2, start_step=5))
    assert len(tail) == len(whole) - 5
    for (xa, ya), (xb, yb) in zip(whole[5:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_reflect_padding_crops_come_from_the_reflected_image():
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    cfg = AugmentConfig(flip="none", crop_padding=2, padding_mode="reflect", brightness=0, contrast=0)
    crops = augment(image.repeat(16, 1, 1, 1), cfg, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(image.float() / 255, (2, 2, 2, 2), mode="reflect")
    windows = [padded[0, :, dy:dy + 32, dx:dx + 32] for dy in range(5) for dx in range(5)]
    assert all(any(torch.equal(c, w) for w in windows) for c in crops)
    assert len({tuple(c.flatten()[::50].tolist()) for c in crops}) > 5


def test_alternating_flip_mirrors_each_image_every_other_epoch(cifar_root):
    data = load_cifar10(cifar_root)
    cfg = AugmentConfig(flip="alternate", crop_padding=0, brightness=0, contrast=0)
    ids = torch.arange(len(data.train_images))
    loader = Loader(data.train_images, ids, 100, device="cpu", augment=cfg, shuffle=True, seed=0)
    plain = normalize_(data.train_images.float() / 255)

    def mirrored(epoch):
        x, y = map(torch.cat, zip(*loader.epoch(epoch)))
        flipped = torch.tensor([torch.equal(a, plain[i].flip(2)) and not torch.equal(a, plain[i])
                               for a, i in zip(x, y.tolist())])
        return flipped[y.argsort()]

    e0, e1, e2 = mirrored(0), mirrored(1), mirrored(2)
    assert 0.3 < e0.float().mean() < 0.7
    assert torch.equal(e1, ~e0) and torch.equal(e2, e0)



def no_augment() -> dict:
    return {"flip": "none", "crop_padding": 0, "brightness": 0, "contrast": 0}


def test_cutout_sets_one_square_per_image_to_the_mean_colour():
    batch = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = augment(batch, AugmentConfig(cutout=12, **no_augment()), torch.Generator().manual_seed(3))
    plain = batch.float() / 255
    mean = torch.tensor(MEAN)[:, None]
    corners = set()
    for image, original in zip(out, plain):
        changed = (image != original).any(0)  # (h, w); a uint8 level k/255 never equals the mean colour
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        top, left = rows.min().item(), cols.min().item()
        square = torch.zeros(32, 32, dtype=torch.bool)
        square[top:top + 12, left:left + 12] = True
        assert torch.equal(changed, square)  # exactly one 12x12 square, wholly inside the image
        assert torch.allclose(image[:, square], mean.expand(3, 144))
        corners.add((top, left))
    assert len(corners) > 30  # each image has its own square
    normalized = normalize_(out.clone())
    assert normalized.abs().flatten(1).lt(1e-6).sum(1).min() >= 3 * 144  # the mean colour normalizes to zero


def test_cutout_comes_after_flip_and_crop_and_leaves_their_randomness_alone():
    batch = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    geometry = {"flip": "random", "crop_padding": 4, "padding_mode": "reflect", "brightness": 0,
                "contrast": 0}
    without = augment(batch, AugmentConfig(**geometry), torch.Generator().manual_seed(4))
    with_cutout = augment(batch, AugmentConfig(cutout=8, **geometry), torch.Generator().manual_seed(4))
    differs = (with_cutout != without).any(1).flatten(1).sum(1)
    assert (differs == 64).all()  # the same flips and crops, then one 8x8 square each
    whole = augment(batch, AugmentConfig(cutout=40, **no_augment()), torch.Generator().manual_seed(0))
    # clamped to the image
    assert torch.allclose(whole, torch.tensor(MEAN)[None, :, None, None].expand_as(whole))


def test_cutout_reaches_training_batches_only(cifar_root):
    data = load_cifar10(cifar_root)
    cfg = AugmentConfig(cutout=12, **no_augment())
    train = Loader(data.train_images, data.train_labels, 600, device="cpu", augment=cfg, shuffle=False)
    test = Loader(data.test_images, data.test_labels, 200, device="cpu")
    x_train, _ = next(iter(train))
    x_test, _ = next(iter(test))
    zero_pixels = (x_train.abs() < 1e-6).all(1).flatten(1).sum(1)
    assert (zero_pixels >= 144).all()  # every training image has its 12x12 square at the mean (0 normalized)
    assert torch.equal(x_test, normalize_(data.test_images.float() / 255))
