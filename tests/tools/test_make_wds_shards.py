"""tools/make_wds_shards.py: a caption json + image folder -> tar shards that image_text_wds reads
back with every caption paired with its own image."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from lavis_lite.config import load_config
from lavis_lite.data.builders import build_datasets
from lavis_lite.data.webdataset import read_tar

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_wds_shards.py"


def _tool():
    spec = importlib.util.spec_from_file_location("tools_make_wds_shards", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _colour(k: int) -> tuple[int, int, int]:
    return (20 * k, 200 - 20 * k, 90)


def test_caption_json_to_shards_and_back(tmp_path, capsys):
    images = tmp_path / "images"
    (images / "train2014").mkdir(parents=True)
    records = []
    for k in range(5):
        name = f"train2014/img{k}.{'png' if k == 3 else 'jpg'}"
        Image.new("RGB", (16, 16), _colour(k)).save(images / name)
        records.append({"image": name, "caption": f"Colour number {k}.", "image_id": f"coco_{k}"})
    records.append({"image": "train2014/img1.jpg", "caption": ["Colour number 1.", "Still colour number 1."]})
    (images / "train2014" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    records.append({"image": "train2014/broken.jpg", "caption": "never written"})
    annotations = tmp_path / "caption.json"
    annotations.write_text(json.dumps(records))

    _tool().main(["--annotations", str(annotations), "--images", str(images), "--output", str(tmp_path / "shards"),
                  "--samples-per-shard", "3"])
    printed = capsys.readouterr().out
    assert "7 samples in 3 shards (1 unreadable images skipped)" in printed
    pattern = str(tmp_path / "shards" / "{00000..00002}.tar")
    assert f"build_info.storage={pattern}" in printed
    members = [s for shard in sorted((tmp_path / "shards").glob("*.tar")) for s in read_tar(shard)]
    assert sorted(k for s in members for k in s if not k.startswith("__")).count("png") == 1  # bytes kept as is

    project = tmp_path / "project.yaml"
    project.write_text(OmegaConf.to_yaml({"model": {"arch": "bow_tagger"}, "datasets": {"image_text_wds": {
        "build_info": {"storage": pattern},  # num_samples from the stats files
        "vis_processor": {"train": {"name": "blip_image_eval", "image_size": 16}}}}}))
    cfg, sources = load_config(project)
    data = build_datasets(cfg.datasets, sources)["image_text_wds"]["train"]
    assert data.num_samples == 7
    seen = []
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    for sample in DataLoader(data, batch_size=None):
        k = int(sample["text_input"].split()[-1])
        pixel = ((sample["image"] * std + mean) * 255)[:, 8, 8]
        assert (pixel - torch.tensor(_colour(k))).abs().max() < 6, (sample["text_input"], pixel)
        seen.append((sample["text_input"], sample["image_id"]))
    expected = [(f"colour number {k}", f"coco_{k}") for k in range(5)]
    expected += [("colour number 1", "img1"), ("still colour number 1", "img1")]  # no image_id: the file stem
    assert sorted(seen) == sorted(expected)
