"""tools/convert_*.py: tiny files in the official download formats -> the files the builders
expect, then built with the matching builder (round trip)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from lavis_lite.config import load_config
from lavis_lite.data.builders import build_datasets
from lavis_lite.tasks.captioning import load_coco_gt
from lavis_lite.tasks.vqa import VQAConfig, VQATask

TOOLS = Path(__file__).resolve().parents[2] / "tools"
SMALL_IMAGES = {"train": {"name": "blip_image_train", "image_size": 16},
                "eval": {"name": "blip_image_eval", "image_size": 16}}


def tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(tmp_path: Path, name: str, storage: Path, **build_info):
    project = tmp_path / "project.yaml"
    project.write_text(OmegaConf.to_yaml({"model": {"arch": "bow_tagger"}, "datasets": {
        name: {"build_info": {"storage": str(storage), **build_info}, "vis_processor": SMALL_IMAGES}}}))
    cfg, sources = load_config(project)
    return build_datasets(cfg.datasets, sources)[name]


def write_images(root: Path, paths: list[str]) -> None:
    for k, path in enumerate(paths):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (30 * k, 90, 160)).save(root / path)


def dump(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("name", ["convert_coco_karpathy", "convert_vqav2", "convert_vg_captions", "convert_gqa",
                                  "convert_nocaps", "make_wds_shards"])
def test_tool_cli_runs_as_a_script_with_a_docstring(name):
    module = tool(name)
    assert "python tools/" + name + ".py" in module.__doc__  # the exact command is documented
    if name != "make_wds_shards":  # imports webdataset + torch: slow to start; its main() is tested
        out = subprocess.run([sys.executable, str(TOOLS / f"{name}.py"), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage" in out.stdout


# ------------------------------------------------------------------------------- COCO Karpathy
def _karpathy_entry(imgid: int, cocoid: int, split: str, folder: str) -> dict:
    sentids = [5 * imgid + j for j in range(5)]
    return {"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "imgid": imgid, "split": split,
            "cocoid": cocoid, "sentids": sentids,
            "sentences": [{"tokens": ["a", "cat"], "raw": f"A cat number {j}.", "imgid": imgid, "sentid": s}
                          for j, s in enumerate(sentids)]}


def test_coco_karpathy_round_trip(tmp_path):
    entries = [_karpathy_entry(0, 391895, "test", "val2014"), _karpathy_entry(1, 522418, "val", "val2014"),
               _karpathy_entry(2, 184613, "restval", "val2014"), _karpathy_entry(3, 318219, "train", "train2014")]
    source = dump(tmp_path / "dataset_coco.json", {"images": entries, "dataset": "coco"})
    storage = tmp_path / "coco"
    write_images(storage / "images", [f"{e['filepath']}/{e['filename']}" for e in entries])
    tool("convert_coco_karpathy").main(["--karpathy", str(source), "--output", str(storage / "annotations")])

    train = json.loads((storage / "annotations" / "coco_karpathy_train.json").read_text())
    assert len(train) == 10 and train[0] == {"caption": "A cat number 0.",
                                             "image": "val2014/COCO_val2014_000000184613.jpg", "image_id": "coco_184613"}
    built = build(tmp_path, "coco_caption", storage)
    assert len(built["train"]) == 10 and len(built["val"]) == len(built["test"]) == 1
    for split, cocoid in (("val", 522418), ("test", 391895)):
        assert built[split][0]["image_id"] == cocoid  # from the file name, as the gt's image id
        gt = load_coco_gt(built[split].gt_path)
        assert gt == {cocoid: [f"A cat number {j}." for j in range(5)]}
    retrieval = build(tmp_path, "coco_retrieval", storage)
    assert len(retrieval["test"].text) == 5


# ------------------------------------------------------------------------------------- VQAv2
def _vqa_files(folder: Path, subtype: str, items: list[tuple[int, int, str, list[str]]], answers: bool = True):
    questions = dump(folder / f"v2_OpenEnded_mscoco_{subtype}_questions.json", {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": subtype,
        "questions": [{"image_id": i, "question": q, "question_id": qid} for qid, i, q, _ in items]})
    if not answers:
        return questions, None
    annotations = dump(folder / f"v2_mscoco_{subtype}_annotations.json", {
        "info": {}, "license": {}, "data_subtype": subtype, "data_type": "mscoco",
        "annotations": [{"question_type": "what color", "multiple_choice_answer": a[0], "answer_type": "other",
                         "image_id": i, "question_id": qid,
                         "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": n + 1}
                                     for n, x in enumerate(a)]} for qid, i, _, a in items]})
    return questions, annotations


def test_vqav2_round_trip_and_metric(tmp_path):
    official = tmp_path / "official"
    train_items = [(9000, 9, "What color is the bus?", ["red"] * 7 + ["orange"] * 3)]
    val_items = [(42000, 42, "What color is the sky?", ["blue"] * 10), (73000, 73, "What is it?", ["dog"] * 9 + ["cat"])]
    test_items = [(1000, 1, "How many?", [])]
    storage = tmp_path / "coco"
    ann = storage / "annotations"
    convert = tool("convert_vqav2").main
    q, a = _vqa_files(official, "train2014", train_items)
    convert(["--questions", str(q), "--annotations", str(a), "--output", str(ann / "vqa_train.json")])
    q, a = _vqa_files(official, "val2014", val_items)
    convert(["--questions", str(q), "--annotations", str(a), "--output", str(ann / "vqa_val.json"),
             "--answer-list", str(ann / "answer_list.json"), "--answer-list-size", "5"])
    (ann / "vqa_val_eval.json").write_text((ann / "vqa_val.json").read_text())
    for path in (q, a):
        (ann / path.name).write_text(path.read_text())
    q, _ = _vqa_files(official, "test-dev2015", test_items, answers=False)
    convert(["--questions", str(q), "--output", str(ann / "vqa_test.json")])

    test_record = json.loads((ann / "vqa_test.json").read_text())[0]
    assert test_record["image"] == "test2015/COCO_test2015_000000000001.jpg" and "answer" not in test_record
    assert json.loads((ann / "answer_list.json").read_text()) == ["blue", "dog"]
    write_images(storage / "images", ["train2014/COCO_train2014_000000000009.jpg",
                                      "val2014/COCO_val2014_000000000042.jpg", "val2014/COCO_val2014_000000000073.jpg",
                                      "test2015/COCO_test2015_000000000001.jpg"])
    built = build(tmp_path, "coco_vqa", storage)
    assert len(built["train"]) == 3 and built["train"][0]["answers"] == ["red", "orange"]
    assert built["train"][0]["weights"] == pytest.approx([0.7, 0.3])
    val = built["val"]
    batch = next(iter(DataLoader(val, batch_size=2, collate_fn=val.collater)))
    assert batch["question_id"] == [42000, 73000]
    metrics = VQATask(VQAConfig()).aggregate([{"question_id": 42000, "answer": "blue"},
                                              {"question_id": 73000, "answer": "cat"}], "val", val, None)
    assert metrics["agg_metrics"] == pytest.approx(100 * (1 + 0.3) / 2)  # "cat": 1 of 10 humans -> 0.3


def test_okvqa_files_convert_with_the_same_tool(tmp_path):
    items = [(2971475, 297147, "What sport can you use this for?", ["race"] * 10)]
    q, a = _vqa_files(tmp_path / "official", "val2014", items)
    storage = tmp_path / "okvqa"
    ann = storage / "annotations"
    tool("convert_vqav2").main(["--questions", str(q), "--annotations", str(a), "--dataset", "okvqa",
                                "--output", str(ann / "okvqa_val_eval.json")])
    (ann / "okvqa_train.json").write_text((ann / "okvqa_val_eval.json").read_text())
    (ann / "OpenEnded_mscoco_val2014_questions.json").write_text(q.read_text())
    (ann / "mscoco_val2014_annotations.json").write_text(a.read_text())
    write_images(storage / "images", ["val2014/COCO_val2014_000000297147.jpg"])
    built = build(tmp_path, "ok_vqa", storage)
    assert built["test"][0]["question_id"] == 2971475 and built["train"][0]["answers"] == ["race"]
    assert json.loads((ann / "okvqa_train.json").read_text())[0]["dataset"] == "okvqa"


# ------------------------------------------------------------------------------- Visual Genome
def test_vg_captions_round_trip(tmp_path):
    image_data = dump(tmp_path / "image_data.json", [
        {"width": 100, "height": 50, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg",
         "coco_id": None, "flickr_id": None, "image_id": 1},
        {"width": 80, "height": 80, "url": "https://cs.stanford.edu/people/rak248/VG_100K/10.jpg",
         "coco_id": 12, "flickr_id": None, "image_id": 10}])
    def region(region_id: int, image_id: int, side: int, phrase: str) -> dict:
        return {"region_id": region_id, "width": side, "height": side, "image_id": image_id, "phrase": phrase,
                "y": 0, "x": 0}
    regions = dump(tmp_path / "region_descriptions.json", [
        {"id": 1, "regions": [region(1, 1, 30, "the clock is green in colour"),
                              region(2, 1, 2, "shade is along the street "),
                              region(3, 1, 30, "The clock is green in colour")]},  # a repeat
        {"id": 10, "regions": [region(4, 10, 50, "a man walking"), region(5, 10, 50, "  ")]}])
    storage = tmp_path / "vg"
    out = storage / "annotations" / "vg_caption.json"
    convert = tool("convert_vg_captions").main
    convert(["--regions", str(regions), "--image-data", str(image_data), "--output", str(out)])
    records = json.loads(out.read_text())
    assert records == [
        {"image": "VG_100K_2/1.jpg", "caption": "the clock is green in colour", "image_id": "vg_1"},
        {"image": "VG_100K_2/1.jpg", "caption": "shade is along the street", "image_id": "vg_1"},
        {"image": "VG_100K/10.jpg", "caption": "a man walking", "image_id": "vg_10"}]
    write_images(storage / "images", ["VG_100K_2/1.jpg", "VG_100K/10.jpg"])
    train = build(tmp_path, "vg_caption", storage)["train"]
    assert [train[i]["text_input"] for i in range(3)] == [r["caption"] for r in records]
    convert(["--regions", str(regions), "--image-data", str(image_data), "--output", str(out), "--min-area", "0.01"])
    assert len(json.loads(out.read_text())) == 2  # the 2x2 region is dropped


# ------------------------------------------------------------------------------------------ GQA
def test_gqa_round_trip(tmp_path):
    official = {
        "201307251": {"semantic": [], "entailed": [], "equivalent": ["201307251"], "question": "Is it overcast?",
                      "imageId": "n161313", "isBalanced": True, "groups": {"global": None, "local": "08c-overcast"},
                      "answer": "no", "semanticStr": "select: sky", "annotations": {}, "types": {},
                      "fullAnswer": "No, it is clear."},
        "05515938": {"question": "Who is wearing the shirt?", "imageId": "2354786", "answer": "girl",
                     "fullAnswer": "The girl is wearing a shirt.", "isBalanced": True}}
    source = tmp_path / "official"
    storage = tmp_path / "gqa"
    convert = tool("convert_gqa").main
    for split in ("train", "val", "testdev"):
        dump(source / f"{split}_balanced_questions.json", official)
        convert(["--questions", str(source / f"{split}_balanced_questions.json"),
                 "--output", str(storage / "annotations" / f"{split}_balanced_questions.json")])
    records = json.loads((storage / "annotations" / "testdev_balanced_questions.json").read_text())
    assert records[1] == {"image": "2354786.jpg", "question": "Who is wearing the shirt?", "question_id": "05515938",
                          "answer": "girl", "fullAnswer": "The girl is wearing a shirt."}
    write_images(storage / "images", ["n161313.jpg", "2354786.jpg"])
    built = build(tmp_path, "gqa", storage)
    testdev = built["testdev"]
    assert [testdev[i]["question_id"] for i in range(2)] == ["201307251", "05515938"]  # leading zero kept
    metrics = VQATask(VQAConfig(metric="gqa")).aggregate(
        [{"question_id": "201307251", "answer": "no"}, {"question_id": "05515938", "answer": "girl"}],
        "testdev", testdev, None)
    assert metrics["agg_metrics"] == pytest.approx(100.0)
    with pytest.raises(SystemExit, match="input file"):
        convert(["--questions", str(source / "val_balanced_questions.json"),
                 "--output", str(source / "val_balanced_questions.json")])


# --------------------------------------------------------------------------------------- NoCaps
def test_nocaps_round_trip(tmp_path):
    gt = dump(tmp_path / "nocaps_val_4500_captions.json", {
        "licenses": [], "info": {},
        "images": [{"id": 0, "file_name": "0013ea2087020901.jpg", "domain": "in-domain",
                    "open_images_id": "0013ea2087020901", "height": 20, "width": 20,
                    "coco_url": "https://s3.amazonaws.com/nocaps/val/0013ea2087020901.jpg"},
                   {"id": 1, "file_name": "00223d8f2e7f6b7e.jpg", "domain": "near-domain",
                    "open_images_id": "00223d8f2e7f6b7e", "height": 20, "width": 20, "coco_url": ""}],
        "annotations": [{"image_id": i, "id": 10 * i + j, "caption": f"caption {j}"} for i in range(2) for j in range(10)]})
    info = dump(tmp_path / "nocaps_test_image_info.json", {
        "licenses": [], "info": {}, "images": [{"id": 0, "file_name": "0a1b2c3d4e5f6a7b.jpg", "domain": "out-domain"}]})
    storage = tmp_path / "nocaps"
    ann = storage / "annotations"
    convert = tool("convert_nocaps").main
    convert(["--nocaps", str(gt), "--image-folder", "val", "--output", str(ann / "nocaps_val.json")])
    convert(["--nocaps", str(info), "--image-folder", "test", "--output", str(ann / "nocaps_test.json")])
    (ann / gt.name).write_text(gt.read_text())
    write_images(storage / "images", ["val/0013ea2087020901.jpg", "val/00223d8f2e7f6b7e.jpg", "test/0a1b2c3d4e5f6a7b.jpg"])
    built = build(tmp_path, "nocaps", storage)
    ids = [built["val"][i]["image_id"] for i in range(2)]
    assert ids == [0, 1] and set(load_coco_gt(built["val"].gt_path)) == set(ids)
    assert built["test"][0]["image_id"] == 0
