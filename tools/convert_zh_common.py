"""What the Chinese caption converters share (a module, not a command): caption cleaning and the
files they write, in the coco_caption conventions (as tools/convert_coco_karpathy.py):

- ``<name>_train.json``: one record per caption, ``{"image", "caption", "image_id"}``;
- ``<name>_val.json`` / ``<name>_test.json``: one record per image, ``{"image", "caption": [its
  captions], "image_id"}``;
- ``<name>_val_gt.json`` / ``<name>_test_gt.json``: COCO-format ground truth for CIDEr / BLEU
  (``images: [{"id", "file_name"}]``, ``annotations: [{"image_id", "caption", "id"}]``) whose ids are
  the eval records' ``image_id``.

Image ids are strings with a data set prefix (``"coco_391895"``, ``"flickr30k_1000092795"``), so an
image keeps one id when several training sets are mixed (the ITC loss treats equal ids as
positives). Files are UTF-8 with the Chinese written as is (``ensure_ascii=False``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator, NamedTuple

_POS_TAG = re.compile(r"(?<=.):[A-Za-z][A-Za-z0-9]*$")  # "男人:n" -> "男人"; a tagged ASCII colon "::wd" -> ":"
_LATIN_OR_DIGIT = re.compile(r"[A-Za-z0-9]")


class Image(NamedTuple):
    path: str  # relative to the data set's image folder
    image_id: str
    captions: list[str]


def join_chinese(text: str, pos_tags: bool = False) -> str:
    """Chinese text without its spaces, which only segment words ("一个 穿 T恤 的 男人" -> "一个穿T恤的男人");
    a space stays between two Latin words or numbers ("NBA 2017" stays). ``pos_tags``: the words carry a
    part-of-speech tag after a colon ("男人:n"), which is dropped."""
    words = text.split()
    if pos_tags:
        words = [_POS_TAG.sub("", word) for word in words]
    out = ""
    for word in words:
        if out and _LATIN_OR_DIGIT.match(out[-1]) and _LATIN_OR_DIGIT.match(word[0]):
            out += " "
        out += word
    return out


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) of the non-empty lines of a UTF-8 text file (a BOM is ignored)."""
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line.strip()


def caption_files(name: str, splits: dict[str, list[Image]]) -> dict[str, Any]:
    """``{file name: content}`` for the splits given (train, val, test)."""
    files: dict[str, Any] = {}
    for split, images in splits.items():
        if split == "train":
            files[f"{name}_train.json"] = [{"image": im.path, "caption": c, "image_id": im.image_id}
                                           for im in images for c in im.captions]
            continue
        files[f"{name}_{split}.json"] = [{"image": im.path, "caption": im.captions, "image_id": im.image_id}
                                         for im in images]
        pairs = [(im.image_id, c) for im in images for c in im.captions]
        files[f"{name}_{split}_gt.json"] = {
            "info": {"description": f"{name} {split} captions"}, "licenses": [], "type": "captions",
            "images": [{"id": im.image_id, "file_name": im.path} for im in images],
            "annotations": [{"image_id": i, "caption": c, "id": n} for n, (i, c) in enumerate(pairs)],
        }
    return files


def write_files(output: str | Path, files: dict[str, Any]) -> None:
    """Write ``files`` into the folder ``output`` (created), printing what each holds."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (output / name).write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
        held = (f"{len(content):,} records" if isinstance(content, list)
                else f"{len(content['images']):,} images, {len(content['annotations']):,} captions")
        print(f"{output / name}: {held}")
