"""Processors: LAVIS's text cleaning, image tensors, config validation."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from lavis_lite.config import ConfigError
from lavis_lite.data.processors import CLIP_MEAN, CLIP_STD, build_processor, pre_caption, pre_question


@pytest.mark.parametrize("raw, cleaned", [
    ("A  man (riding) a horse.", "a man riding a horse"),
    ("Two shapes: a RED circle; and* a #blue~ square!", "two shapes a red circle and a blue square"),
    ("  leading and trailing   ", "leading and trailing"),
    ("what's this? it's red, isn't it", "what's this? it's red, isn't it"),  # ? , ' are kept
    ("条纹背景上有一个红色的圆形。", "条纹背景上有一个红色的圆形。"),
])
def test_pre_caption(raw, cleaned):
    assert pre_caption(raw) == cleaned


def test_pre_caption_truncates_words_and_prompt_is_prepended():
    assert pre_caption("one two three four", max_words=2) == "one two"
    caption = build_processor({"name": "blip_caption", "prompt": "a photo of ", "max_words": 3})
    assert caption("A Red circle on a striped background.") == "a photo of a red circle"


@pytest.mark.parametrize("raw, cleaned", [
    ("What color is the circle?", "what color is the circle?"),
    ("Is the (red) circle left of: the square.  ", "is the red circle left of the square"),
    ("How many shapes are there?", "how many shapes are there?"),
])
def test_pre_question(raw, cleaned):
    assert pre_question(raw) == cleaned
    assert build_processor({"name": "blip_question"})(raw) == cleaned


def test_pre_question_truncates():
    assert build_processor({"name": "blip_question", "max_words": 2})("is there a circle?") == "is there"


def test_eval_image_is_resized_and_clip_normalised():
    proc = build_processor({"name": "blip_image_eval", "image_size": 32})
    out = proc(Image.new("RGB", (50, 70), (255, 0, 128)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-2)


def _left_red_right_blue() -> Image.Image:
    image = Image.new("RGB", (40, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 40))
    return image


@pytest.mark.parametrize("hflip", [False, True])
def test_train_image_flips_only_when_asked(hflip):
    proc = build_processor({"name": "blip_image_train", "image_size": 24, "min_scale": 1.0, "hflip": hflip})
    torch.manual_seed(0)
    outs = [proc(_left_red_right_blue()) for _ in range(20)]
    assert all(o.shape == (3, 24, 24) for o in outs)
    red_on_left = [bool(o[0, :, 0].mean() > o[2, :, 0].mean()) for o in outs]
    assert all(red_on_left) if not hflip else not all(red_on_left)


def test_misspelled_and_bad_values_name_the_key():
    where = "datasets.x.vis_processor.train"
    with pytest.raises(ConfigError, match=r"datasets\.x\.vis_processor\.train\.imge_size"):
        build_processor({"name": "blip_image_train", "imge_size": 224}, where)
    with pytest.raises(ConfigError, match=r"\.name.*'blip_image_train'"):
        build_processor({"name": "blip_image_trian"}, where)
    with pytest.raises(ConfigError, match=r"train\.name is missing"):
        build_processor({"image_size": 224}, where)
    with pytest.raises(ConfigError, match=r"min_scale=0\.9, max_scale=0\.5"):
        build_processor({"name": "blip_image_train", "min_scale": 0.9, "max_scale": 0.5}, where)
    with pytest.raises(ConfigError, match="max_words"):
        build_processor({"name": "blip_caption", "max_words": 0}, where)
