"""AI Challenger 2017 image Chinese captioning (AIC-ICC) -> the files of ``aic_caption``.

Source: ``ai_challenger_caption_train_20170902.zip`` and ``ai_challenger_caption_validation_20170910.zip``
(the challenge site is gone; the data set is mirrored, e.g. as "AI Challenger" on OpenDataLab /
https://tianchi.aliyun.com/dataset/145781). Each holds an image folder and one json list of
``{"url", "image_id": "<sha1>.jpg", "caption": [five sentences]}``:

- train: ``caption_train_annotations_20170902.json`` + ``caption_train_images_20170902/`` (210,000 images);
- validation: ``caption_validation_annotations_20170910.json`` + ``caption_validation_images_20170910/``
  (30,000 images).

The test sets' sentences came out after the challenge (``caption_test_a_annotations_20180103.json``
and ``..._test_b_...`` in published readers; not seen here, assumed to share the layout): pass one as
``--test`` with its image folder name as ``--test-images``. Without them, carve the test split out of
the validation set: ``--test-from-val 10000`` moves the last 10,000 validation images (file order).

    python tools/convert_aic_caption.py --train caption_train_annotations_20170902.json \\
        --val caption_validation_annotations_20170910.json --test-from-val 10000 --output /data/aic/annotations

writes ``aic_caption_{train,val,test}.json`` and ``aic_caption_{val,test}_gt.json``
(tools/convert_zh_common.py); the image paths are ``<image folder>/<image_id>``, relative to a folder
holding the unzipped image folders (``datasets.aic_caption.build_info.images``). Sentences lose their
line breaks and spaces, as the official baseline's reader does (it also drops a final "。"; kept here).

The layout is confirmed by the official baseline's reader (AIChallenger/AI_Challenger_2017,
``Baselines/caption_baseline/build_tfrecord.py``: ``image_id``, ``caption`` list) and the file names by
published readers; ``url`` is not read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_zh_common import Image, caption_files, join_chinese, write_files  # noqa: E402

IMAGE_FOLDERS = {"train": "caption_train_images_20170902", "val": "caption_validation_images_20170910", "test": None}


def read_annotations(path: str | Path, folder: str) -> list[Image]:
    """The images of one AIC annotation file, their paths under ``folder``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise SystemExit(f"{path}: holds a {type(data).__name__}, not AIC's list of "
                         "{\"url\", \"image_id\", \"caption\"} records")
    images = []
    for n, record in enumerate(data):
        if not isinstance(record, dict) or not isinstance(record.get("image_id"), str) \
                or not isinstance(record.get("caption"), list):
            raise SystemExit(f"{path}: record {n} is {str(record)[:120]}, not {{\"image_id\": \"<sha1>.jpg\", "
                             "\"caption\": [...]}; is this an AI Challenger caption annotation file?")
        captions = [c for c in (join_chinese(c) for c in record["caption"] if isinstance(c, str)) if c]
        if captions:
            images.append(Image(f"{folder}/{record['image_id']}", f"aic_{Path(record['image_id']).stem}", captions))
    return images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", help="caption_train_annotations_20170902.json")
    parser.add_argument("--val", help="caption_validation_annotations_20170910.json")
    parser.add_argument("--test", help="a test annotation file in the same layout, if you have one")
    parser.add_argument("--test-from-val", type=int, default=0, metavar="N",
                        help="move the last N validation images to the test split")
    for split, folder in IMAGE_FOLDERS.items():
        parser.add_argument(f"--{split}-images", default=folder, help=f"{split} image folder name"
                            + (f" (default {folder})" if folder else " (needed with --test)"))
    parser.add_argument("--output", required=True, help="folder for the LAVIS-format files")
    args = parser.parse_args(argv)
    if args.test and args.test_from_val:
        raise SystemExit("give either --test or --test-from-val, not both")
    if args.test and not args.test_images:
        raise SystemExit("--test needs --test-images: the name of the folder holding the test images")
    images = {split: read_annotations(getattr(args, split), getattr(args, f"{split}_images"))
              for split in ("train", "val", "test") if getattr(args, split)}
    if not images:
        raise SystemExit("no annotation file given; pass --train, --val and/or --test")
    if args.test_from_val:
        val = images.get("val", [])
        if not 0 < args.test_from_val < len(val):
            raise SystemExit(f"--test-from-val {args.test_from_val}: needs --val with more than that many images "
                             f"(it has {len(val)})")
        images["val"], images["test"] = val[:-args.test_from_val], val[-args.test_from_val:]
    write_files(args.output, caption_files("aic_caption", images))


if __name__ == "__main__":
    main()
