"""Image pipeline throughput: JPEG decode + ``blip_image_train`` / ``blip_image_eval`` at 224 px, through a
DataLoader with 0, 1 and 2 workers, with and without reduced-size JPEG decoding.

    python bench/bench_images.py                                   # 640x480, ~1 min on 2 cores
    python bench/bench_images.py --width 1280 --height 960 --json bench/results/images_1280_cpu.json

Writes ``--images`` synthetic photo-like JPEGs (smooth gradients, soft shapes, sensor noise; quality
90) to a temp dir. A sample is what a data set does: ``lavis_lite.data.datasets.load_image`` (open,
optional draft, decode to RGB) -> processor. ``--draft`` modes: ``off`` (full decode), ``on`` (the
processor's ``draft()``, what the data sets use: 1/2, 1/4 or 1/8 scale only when every crop/resize
keeps ``image_size`` px; see lavis_lite/data/processors.py). Per configuration one untimed epoch (workers start, files
enter the page cache), then ``--epochs`` timed epochs with persistent workers; images/s per worker
divides by the number of worker processes (the main process for 0 workers).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from common import environment, print_table, set_threads, write_json
from lavis_lite.data.datasets import load_image
from lavis_lite.data.processors import build_processor


def write_images(folder: Path, count: int, width: int, height: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(count):
        fx, fy, phase = rng.uniform(20, 120, 3)
        colour = rng.uniform(0, 255, (3,))
        base = np.stack([colour[0] * x / width, colour[1] * y / height,
                         127 + 100 * np.sin(x / fx + y / fy + phase)], axis=-1)
        for _ in range(4):  # soft discs
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, height / 3)
            disc = np.clip(1.5 - np.hypot(x - cx, y - cy) / r, 0, 1)[..., None]
            base = base * (1 - disc) + rng.uniform(0, 255, (3,)) * disc
        base += rng.normal(0, 6, base.shape)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


class Images(Dataset):
    def __init__(self, paths: list[Path], processor: Any, draft: str):
        self.paths, self.processor, self.draft = paths, processor, draft

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, tuple[int, int]]:
        image = load_image(self.paths[index], self.processor.draft if self.draft == "on" else None)
        return self.processor(image), image.size


def bench(paths: list[Path], processor_name: str, draft: str, workers: int, args: argparse.Namespace) -> dict:
    processor = build_processor({"name": processor_name, "image_size": args.image_size,
                                 "jpeg_draft": draft == "on"})
    loader = DataLoader(Images(paths, processor, draft), batch_size=args.batch_size, num_workers=workers,
                        persistent_workers=workers > 0)
    decoded = None
    for _, sizes in loader:  # untimed epoch
        decoded = (int(sizes[0][0]), int(sizes[1][0]))
    start = time.perf_counter()
    for _ in range(args.epochs):
        for images, _ in loader:
            assert images.shape[1:] == (3, args.image_size, args.image_size)
    elapsed = time.perf_counter() - start
    rate = len(paths) * args.epochs / elapsed
    return {"processor": processor_name, "draft": draft, "workers": workers,
            "decoded_size": f"{decoded[0]}x{decoded[1]}", "images_per_s": rate,
            "images_per_s_per_worker": rate / max(workers, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--processors", nargs="+", default=["blip_image_train", "blip_image_eval"])
    parser.add_argument("--draft", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs (after one untimed)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads of the main process (1: as each DataLoader worker)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    results: dict[str, Any] = {**environment(torch.device("cpu")), "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.images, args.width, args.height)
        results["mean_file_kb"] = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        for name in args.processors:
            for draft in args.draft:
                for workers in args.workers:
                    results["runs"].append(bench(paths, name, draft, workers, args))
    print(f"{args.images} JPEGs {args.width}x{args.height} (~{results['mean_file_kb']:.0f} KB) -> "
          f"{args.image_size} px, batch {args.batch_size}, {results['device']}")
    print_table(results["runs"], [("processor", "processor"), ("draft", "draft"), ("decoded_size", "decoded"),
                                  ("workers", "workers"), ("images_per_s", "images/s"),
                                  ("images_per_s_per_worker", "images/s per worker")])
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
