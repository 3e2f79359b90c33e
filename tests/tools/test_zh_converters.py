"""tools/convert_{coco_cn,flickr_cn,aic_caption,xm3600}.py: a few lines written as the official Chinese
caption releases write them -> the annotation files, built with the matching builder and its
configs/datasets defaults (Chinese kept as written), with the ground truth matching the eval ids."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from lavis_lite.data.datasets import CaptionDataset, CaptionEvalDataset
from lavis_lite.tasks.captioning import load_coco_gt
from tests.tools.test_converters import TOOLS, build, tool, write_images

CONVERTERS = ["convert_coco_cn", "convert_flickr_cn", "convert_aic_caption", "convert_xm3600"]


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def eval_ids(data: CaptionEvalDataset) -> list:
    return next(iter(DataLoader(data, batch_size=len(data), collate_fn=data.collater)))["image_id"]


@pytest.mark.parametrize("name", CONVERTERS)
def test_cli_runs_as_a_script_and_documents_its_command(name):
    assert f"python tools/{name}.py" in tool(name).__doc__
    out = subprocess.run([sys.executable, str(TOOLS / f"{name}.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage" in out.stdout


# ------------------------------------------------------------------------------------ COCO-CN
COCO_CN = {  # coco-cn-version1805v1.1/: split files of COCO names, "<name>#<n>\t<sentence>" lines
    "coco-cn_train.txt": "COCO_train2014_000000128475\nCOCO_val2014_000000217153\n",
    "coco-cn_val.txt": "COCO_val2014_000000393857\n",
    "coco-cn_test.txt": "COCO_train2014_000000235838\nCOCO_val2014_000000375521\n",
    "imageid.human-written-caption.txt": (
        "COCO_train2014_000000128475#0\t三个甜甜圈旁边放着三种不同口味的蘸酱\n"
        "COCO_val2014_000000217153#0\t一个男人和一个女人穿着军装玩手机。\n"
        "COCO_val2014_000000217153#1\t一个穿T恤的男人在看手机\n"
        "COCO_val2014_000000393857#0\t一只白色的小狗睡在沙发上\n"
        "COCO_train2014_000000235838#0\t两只斑马站警惕地站在草原上\n"
        "COCO_val2014_000000375521#0\t下雪天一个男人和一个女人拿着滑雪板站在雪地上\n"),
    "imageid.manually-translated-caption.txt": (
        "COCO_train2014_000000235838#0\t两只斑马站在一片草地上。\n"
        "COCO_train2014_000000235838#1\t草原上的两匹斑马。\n"
        "COCO_val2014_000000375521#0\t一男一女拿着滑雪板站在雪中。\n"),
}


def make_coco_cn(tmp_path: Path) -> tuple[Path, Path]:
    release = tmp_path / "coco-cn-version1805v1.1"
    for name, text in COCO_CN.items():
        write_text(release / name, text)
    storage = tmp_path / "coco_cn"
    write_images(storage / "images", [f"{n.split('_')[1]}/{n}.jpg" for n in
                                      ("COCO_train2014_000000128475", "COCO_val2014_000000217153",
                                       "COCO_val2014_000000393857", "COCO_train2014_000000235838",
                                       "COCO_val2014_000000375521")])
    return release, storage


def test_coco_cn_round_trip(tmp_path, capsys):
    release, storage = make_coco_cn(tmp_path)
    karpathy = write_text(tmp_path / "dataset_coco.json", json.dumps({"images": [
        {"filepath": "train2014", "filename": "COCO_train2014_000000235838.jpg", "split": "train"},
        {"filepath": "val2014", "filename": "COCO_val2014_000000393857.jpg", "split": "test"}]}))
    tool("convert_coco_cn").main(["--coco-cn", str(release), "--output", str(storage / "annotations"),
                                  "--karpathy", str(karpathy)])
    assert "test: 1 of 2 images are in COCO Karpathy train/restval" in capsys.readouterr().out
    train_file = read_json(storage / "annotations" / "coco_cn_train.json")
    assert train_file[0] == {"image": "train2014/COCO_train2014_000000128475.jpg",
                             "caption": "三个甜甜圈旁边放着三种不同口味的蘸酱", "image_id": "coco_128475"}

    built = build(tmp_path, "coco_cn_caption", storage)
    train, val, test = built["train"], built["val"], built["test"]
    assert type(train) is CaptionDataset and type(test) is CaptionEvalDataset
    assert [train[i]["text_input"] for i in range(len(train))] == [
        "三个甜甜圈旁边放着三种不同口味的蘸酱", "一个男人和一个女人穿着军装玩手机。", "一个穿T恤的男人在看手机"]
    assert eval_ids(val) == ["coco_393857"] and eval_ids(test) == ["coco_235838", "coco_375521"]
    gt = load_coco_gt(test.gt_path)  # written sentences, then the manual translations
    assert gt == {"coco_235838": ["两只斑马站警惕地站在草原上", "两只斑马站在一片草地上。", "草原上的两匹斑马。"],
                  "coco_375521": ["下雪天一个男人和一个女人拿着滑雪板站在雪地上", "一男一女拿着滑雪板站在雪中。"]}
    assert load_coco_gt(val.gt_path) == {"coco_393857": ["一只白色的小狗睡在沙发上"]}


def test_coco_cn_without_translations_and_bad_files(tmp_path):
    release, storage = make_coco_cn(tmp_path)
    convert = tool("convert_coco_cn").main
    convert(["--coco-cn", str(release), "--output", str(storage / "annotations"), "--no-translated"])
    test = read_json(storage / "annotations" / "coco_cn_test.json")
    assert [r["caption"] for r in test] == [["两只斑马站警惕地站在草原上"], ["下雪天一个男人和一个女人拿着滑雪板站在雪地上"]]

    write_text(release / "imageid.human-written-caption.txt", "COCO_val2014_000000217153\t没有编号\n")
    with pytest.raises(SystemExit, match=r"human-written-caption\.txt:1: .* does not start with '<image>#<n>'"):
        convert(["--coco-cn", str(release), "--output", str(tmp_path / "out")])
    (release / "coco-cn_val.txt").unlink()
    with pytest.raises(SystemExit, match=r"no coco-cn_val\.txt; pass the unpacked coco-cn-version1805v1.1 folder"):
        convert(["--coco-cn", str(release), "--output", str(tmp_path / "out")])


# ---------------------------------------------------------------------------------- Flickr8k-CN
FLICKR8K_ZHC = """\
1000268201_693b08cb0e.jpg#zhc#0 穿着连衣裙的小女孩。
262681159_e5fed3acf0.jpg#zhc#0 一个穿着红色T恤的金发美女。
2090545563_a4e66ec76b.jpg#zhc#0 在玩滑板的两个女孩。
3385593926_d3e9c21170.jpg#zhc#0 有两只狗在雪地上滑雪。
1000268201_693b08cb0e.jpg#zhc#1 走上小屋的女孩。
2090545563_a4e66ec76b.jpg#zhc#1 小孩趴在滑板车上。
3385593926_d3e9c21170.jpg#zhc#1  两只狗在打闹。
"""
FLICKR8K_ZHM = """\
3385593926_d3e9c21170.jpg#zhm#0 狗在一个篱笆前的雪地里。
3385593926_d3e9c21170.jpg#zhm#1 狗在雪地上玩耍。
"""


def test_flickr8k_cn_round_trip(tmp_path, capsys):
    data = tmp_path / "flickr8kcn" / "data"
    zhc = write_text(data / "flickr8kzhc.caption.txt", FLICKR8K_ZHC)
    zhm = write_text(data / "flickr8kzhmtest.captions.txt", FLICKR8K_ZHM)
    train = write_text(data / "flickr8ktrain.txt", "1000268201_693b08cb0e\n262681159_e5fed3acf0\n")
    val = write_text(data / "flickr8kval.txt", "2090545563_a4e66ec76b\n")
    test = write_text(data / "Flickr_8k.testImages.txt", "3385593926_d3e9c21170.jpg\n1056338697_4f7d7ce270.jpg\n")
    storage = tmp_path / "flickr8k_cn"
    tool("convert_flickr_cn").main(["--name", "flickr8k_cn", "--captions", str(zhc), str(zhm), "--train", str(train),
                                    "--val", str(val), "--test", str(test), "--output", str(storage / "annotations")])
    assert "test: 1 of 2 images have no sentence" in capsys.readouterr().out
    write_images(storage / "images", ["1000268201_693b08cb0e.jpg", "262681159_e5fed3acf0.jpg",
                                      "2090545563_a4e66ec76b.jpg", "3385593926_d3e9c21170.jpg"])

    built = build(tmp_path, "flickr8k_cn_caption", storage)
    assert [built["train"][i]["text_input"] for i in range(3)] == [
        "穿着连衣裙的小女孩。", "走上小屋的女孩。", "一个穿着红色T恤的金发美女。"]
    assert built["train"][0]["image_id"] == "flickr8k_1000268201_693b08cb0e"
    assert eval_ids(built["val"]) == ["flickr8k_2090545563_a4e66ec76b"]
    assert load_coco_gt(built["test"].gt_path) == {"flickr8k_3385593926_d3e9c21170": [
        "有两只狗在雪地上滑雪。", "两只狗在打闹。", "狗在一个篱笆前的雪地里。", "狗在雪地上玩耍。"]}


def test_flickr_cn_split_files_must_not_share_images(tmp_path):
    zhc = write_text(tmp_path / "zhc.txt", FLICKR8K_ZHC)
    train = write_text(tmp_path / "train.txt", "1000268201_693b08cb0e\n")
    val = write_text(tmp_path / "val.txt", "1000268201_693b08cb0e.jpg\n")
    with pytest.raises(SystemExit, match=r"1000268201_693b08cb0e is listed in both the train and the val split"):
        tool("convert_flickr_cn").main(["--name", "flickr8k_cn", "--captions", str(zhc), "--train", str(train),
                                        "--val", str(val), "--output", str(tmp_path / "out")])


# --------------------------------------------------------------------------------- Flickr30k-CN
def test_flickr30k_cn_segmented_round_trip(tmp_path):
    """One folder per split; TextData/seg.<folder>.caption.txt holds word-segmented sentences, the
    human-translated test words tagged word:pos; ImageSets/<folder>.txt lists the numeric ids."""
    release = tmp_path / "flickr30k-cn"
    sets = {"train": ("flickr30kzhbbosontrain", ["1000092795", "10002456"]),
            "val": ("flickr30kzhbbosonval", ["1007129816"]), "test": ("flickr30kzhmbosontest", ["1009434119"])}
    lines = {"train": "1000092795#zhb#0 两 个 年轻 的 男人 在 院子 里 闲逛 。\n"
                      "1000092795#zhb#1 两 个 男人 在 绿色 植物 旁边\n"
                      "10002456#zhb#0 几 个 男人 戴 着 安全帽  在 操作 一个 巨大 的 滑轮 系统 。\n",
             "val": "1007129816#zhb#0 一个 男人 戴 着 橙色 的 帽子 。\n",
             "test": "1009434119#zhm#0 一只:m 黑白:b 相间:v 的:ude1 狗:n 在:p 草地:n 上:f 奔跑:v 。:wj\n"
                     "1009434119#zhm#1 一只:m 狗:n 在:p 追:v NBA:nx 球:n\n"}
    args = ["--name", "flickr30k_cn", "--segmented", "--captions"]
    for split, (folder, ids) in sets.items():
        args.append(str(write_text(release / folder / "TextData" / f"seg.{folder}.caption.txt", lines[split])))
    for split, (folder, ids) in sets.items():
        args += [f"--{split}", str(write_text(release / folder / "ImageSets" / f"{folder}.txt", "\n".join(ids) + "\n"))]
    storage = tmp_path / "flickr30k_cn"
    tool("convert_flickr_cn").main([*args, "--output", str(storage / "annotations")])
    write_images(storage / "images", [f"{i}.jpg" for _, ids in sets.values() for i in ids])

    built = build(tmp_path, "flickr30k_cn_caption", storage)
    assert [built["train"][i]["text_input"] for i in range(3)] == [
        "两个年轻的男人在院子里闲逛。", "两个男人在绿色植物旁边", "几个男人戴着安全帽在操作一个巨大的滑轮系统。"]
    assert eval_ids(built["test"]) == ["flickr30k_1009434119"]
    assert load_coco_gt(built["test"].gt_path) == {"flickr30k_1009434119": ["一只黑白相间的狗在草地上奔跑。",
                                                                           "一只狗在追NBA球"]}


# ------------------------------------------------------------------------------ AI Challenger
def aic_record(sha: str, captions: list[str]) -> dict:
    return {"url": f"http://img.example.com/{sha[:8]}.jpg", "image_id": f"{sha}.jpg", "caption": captions}


def test_aic_caption_round_trip_with_test_from_val(tmp_path):
    train_sha, val_shas = "8f00f3d0f1008e085ab660e70dffced16a8259f6", ["b96ff46ea3f1ce1fb6dc1e5b7c2a2d5f2e9a4a07",
                                                                       "3cd32bef87ed98572bac868418521852ac3f6a70"]
    official = tmp_path / "official"
    write_text(official / "caption_train_annotations_20170902.json", json.dumps([aic_record(train_sha, [
        "两个衣着休闲的人在平整的道路上交谈", "一个穿着红色上衣的男人和一个穿着灰色裤子的男人站在室外的道路上交谈",
        "室外的公园里有两个穿着长裤的男人在交流", "街道上有一个穿着深色外套的男人和一个穿着红色外套的男人在交谈",
        "道路上有一个身穿红色上衣的男人在和一个抬着左手的人讲话\n"])], ensure_ascii=False))
    write_text(official / "caption_validation_annotations_20170910.json", json.dumps(
        [aic_record(val_shas[0], ["一个穿着T恤的男人在 球场上 打篮球"]),
         aic_record(val_shas[1], ["舞台上有一个穿着裙子的女人在唱歌", "一个女人在舞台上唱歌"])], ensure_ascii=False))
    storage = tmp_path / "aic"
    tool("convert_aic_caption").main([
        "--train", str(official / "caption_train_annotations_20170902.json"),
        "--val", str(official / "caption_validation_annotations_20170910.json"), "--test-from-val", "1",
        "--output", str(storage / "annotations")])
    write_images(storage / "images", [f"caption_train_images_20170902/{train_sha}.jpg"]
                 + [f"caption_validation_images_20170910/{sha}.jpg" for sha in val_shas])

    built = build(tmp_path, "aic_caption", storage)
    assert len(built["train"]) == 5 and built["train"][4]["text_input"] == \
        "道路上有一个身穿红色上衣的男人在和一个抬着左手的人讲话"  # the line break is gone
    assert eval_ids(built["val"]) == [f"aic_{val_shas[0]}"] and eval_ids(built["test"]) == [f"aic_{val_shas[1]}"]
    assert load_coco_gt(built["val"].gt_path) == {f"aic_{val_shas[0]}": ["一个穿着T恤的男人在球场上打篮球"]}
    assert len(load_coco_gt(built["test"].gt_path)[f"aic_{val_shas[1]}"]) == 2


def test_aic_caption_rejects_other_files(tmp_path):
    coco_gt = write_text(tmp_path / "coco.json", json.dumps({"images": [], "annotations": []}))
    with pytest.raises(SystemExit, match=r"holds a dict, not AIC's list"):
        tool("convert_aic_caption").main(["--val", str(coco_gt), "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"--test needs --test-images"):
        tool("convert_aic_caption").main(["--test", str(coco_gt), "--output", str(tmp_path / "out")])


# ------------------------------------------------------------------------------------- XM3600
def xm3600_line(key: str, locale: str, zh: list[str]) -> str:
    entry = lambda caps: {"caption": caps, "caption/tokenized": caps, "caption/tokenized/lowercase": caps}  # noqa: E731
    return json.dumps({"image/key": key, "image/locale": locale, "en": entry(["A dog on a sofa."]),
                       "zh": entry(zh)}, ensure_ascii=False)


def test_xm3600_round_trip(tmp_path, capsys):
    lines = [xm3600_line("000411001ff7dd4f", "zh", ["沙发上躺着一只棕色的狗", "一只狗躺在 灰色的沙发上"]),
             xm3600_line("0005b9ba4f6ec2d4", "en", ["一辆红色的公共汽车停在路边"]),
             xm3600_line("0009b1ea2b3b0c2f", "sw", [])]
    captions = write_text(tmp_path / "captions.jsonl", "\n".join(lines) + "\n")
    storage = tmp_path / "xm3600"
    tool("convert_xm3600").main(["--captions", str(captions), "--output", str(storage / "annotations")])
    assert "1 images have no zh caption" in capsys.readouterr().out
    assert not (storage / "annotations" / "xm3600_zh_train.json").exists()  # an evaluation set
    write_images(storage / "images", ["000411001ff7dd4f.jpg", "0005b9ba4f6ec2d4.jpg"])

    built = build(tmp_path, "xm3600_zh_caption", storage)
    assert set(built) == {"test"}
    assert eval_ids(built["test"]) == ["xm3600_000411001ff7dd4f", "xm3600_0005b9ba4f6ec2d4"]
    assert load_coco_gt(built["test"].gt_path)["xm3600_000411001ff7dd4f"] == [
        "沙发上躺着一只棕色的狗", "一只狗躺在灰色的沙发上"]


def test_output_is_utf8_chinese_not_escapes(tmp_path):
    captions = write_text(tmp_path / "captions.jsonl", xm3600_line("000411001ff7dd4f", "zh", ["一只狗"]) + "\n")
    tool("convert_xm3600").main(["--captions", str(captions), "--output", str(tmp_path / "out")])
    assert "一只狗" in (tmp_path / "out" / "xm3600_zh_test.json").read_text(encoding="utf-8")


def test_join_chinese():
    join = tool("convert_zh_common").join_chinese
    assert join("一个 穿 T恤 的 男人  在 看 NBA 2017 比赛") == "一个穿T恤的男人在看NBA 2017比赛"
    assert join("一只:m 狗:n 在:p 叫:v ，:wd 3:m 点:q", pos_tags=True) == "一只狗在叫，3点"
    assert join("比分 是 3:2", pos_tags=True) == "比分是3:2"  # digits after a colon are no tag
