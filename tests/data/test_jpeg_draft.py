"""Reduced-size JPEG decoding in the image processors (``draft``): same output shape, smaller decode
only when every crop/resize still gets ``image_size`` pixels, pixels close to a full decode."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter
from torchvision import transforms

from lavis_lite.data.processors import CLIP_MEAN, CLIP_STD, build_processor, jpeg_draft


def write_jpeg(path, width: int, height: int, seed: int = 0):
    """A photo-like JPEG: smooth colour gradients and a few soft-edged shapes (quality 90)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([255 * x / width, 255 * y / height, 127 + 100 * np.sin(x / 57 + y / 83)], axis=-1)
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width * 3 // 4), rng.integers(0, height * 3 // 4)
        size = int(rng.integers(min(width, height) // 8, min(width, height) // 3))
        draw.ellipse((x0, y0, x0 + size, y0 + size), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(2))
    image.save(path, quality=90)
    return path


def open_drafted(processor, path) -> tuple[Image.Image, tuple[int, int]]:
    """What a data set does: open, let the processor draft, decode to RGB; also the decoded size."""
    with Image.open(path) as image:
        processor.draft(image)
        decoded = image.convert("RGB")
    return decoded, decoded.size


def full_decode(path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def clip_tensor(image: Image.Image) -> torch.Tensor:
    """Independent reference: PIL pixels -> [3, H, W] CLIP-normalised, without torchvision."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    return (array - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


@pytest.mark.parametrize("size, image_size, decoded", [
    ((640, 480), 224, (320, 240)),  # 1/2 keeps both sides >= 224; 1/4 would not
    ((1280, 960), 224, (320, 240)),  # 1/4
    ((2048, 1536), 224, (512, 384)),  # 1/4: 1/8 would give 192 < 224
    ((448, 448), 224, (224, 224)),  # exactly enough
    ((446, 446), 224, (446, 446)),  # 1/2 would give 223 < 224: full decode
    ((400, 300), 224, (400, 300)),
    ((2000, 300), 224, (2000, 300)),  # the short side decides
    ((128, 128), 64, (64, 64)),  # the shapes images at the CPU recipe's size
])
def test_eval_decodes_smaller_only_when_both_sides_keep_image_size(tmp_path, size, image_size, decoded):
    path = write_jpeg(tmp_path / "a.jpg", *size)
    proc = build_processor({"name": "blip_image_eval", "image_size": image_size})
    image, got = open_drafted(proc, path)
    assert got == decoded
    assert min(got) >= image_size
    assert proc(image).shape == (3, image_size, image_size)


@pytest.mark.parametrize("size, min_scale, decoded", [
    ((640, 480), 0.5, (640, 480)),  # a 1/2 decode (320x240) allows crops of ~170 px: full decode
    ((1280, 960), 0.5, (640, 480)),  # smallest crop of 640x480 ~ 339 px >= 224; 1/4 would give ~170
    ((1280, 960), 0.1, (1280, 960)),  # a 1/2 decode allows ~151 px crops at min_scale 0.1
    ((2048, 1536), 1.0, (512, 384)),  # min_scale 1: crops never smaller than min(W, H) * sqrt(3/4)
    ((3000, 800), 0.5, (1500, 400)),  # elongated: the fallback centre crop keeps the short side (400)
])
def test_train_decodes_smaller_only_when_every_crop_keeps_image_size(tmp_path, size, min_scale, decoded):
    path = write_jpeg(tmp_path / "a.jpg", *size)
    proc = build_processor({"name": "blip_image_train", "image_size": 224, "min_scale": min_scale})
    image, got = open_drafted(proc, path)
    assert got == decoded
    assert proc(image).shape == (3, 224, 224)


@pytest.mark.parametrize("width, height, min_scale", [
    (640, 480, 0.5), (512, 384, 0.5), (400, 300, 0.9), (1500, 400, 0.5), (300, 900, 0.3), (300, 260, 1.0),
])
def test_train_fits_is_a_lower_bound_on_sampled_crops(width, height, min_scale):
    """Where ``fits`` says yes, no crop that RandomResizedCrop draws is below image_size on a side."""
    proc = build_processor({"name": "blip_image_train", "image_size": 224, "min_scale": min_scale})
    if not proc.fits(width, height):
        pytest.skip("fits() says no: nothing to check")
    torch.manual_seed(0)
    image = Image.new("RGB", (width, height))
    sides = [transforms.RandomResizedCrop.get_params(image, proc.crop.scale, proc.crop.ratio)[2:] for _ in range(3000)]
    assert min(min(h, w) for h, w in sides) >= 224


def test_eval_pixels_close_to_full_decode_and_resize(tmp_path):
    path = write_jpeg(tmp_path / "a.jpg", 640, 480)
    proc = build_processor({"name": "blip_image_eval", "image_size": 224})
    drafted, size = open_drafted(proc, path)
    assert size == (320, 240)
    reference = clip_tensor(full_decode(path).resize((224, 224), Image.BICUBIC))
    out = proc(drafted)
    assert out.shape == reference.shape
    diff = (out - reference).abs()
    assert diff.mean() < 0.02 and diff.quantile(0.99) < 0.1  # CLIP-normalised units; 1/255 ~ 0.015


def test_train_pixels_close_to_full_decode_and_resize(tmp_path):
    """min_scale 1 on a 4:3 image: RandomResizedCrop keeps the whole image, so the reference is a full
    decode resized to 224 x 224; the processor decodes at 1/4 (320 x 240: every crop keeps 224 px)."""
    path = write_jpeg(tmp_path / "a.jpg", 1280, 960)
    proc = build_processor({"name": "blip_image_train", "image_size": 224, "min_scale": 1.0, "hflip": False})
    drafted, size = open_drafted(proc, path)
    assert size == (320, 240)
    reference = clip_tensor(full_decode(path).resize((224, 224), Image.BICUBIC))
    torch.manual_seed(0)
    out = proc(drafted)
    assert out.shape == reference.shape == (3, 224, 224)
    diff = (out - reference).abs()
    assert diff.mean() < 0.02 and diff.quantile(0.99) < 0.1  # CLIP-normalised units; 1/255 ~ 0.015


def test_draft_does_nothing_when_off_not_jpeg_or_already_decoded(tmp_path):
    path = write_jpeg(tmp_path / "a.jpg", 640, 480)
    off = build_processor({"name": "blip_image_eval", "image_size": 224, "jpeg_draft": False})
    assert open_drafted(off, path)[1] == (640, 480)
    png = tmp_path / "a.png"
    full_decode(path).save(png)
    on = build_processor({"name": "blip_image_eval", "image_size": 224})
    assert open_drafted(on, png)[1] == (640, 480)
    with Image.open(path) as image:
        image.load()
        assert jpeg_draft(image, on.fits) == 1 and image.size == (640, 480)
    with Image.open(path) as image:  # a second draft (e.g. by the data set) is not stacked
        assert jpeg_draft(image, on.fits) == 2
        assert jpeg_draft(image, lambda w, h: True) == 1 and image.size == (320, 240)
