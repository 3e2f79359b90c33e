"""The builders of real data sets (vg_caption, ok_vqa, gqa, nocaps; coco_* defaults) on tiny data
written in the official / LAVIS formats: samples, batches, metrics on the eval files, path errors."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lavis_lite.config import CONFIG_ROOT, ConfigError, load_config, load_yaml
from lavis_lite.data.builders import build_datasets
from lavis_lite.data.datasets import CaptionDataset, NoCapsEvalDataset, VQADataset, VQAEvalDataset
from lavis_lite.tasks.captioning import load_coco_gt
from lavis_lite.tasks.vqa import VQAConfig, VQATask
from tests.fixtures.real_data import dump, make_gqa, make_okvqa, make_vg, write_images

SMALL_IMAGES = {"train": {"name": "blip_image_train", "image_size": 16},
                "eval": {"name": "blip_image_eval", "image_size": 16}}


def build(tmp_path: Path, datasets: dict):
    """build_datasets on a project yaml loaded as the runner does (data set yaml defaults merged)."""
    project = tmp_path / "project.yaml"
    project.write_text(OmegaConf.to_yaml({"model": {"arch": "bow_tagger"}, "datasets": datasets}))
    cfg, sources = load_config(project)
    return build_datasets(cfg.datasets, sources)


def node(storage: Path, **extra) -> dict:
    return {"build_info": {"storage": str(storage), **extra.pop("build_info", {})}, "vis_processor": SMALL_IMAGES,
            **extra}


# ------------------------------------------------------------------------------------------ VG
def test_vg_caption(tmp_path):
    built = build(tmp_path, {"vg_caption": node(make_vg(tmp_path / "vg"))})["vg_caption"]
    assert set(built) == {"train"} and type(built["train"]) is CaptionDataset
    data = built["train"]
    assert [data[i]["text_input"] for i in range(3)] == ["a red car parked", "tall green tree", "white clouds in blue sky"]
    batch = next(iter(DataLoader(data, batch_size=3, collate_fn=data.collater)))
    assert batch["image"].shape == (3, 3, 16, 16) and batch["image_id"] == ["vg_1", "vg_1", "vg_2"]


# --------------------------------------------------------------------------------------- OK-VQA
def test_ok_vqa_builds_and_its_eval_files_score(tmp_path):
    storage = make_okvqa(tmp_path / "okvqa")
    built = build(tmp_path, {"ok_vqa": node(storage, build_info={"images": str(storage / "coco_images")})})["ok_vqa"]
    assert set(built) == {"train", "test"}  # LAVIS: the official val questions are the test split
    train, test = built["train"], built["test"]
    assert type(train) is VQADataset and type(test) is VQAEvalDataset
    sample = train[0]
    assert sample["text_input"] == "what food is this?" and sample["answers"] == ["pizza", "pie"]
    assert sample["weights"] == pytest.approx([0.8, 0.2])
    batch = next(iter(DataLoader(test, batch_size=2, collate_fn=test.collater)))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["question_id"] == [2971475, 1955745]
    assert test.question_path.name == "OpenEnded_mscoco_val2014_questions.json"
    task = VQATask(VQAConfig())
    metrics = task.aggregate([{"question_id": 2971475, "answer": "motocross"}, {"question_id": 1955745, "answer": "london"}],
                             "test", test, None)
    assert metrics["agg_metrics"] == pytest.approx(100 * (1.0 + 1.0) / 2)  # 4 of 10 humans: min(1, 4/3)


# ------------------------------------------------------------------------------------------ GQA
def test_gqa_builds_and_scores_with_metric_gqa(tmp_path):
    built = build(tmp_path, {"gqa": node(make_gqa(tmp_path / "gqa"))})["gqa"]
    assert set(built) == {"train", "val", "testdev"}
    sample = built["train"][0]
    assert sample["answers"] == ["no"] and sample["weights"] == [1.0] and sample["question_id"] == "02930152"
    testdev = built["testdev"]
    assert testdev.annotation_path == testdev.ann_paths[0]  # the answers are in the split's own file
    batch = next(iter(DataLoader(testdev, batch_size=2, collate_fn=testdev.collater)))
    assert batch["question_id"] == ["testdev1", "testdev2"] and batch["text_input"][1] == "is the sky dark?"
    task = VQATask(VQAConfig(metric="gqa"))
    metrics = task.aggregate([{"question_id": "testdev1", "answer": "girl"}, {"question_id": "testdev2", "answer": "no"}],
                             "testdev", testdev, None)
    assert metrics["agg_metrics"] == pytest.approx(50.0)


def test_gqa_split_can_be_left_out_and_wrong_answer_files_fail_at_build(tmp_path):
    storage = make_gqa(tmp_path / "gqa")
    (storage / "annotations" / "train_balanced_questions.json").unlink()
    no_train = node(storage, build_info={"annotations": {"train": None}})
    assert set(build(tmp_path, {"gqa": no_train})["gqa"]) == {"val", "testdev"}

    official = storage / "annotations" / "official_testdev.json"
    dump(official, {"testdev1": {"imageId": "n235859", "question": "Who?", "answer": "girl"}})
    wrong = node(storage, build_info={"annotations": {"train": None},
                                      "vqa_annotations": {"testdev": "annotations/official_testdev.json"}})
    with pytest.raises(ConfigError, match=r"datasets\.gqa\.build_info\.vqa_annotations\.testdev.*convert_gqa\.py"):
        build(tmp_path, {"gqa": wrong})
    wrong["build_info"]["vqa_annotations"]["testdev"] = "annotations/val_balanced_questions.json"
    with pytest.raises(ConfigError, match=r"no answer for 2 of the 2 questions of split 'testdev'"):
        build(tmp_path, {"gqa": wrong})


# ---------------------------------------------------------------------------------------- NoCaps
def make_nocaps(storage: Path) -> Path:
    write_images(storage / "images", ["val/0013ea2087020901.jpg", "val/00223d8f2e7f6b7e.jpg", "test/0a1b2c3d4e5f6a7b.jpg"])
    ann = storage / "annotations"
    dump(ann / "nocaps_val.json", [{"image": "val/0013ea2087020901.jpg", "img_id": 0},
                                   {"image": "val/00223d8f2e7f6b7e.jpg", "img_id": 1}])
    dump(ann / "nocaps_test.json", [{"image": "test/0a1b2c3d4e5f6a7b.jpg", "img_id": 0}])
    dump(ann / "nocaps_val_4500_captions.json", {
        "licenses": [], "info": {"url": "http://nocaps.org"},
        "images": [{"id": 0, "file_name": "0013ea2087020901.jpg", "domain": "in-domain"},
                   {"id": 1, "file_name": "00223d8f2e7f6b7e.jpg", "domain": "out-domain"}],
        "annotations": [{"image_id": i, "id": 2 * i + j, "caption": f"caption {j} of image {i}"}
                        for i in range(2) for j in range(2)]})
    return storage


def test_nocaps_image_ids_match_the_ground_truth(tmp_path):
    built = build(tmp_path, {"nocaps": node(make_nocaps(tmp_path / "nocaps"))})["nocaps"]
    val, test = built["val"], built["test"]
    assert type(val) is NoCapsEvalDataset and test.gt_path is None  # test captions are held out
    batch = next(iter(DataLoader(val, batch_size=2, collate_fn=val.collater)))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["image_id"] == [0, 1]
    assert set(load_coco_gt(val.gt_path)) == set(batch["image_id"])


# ------------------------------------------------------------------------------ errors, defaults
MAKERS = {"vg_caption": (make_vg, "annotations/vg_caption.json", "annotations.train"),
          "ok_vqa": (make_okvqa, "annotations/mscoco_val2014_annotations.json", "vqa_annotations.test"),
          "gqa": (make_gqa, "annotations/testdev_balanced_questions.json", "annotations.testdev"),
          "nocaps": (make_nocaps, "annotations/nocaps_val_4500_captions.json", "caption_gt.val")}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_missing_annotation_file_names_path_and_key(tmp_path, name):
    make, missing, key = MAKERS[name]
    storage = make(tmp_path / name)
    (storage / missing).unlink()
    extra = {"build_info": {"images": str(storage / "coco_images")}} if name == "ok_vqa" else {}
    with pytest.raises(ConfigError) as err:
        build(tmp_path, {name: node(storage, **extra)})
    message = str(err.value)
    assert str(storage / missing) in message
    assert f"datasets.{name}.build_info.{key}" in message and f"datasets.{name}.build_info.storage" in message


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_missing_image_folder_names_path_and_key(tmp_path, name):
    storage = MAKERS[name][0](tmp_path / name)
    with pytest.raises(ConfigError) as err:
        build(tmp_path, {name: node(storage, build_info={"images": "no_such_folder"})})
    message = str(err.value)
    assert f"no image folder at {storage / 'no_such_folder'}" in message
    assert f"datasets.{name}.build_info.images" in message and f"datasets.{name}.build_info.storage" in message


def test_coco_defaults_use_lavis_file_names():
    caption = load_yaml(CONFIG_ROOT / "datasets" / "coco_caption.yaml", "test").build_info
    assert {s: Path(p).name for s, p in caption.annotations.items()} == {
        s: f"coco_karpathy_{s}.json" for s in ("train", "val", "test")}
    assert {s: Path(p).name for s, p in caption.caption_gt.items()} == {
        s: f"coco_karpathy_{s}_gt.json" for s in ("val", "test")}
    vqa = load_yaml(CONFIG_ROOT / "datasets" / "coco_vqa.yaml", "test").build_info
    assert [Path(p).name for p in vqa.annotations.train] == ["vqa_train.json", "vqa_val.json"]
    assert Path(vqa.annotations.val).name == "vqa_val_eval.json" and Path(vqa.annotations.test).name == "vqa_test.json"
    assert Path(vqa.vqa_questions.val).name == "v2_OpenEnded_mscoco_val2014_questions.json"
    assert Path(vqa.vqa_annotations.val).name == "v2_mscoco_val2014_annotations.json"
    assert "test" not in vqa.vqa_questions  # test-dev/test answers are held out: no file needed
