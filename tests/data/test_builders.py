"""Builders through the real config path: yaml defaults, validation, and path errors."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lavis_lite.config import CONFIG_ROOT, ConfigError, load_config, load_yaml, merge_onto
from lavis_lite.data.builders import build_datasets
from lavis_lite.data.datasets import (
    CaptionDataset,
    CaptionEvalDataset,
    RetrievalEvalDataset,
    VQADataset,
    VQAEvalDataset,
)
from lavis_lite.registry import DATASETS

SMALL_IMAGES = {"train": {"name": "blip_image_train", "image_size": 32}, "eval": {"name": "blip_image_eval", "image_size": 32}}


def _build(tmp_path: Path, datasets: dict):
    """build_datasets on a project yaml loaded like the runner does (data set yaml defaults merged)."""
    project = tmp_path / "project.yaml"
    project.write_text(OmegaConf.to_yaml({"model": {"arch": "bow_tagger"}, "datasets": datasets}))
    cfg, sources = load_config(project)
    return build_datasets(cfg.datasets, sources)


def _shapes_node(storage: Path, spec: dict, **extra) -> dict:
    return {"build_info": {"storage": str(storage)}, "generator": spec, "vis_processor": SMALL_IMAGES, **extra}


def test_shapes_builders(shapes_root, small_spec, tmp_path):
    built = _build(tmp_path, {
        name: _shapes_node(shapes_root, small_spec)
        for name in ("shapes_caption", "shapes_caption_cn", "shapes_retrieval", "shapes_vqa")
    } | {"shapes_caption": _shapes_node(shapes_root, small_spec, sample_ratio=2.5)})
    expected = {
        "shapes_caption": (CaptionDataset, CaptionEvalDataset),
        "shapes_caption_cn": (CaptionDataset, CaptionEvalDataset),
        "shapes_retrieval": (CaptionDataset, RetrievalEvalDataset),
        "shapes_vqa": (VQADataset, VQAEvalDataset),
    }
    for name, (train_cls, eval_cls) in expected.items():
        splits = built[name]
        assert set(splits) == {"train", "val", "test"}
        assert type(splits["train"]) is train_cls and type(splits["val"]) is eval_cls is type(splits["test"])
        assert splits["val"][0]["image"].shape == (3, 32, 32)
    assert built["shapes_caption"]["train"].sample_ratio == 2.5
    assert built["shapes_caption"]["val"].gt_path == shapes_root / "annotations" / "caption_val_gt.json"
    assert built["shapes_caption_cn"]["test"].gt_path == shapes_root / "annotations" / "caption_cn_test_gt.json"
    assert re.search("[\u4e00-\u9fff]", built["shapes_caption_cn"]["train"][0]["text_input"])
    vqa_val = built["shapes_vqa"]["val"]
    assert vqa_val.question_path.name == "vqa_val_questions.json"
    assert vqa_val.annotation_path.name == "vqa_val_annotations.json"
    assert built["shapes_vqa"]["train"][0]["text_input"].endswith("?")  # blip_question keeps "?"
    # shapes yamls switch the flip off: their text talks about left and right
    assert all(not ds["train"].vis_processor.cfg.hflip for ds in built.values())


def test_shapes_storage_defaults_to_the_cache_env_var(tmp_path, monkeypatch, small_spec):
    monkeypatch.setenv("LAVIS_LITE_CACHE", str(tmp_path / "cache"))
    built = _build(tmp_path, {"shapes_caption": {"generator": small_spec, "vis_processor": SMALL_IMAGES}})
    assert (tmp_path / "cache" / "shapes" / "manifest.json").is_file()
    assert len(built["shapes_caption"]["val"]) == small_spec["val"]


def test_missing_annotation_file_names_path_and_key(shapes_copy, small_spec, tmp_path):
    (shapes_copy / "annotations" / "caption_val.json").unlink()
    with pytest.raises(ConfigError) as err:
        _build(tmp_path, {"shapes_caption": _shapes_node(shapes_copy, small_spec)})
    message = str(err.value)
    assert str(shapes_copy / "annotations" / "caption_val.json") in message
    assert "datasets.shapes_caption.build_info.annotations.val" in message
    assert "datasets.shapes_caption.build_info.storage" in message


def test_shapes_storage_at_a_users_folder_is_refused_and_left_intact(small_spec, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=rf"datasets\.shapes_vqa\.build_info\.storage: {mine} is not empty and is not "
                                          r"a shapes data set written by lavis_lite"):
        _build(tmp_path, {"shapes_vqa": _shapes_node(mine, small_spec)})
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_shapes_hint_does_not_advise_deleting_storage(shapes_copy, small_spec, tmp_path):
    (shapes_copy / "annotations" / "vqa_val.json").unlink()
    with pytest.raises(ConfigError) as err:
        _build(tmp_path, {"shapes_vqa": _shapes_node(shapes_copy, small_spec)})
    assert "delete" not in str(err.value) and "at a new folder" in str(err.value)


def _fake_coco(root: Path, shapes_root: Path) -> Path:
    """COCO's Karpathy layout, filled with shapes images and no image ids in val (as LAVIS's files)."""
    (root / "annotations").mkdir(parents=True)
    (root / "images" / "val2014").mkdir(parents=True)
    val = json.loads((shapes_root / "annotations" / "caption_val.json").read_text())
    train, evals = [], []
    for k, entry in enumerate(val):
        name = f"val2014/COCO_val2014_{k + 1:012d}.jpg"
        shutil.copy(shapes_root / entry["image"], root / "images" / name)
        evals.append({"image": name, "caption": entry["caption"]})
        train.append({"image": name, "caption": entry["caption"][0], "image_id": f"{k + 1}"})
    for split, data in (("train", train), ("val", evals), ("test", evals)):
        (root / "annotations" / f"coco_karpathy_{split}.json").write_text(json.dumps(data))
    for split in ("val", "test"):
        (root / "annotations" / f"coco_karpathy_{split}_gt.json").write_text("{}")
    return root


def test_coco_caption_builder_on_the_karpathy_layout(shapes_root, tmp_path):
    storage = _fake_coco(tmp_path / "coco", shapes_root)
    built = _build(tmp_path, {"coco_caption": {"build_info": {"storage": str(storage)}, "vis_processor": SMALL_IMAGES},
                              "coco_retrieval": {"build_info": {"storage": str(storage)}, "vis_processor": SMALL_IMAGES}})
    assert built["coco_caption"]["val"][0]["image_id"] == 1  # derived from the file name, an int as in COCO gt
    assert built["coco_caption"]["train"][0]["image_id"] == "1"  # given ids are kept as they are
    assert len(built["coco_retrieval"]["test"].text) == 5 * len(built["coco_retrieval"]["test"])


def test_real_builders_fail_on_missing_paths_with_the_key_to_set(shapes_root, tmp_path):
    with pytest.raises(ConfigError, match=r"datasets\.coco_caption\.build_info\.storage is not set"):
        _build(tmp_path, {"coco_caption": {}})

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as err:
        _build(tmp_path, {"coco_vqa": {"build_info": {"storage": str(empty)}}})
    assert f"no image folder at {empty / 'images'}" in str(err.value)
    assert "datasets.coco_vqa.build_info.storage" in str(err.value) and "build_info.images" in str(err.value)

    (empty / "images").mkdir()
    with pytest.raises(ConfigError) as err:
        _build(tmp_path, {"coco_vqa": {"build_info": {"storage": str(empty)}}})
    assert str(empty / "annotations" / "vqa_train.json") in str(err.value)
    assert "datasets.coco_vqa.build_info.annotations.train" in str(err.value)


def test_real_storage_that_does_not_exist_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        _build(tmp_path, {"coco_caption": {"build_info": {"storage": str(tmp_path / "coco")}}})
    assert str(err.value).startswith(f"datasets.coco_caption.build_info.storage={str(tmp_path / 'coco')!r}: no folder")
    assert not (tmp_path / "coco").exists()


def _malformed_caption_val(shapes_copy: Path) -> Path:
    path = shapes_copy / "annotations" / "caption_val.json"
    path.write_text('[{"image": "images/val/shapes_1000000.jpg"}, ')  # cut short
    return path


def test_malformed_annotation_file_is_a_config_error(shapes_copy, small_spec, tmp_path):
    bad = _malformed_caption_val(shapes_copy)
    with pytest.raises(ConfigError, match=rf"^datasets\.shapes_caption: cannot build split 'val' from {bad} "):
        _build(tmp_path, {"shapes_caption": _shapes_node(shapes_copy, small_spec)})
    (shapes_copy / "annotations" / "caption_val.json").write_text('[{"caption": ["a red circle"]}]')
    with pytest.raises(ConfigError, match=r"datasets\.shapes_caption: .*record 0 has no 'image'"):
        _build(tmp_path, {"shapes_caption": _shapes_node(shapes_copy, small_spec)})


def test_malformed_annotation_file_is_one_error_line_from_the_cli(shapes_copy, small_spec, tmp_path):
    bad = _malformed_caption_val(shapes_copy)
    root = Path(__file__).resolve().parents[2]
    cfg = OmegaConf.load(root / "projects/bow_tagger/train_shapes.yaml")
    cfg.datasets.shapes_caption.build_info = {"storage": str(shapes_copy)}
    cfg.datasets.shapes_caption.generator = small_spec
    OmegaConf.save(cfg, tmp_path / "project.yaml")
    result = subprocess.run([sys.executable, "-m", "lavis_lite.train", "--cfg-path", str(tmp_path / "project.yaml"),
                             "--options", f"run.output_dir={tmp_path / 'out'}"], cwd=root, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "LAVIS_LITE_CACHE": str(tmp_path / "cache")})
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "datasets.shapes_caption" in lines[0] and str(bad) in lines[0]
    assert result.stderr.strip().splitlines()[-1] == lines[0]


def test_missing_image_folder_on_shapes(shapes_root, small_spec, tmp_path):
    node = _shapes_node(shapes_root, small_spec)
    node["build_info"]["images"] = "pictures"
    with pytest.raises(ConfigError, match=rf"no image folder at {shapes_root / 'pictures'}.*"
                                          r"datasets\.shapes_vqa\.build_info\.storage"):
        _build(tmp_path, {"shapes_vqa": node})


def test_config_mistakes_are_named(shapes_root, small_spec, tmp_path):
    with pytest.raises(ConfigError, match=r"datasets\.shapes_caption\.skip_bad_image\b"):
        _build(tmp_path, {"shapes_caption": _shapes_node(shapes_root, small_spec, skip_bad_image=True)})
    with pytest.raises(ConfigError, match=r"datasets\.shapes_captoin.*'shapes_caption'"):
        build_datasets(OmegaConf.create({"shapes_captoin": {}}))
    bad_proc = {"train": {"name": "blip_image_train", "image_sise": 32}, "eval": {"name": "blip_image_eval"}}
    with pytest.raises(ConfigError, match=r"datasets\.shapes_caption\.vis_processor\.train\.image_sise"):
        _build(tmp_path, {"shapes_caption": _shapes_node(shapes_root, small_spec) | {"vis_processor": bad_proc}})
    with pytest.raises(ConfigError, match=r"datasets\.coco_caption\.generator"):  # shapes-only key
        build_datasets(OmegaConf.create({"coco_caption": {"generator": {"train": 1}}}))


@pytest.mark.parametrize("path", sorted((CONFIG_ROOT / "datasets").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_dataset_yaml_validates_against_its_builder(path):
    builder = DATASETS.get(path.stem)
    cfg = merge_onto(builder.config_class, load_yaml(path, "test"), f"datasets.{path.stem}")
    assert cfg.build_info.annotations, "a data set yaml should name its annotation files"
