"""A LAVIS caption json + its image folder -> webdataset tar shards for ``laion_wds`` / ``image_text_wds``.

Source: any caption json in LAVIS's format (``[{"image": <path under the image folder>, "caption":
<text or list of texts>, "image_id"?}]``), e.g. coco_karpathy_train.json or vg_caption.json (see
tools/README.md). LAION / CC shards made by img2dataset need no conversion.

    python tools/make_wds_shards.py --annotations /data/coco/annotations/coco_karpathy_train.json \\
        --images /data/coco/images --output /data/coco_wds --samples-per-shard 10000

writes ``/data/coco_wds/00000.tar, 00001.tar, ...``: one sample per caption, key ``%09d``, members
``<key>.jpg`` (the original file bytes when JPEG/PNG/WEBP, else re-encoded as JPEG), ``<key>.txt``
(the caption) and ``<key>.json`` ({"caption", "image_id", "image"}), and beside each shard an
img2dataset-style ``<shard>_stats.json`` with its ``successes``, from which the builder counts
``num_samples``. It prints the ``build_info.storage`` pattern to set. Records are shuffled (seeded)
before writing unless --no-shuffle; unreadable images are skipped and counted (or fail with --strict).
"""
from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

from PIL import Image
from webdataset import TarWriter

_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def image_member(path: Path) -> tuple[str, bytes]:
    """(extension, bytes) of an image file, verified to decode."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.format in _EXT:
            return _EXT[image.format], data
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
        return "jpg", buffer.getvalue()


def pairs(records: list[dict]) -> list[tuple[str, str, object]]:
    """(image path, caption, image id) per caption."""
    out = []
    for record in records:
        captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
        image_id = record.get("image_id", Path(record["image"]).stem)
        out += [(record["image"], caption, image_id) for caption in captions]
    return out


def write_shards(records: list[dict], image_root: Path, output: Path, samples_per_shard: int = 10000,
                 seed: int | None = 0, strict: bool = False) -> tuple[list[Path], int, int]:
    """Write the shards; returns (shard paths, samples written, bad images skipped)."""
    items = pairs(records)
    if seed is not None:
        random.Random(seed).shuffle(items)
    output.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    written = bad = 0
    writer, in_shard = None, 0
    for image, caption, image_id in items:
        try:
            ext, data = image_member(image_root / image)
        except (OSError, SyntaxError, ValueError) as err:
            if strict:
                raise SystemExit(f"cannot read {image_root / image} ({type(err).__name__}: {err})") from None
            bad += 1
            print(f"skipped unreadable image {image_root / image} ({type(err).__name__}: {err})")
            continue
        if writer is None:
            shards.append(output / f"{len(shards):05d}.tar")
            writer, in_shard = TarWriter(str(shards[-1])), 0
        key = f"{written:09d}"
        writer.write({"__key__": key, ext: data, "txt": caption,
                      "json": json.dumps({"caption": caption, "image_id": image_id, "image": image},
                                         ensure_ascii=False).encode("utf-8")})
        written, in_shard = written + 1, in_shard + 1
        if in_shard == samples_per_shard:
            writer.close()
            _write_stats(shards[-1], in_shard)
            writer = None
    if writer is not None:
        writer.close()
        _write_stats(shards[-1], in_shard)
    return shards, written, bad


def _write_stats(shard: Path, count: int) -> None:
    shard.with_name(f"{shard.stem}_stats.json").write_text(json.dumps({"count": count, "successes": count}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True, nargs="+", help="LAVIS caption json file(s)")
    parser.add_argument("--images", required=True, help="image folder the json's image paths are relative to")
    parser.add_argument("--output", required=True, help="folder for the shards")
    parser.add_argument("--samples-per-shard", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed for the record order")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the json's order")
    parser.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    args = parser.parse_args(argv)
    if args.samples_per_shard < 1:
        raise SystemExit("--samples-per-shard must be >= 1")
    records: list[dict] = []
    for path in args.annotations:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(isinstance(r, dict) and "image" in r and "caption" in r for r in data):
            raise SystemExit(f"{path}: expected a LAVIS caption json (a list of {{image, caption}})")
        records += data
    shards, written, bad = write_shards(records, Path(args.images), Path(args.output), args.samples_per_shard,
                                        None if args.no_shuffle else args.seed, args.strict)
    if not shards:
        raise SystemExit("no sample written (every image unreadable?)")
    pattern = str(Path(args.output) / f"{{00000..{len(shards) - 1:05d}}}.tar")
    print(f"{written} samples in {len(shards)} shards ({bad} unreadable images skipped)")
    print(f"set: datasets.image_text_wds.build_info.storage={pattern} "
          f"(num_samples={written}, read from the stats files)")


if __name__ == "__main__":
    main()
