"""Flickr8k-CN or Flickr30k-CN (Chinese sentences for Flickr images) -> the files of
``flickr8k_cn_caption`` / ``flickr30k_cn_caption``.

Both come from Xirong Li's group in the same text layout: one sentence per line,
``<image>#<tag>#<n> <sentence>``, the key and the sentence separated by a space; ``<image>`` is the
Flickr file name with or without ``.jpg``, ``<tag>`` names the source (zhc: written by Chinese
speakers, zhb / zhg: Baidu / Google translation, zhm: human translation). Split files list one image
per line (with or without ``.jpg``).

Flickr8k-CN: https://github.com/li-xirong/flickr8kcn, folder ``data/``: ``flickr8kzhc.caption.txt``
(40,455 written sentences, five per image, all splits), ``flickr8kzhmtest.captions.txt`` (5,000 human
translations, test only), the splits ``flickr8ktrain.txt`` / ``flickr8kval.txt`` / ``flickr8ktest.txt``
(6,000 / 1,000 / 1,000 images; Flickr8k's own ``Flickr_8k.{train,dev,test}Images.txt`` work too).
Images: Flickr8k's ``Flickr8k_Dataset.zip`` (``<name>.jpg``).

    python tools/convert_flickr_cn.py --name flickr8k_cn --captions flickr8kzhc.caption.txt \\
        --train flickr8ktrain.txt --val flickr8kval.txt --test flickr8ktest.txt --output /data/flickr8k_cn/annotations

Flickr30k-CN: ``flickr30k-cn.tar.gz`` (http://lixirong.net/data/mm2017/flickr30k-cn.tar.gz, from
https://github.com/weiyuk/fluent-cap's ``download_cn_data.sh``), one folder per split:
``flickr30kzhbbosontrain`` (Baidu translations, 29,783 images), ``flickr30kzhbbosonval`` (1,000),
``flickr30kzhmbosontest`` (human translations, 1,000), each with ``ImageSets/<folder>.txt`` (image ids)
and ``TextData/seg.<folder>.caption.txt``: word-segmented sentences (BosonNLP), the test file's words
tagged ``word:pos``. ``--segmented`` joins the words and drops the tags. Images: Flickr30k's
``flickr30k-images/`` (``<id>.jpg``).

    F=flickr30k-cn; S=TextData/seg; I=ImageSets
    python tools/convert_flickr_cn.py --name flickr30k_cn --segmented \\
        --captions $F/flickr30kzhbbosontrain/$S.flickr30kzhbbosontrain.caption.txt \\
                   $F/flickr30kzhbbosonval/$S.flickr30kzhbbosonval.caption.txt \\
                   $F/flickr30kzhmbosontest/$S.flickr30kzhmbosontest.caption.txt \\
        --train $F/flickr30kzhbbosontrain/$I/flickr30kzhbbosontrain.txt \\
        --val $F/flickr30kzhbbosonval/$I/flickr30kzhbbosonval.txt \\
        --test $F/flickr30kzhmbosontest/$I/flickr30kzhmbosontest.txt --output /data/flickr30k_cn/annotations

writes ``<name>_{train,val,test}.json`` and ``<name>_{val,test}_gt.json`` (tools/convert_zh_common.py):
every sentence the ``--captions`` files give an image, so adding ``flickr8kzhmtest.captions.txt`` adds
the human translations to the Flickr8k-CN test references.

Confirmed from the flickr8kcn repository's files: the Flickr8k-CN layout. Flickr30k-CN's archive could
not be read here: its layout is taken from fluent-cap's reader (``<key> <words>``, words split on
spaces, ``word:pos`` tags) and published converters of the archive; one of them reads a run of two or
more spaces in the Baidu files as a dropped comma, which is not restored here.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_zh_common import Image, caption_files, join_chinese, read_lines, write_files  # noqa: E402


def image_key(name: str) -> str:
    """``1000268201_693b08cb0e.jpg`` / ``1000268201_693b08cb0e`` -> ``1000268201_693b08cb0e``."""
    return name[:-4] if name.lower().endswith(".jpg") else name


def read_sentences(paths: list[str], segmented: bool) -> dict[str, list[str]]:
    """Image key -> its sentences, from ``<image>#...`` lines of every file in ``paths``."""
    sentences: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        for number, line in read_lines(path):
            key, _, text = line.replace("\t", " ", 1).partition(" ")
            if "#" not in key:
                raise SystemExit(f"{path}:{number}: {line[:80]!r} does not start with '<image>#<tag>#<n>'; "
                                 "is this a Flickr8k-CN / Flickr30k-CN sentence file?")
            sentence = join_chinese(text, pos_tags=segmented)
            if sentence:
                sentences[image_key(key.split("#")[0])].append(sentence)
    return sentences


def convert(name: str, splits: dict[str, list[str]], sentences: dict[str, list[str]]) -> dict[str, list[Image]]:
    """Split -> its images with their sentences (images without any are left out). ``name``: flickr8k_cn
    or flickr30k_cn; the ids are ``flickr8k_<key>`` / ``flickr30k_<key>``."""
    prefix = name.removesuffix("_cn")
    return {split: [Image(f"{key}.jpg", f"{prefix}_{key}", sentences[key]) for key in keys if sentences.get(key)]
            for split, keys in splits.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, choices=["flickr8k_cn", "flickr30k_cn"], help="output file prefix")
    parser.add_argument("--captions", required=True, nargs="+", help="sentence file(s): <image>#<tag>#<n> <sentence>")
    parser.add_argument("--segmented", action="store_true", help="sentences are word-segmented, words may carry :pos")
    for split in ("train", "val", "test"):
        parser.add_argument(f"--{split}", help=f"file listing the {split} images (leave out to skip the split)")
    parser.add_argument("--output", required=True, help="folder for the LAVIS-format files")
    args = parser.parse_args(argv)
    files = {split: getattr(args, split) for split in ("train", "val", "test") if getattr(args, split)}
    if not files:
        raise SystemExit("no split file given; pass --train, --val and/or --test")
    splits = {split: [image_key(line) for _, line in read_lines(path)] for split, path in files.items()}
    owner: dict[str, str] = {}
    for split, keys in splits.items():
        for key in keys:
            if owner.setdefault(key, split) != split:
                raise SystemExit(f"image {key} is listed in both the {owner[key]} and the {split} split files "
                                 f"({files[owner[key]]}, {files[split]}); the splits must not share images")
    sentences = read_sentences(args.captions, args.segmented)
    images = convert(args.name, splits, sentences)
    for split, keys in splits.items():
        if len(images[split]) < len(keys):
            print(f"{split}: {len(keys) - len(images[split])} of {len(keys)} images have no sentence in "
                  f"{', '.join(args.captions)}; left out")
    unused = sum(len(v) for k, v in sentences.items() if k not in owner)
    if unused:
        print(f"{unused:,} sentences describe images in none of the split files; left out")
    write_files(args.output, caption_files(args.name, images))


if __name__ == "__main__":
    main()
