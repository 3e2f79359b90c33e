"""Visual Genome region descriptions -> LAVIS's caption json (vg_caption.json), one record per region.

Sources (https://homes.cs.washington.edu/~ranjay/visualgenome/api.html, version 1.2):
``region_descriptions.json.zip`` and ``image_data.json.zip``; images ``images.zip`` (VG_100K/) and
``images2.zip`` (VG_100K_2/), unpacked side by side into one image folder.

    python tools/convert_vg_captions.py --regions region_descriptions.json --image-data image_data.json \\
        --output /data/vg/annotations/vg_caption.json

Each record: ``{"image": "VG_100K/1.jpg", "caption": <region phrase>, "image_id": "vg_1"}``, the path
taken from the image's url (so VG_100K vs VG_100K_2 is right), relative to the image folder. Empty
phrases and, per image, repeated phrases (case and surrounding space ignored) are dropped; so are
regions smaller than ``--min-area`` of the image, if given. LAVIS's own vg_caption.json is a
filtered subset whose filter is not published, so the record count differs from it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _image_id(entry: dict) -> int:
    return entry["image_id"] if "image_id" in entry else entry["id"]  # v1.2+ / v1.0


def convert(regions: list[dict], image_data: list[dict], min_area: float = 0.0, dedupe: bool = True) -> list[dict]:
    images = {_image_id(e): e for e in image_data}
    records = []
    for entry in regions:
        image_id = _image_id(entry)
        if image_id not in images:
            raise ValueError(f"image {image_id} of region_descriptions is not in image_data; use files of the "
                             "same Visual Genome version")
        info = images[image_id]
        path = "/".join(info["url"].split("/")[-2:])
        area = info["width"] * info["height"]
        seen: set[str] = set()
        for region in entry["regions"]:
            phrase = " ".join(region["phrase"].split())
            norm = phrase.lower()
            if not phrase or (dedupe and norm in seen):
                continue
            if min_area and region["width"] * region["height"] < min_area * area:
                continue
            seen.add(norm)
            records.append({"image": path, "caption": phrase, "image_id": f"vg_{image_id}"})
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regions", required=True, help="region_descriptions.json")
    parser.add_argument("--image-data", required=True, help="image_data.json")
    parser.add_argument("--output", required=True, help="vg_caption.json to write")
    parser.add_argument("--min-area", type=float, default=0.0, help="drop regions below this fraction of the image")
    parser.add_argument("--keep-duplicates", action="store_true", help="keep repeated phrases of an image")
    args = parser.parse_args(argv)
    regions = json.loads(Path(args.regions).read_text(encoding="utf-8"))
    image_data = json.loads(Path(args.image_data).read_text(encoding="utf-8"))
    records = convert(regions, image_data, args.min_area, dedupe=not args.keep_duplicates)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    print(f"{args.output}: {len(records)} region captions of {len({r['image'] for r in records})} images")


if __name__ == "__main__":
    main()
