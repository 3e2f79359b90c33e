"""model.cache_image_features: a frozen encoder runs once per distinct image, the cached features equal
fresh ones, the memory cap holds, and the runner refuses augmented training images."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lavis_lite.models.feature_cache import ImageFeatureCache
from tests.models.tiny_blip2 import make_batch, tiny_model

ROOT = Path(__file__).resolve().parents[2]


def count_encoder_images(model):
    """A list that receives the batch size of every image-encoder forward pass."""
    seen = []
    model.visual_encoder.patch_embed.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    return seen


def test_cached_features_equal_fresh_ones_and_each_image_is_encoded_once():
    plain, cached = tiny_model(), tiny_model(cache_image_features=True)
    cached.load_state_dict(plain.state_dict())
    calls = count_encoder_images(cached)
    images = make_batch(4)["image"]
    expected = plain.encode_image(images)

    torch.testing.assert_close(cached.encode_image(images), expected, rtol=0, atol=0)
    torch.testing.assert_close(cached.encode_image(images), expected, rtol=0, atol=0)
    assert calls == [4]  # the second pass came from the cache
    new = make_batch(2, seed=1)["image"]
    mixed = torch.cat([images[:2], new, images[:1], new[:1]])  # 2 new, one of them twice
    torch.testing.assert_close(cached.encode_image(mixed), plain.encode_image(mixed), rtol=0, atol=0)
    assert calls == [4, 2]
    stats = cached.image_feature_cache.stats()
    assert (stats["images"], stats["hits"], stats["misses"], stats["uncached"]) == (6, 8, 6, 0)


def test_a_changed_pixel_is_a_different_image():
    cache = ImageFeatureCache(max_gb=1)
    images = make_batch(2)["image"]
    changed = images.clone()
    changed[1, 2, 63, 63] += 1e-3
    keys = cache.fingerprints(images) + cache.fingerprints(changed)
    assert keys[0] == keys[2] and keys[1] != keys[3] and len(keys[0]) == 8 * 8


def test_images_beyond_the_memory_cap_are_encoded_every_time():
    model = tiny_model(cache_image_features=True)
    images = make_batch(3)["image"]
    per_image = model.encode_image(images[:1]).shape[1:].numel() * 4  # float32 encoder output here
    model.image_feature_cache = ImageFeatureCache(max_gb=2.5 * per_image / 2**30)
    calls = count_encoder_images(model)
    first = model.encode_image(images)
    torch.testing.assert_close(model.encode_image(images), first, rtol=0, atol=0)
    assert calls == [3, 1]  # two fit; the third is encoded again
    stats = model.image_feature_cache.stats()
    assert (stats["images"], stats["uncached"], stats["hits"]) == (2, 2, 2)
    assert stats["gb"] * 2**30 == 2 * per_image


def test_cache_needs_a_frozen_encoder():
    with pytest.raises(ValueError, match="model.cache_image_features=true needs model.freeze_vit=true"):
        tiny_model(cache_image_features=True, freeze_vit=False)


# ----------------------------------------------------------------------------- through the runner
@pytest.fixture(scope="module")
def stage1_project(tmp_path_factory):
    """Stage 1 on 16 generated training images with a frozen encoder."""
    tmp = tmp_path_factory.mktemp("feature_cache")
    cfg = yaml.safe_load((ROOT / "projects/blip2/train/pretrain_stage1_shapes.yaml").read_text())
    cfg["model"]["freeze_vit"] = True
    cfg["datasets"]["shapes_retrieval"]["generator"] = {"train": 16, "val": 8, "test": 8}
    path = tmp / "project.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp


def train(project, out, options=()):
    path, tmp = project
    env = {**os.environ, "LAVIS_LITE_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["--cfg-path", str(path), "--options", f"run.output_dir={out}", "run.progress_bar=false",
            "run.max_epoch=2", "run.batch_size_train=16", "run.num_workers=0", "run.valid_splits=[]", *options]
    return subprocess.run([sys.executable, "-m", "lavis_lite.train", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_runner_refuses_augmented_training_images(stage1_project, tmp_path):
    result = train(stage1_project, tmp_path / "bad", ["model.cache_image_features=true"])
    assert result.returncode != 0
    assert "datasets.shapes_retrieval.vis_processor.train (BlipImageTrainProcessor) augments" in result.stderr


def test_training_with_the_cache_equals_training_without(stage1_project, tmp_path):
    unaugmented = ["datasets.shapes_retrieval.vis_processor.train={name: blip_image_eval, image_size: 64}"]
    for name, cache in (("plain", "false"), ("cached", "true")):
        result = train(stage1_project, tmp_path / name, [*unaugmented, f"model.cache_image_features={cache}"])
        assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "cached" / "train.log").read_text()
    # 80 captions of 16 images, 2 epochs: each image is encoded once (16 misses), every other time is a hit
    assert "image feature cache: {'images': 16," in log and "'hits': 144, 'misses': 16, 'uncached': 0}" in log
    a, b = (torch.load(tmp_path / name / "checkpoint_10.pth", weights_only=True)["model"] for name in ("plain", "cached"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
