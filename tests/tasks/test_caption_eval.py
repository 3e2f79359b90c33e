"""Caption metrics: the AI Challenger 2017 jieba tokenisation on hand-checked sentences (and against the
real CoreNLP jar when Java is here), hand-computed BLEU / ROUGE-L / CIDEr under both Chinese
tokenisations, and the CLI on the shapes files and on malformed input."""
import json
import math
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from lavis_lite.tasks.caption_eval import (
    PTB_PUNCTUATIONS,
    load_coco_gt,
    main,
    metric_names,
    score_captions,
    tokenize_chinese,
    tokenize_jieba,
)

REPO = Path(__file__).resolve().parents[2]
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer runs Java")

# What the AI Challenger procedure gives (strip, drop "。", jieba precise mode, PTB -lowerCase, PUNCTUATIONS
# dropped), written out by hand and checked once against jieba 0.42.1 and the CoreNLP 3.4.1 jar.
JIEBA_CASES = {
    # a reference of the challenge's own sample file (data/id_to_words.json), unspaced, plus "。"
    "一个长头发的女人坐在海边沙滩的椅子上看着蓝天大海。": "一个 长 头发 的 女人 坐在 海边 沙滩 的 椅子 上 看着 蓝天 大海",
    " 3个Red圆形，在左边！": "3 个 red 圆形 ， 在 左边 ！",  # strip, lower-case; "，" "！" are words
    "两个人在打篮球。。": "两个 人 在 打篮球",
    "蓝色的 方形 和 红色的圆形": "蓝色 的 方形 和 红色 的 圆形",  # spaces only separate
    "价格是3.5元": "价格 是 3.5 元",
    "100%的人": "100 % 的 人",
    "穿T恤的人": "穿 t恤 的 人",
    "一只狗(棕色)在草地上": "一只 狗 -lrb- 棕色 -rrb- 在 草地 上",  # lower-cased, so not in PUNCTUATIONS
    "他说：“你好”...": "他 说 ： 你好",
    "《书名》……二〇一七年": "书名 二 一 七年",
    "图中有三个图形：紫色的星形、红色的三角形和黄色的正方形。":
        "图中 有 三个 图形 ： 紫色 的 星形 、 红色 的 三角形 和 黄色 的 正方形",
}


@pytest.mark.parametrize("text", list(JIEBA_CASES))
def test_jieba_tokenization_by_hand(text):
    assert tokenize_jieba(text) == JIEBA_CASES[text]


def test_jieba_ignores_words_added_to_the_global_tokenizer():
    import jieba

    jieba.add_word("红色的圆形")
    try:
        assert " ".join(jieba.cut("红色的圆形")) == "红色的圆形"
        assert tokenize_jieba("红色的圆形") == "红色 的 圆形"
    finally:
        jieba.del_word("红色的圆形")


@needs_java
def test_jieba_tokenization_equals_the_challenge_pipeline_run_with_java():
    """The challenge's steps run as it runs them (global jieba.cut, then pycocoevalcap's PTBTokenizer, the
    same CoreNLP 3.4.1 jar), on every character of the blocks our PTB pass claims, between two words."""
    import jieba
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

    assert PTB_PUNCTUATIONS == set(PUNCTUATIONS)
    codes = [*range(0x21, 0x7F), 0xAB, 0xBB, 0x200B, 0xFEFF, 0x3000, *range(0x2010, 0x205F), *range(0x3001, 0x3040),
             *range(0xFE30, 0xFE6C), *range(0xFF01, 0xFFEF)]
    texts = [f"前{chr(c)}后" for c in codes if unicodedata.category(chr(c))[0] not in "ZC" or c in (0x200B, 0xFEFF)]
    texts += list(JIEBA_CASES) + ["等等....", "等---等", "C++代码", "AT&T公司", "1,000个", "10:30", "3.5%", "I'm"]
    segmented = {i: [{"caption": " ".join(jieba.cut(t.strip().replace("。", ""), cut_all=False))}]
                 for i, t in enumerate(texts)}
    reference = PTBTokenizer().tokenize(segmented)
    wrong = [(t, tokenize_jieba(t), reference[i][0]) for i, t in enumerate(texts) if tokenize_jieba(t) != reference[i][0]]
    assert not wrong, wrong[:10]


# ------------------------------------------------------------------------------------------ scores
def rouge_l(p, r, beta=1.2):
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p)


