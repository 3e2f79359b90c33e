"""The tensor image pipeline (``backend: tensor``): within one grey level of the PIL transform on the
same decode and the same crop/flip draws (but for ~1 value in a million, off by 2), the crop drawn
before decoding so a reduced-size JPEG decode applies whenever that crop allows it, seeded runs
reproducible."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter
from torchvision import transforms

from lavis_lite.config import ConfigError
from lavis_lite.data.datasets import load_image, process_image
from lavis_lite.data.processors import CLIP_MEAN, CLIP_STD, build_processor

MEAN, STD = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)


def write_image(path, width: int, height: int, mode: str = "RGB", seed: int = 0):
    """A photo-like image (gradients, soft shapes, noise) saved as ``path`` (JPEG quality 90 or PNG)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([255 * x / width, 255 * y / height, 127 + 100 * np.sin(x / 37 + y / 53)], axis=-1)
    image = Image.fromarray((base + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width * 3 // 4), rng.integers(0, height * 3 // 4)
        size = int(rng.integers(min(width, height) // 8, min(width, height) // 3))
        draw.ellipse((x0, y0, x0 + size, y0 + size), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image.filter(ImageFilter.GaussianBlur(1)).convert(mode).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return {
        "640x480": write_image(root / "a.jpg", 640, 480),
        "1280x960": write_image(root / "b.jpg", 1280, 960, seed=1),
        "grey": write_image(root / "c.jpg", 500, 375, mode="L", seed=2),
        "cmyk": write_image(root / "d.jpg", 480, 640, mode="CMYK", seed=3),
        "png": write_image(root / "e.png", 640, 480, seed=4),
    }


def grey_levels(out: torch.Tensor) -> torch.Tensor:
    """Undo the CLIP normalisation: [3, S, S] in 0..255 grey levels."""
    return (out * STD + MEAN) * 255


def assert_within_one_grey_level(out: torch.Tensor, reference: torch.Tensor) -> None:
    """PIL's and torch's uint8 bicubic resizes round differently at some pixels: measured on these
    images, 0.3% of values (13% for the slight 240 -> 224 shrink of the CMYK one) differ by 1 grey level
    and 1 in ~150,000 or fewer by 2, none by more."""
    diff = (grey_levels(out) - grey_levels(reference)).abs()
    assert diff.max() <= 2.001 and (diff > 1.001).float().mean() < 1e-4 and diff.mean() < 0.25


def processors(name: str, **fields):
    """(today's PIL transform, the tensor pipeline) with the same settings."""
    node = {"name": name, "image_size": 224, **fields}
    return build_processor({**node, "backend": "pil"}), build_processor(node)


def pil_path(proc, path):
    """Today's data set route: open, draft, decode to RGB, PIL transform."""
    return proc(load_image(path, proc.draft))


@pytest.mark.parametrize("which", ["640x480", "1280x960", "grey", "cmyk", "png"])
def test_train_within_one_grey_level_of_pil_on_the_same_decode(files, which):
    """Full decodes on both sides (``jpeg_draft`` off); the same seed gives the same crops and flips."""
    old, new = processors("blip_image_train", jpeg_draft=False)
    for seed in range(4):
        torch.manual_seed(seed)
        reference = pil_path(old, files[which])
        torch.manual_seed(seed)
        out = new.load(files[which])
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32 and out.is_contiguous()
        assert_within_one_grey_level(out, reference)
    if which in ("640x480", "1280x960", "grey"):
        assert new.decoded_scales == {1: 4}  # decoded by decode_jpeg, not through PIL


@pytest.mark.parametrize("which, scale", [("640x480", 2), ("1280x960", 4), ("grey", 1), ("cmyk", None),
                                          ("png", None)])
def test_eval_within_one_grey_level_of_pil_with_reduced_decoding(files, which, scale):
    """Eval has no crop: both routes reduce the JPEG by the same k (1/2 of 640x480, 1/4 of 1280x960)."""
    old, new = processors("blip_image_eval")
    assert_within_one_grey_level(new.load(files[which]), pil_path(old, files[which]))
    assert new.decoded_scales == ({scale: 1} if scale else {})  # PNG, CMYK: PIL decodes, no count


@pytest.mark.parametrize("name", ["blip_image_train", "blip_image_eval"])
def test_decoded_images_within_one_grey_level(files, name):
    """What lmms-eval and old callers pass: a decoded PIL image; a uint8 tensor gives the same."""
    old, new = processors(name)
    image = load_image(files["1280x960"])
    torch.manual_seed(0)
    reference = old(image)
    torch.manual_seed(0)
    out = new(image)
    assert_within_one_grey_level(out, reference)
    torch.manual_seed(0)
    assert torch.equal(new(torch.from_numpy(np.array(image)).permute(2, 0, 1)), out)


def test_reduced_decode_follows_the_sampled_crop(files, monkeypatch):
    """640x480 at min_scale 0.5: PIL's draft never reduces (some crop could be ~170 px at 1/2); the tensor
    pipeline decodes at 1/2 exactly when the drawn crop keeps 224 px there (448 px at full size)."""
    old, new = processors("blip_image_train", hflip=False)
    assert not old.fits(320, 240)
    with Image.open(files["640x480"]) as image:
        assert old.draft(image).size == (640, 480)
    monkeypatch.setattr(new, "box", lambda width, height: (10, 20, 460, 600))
    big = new.load(files["640x480"])
    assert new.decoded_scales == {2: 1}
    monkeypatch.setattr(new, "box", lambda width, height: (10, 20, 446, 600))  # 223 px at 1/2
    new.load(files["640x480"])
    assert new.decoded_scales == {2: 1, 1: 1}
    full = transforms.functional.resized_crop(load_image(files["640x480"]), 10, 20, 460, 600, [224, 224],
                                              transforms.InterpolationMode.BICUBIC)
    diff = (grey_levels(big) - torch.from_numpy(np.array(full)).permute(2, 0, 1)).abs()
    assert diff.mean() < 2 and diff.quantile(0.99) < 8  # a reduced decode, not the same pixels


def test_reduced_decode_applies_per_crop_where_pil_draft_never_does(files):
    _, new = processors("blip_image_train")
    torch.manual_seed(0)
    for _ in range(40):
        new.load(files["640x480"])
    assert new.decoded_scales[2] > 0 and new.decoded_scales[1] > 0  # big crops at 1/2, others in full
    _, new = processors("blip_image_train", jpeg_draft=False)
    for _ in range(10):
        new.load(files["640x480"])
    assert new.decoded_scales == {1: 10}


def test_crops_are_drawn_as_random_resized_crop_draws_them():
    proc = build_processor({"name": "blip_image_train", "image_size": 224})
    torch.manual_seed(0)
    boxes = [proc.box(640, 480) for _ in range(50)]
    torch.manual_seed(0)
    image = Image.new("RGB", (640, 480))
    assert boxes == [transforms.RandomResizedCrop.get_params(image, proc.crop.scale, proc.crop.ratio)
                     for _ in range(50)]


def test_seeded_runs_repeat(files):
    _, new = processors("blip_image_train")
    data = files["1280x960"].read_bytes()
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(torch.stack([new.load(data), new.load(io.BytesIO(data)), new.load(files["640x480"])]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_pil_backend_is_todays_transform(files):
    old = build_processor({"name": "blip_image_train", "backend": "pil"})
    torch.manual_seed(0)
    reference = pil_path(old, files["1280x960"])
    torch.manual_seed(0)
    assert torch.equal(old.load(files["1280x960"]), reference)
    torch.manual_seed(0)
    reference = pil_path(old, files["png"])
    torch.manual_seed(0)
    assert torch.equal(process_image(files["png"], old.transform), reference)  # a plain callable: PIL route


def test_unreadable_files_raise_oserror_and_bad_backend_names_the_key(tmp_path, files):
    _, new = processors("blip_image_train")
    data = files["640x480"].read_bytes()
    with pytest.raises(OSError):
        new.load(data[: len(data) // 2])
    with pytest.raises(OSError):
        new.load(tmp_path / "missing.jpg")
    with pytest.raises(ConfigError, match=r"vis\.backend"):
        build_processor({"name": "blip_image_eval", "backend": "cv2"}, "vis")
