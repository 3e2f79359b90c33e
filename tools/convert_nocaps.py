"""NoCaps image info -> LAVIS's nocaps_{val,test}.json ({"image", "img_id"}).

Source: https://nocaps.org/download: ``nocaps_val_4500_captions.json`` (val: image info and the
ground-truth captions, COCO format: used as is by the metric) and ``nocaps_test_image_info.json``
(test: image info only); the images are fetched from the ``coco_url`` of each image entry.

    python tools/convert_nocaps.py --nocaps nocaps_val_4500_captions.json --image-folder val \\
        --output /data/nocaps/annotations/nocaps_val.json
    python tools/convert_nocaps.py --nocaps nocaps_test_image_info.json --image-folder test \\
        --output /data/nocaps/annotations/nocaps_test.json
    cp nocaps_val_4500_captions.json /data/nocaps/annotations/

with the images in /data/nocaps/images/val/ and /data/nocaps/images/test/. Each record:
``{"image": "<folder>/<file_name>", "img_id": <id in the ground truth>, "domain"}``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def convert(info: dict, image_folder: str) -> list[dict]:
    prefix = f"{image_folder.strip('/')}/" if image_folder else ""
    return [{"image": prefix + image["file_name"], "img_id": image["id"],
             **({"domain": image["domain"]} if "domain" in image else {})} for image in info["images"]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nocaps", required=True, help="nocaps_val_4500_captions.json or nocaps_test_image_info.json")
    parser.add_argument("--image-folder", default="", help="folder of these images under the image root (val, test)")
    parser.add_argument("--output", required=True, help="LAVIS-format json to write")
    args = parser.parse_args(argv)
    info = json.loads(Path(args.nocaps).read_text(encoding="utf-8"))
    if not isinstance(info, dict) or "images" not in info:
        raise SystemExit(f"{args.nocaps}: not a NoCaps image info file (no 'images' list)")
    records = convert(info, args.image_folder)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    print(f"{args.output}: {len(records)} images")


if __name__ == "__main__":
    main()