def test_hand_computed_bleu_and_rouge_under_both_tokenizations():
    m = score_captions({1: ["红色的圆形在左边"]}, {1: "蓝色的圆形"}, language="zh")
    # characters: 蓝 色 的 圆 形 vs 红 色 的 圆 形 在 左 边: LCS 色的圆形 = 4, 4 of 5 unigrams found
    assert m["ROUGE_L_char"] == pytest.approx(rouge_l(4 / 5, 4 / 8), rel=1e-9)
    assert m["Bleu_1_char"] == pytest.approx(math.exp(1 - 8 / 5) * 4 / 5, rel=1e-6)
    # words: 蓝色 的 圆形 vs 红色 的 圆形 在 左边: LCS 的 圆形 = 2, 2 of 3 unigrams found
    assert m["ROUGE_L_jieba"] == pytest.approx(rouge_l(2 / 3, 2 / 5), rel=1e-9)
    assert m["ROUGE_L_jieba"] == pytest.approx(0.478431, abs=1e-6)
    assert m["Bleu_1_jieba"] == pytest.approx(math.exp(1 - 5 / 3) * 2 / 3, rel=1e-6)


GTS = {"a": ["红色的圆形在左边。"], "b": ["两个蓝色的正方形在右边"]}


def test_identical_captions_score_one_and_cider_ten():
    m = score_captions(GTS, {"a": "红色的圆形在左边", "b": "两个蓝色的正方形在右边。"}, language="zh")
    assert set(m) == set(metric_names("zh"))
    for t in ("char", "jieba"):
        assert m[f"Bleu_4_{t}"] == pytest.approx(1.0, rel=1e-6)
        assert m[f"ROUGE_L_{t}"] == pytest.approx(1.0)
        # every n-gram vector equals its reference's: cosine 1, no length penalty, times 10
        assert m[f"CIDEr_{t}"] == pytest.approx(10.0)


def test_disjoint_captions_score_zero():
    m = score_captions(GTS, {"a": "一只小狗", "b": "一只小猫"}, language="zh")
    for t in ("char", "jieba"):
        assert m[f"Bleu_4_{t}"] < 1e-6
        assert m[f"ROUGE_L_{t}"] == 0.0
        assert m[f"CIDEr_{t}"] == 0.0


def test_char_and_jieba_cider_differ_and_each_equals_pycocoevalcap_on_tokens_written_out():
    from pycocoevalcap.cider.cider import Cider

    gts = {"a": ["红色的圆形在左边", "一个红色的圆形"], "b": ["两个蓝色的正方形", "蓝色的正方形在右边"]}
    res = {"a": "红色的圆形", "b": "两个蓝色的方形"}
    m = score_captions(gts, res, language="zh")
    words = {"a": ["红色 的 圆形 在 左边", "一个 红色 的 圆形"], "b": ["两个 蓝色 的 正方形", "蓝色 的 正方形 在 右边"]}
    chars = {"a": ["红 色 的 圆 形 在 左 边", "一 个 红 色 的 圆 形"], "b": ["两 个 蓝 色 的 正 方 形", "蓝 色 的 正 方 形 在 右 边"]}
    assert m["CIDEr_jieba"] == pytest.approx(Cider().compute_score(words, {"a": ["红色 的 圆形"], "b": ["两个 蓝色 的 方形"]})[0])
    assert m["CIDEr_char"] == pytest.approx(Cider().compute_score(chars, {"a": ["红 色 的 圆 形"], "b": ["两 个 蓝 色 的 方 形"]})[0])
    assert abs(m["CIDEr_char"] - m["CIDEr_jieba"]) > 0.1


def test_char_tokenization_is_unchanged():
    assert tokenize_chinese(" 3个red圆形，在左边！") == "3 个 red 圆 形 在 左 边"


# --------------------------------------------------------------------------------------------- CLI
def first_captions(gt_path: Path, out: Path) -> Path:
    gts = load_coco_gt(gt_path)
    out.write_text(json.dumps([{"image_id": k, "caption": v[0]} for k, v in gts.items()], ensure_ascii=False))
    return out


