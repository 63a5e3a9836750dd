"""Image files to model input: formats, modes, orientation, crop/resize, normalization, bad files, file
discovery."""

import numpy as np
import pytest
import torch
from PIL import Image

from cifarcnn.base.errors import UsageError
from cifarcnn.data.images import ImageReadError, find_images, load_image, to_model_input
from cifarcnn.data.loader import Loader

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def close(pixel, colour, tol=12):
    return np.all(np.abs(np.asarray(pixel, dtype=int) - colour) <= tol)


def random_rgb(seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("BMP", "bmp"), ("WEBP", "webp")])
def test_lossless_32x32_files_come_back_pixel_exact(tmp_path, fmt, ext):
    pixels = random_rgb()
    path = tmp_path / f"x.{ext}"
    Image.fromarray(pixels).save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert np.array_equal(load_image(path), pixels)


def test_jpeg_grayscale_and_palette_become_rgb(tmp_path):
    Image.new("L", (40, 40), 90).save(tmp_path / "gray.jpg", quality=95)
    gray = load_image(tmp_path / "gray.jpg")
    assert gray.shape == (32, 32, 3) and gray.dtype == np.uint8
    assert np.all(np.abs(gray.astype(int) - 90) <= 2)
    palette = Image.new("RGB", (32, 32), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(tmp_path / "palette.png")
    assert close(load_image(tmp_path / "palette.png")[5, 5], (10, 200, 30), tol=0)


def test_transparency_is_composited_over_white(tmp_path):
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 16, 32))  # opaque blue left half
    rgba.save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert close(out[10, 4], BLUE, 0) and close(out[10, 28], WHITE, 0)
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(tmp_path / "palette-transparent.gif", transparency=1)
    assert close(load_image(tmp_path / "palette-transparent.gif")[3, 3], WHITE, 0)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.full((32, 32), 65535, dtype=np.uint16)
    values[:, 16:] = 128 * 257
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = load_image(tmp_path / "deep.png")
    assert close(out[0, 0], WHITE, 0) and close(out[0, 31], (128, 128, 128), 1)


def test_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (32, 32), RED), Image.new("RGB", (32, 32), BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    assert close(load_image(tmp_path / "anim.gif")[16, 16], RED, 0)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (64, 32), RED)
    image.paste(BLUE, (32, 0, 64, 32))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": left edge goes to the top
    image.save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    out = load_image(tmp_path / "rotated.jpg")
    assert close(out[2, 16], RED, 30) and close(out[29, 16], BLUE, 30)
    image.save(tmp_path / "plain.jpg", quality=95)
    plain = load_image(tmp_path / "plain.jpg")
    assert close(plain[16, 2], RED, 30) and close(plain[16, 29], BLUE, 30)


def test_centre_square_crop_then_resize(tmp_path):
    image = Image.new("RGB", (96, 32), RED)
    image.paste(GREEN, (32, 0, 64, 32))
    image.paste(BLUE, (64, 0, 96, 32))
    image.save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png")
    assert all(close(p, GREEN, 0) for p in out.reshape(-1, 3))


def test_downscaling_is_antialiased(tmp_path):
    checker = (np.indices((320, 320)).sum(0) % 2 * 255).astype(np.uint8)  # 1-pixel black/white checkerboard
    Image.fromarray(checker).save(tmp_path / "checker.png")
    out = load_image(tmp_path / "checker.png").astype(int)
    assert out.shape == (32, 32, 3)
    assert out.min() >= 110 and out.max() <= 145  # averaged to grey, not aliased to black and white


def test_a_large_photo_is_read_and_shrunk(tmp_path):
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8))
    big.save(tmp_path / "big.jpg", quality=80)
    assert load_image(tmp_path / "big.jpg").shape == (32, 32, 3)


def test_model_input_matches_the_training_loader_exactly():
    pixels = np.stack([random_rgb(s) for s in range(5)])
    from_files = to_model_input(pixels)
    chw = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    from_loader, _ = next(iter(Loader(chw, torch.zeros(5, dtype=torch.long), 5, device="cpu")))
    assert from_files.shape == (5, 3, 32, 32) and from_files.dtype == torch.float32
    assert torch.equal(from_files, from_loader)


def test_bad_files_raise_a_short_reason(tmp_path):
    (tmp_path / "text.jpg").write_text("this is not a picture\n" * 20)
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(random_rgb(size=64)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    reasons = {}
    for name in ("text.jpg", "empty.png", "truncated.png"):
        with pytest.raises(ImageReadError) as e:
            load_image(tmp_path / name)
        reasons[name] = str(e.value)
    assert "not an image" in reasons["text.jpg"]
    assert reasons["empty.png"] == "empty file"
    assert "truncated" in reasons["truncated.png"]


def test_find_images_walks_folders_globs_and_files(tmp_path):
    for rel in ("a/cat/1.png", "a/cat/2.JPG", "a/dog/3.webp", "a/notes.txt", "a/.hidden/4.png", "b/5.gif",
                "c/readme.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    files, skipped = find_images([tmp_path / "a", str(tmp_path / "b" / "*.gif"), tmp_path / "c" / "readme.md",
                                  tmp_path / "a" / "cat" / "1.png"])
    names = [p.relative_to(tmp_path).as_posix() for p in files]
    assert names == ["a/cat/1.png", "a/cat/2.JPG", "a/dog/3.webp", "b/5.gif", "c/readme.md"]  # de-duplicated
    assert skipped == 1  # notes.txt; hidden folders are not searched
    with pytest.raises(UsageError, match="no such file"):
        find_images([tmp_path / "missing"])
    with pytest.raises(UsageError, match="matches no file"):
        find_images([str(tmp_path / "*.tiff")])
