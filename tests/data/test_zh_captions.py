"""Chinese caption data: the blip_caption option that keeps Chinese as written, the Chinese builders'
defaults, and build_datasets' warning when evaluation images also appear in training annotations."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from lavis_lite.config import CONFIG_ROOT, ConfigError, load_config, load_yaml
from lavis_lite.data.builders import build_datasets
from lavis_lite.data.processors import build_processor

SMALL_IMAGES = {"train": {"name": "blip_image_train", "image_size": 16},
                "eval": {"name": "blip_image_eval", "image_size": 16}}
ZH_SETS = ["coco_cn_caption", "flickr8k_cn_caption", "flickr30k_cn_caption", "aic_caption", "xm3600_zh_caption"]


def test_blip_caption_clean_whitespace_keeps_chinese_as_written():
    lavis = build_processor({"name": "blip_caption"})
    kept = build_processor({"name": "blip_caption", "clean": "whitespace"})
    caption = " 一个穿T恤的男人在看NBA比赛：“好球!”\n "
    assert lavis(caption) == "一个穿t恤的男人在看nba比赛：“好球 ”"  # LAVIS's English cleaning
    assert kept(caption) == "一个穿T恤的男人在看NBA比赛：“好球!”"
    assert build_processor({"name": "blip_caption", "clean": "whitespace", "max_words": 2})("a  b c") == "a b"
    with pytest.raises(ConfigError, match=r"x\.clean.*'lavis', 'whitespace'"):
        build_processor({"name": "blip_caption", "clean": "zh"}, "x")


@pytest.mark.parametrize("name", ZH_SETS)
def test_chinese_sets_keep_chinese_and_use_their_own_files(name):
    cfg = load_yaml(CONFIG_ROOT / "datasets" / f"{name}.yaml", "test")
    assert {stage: node.clean for stage, node in cfg.text_processor.items()} == {"train": "whitespace",
                                                                                "eval": "whitespace"}
    stem = name.removesuffix("_caption")
    files = [*cfg.build_info.annotations.values(), *cfg.build_info.caption_gt.values()]
    assert all(Path(f).name.startswith(stem) for f in files)
    assert set(cfg.build_info.caption_gt) == set(cfg.build_info.annotations) - {"train"}


# ------------------------------------------------------------------ evaluation images seen in training
def write_caption_set(storage: Path, train: list[str], val: list[str]) -> Path:
    """A tiny coco_caption-layout data set: train records per caption, val records per image + gt."""
    for k, path in enumerate(sorted(set(train + val))):
        (storage / "images" / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (40 * k, 90, 160)).save(storage / "images" / path)
    ann = storage / "annotations"
    ann.mkdir(parents=True)
    (ann / "train.json").write_text(json.dumps([{"image": p, "caption": "一只狗", "image_id": p} for p in train]))
    (ann / "val.json").write_text(json.dumps([{"image": p, "caption": ["一只狗"], "image_id": p} for p in val]))
    (ann / "val_gt.json").write_text(json.dumps({"images": [{"id": p} for p in val], "annotations": [
        {"image_id": p, "caption": "一只狗", "id": n} for n, p in enumerate(val)]}))
    return storage


def node(storage: Path, splits: tuple[str, ...] = ("train", "val"), images: str = "images") -> dict:
    files = {"train": "annotations/train.json", "val": "annotations/val.json"}
    return {"build_info": {"storage": str(storage), "images": images,
                           "annotations": {s: files[s] if s in splits else None for s in ("train", "val", "test")},
                           "caption_gt": {"val": "annotations/val_gt.json", "test": None}},
            "vis_processor": SMALL_IMAGES}


def build(tmp_path: Path, datasets: dict):
    project = tmp_path / "project.yaml"
    project.write_text(OmegaConf.to_yaml({"model": {"arch": "bow_tagger"}, "datasets": datasets}))
    cfg, sources = load_config(project)
    return build_datasets(cfg.datasets, sources)


def overlap_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "also appear in the training annotations" in r.getMessage()]


def test_eval_images_in_the_same_sets_train_split_are_counted(tmp_path, caplog):
    storage = write_caption_set(tmp_path / "coco_cn", train=["train2014/a.jpg", "val2014/b.jpg", "val2014/c.jpg"],
                                val=["val2014/b.jpg", "val2014/c.jpg", "val2014/d.jpg", "train2014/e.jpg"])
    with caplog.at_level(logging.WARNING, logger="lavis_lite.data.builders"):
        build(tmp_path, {"coco_cn_caption": node(storage)})
    assert overlap_warnings(caplog) == [
        "coco_cn_caption/val: 2 of 4 images also appear in the training annotations (2 in coco_cn_caption/train), "
        "so its scores on them are not held out; COCO-CN's images come from COCO train2014 and val2014, which "
        "COCO-trained checkpoints such as BLIP-2's have seen"]


def test_eval_images_in_another_sets_train_split_are_counted_by_path(tmp_path, caplog):
    """coco_caption trains on COCO images that flickr8k_cn_caption (pointed at the same image folder by
    an absolute path, as a second data set sharing COCO's images would be) evaluates on."""
    coco = write_caption_set(tmp_path / "coco", train=["train2014/a.jpg", "train2014/b.jpg"],
                             val=["train2014/q.jpg"])
    other = write_caption_set(tmp_path / "other", train=["x.jpg"], val=["a.jpg", "q.jpg"])
    shared = node(other, splits=("val",), images=str(coco / "images" / "train2014" / ".." / "train2014"))
    with caplog.at_level(logging.WARNING, logger="lavis_lite.data.builders"):
        build(tmp_path, {"coco_caption": node(coco, splits=("train",)), "flickr8k_cn_caption": shared})
    assert overlap_warnings(caplog) == [
        "flickr8k_cn_caption/val: 1 of 2 images also appear in the training annotations (1 in coco_caption/train), "
        "so its scores on them are not held out"]


def test_no_warning_without_overlap(tmp_path, caplog):
    storage = write_caption_set(tmp_path / "aic", train=["t/a.jpg", "t/b.jpg"], val=["v/a.jpg", "v/c.jpg"])
    with caplog.at_level(logging.WARNING, logger="lavis_lite.data.builders"):
        built = build(tmp_path, {"aic_caption": node(storage)})
    assert set(built["aic_caption"]) == {"train", "val"} and overlap_warnings(caplog) == []
