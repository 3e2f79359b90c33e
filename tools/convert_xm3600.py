"""Crossmodal-3600 (XM3600), Chinese references -> the files of ``xm3600_zh_caption``.

Source: https://google.github.io/crossmodal-3600/ ("Captions": ``web-data/captions.zip`` holding
``captions.jsonl``; "Images": https://open-images-dataset.s3.amazonaws.com/crossmodal-3600/images.tgz,
3,600 Open Images photos ``<key>.jpg``). Each line of ``captions.jsonl`` is one image:
``{"image/key": "<key>", "image/locale": "<locale>", "<lang>": {"caption": [...], "caption/tokenized":
[...], "caption/tokenized/lowercase": [...]}, ...}`` for 36 languages, ``zh`` among them.

XM3600 is an evaluation set: it has no training split, so this writes only the test split.

    python tools/convert_xm3600.py --captions captions.jsonl --output /data/xm3600/annotations

writes ``xm3600_zh_test.json`` and ``xm3600_zh_test_gt.json`` (tools/convert_zh_common.py) from the
untokenized ``zh`` captions (spaces dropped); images without a ``zh`` caption are left out. Unpack
the images into ``/data/xm3600/images`` and set ``datasets.xm3600_zh_caption.build_info.storage=
/data/xm3600``.

The keys are confirmed by google-research/big_vision's XM3600 reader (``image/key``, ``<lang>``
-> ``caption``; images ``<key>.jpg``) and published readers (``image/locale``, ``caption/tokenized``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_zh_common import Image, caption_files, join_chinese, read_lines, write_files  # noqa: E402


def read_xm3600(path: str | Path, language: str = "zh") -> tuple[list[Image], int]:
    """(the images with ``language`` captions, number of lines without any)."""
    images, without = [], 0
    for number, line in read_lines(path):
        try:
            record = json.loads(line)
            key, entry = record["image/key"], record.get(language) or {}
        except (ValueError, KeyError, TypeError):
            raise SystemExit(f"{path}:{number}: not an XM3600 captions.jsonl line (a json object with "
                             f"\"image/key\"): {line[:80]!r}") from None
        captions = [c for c in (join_chinese(c) for c in entry.get("caption", [])) if c]
        if captions:
            images.append(Image(f"{key}.jpg", f"xm3600_{key}", captions))
        else:
            without += 1
    return images, without


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", required=True, help="captions.jsonl from XM3600's captions.zip")
    parser.add_argument("--output", required=True, help="folder for the LAVIS-format files")
    args = parser.parse_args(argv)
    images, without = read_xm3600(args.captions)
    if without:
        print(f"{without} images have no zh caption; left out")
    write_files(args.output, caption_files("xm3600_zh", {"test": images}))


if __name__ == "__main__":
    main()
