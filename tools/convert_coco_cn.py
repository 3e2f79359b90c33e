"""COCO-CN (Chinese sentences for COCO 2014 images) -> the files of ``coco_cn_caption``.

Source: ``coco-cn-version1805v1.1.tar.gz``, linked from https://github.com/li-xirong/coco-cn (now
https://huggingface.co/datasets/AIMClab/COCO-CN). Unpacked, ``coco-cn-version1805v1.1/`` holds:

- ``coco-cn_train.txt``, ``coco-cn_val.txt``, ``coco-cn_test.txt``: one COCO file name without
  ``.jpg`` per line, ``COCO_train2014_000000128475`` or ``COCO_val2014_000000217153`` (18,341 /
  1,000 / 1,000 images; each split draws on both COCO folders);
- ``imageid.human-written-caption.txt``: ``<image>#<n><TAB><sentence>`` per line (22,218 sentences,
  about one per image);
- ``imageid.manually-translated-caption.txt``: the same keys, human translations of the English COCO
  captions of the test images (5,000, five per image).

Images: COCO 2014 ``train2014.zip`` and ``val2014.zip`` (https://cocodataset.org/#download).

    python tools/convert_coco_cn.py --coco-cn coco-cn-version1805v1.1 --output /data/coco_cn/annotations

writes ``coco_cn_{train,val,test}.json`` and ``coco_cn_{val,test}_gt.json`` (see
tools/convert_zh_common.py): train records are the human-written sentences; the val / test
references are the human-written sentences plus the manual translations (test only; ``--no-translated``
leaves them out, leaving about one reference per image). ``--karpathy dataset_coco.json`` also prints
how many val / test images are in COCO's Karpathy train + restval split, which COCO-trained
checkpoints (BLIP-2 stage 1 among them) have seen. Set ``datasets.coco_cn_caption.build_info.storage=
/data/coco_cn`` and ``.images`` to the folder holding ``train2014/`` and ``val2014/``.

The sentence-file layout is confirmed by the repository's own ``data/coco-cn_ext.icap2020.txt`` (same
keys and tab) and by published parsers of the archive; the manual-translation file's separator is not
(either a tab or a space is read).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_zh_common import Image, caption_files, join_chinese, read_lines, write_files  # noqa: E402

SPLITS = {"train": "coco-cn_train.txt", "val": "coco-cn_val.txt", "test": "coco-cn_test.txt"}
WRITTEN = "imageid.human-written-caption.txt"
TRANSLATED = "imageid.manually-translated-caption.txt"
_COCO_NAME = re.compile(r"COCO_(train|val)2014_(\d{12})")


def read_sentences(path: Path) -> dict[str, list[str]]:
    """COCO name -> its sentences, from ``<name>#<n><TAB or space><sentence>`` lines."""
    sentences: dict[str, list[str]] = defaultdict(list)
    for number, line in read_lines(path):
        key, _, text = line.replace("\t", " ", 1).partition(" ")
        if "#" not in key:
            raise SystemExit(f"{path}:{number}: {line[:80]!r} does not start with '<image>#<n>'; "
                             "pass the folder holding COCO-CN's sentence files")
        sentence = join_chinese(text)
        if sentence:
            sentences[key.split("#")[0]].append(sentence)
    return sentences


def read_split(path: Path) -> list[str]:
    names = [line for _, line in read_lines(path)]
    bad = [n for n in names if not _COCO_NAME.fullmatch(n)]
    if bad:
        raise SystemExit(f"{path}: {len(bad)} line(s) are not COCO 2014 names such as "
                         f"COCO_val2014_000000217153, e.g. {bad[0]!r}")
    return names


def convert(splits: dict[str, list[str]], sentences: dict[str, list[str]]) -> dict[str, list[Image]]:
    """Split -> its images with their sentences; images without any are left out."""
    out: dict[str, list[Image]] = {}
    for split, names in splits.items():
        out[split] = []
        for name in names:
            folder, number = _COCO_NAME.fullmatch(name).groups()
            if sentences.get(name):
                out[split].append(Image(f"{folder}2014/{name}.jpg", f"coco_{int(number)}", sentences[name]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco-cn", required=True, help="the unpacked coco-cn-version1805v1.1 folder")
    parser.add_argument("--output", required=True, help="folder for the LAVIS-format files")
    parser.add_argument("--no-translated", action="store_true",
                        help=f"leave {TRANSLATED} out of the test references")
    parser.add_argument("--karpathy", help="Karpathy's dataset_coco.json: report val/test images in its train")
    args = parser.parse_args(argv)
    root = Path(args.coco_cn)
    needed = [*SPLITS.values(), WRITTEN] + ([] if args.no_translated else [TRANSLATED])
    missing = [name for name in needed if not (root / name).is_file()]
    if missing:
        raise SystemExit(f"{root}: no {', '.join(missing)}; pass the unpacked coco-cn-version1805v1.1 folder "
                         "as --coco-cn" + ("" if args.no_translated else f" (or --no-translated without {TRANSLATED})"))
    splits = {split: read_split(root / name) for split, name in SPLITS.items()}
    written = read_sentences(root / WRITTEN)
    train = convert({"train": splits["train"]}, written)
    references = dict(written)
    if not args.no_translated:
        for name, extra in read_sentences(root / TRANSLATED).items():
            references[name] = written.get(name, []) + extra
    images = {**train, **convert({s: splits[s] for s in ("val", "test")}, references)}
    for split, names in splits.items():
        if len(images[split]) < len(names):
            print(f"{split}: {len(names) - len(images[split])} of {len(names)} images have no sentence; left out")
    write_files(args.output, caption_files("coco_cn", images))
    if args.karpathy:
        karpathy = json.loads(Path(args.karpathy).read_text(encoding="utf-8"))
        seen = {f"{im['filepath']}/{im['filename']}" for im in karpathy["images"]
                if im["split"] in ("train", "restval")}
        for split in ("val", "test"):
            overlap = sum(im.path in seen for im in images[split])
            print(f"{split}: {overlap:,} of {len(images[split]):,} images are in COCO Karpathy train/restval "
                  "(seen by COCO-trained checkpoints)")


if __name__ == "__main__":
    main()
