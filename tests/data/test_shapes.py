"""The shapes generator: determinism, real file formats, answers and captions true to the scene."""
from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from pycocotools.coco import COCO

from lavis_lite.data import shapes
from lavis_lite.data.shapes import COLOURS, SHAPES, ShapesSpec, ensure_shapes, generate_shapes

TINY = dict(train=6, val=3, test=3, image_size=48)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, name: str):
    return json.loads((root / "annotations" / name).read_text())


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = _files(generate_shapes(tmp_path / "a", ShapesSpec(seed=3, **TINY)))
    b = _files(generate_shapes(tmp_path / "b", ShapesSpec(seed=3, **TINY)))
    c = _files(generate_shapes(tmp_path / "c", ShapesSpec(seed=4, **TINY)))
    assert a == b
    # images; per split 3 VQA files, scenes, en + cn captions; en + cn val/test gt; vocab; manifest
    assert len(a) == 12 + 3 * 6 + 4 + 2
    assert a.keys() == c.keys()
    changed = [k for k in a if a[k] != c[k]]
    assert any(k.endswith(".jpg") for k in changed) and "annotations/caption_train.json" in changed


def test_a_split_does_not_depend_on_the_other_split_sizes(tmp_path):
    a = _files(generate_shapes(tmp_path / "a", ShapesSpec(**TINY)))
    b = _files(generate_shapes(tmp_path / "b", ShapesSpec(**{**TINY, "train": 2})))
    val = [k for k in a if "val" in k]
    assert val and all(a[k] == b[k] for k in val)


def test_layout_and_manifest(shapes_root, small_spec):
    manifest = json.loads((shapes_root / "manifest.json").read_text())
    assert manifest == {"generator_version": shapes.GENERATOR_VERSION, "seed": 0,
                        "counts": {"train": 20, "val": 6, "test": 6}, "image_size": 64}
    for split in ("train", "val", "test"):
        images = sorted((shapes_root / "images" / split).glob("*.jpg"))
        assert len(images) == small_spec[split]
        with Image.open(images[0]) as im:
            assert im.format == "JPEG" and im.size == (64, 64) and im.mode == "RGB"


def test_caption_files_in_karpathy_format(shapes_root):
    for suffix in ("", "_cn"):
        train = _load(shapes_root, f"caption{suffix}_train.json")
        assert all(set(e) == {"image", "caption", "image_id"} and isinstance(e["caption"], str) for e in train)
        assert all(re.fullmatch(r"shapes_\d+", e["image_id"]) for e in train)
        assert len({e["image_id"] for e in train}) == 20
        for split in ("val", "test"):
            entries = _load(shapes_root, f"caption{suffix}_{split}.json")
            assert len(entries) == 6 and all(isinstance(e["caption"], list) for e in entries)
            for e in entries:
                assert (shapes_root / e["image"]).is_file()
    assert re.search(r"[\u4e00-\u9fff]", _load(shapes_root, "caption_cn_val.json")[0]["caption"][0])


@pytest.mark.parametrize("name", ["caption_val_gt.json", "caption_test_gt.json", "caption_cn_val_gt.json"])
def test_caption_ground_truth_loads_in_pycocotools(shapes_root, name):
    from pycocoevalcap.bleu.bleu import Bleu

    gt = COCO(str(shapes_root / "annotations" / name))
    entries = _load(shapes_root, name.replace("_gt", ""))
    assert sorted(gt.getImgIds()) == sorted(e["image_id"] for e in entries)
    assert len(gt.getAnnIds()) == sum(len(e["caption"]) for e in entries)
    # string image ids survive loadRes and a metric
    results = [{"image_id": e["image_id"], "caption": e["caption"][0]} for e in entries]
    res = gt.loadRes(results)
    refs = {i: [a["caption"] for a in gt.imgToAnns[i]] for i in gt.getImgIds()}
    hyps = {i: [a["caption"] for a in res.imgToAnns[i]] for i in gt.getImgIds()}
    score, _ = Bleu(1).compute_score(refs, hyps)
    assert score[0] > 0.99  # each hypothesis is one of its references


def _scenes(root: Path, split: str) -> dict[int, dict]:
    return {s["vqa_image_id"]: s for s in _load(root, f"scenes_{split}.json")}


