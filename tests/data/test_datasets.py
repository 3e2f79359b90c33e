"""Data sets and collaters on the shapes files, and the bad-image policy."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from torch.utils.data import DataLoader

from lavis_lite.data.datasets import (
    BadImageError,
    CaptionDataset,
    CaptionEvalDataset,
    RetrievalEvalDataset,
    VQADataset,
    VQAEvalDataset,
    image_id_of,
)
from lavis_lite.data.processors import build_processor

SIZE = 32


@pytest.fixture(scope="module")
def procs():
    return {
        "image_train": build_processor({"name": "blip_image_train", "image_size": SIZE, "hflip": False}),
        "image_eval": build_processor({"name": "blip_image_eval", "image_size": SIZE}),
        "caption": build_processor({"name": "blip_caption"}),
        "question": build_processor({"name": "blip_question"}),
    }


def _ann(root, name):
    return root / "annotations" / name


def test_caption_train(shapes_root, procs):
    data = CaptionDataset(_ann(shapes_root, "caption_train.json"), shapes_root, procs["image_train"], procs["caption"])
    raw = json.loads(_ann(shapes_root, "caption_train.json").read_text())
    assert len(data) == len(raw) == 100
    sample = data[3]
    assert set(sample) == {"image", "text_input", "image_id", "bad_images"}
    assert sample["image"].shape == (3, SIZE, SIZE) and sample["image_id"] == raw[3]["image_id"]
    assert sample["text_input"] == procs["caption"](raw[3]["caption"])
    batch = data.collater([data[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, SIZE, SIZE)
    assert batch["image_id"] == [r["image_id"] for r in raw[:4]] and isinstance(batch["image_id"], list)
    assert len(batch["text_input"]) == 4 and batch["bad_images"] == 0
    assert all(t == t.lower() and not t.endswith(".") for t in batch["text_input"])


def test_caption_eval(shapes_root, procs):
    data = CaptionEvalDataset(_ann(shapes_root, "caption_val.json"), shapes_root, procs["image_eval"],
                              gt_path=_ann(shapes_root, "caption_val_gt.json"))
    assert len(data) == 6 and data.gt_path.is_file()
    batch = data.collater([data[i] for i in range(len(data))])
    assert set(batch) == {"image", "image_id", "bad_images"}
    assert batch["image_id"] == [f"shapes_{1_000_000 + i}" for i in range(6)]
    assert batch["image"].shape == (6, 3, SIZE, SIZE)


def test_retrieval_eval_indexes_captions_like_lavis(shapes_root, procs):
    data = RetrievalEvalDataset(_ann(shapes_root, "caption_val.json"), shapes_root, procs["image_eval"], procs["caption"])
    raw = json.loads(_ann(shapes_root, "caption_val.json").read_text())
    assert data.image == [e["image"] for e in raw] and len(data) == len(raw)
    assert len(data.text) == len(data.txt2img) == sum(len(e["caption"]) for e in raw)
    for img, entry in enumerate(raw):
        assert [data.text[t] for t in data.img2txt[img]] == [procs["caption"](c) for c in entry["caption"]]
        assert all(data.txt2img[t] == img for t in data.img2txt[img])
    batch = data.collater([data[1], data[2]])
    assert batch["index"] == [1, 2] and batch["image"].shape == (2, 3, SIZE, SIZE)


def test_vqa_train_weights_and_collater(shapes_root, procs):
    data = VQADataset(_ann(shapes_root, "vqa_train.json"), shapes_root, procs["image_train"], procs["question"])
    raw = json.loads(_ann(shapes_root, "vqa_train.json").read_text())
    noisy = next(i for i, e in enumerate(raw) if len(set(e["answer"])) > 1)
    sample = data[noisy]
    assert len(sample["answers"]) == len(set(sample["answers"])) == len(set(raw[noisy]["answer"]))
    for answer, weight in zip(sample["answers"], sample["weights"]):
        assert weight == pytest.approx(raw[noisy]["answer"].count(answer) / 10)
    assert sample["text_input"] == raw[noisy]["question"].lower()
    samples = [data[0], data[noisy]]
    batch = data.collater(samples)
    assert batch["answer"] == samples[0]["answers"] + samples[1]["answers"]
    assert batch["n_answers"].tolist() == [len(s["answers"]) for s in samples]
    assert batch["weight"].dtype == torch.float32 and batch["weight"].shape == (len(batch["answer"]),)
    assert batch["weight"].sum().item() == pytest.approx(2.0)
    assert batch["question_id"] == [raw[0]["question_id"], raw[noisy]["question_id"]]


def test_vqa_eval(shapes_root, procs):
    data = VQAEvalDataset(_ann(shapes_root, "vqa_val.json"), shapes_root, procs["image_eval"], procs["question"],
                          question_path=_ann(shapes_root, "vqa_val_questions.json"))
    batch = data.collater([data[0], data[1]])
    assert set(batch) == {"image", "text_input", "question_id", "bad_images"}
    assert batch["question_id"] == [10_000_000, 10_000_001] and data.annotation_path is None


def test_image_ids_for_coco_karpathy_eval_files():
    assert image_id_of({"image": "val2014/COCO_val2014_000000391895.jpg"}) == 391895
    assert image_id_of({"image": "x/shapes_5.jpg", "image_id": "shapes_5"}) == "shapes_5"
    assert image_id_of({"image": "x/photo.jpg"}) == "photo"


def test_annotation_file_of_the_wrong_format_is_named(shapes_root, procs):
    with pytest.raises(ValueError, match=r"caption_val\.json: record 0 'caption' is list.*datasets\.foo"):
        CaptionDataset(_ann(shapes_root, "caption_val.json"), shapes_root, procs["image_train"], procs["caption"],
                       name="foo")
    with pytest.raises(ValueError, match=r"not a list of records"):
        CaptionEvalDataset(_ann(shapes_root, "caption_val_gt.json"), shapes_root, procs["image_eval"])


# ------------------------------------------------------------------------------------ bad images
def _truncate_first_image(root, split="train") -> str:
    """Cut image 0 of ``split`` in half; return its path relative to root."""
    first_id = {"train": 0, "val": 1_000_000}[split]
    rel = f"images/{split}/shapes_{first_id}.jpg"
    data = (root / rel).read_bytes()
    (root / rel).write_bytes(data[: len(data) // 2])
    return rel


def test_bad_image_raises_with_path_and_key_by_default(shapes_copy, procs):
    rel = _truncate_first_image(shapes_copy)
    data = CaptionDataset(_ann(shapes_copy, "caption_train.json"), shapes_copy, procs["image_train"],
                          procs["caption"], name="shapes_caption")
    data[5]  # other images are fine
    with pytest.raises(BadImageError) as err:
        data[0]
    assert str(shapes_copy / rel) in str(err.value)
    assert "datasets.shapes_caption.skip_bad_images=true" in str(err.value)


def test_skipping_a_truncated_training_image_takes_the_next_sample(shapes_copy, procs, caplog):
    rel = _truncate_first_image(shapes_copy)
    data = CaptionDataset(_ann(shapes_copy, "caption_train.json"), shapes_copy, procs["image_train"],
                          procs["caption"], name="shapes_caption", skip_bad_images=True)
    raw = json.loads(_ann(shapes_copy, "caption_train.json").read_text())
    first_good = next(i for i, e in enumerate(raw) if e["image"] != rel)  # image 0 has several captions
    with caplog.at_level(logging.WARNING, logger="lavis_lite.data.datasets"):
        sample = data[0]
    assert sample["bad_images"] == first_good and data.bad_image_count == first_good
    assert sample["text_input"] == procs["caption"](raw[first_good]["caption"])  # image and text stay paired
    assert sample["image_id"] == raw[first_good]["image_id"]
    assert str(shapes_copy / rel) in caplog.text
    assert data.collater([sample, data[first_good]])["bad_images"] == first_good


def test_skipping_in_eval_keeps_the_id_with_a_black_image(shapes_copy, procs):
    (shapes_copy / "images/val/shapes_1000001.jpg").unlink()  # missing file
    data = CaptionEvalDataset(_ann(shapes_copy, "caption_val.json"), shapes_copy, procs["image_eval"],
                              name="shapes_caption", skip_bad_images=True)
    batch = data.collater([data[i] for i in range(len(data))])
    assert batch["image_id"] == [f"shapes_{1_000_000 + i}" for i in range(6)]  # one prediction per id
    assert batch["bad_images"] == 1 and data.bad_image_count == 1
    black = procs["image_eval"].transform.transforms[-1](torch.zeros(3, SIZE, SIZE))
    assert torch.allclose(batch["image"][1], black)


def test_bad_image_count_reaches_the_main_process_from_workers(shapes_copy, procs):
    _truncate_first_image(shapes_copy, "val")
    data = VQAEvalDataset(_ann(shapes_copy, "vqa_val.json"), shapes_copy, procs["image_eval"], procs["question"],
                          name="shapes_vqa", skip_bad_images=True)
    raw = json.loads(_ann(shapes_copy, "vqa_val.json").read_text())
    on_bad_image = sum(e["image"].endswith("shapes_1000000.jpg") for e in raw)
    loader = DataLoader(data, batch_size=4, num_workers=2, collate_fn=data.collater)
    batches = list(loader)
    assert sum(b["bad_images"] for b in batches) == on_bad_image > 0
    assert data.bad_image_count == 0  # the workers counted, not this process
    assert [q for b in batches for q in b["question_id"]] == [e["question_id"] for e in raw]
