"""Image pipeline throughput: JPEG file -> ``blip_image_train`` / ``blip_image_eval`` at 224 px, PIL
transform (``--backend pil``, with or without ``draft()``) against the tensor pipeline (``tensor``).

    python bench/bench_images.py                                   # 640x480, both backends, ~1 min
    python bench/bench_images.py --width 1280 --height 960 --json bench/results/images_tensor_1280.json
    python bench/bench_images.py --images ~/coco/val2014 --limit 500     # a folder of your JPEGs
    python bench/bench_images.py --backend tensor --profile              # where a sample's time goes

``--images``: a number of synthetic photo-like JPEGs to write to a temp dir (smooth gradients, soft
shapes, sensor noise; quality 90; ``--width`` x ``--height``), or a folder of images (the first
``--limit`` files, sorted). A sample is what a data set does (``datasets.process_image``): ``pil`` opens
the file, lets the processor ``draft()`` (``--draft on``: 1/2, 1/4, 1/8 scale when every crop keeps
``image_size`` px; ``off``: full decode), decodes and runs the PIL transform; ``tensor`` calls the
processor's ``load(path)`` (crop drawn before decoding, reduced decode when that crop allows it with
``--draft on``, uint8 tensor resize). Per configuration one untimed epoch (workers start, files enter the
page cache), then ``--rounds`` rounds, each timing one epoch of every configuration in turn
(interleaved, so a load change on the machine hits all alike); medians are reported. CPU time is the
process's (``time.process_time``), given for 0 workers only (worker processes' time is not counted).
``--profile`` times the stages of one sample (decode, crop/resize, convert) per backend instead.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from common import environment, print_table, set_threads, write_json
from lavis_lite.data.datasets import load_image
from lavis_lite.data.processors import build_processor, scale_box, to_uint8


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
    """``paths`` through ``processor``: its ``load`` (tensor backend), or the previous data set route
    (open, ``draft()``, which does nothing unless the processor's ``jpeg_draft`` is on, decode, transform)."""

    def __init__(self, paths: list[Path], processor: Any):
        self.paths, self.processor = paths, processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.processor.cfg.backend == "tensor":
            return self.processor.load(self.paths[index])
        return self.processor(load_image(self.paths[index], self.processor.draft))


def make_loader(paths: list[Path], name: str, backend: str, draft: str, workers: int,
                args: argparse.Namespace) -> tuple[Any, DataLoader]:
    processor = build_processor({"name": name, "image_size": args.image_size, "jpeg_draft": draft == "on",
                                 "backend": backend})
    loader = DataLoader(Images(paths, processor), batch_size=args.batch_size,
                        num_workers=workers, persistent_workers=workers > 0)
    for images in loader:  # untimed epoch
        assert images.shape[1:] == (3, args.image_size, args.image_size)
    return processor, loader


def epoch(loader: DataLoader) -> tuple[float, float]:
    """(wall s, process CPU s) of one pass over ``loader``."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in loader:
        pass
    return time.perf_counter() - wall, time.process_time() - cpu


def run_rounds(paths: list[Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    configs = [(name, backend, draft, workers) for name in args.processors for backend in args.backend
               for draft in args.draft for workers in args.workers]
    built = {c: make_loader(paths, *c, args) for c in configs}
    times: dict[tuple, list[tuple[float, float]]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for config in configs:
            times[config].append(epoch(built[config][1]))
    rows = []
    for (name, backend, draft, workers), samples in times.items():
        wall = statistics.median(w for w, _ in samples)
        cpu = statistics.median(c for _, c in samples)
        processor = built[(name, backend, draft, workers)][0]
        scales = getattr(processor, "decoded_scales", {}) if workers == 0 and backend == "tensor" else {}
        total = sum(scales.values())
        rows.append({"processor": name, "backend": backend, "draft": draft, "workers": workers,
                     "images_per_s": len(paths) / wall, "ms_per_image": 1e3 * wall / len(paths),
                     "cpu_ms_per_image": 1e3 * cpu / len(paths) if workers == 0 else None,
                     "images_per_s_per_worker": len(paths) / wall / max(workers, 1),
                     "decoded_at": ", ".join(f"1/{k}: {100 * n / total:.0f}%" for k, n in sorted(scales.items()))
                     if total else None,
                     "rounds_wall_s": [w for w, _ in samples], "rounds_cpu_s": [c for _, c in samples]})
    for row in rows:  # speed-up of the tensor pipeline over the PIL transform of the same settings
        base = next((r for r in rows if r["backend"] == "pil" and r["draft"] == "on" and
                     (r["processor"], r["workers"]) == (row["processor"], row["workers"])), None)
        row["speedup_vs_pil_draft_on"] = row["images_per_s"] / base["images_per_s"] if base else None
    return rows


class Stages:
    """Process CPU seconds per named stage: ``with stages("decode"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.process_time()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.process_time() - start


def profile(paths: list[Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per-stage CPU ms of one train/eval sample, both backends (draft on), seeded crops: where time goes."""
    rows = []
    size = [args.image_size] * 2
    for name in args.processors:
        proc = build_processor({"name": name, "image_size": args.image_size})
        pil, tensor = Stages(), Stages()
        torch.manual_seed(0)
        for path in paths:  # today's route: draft() (every crop), PIL decode, PIL resize, ToTensor + Normalize
            with pil("decode"), Image.open(path) as opened:
                image = proc.draft(opened).convert("RGB")
            with pil("crop/resize"):
                box = proc.box(*image.size)
                image = transforms.functional.resized_crop(image, *box, size, InterpolationMode.BICUBIC)
            with pil("convert"):
                proc.transform.transforms[-1](transforms.functional.to_tensor(image))
        for path in paths:  # the tensor route, split as load() does it
            with tensor("decode"):
                data = bytearray(path.read_bytes())
                with Image.open(io.BytesIO(data)) as opened:
                    full = opened.size
                    box = proc.box(*full)
                    k = proc._reduction(box, full)
                    if k > 1 and opened.draft("RGB", (full[0] // k, full[1] // k)) is not None:
                        pixels, box = to_uint8(opened), scale_box(box, k, full, opened.size)
                    else:
                        pixels = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
            with tensor("crop/resize"):
                pixels = TF.resized_crop(pixels, *box, size, InterpolationMode.BICUBIC, antialias=True)
            with tensor("convert"):
                proc.normalise(pixels)
        for backend, stages in (("pil", pil), ("tensor", tensor)):
            ms = {k: 1e3 * v / len(paths) for k, v in stages.seconds.items()}
            rows.append({"processor": name, "backend": backend, **{f"{k}_ms": v for k, v in ms.items()},
                         "total_ms": sum(ms.values())})
    return rows


def image_paths(args: argparse.Namespace, tmp: str) -> list[Path]:
    if args.images.isdigit():
        return write_images(Path(tmp), int(args.images), args.width, args.height)
    folder = Path(args.images).expanduser()
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if not paths:
        raise SystemExit(f"--images {folder}: no .jpg/.jpeg/.png/.webp files there; give a folder of images "
                         "or a number of synthetic JPEGs to write")
    return paths[:args.limit]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="200", help="number of synthetic JPEGs, or a folder of images")
    parser.add_argument("--limit", type=int, default=1000, help="at most this many files of an --images folder")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--processors", nargs="+", default=["blip_image_train", "blip_image_eval"])
    parser.add_argument("--backend", nargs="+", default=["pil", "tensor"], choices=["pil", "tensor"])
    parser.add_argument("--draft", nargs="+", default=["on"], choices=["off", "on"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs per configuration, interleaved")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads of the main process (1: as each DataLoader worker)")
    parser.add_argument("--profile", action="store_true", help="per-stage CPU ms instead of DataLoader epochs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    results: dict[str, Any] = {**environment(torch.device("cpu")), "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = image_paths(args, tmp)
        with Image.open(paths[0]) as first:
            results["first_image"] = f"{first.width}x{first.height} {first.format}"
        results["mean_file_kb"] = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        if args.profile:
            results["profile"] = profile(paths, args)
        else:
            results["runs"] = run_rounds(paths, args)
    print(f"{len(paths)} images (first: {results['first_image']}, ~{results['mean_file_kb']:.0f} KB) -> "
          f"{args.image_size} px, batch {args.batch_size}, {results['device']}")
    if args.profile:
        print_table(results["profile"], [("processor", "processor"), ("backend", "backend"),
                                         ("decode_ms", "decode ms"), ("crop/resize_ms", "crop/resize ms"),
                                         ("convert_ms", "convert ms"), ("total_ms", "total ms")])
    else:
        print_table(results["runs"], [("processor", "processor"), ("backend", "backend"), ("draft", "draft"),
                                      ("workers", "workers"), ("decoded_at", "decoded at"),
                                      ("images_per_s", "images/s"), ("cpu_ms_per_image", "CPU ms/image"),
                                      ("images_per_s_per_worker", "images/s per worker"),
                                      ("speedup_vs_pil_draft_on", "vs pil, draft on")])
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