def _truth(question: str, scene: dict) -> str:
    """The answer, recomputed from the recorded scene (independently of the generator's code)."""
    items = sorted(scene["shapes"], key=lambda s: s["cx"])
    by_shape = {s["shape"]: s for s in items}
    q = question.lower()
    if q == "how many shapes are there?":
        return str(len(items))
    if m := re.fullmatch(r"what color is the (\w+)\?", q):
        return by_shape[m[1]]["colour"]
    if m := re.fullmatch(r"is there an? (\w+)\?", q):
        return "yes" if m[1] in by_shape else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+) left of the (\w+) (\w+)\?", q):
        a, b = by_shape[m[2]], by_shape[m[4]]
        assert (a["colour"], b["colour"]) == (m[1], m[3])
        return "yes" if a["cx"] < b["cx"] else "no"
    if m := re.fullmatch(r"what shape is on the (left|right)\?", q):
        return items[0 if m[1] == "left" else -1]["shape"]
    raise AssertionError(f"unexpected question {question!r}")


@pytest.mark.parametrize("split", ["train", "val"])
def test_vqa_files_are_valid_vqav2_and_true_to_the_scene(shapes_root, split):
    questions = _load(shapes_root, f"vqa_{split}_questions.json")
    annotations = _load(shapes_root, f"vqa_{split}_annotations.json")
    lavis = _load(shapes_root, f"vqa_{split}.json")
    assert questions["task_type"] == "Open-Ended" and questions["data_subtype"] == split
    assert {"info", "license", "data_type"} <= set(questions) and {"info", "license", "data_subtype"} <= set(annotations)
    scenes = _scenes(shapes_root, split)
    by_qid = {a["question_id"]: a for a in annotations["annotations"]}
    assert [q["question_id"] for q in questions["questions"]] == list(by_qid) == [e["question_id"] for e in lavis]
    types, noisy = collections.Counter(), 0
    for q, entry in zip(questions["questions"], lavis):
        ann = by_qid[q["question_id"]]
        assert isinstance(q["image_id"], int) and ann["image_id"] == q["image_id"] == entry["image_id"]
        scene = scenes[q["image_id"]]
        assert entry["image"] == scene["image"] and scene["image_id"] == f"shapes_{q['image_id']}"
        answers = [a["answer"] for a in ann["answers"]]
        assert [a["answer_id"] for a in ann["answers"]] == list(range(1, 11))
        assert all(a["answer_confidence"] == "yes" for a in ann["answers"])
        assert answers == entry["answer"] and entry["question"] == q["question"] and entry["dataset"] == "shapes"
        truth = _truth(q["question"], scene)
        assert ann["multiple_choice_answer"] == truth
        assert collections.Counter(answers).most_common(1)[0][0] == truth
        assert ann["answer_type"] in {"yes/no", "number", "other"}
        assert (ann["answer_type"] == "yes/no") == (truth in {"yes", "no"})
        assert (ann["answer_type"] == "number") == truth.isdigit()
        types[ann["answer_type"]] += 1
        noisy += answers.count(truth) < 10
    assert set(types) == {"yes/no", "number", "other"}
    if split == "train":
        assert noisy > 0  # some human-like disagreement, to exercise the accuracy metric


def test_english_captions_true_to_the_scene(shapes_root):
    scenes = {s["image_id"]: s for s in _load(shapes_root, "scenes_train.json")}
    for entry in _load(shapes_root, "caption_train.json"):
        scene = scenes[entry["image_id"]]
        caption = entry["caption"].lower().rstrip(".")
        present = {(s["colour"], s["shape"]) for s in scene["shapes"]}
        mentioned = set(re.findall(rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})", caption))
        assert mentioned <= present, (caption, present)
        cx = {s["shape"]: s["cx"] for s in scene["shapes"]}
        if m := re.fullmatch(r"an? \w+ (\w+) left of an? \w+ (\w+)", caption):
            assert cx[m[1]] < cx[m[2]]
        if m := re.fullmatch(r"an? \w+ (\w+) to the right of an? \w+ (\w+) on .*", caption):
            assert cx[m[1]] > cx[m[2]]
        assert scene["background"] in caption or "background" not in caption


def test_pixels_match_the_recorded_scene(shapes_root):
    for scene in _load(shapes_root, "scenes_val.json"):
        pixels = np.asarray(Image.open(shapes_root / scene["image"]), dtype=np.float32)
        for s in scene["shapes"]:
            x, y = int(round(s["cx"])), int(round(s["cy"]))
            centre = pixels[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0)
            assert np.abs(centre - COLOURS[s["colour"]][1]).max() < 45, (scene["image"], s)


