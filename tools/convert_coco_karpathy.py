"""Karpathy's COCO split -> LAVIS's caption files and COCO-format ground truth.

Source: ``dataset_coco.json`` from Karpathy's ``caption_datasets.zip``
(https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip); images: COCO 2014
``train2014.zip`` and ``val2014.zip`` from https://cocodataset.org/#download.

    python tools/convert_coco_karpathy.py --karpathy dataset_coco.json --output /data/coco/annotations

writes, as LAVIS's downloads:

- ``coco_karpathy_train.json``: one record per caption of the train and restval images (113,287
  images), ``{"caption", "image": "train2014/COCO_train2014_....jpg", "image_id": "coco_<cocoid>"}``;
- ``coco_karpathy_val.json`` / ``coco_karpathy_test.json``: one record per image (5,000 each),
  ``{"image", "caption": [its captions]}`` (the evaluation set derives the id from the file name);
- ``coco_karpathy_val_gt.json`` / ``coco_karpathy_test_gt.json``: COCO-format ground truth
  (``images: [{"id": cocoid}]``, ``annotations: [{"image_id", "caption", "id"}]``) for the metric.

Then set ``datasets.coco_caption.build_info.storage=/data/coco`` with the images in
``/data/coco/images/{train2014,val2014}``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def convert(karpathy: dict, restval_in_train: bool = True) -> dict[str, object]:
    """``{file name: content}`` of the five output files."""
    train_splits = {"train", "restval"} if restval_in_train else {"train"}
    train: list[dict] = []
    evals: dict[str, list[dict]] = {"val": [], "test": []}
    gts: dict[str, dict] = {
        split: {"info": {"description": f"COCO Karpathy {split} captions"}, "licenses": [], "type": "captions",
                "images": [], "annotations": []}
        for split in evals
    }
    for image in karpathy["images"]:
        path = f"{image['filepath']}/{image['filename']}"
        captions = [s["raw"] for s in image["sentences"]]
        split = image["split"]
        if split in train_splits:
            train += [{"caption": c, "image": path, "image_id": f"coco_{image['cocoid']}"} for c in captions]
        elif split in evals:
            evals[split].append({"image": path, "caption": captions})
            gts[split]["images"].append({"id": image["cocoid"], "file_name": image["filename"]})
            gts[split]["annotations"] += [{"image_id": image["cocoid"], "caption": s["raw"], "id": s["sentid"]}
                                          for s in image["sentences"]]
    out: dict[str, object] = {"coco_karpathy_train.json": train}
    for split in evals:
        out[f"coco_karpathy_{split}.json"] = evals[split]
        out[f"coco_karpathy_{split}_gt.json"] = gts[split]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--karpathy", required=True, help="Karpathy's dataset_coco.json")
    parser.add_argument("--output", required=True, help="folder for the LAVIS-format files")
    parser.add_argument("--no-restval", action="store_true", help="leave the restval images out of train")
    args = parser.parse_args(argv)
    karpathy = json.loads(Path(args.karpathy).read_text(encoding="utf-8"))
    if not isinstance(karpathy, dict) or "images" not in karpathy:
        raise SystemExit(f"{args.karpathy}: not Karpathy's split file (no 'images' list)")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for name, content in convert(karpathy, restval_in_train=not args.no_restval).items():
        (output / name).write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
        print(f"{output / name}: {len(content) if isinstance(content, list) else len(content['images'])} entries")


if __name__ == "__main__":
    main()