def test_cli_on_the_shapes_chinese_files(shapes_root, tmp_path):
    gt = shapes_root / "annotations" / "caption_cn_val_gt.json"
    res = first_captions(gt, tmp_path / "res.json")
    proc = subprocess.run([sys.executable, "-m", "lavis_lite.tasks.caption_eval", "--gt", str(gt), "--results", str(res),
                           "--language", "zh"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # jieba's dictionary loading says nothing
    metrics = json.loads(proc.stdout)
    assert list(metrics) == metric_names("zh")
    expected = score_captions(load_coco_gt(gt), {r["image_id"]: r["caption"] for r in json.loads(res.read_text())}, "zh")
    assert metrics == pytest.approx(expected)
    # each prediction is one of its image's references (BLEU and ROUGE-L take the best match)
    for t in ("char", "jieba"):
        assert metrics[f"Bleu_4_{t}"] == pytest.approx(1.0, rel=1e-6) and metrics[f"ROUGE_L_{t}"] == pytest.approx(1.0)
    # CIDEr compares with all the references: a wrong caption for every image scores lower
    gts = load_coco_gt(gt)
    ids = list(gts)
    wrong = {k: gts[other][0] for k, other in zip(ids, ids[1:] + ids[:1])}
    assert score_captions(gts, wrong, "zh")["CIDEr_jieba"] < metrics["CIDEr_jieba"]


def test_cli_malformed_json_is_one_error_line_without_traceback(shapes_root, tmp_path):
    gt = shapes_root / "annotations" / "caption_cn_val_gt.json"
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image_id": ')
    proc = subprocess.run([sys.executable, "-m", "lavis_lite.tasks.caption_eval", "--gt", str(gt), "--results",
                           str(broken), "--language", "zh"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith(f"error: results file {broken} is not valid JSON")


GOOD_GT = {"images": [{"id": 1}, {"id": 2}],
           "annotations": [{"image_id": 1, "caption": "红色的圆形"}, {"image_id": 2, "caption": "蓝色的方形"}]}
GOOD_RES = [{"image_id": 1, "caption": "红色的圆形"}, {"image_id": 2, "caption": "蓝色的方形"}]


@pytest.mark.parametrize("which,content,message", [
    ("gt", {"annotations": []}, "must be COCO caption JSON with 'images' and 'annotations' lists, found ['annotations']"),
    ("gt", {"images": [{"id": 1}], "annotations": [{"image_id": 1, "text": "x"}]}, "annotations[0] needs 'image_id'"),
    ("gt", {"images": [{"id": 1}], "annotations": [{"image_id": 7, "caption": "x"}]}, "image_id 7, which is not in"),
    ("gt", {"images": [{"id": 1}, {"id": 2}], "annotations": [{"image_id": 1, "caption": "x"}]}, "1 images have no caption"),
    ("results", {"image_id": 1, "caption": "x"}, "must be a list of {'image_id', 'caption'}, got a dict"),
    ("results", [{"caption": "红色的圆形"}], "entry 0 needs 'image_id' and a string 'caption'"),
    ("results", [{"image_id": 1, "caption": None}], "entry 0 needs 'image_id' and a string 'caption'"),
    ("results", GOOD_RES[:1], "has no caption for 1 of the 2 ground-truth images, e.g. [2]"),
    ("results", GOOD_RES + GOOD_RES[:1], "image_id 1 has more than one caption"),
    ("results", GOOD_RES + [{"image_id": 3, "caption": "x"}], "image_id 3 is not in the ground truth"),
    ("results", None, "results file not found"),
])
def test_cli_malformed_input_names_the_file_and_the_fault(tmp_path, capsys, which, content, message):
    files = {"gt": tmp_path / "gt.json", "results": tmp_path / "res.json"}
    files["gt"].write_text(json.dumps(GOOD_GT))
    files["results"].write_text(json.dumps(GOOD_RES))
    if content is None:
        files[which].unlink()
    else:
        files[which].write_text(json.dumps(content))
    assert main(["--gt", str(files["gt"]), "--results", str(files["results"]), "--language", "zh"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.splitlines()) == 1
    assert out.err.startswith("error: ") and str(files[which]) in out.err and message in out.err


def test_cli_english_without_java_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lavis_lite.tasks.caption_eval.shutil.which", lambda name: None)
    assert main(["--gt", "gt.json", "--results", "res.json", "--language", "en"]) == 2
    assert "runs Java, and no `java` is on PATH" in capsys.readouterr().err


@needs_java
def test_cli_english_on_the_shapes_files(shapes_root, tmp_path, capsys):
    gt = shapes_root / "annotations" / "caption_val_gt.json"
    res = first_captions(gt, tmp_path / "res.json")
    out = tmp_path / "metrics.json"
    assert main(["--gt", str(gt), "--results", str(res), "--language", "en", "--output", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert list(metrics) == metric_names("en") == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    assert json.loads(out.read_text()) == metrics and 0 < metrics["Bleu_1"] <= 1