def test_bert_vocab_covers_all_text(shapes_root):
    transformers = pytest.importorskip("transformers")
    vocab_file = shapes_root / "bert_vocab" / "vocab.txt"
    vocab = vocab_file.read_text(encoding="utf-8").split("\n")[:-1]
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) == len(set(vocab))
    assert {"circle", "条", "##条", "3", "?", "##e"} <= set(vocab)
    tokenizer = transformers.BertTokenizer(str(vocab_file))
    texts = [c for e in _load(shapes_root, "caption_val.json") + _load(shapes_root, "caption_cn_val.json")
             for c in e["caption"]]
    texts += [e["question"] for e in _load(shapes_root, "vqa_val.json")] + ["a photo of", "Question: zzz? Answer:"]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids, (text, tokenizer.convert_ids_to_tokens(ids))
    assert tokenizer.tokenize("A red circle.") == ["a", "red", "circle", "."]


def test_ensure_shapes_reuses_a_matching_dataset_and_regenerates_otherwise(tmp_path, monkeypatch):
    root = ensure_shapes(tmp_path / "s", **TINY)
    before = _files(root)

    def fail(*args, **kwargs):
        raise AssertionError("should not regenerate")

    with monkeypatch.context() as m:
        m.setattr(shapes, "generate_shapes", fail)
        assert ensure_shapes(tmp_path / "s", **TINY) == root
    ensure_shapes(root, **{**TINY, "seed": 1})
    assert json.loads((root / "manifest.json").read_text())["seed"] == 1 and _files(root) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temp folders left


def test_a_folder_the_generator_did_not_write_is_refused_and_left_intact(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    (mine / "manifest.json").write_text('{"version": 3}')  # someone else's manifest
    before = _files(mine)
    monkeypatch.setattr(shapes, "generate_shapes", lambda *a, **k: pytest.fail("refused before generating"))
    with pytest.raises(shapes.ShapesRootError, match=rf"{mine} is not empty and is not a shapes data set written by "
                                                     r"lavis_lite.*new or empty folder.*default"):
        ensure_shapes(mine, **TINY)
    assert _files(mine) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_an_empty_folder_gets_the_data_set(tmp_path):
    (tmp_path / "empty").mkdir()
    root = ensure_shapes(tmp_path / "empty", **TINY)
    assert root == tmp_path / "empty" and json.loads((root / "manifest.json").read_text())["counts"]["train"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_an_outdated_data_set_of_ours_is_regenerated(tmp_path, caplog):
    root = generate_shapes(tmp_path / "s", ShapesSpec(**TINY))
    old = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**old, "generator_version": 0}))  # an older generator
    with caplog.at_level("INFO", logger=shapes.__name__):
        ensure_shapes(root, **TINY)
    assert json.loads((root / "manifest.json").read_text()) == old
    assert f"generating the shapes data set at {root}" in caplog.text and "replacing our outdated one" in caplog.text


def test_a_missing_parent_is_an_error_unless_it_is_the_default_root(tmp_path, monkeypatch):
    with pytest.raises(shapes.ShapesRootError, match=rf"cannot create {tmp_path / 'typo' / 's'}: its parent folder "
                                                     rf"{tmp_path / 'typo'} does not exist"):
        ensure_shapes(tmp_path / "typo" / "s", **TINY)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("LAVIS_LITE_CACHE", str(tmp_path / "cache"))  # the default root's parents are created
    assert (ensure_shapes(str(tmp_path / "cache" / "shapes"), **TINY) / "manifest.json").is_file()


def test_a_crash_during_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(shapes, "_write_split", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_shapes(tmp_path / "s", **TINY)
    assert list(tmp_path.iterdir()) == []


def test_default_root_and_resolver_follow_the_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("LAVIS_LITE_CACHE", str(tmp_path))
    assert shapes.default_shapes_root() == tmp_path / "shapes"
    assert OmegaConf.create({"storage": "${shapes_root:}"}).storage == str(tmp_path / "shapes")
    monkeypatch.delenv("LAVIS_LITE_CACHE")
    assert shapes.default_shapes_root() == Path.home() / ".cache" / "lavis_lite" / "shapes"


def test_cli(tmp_path):
    shapes.main(["--out", str(tmp_path / "cli"), "--train", "2", "--val", "1", "--test", "1", "--seed", "5",
                 "--image-size", "40"])
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["seed"] == 5 and manifest["counts"] == {"train": 2, "val": 1, "test": 1}
    assert manifest["image_size"] == 40
