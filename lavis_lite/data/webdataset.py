"""Image-text pairs streamed from webdataset tar shards (LAION / CC / img2dataset layout).

A shard is a tar file; consecutive members sharing a key form one sample (``000123.jpg`` +
``000123.txt`` and/or ``000123.json`` with a ``"caption"``), as ``webdataset.TarWriter`` and
img2dataset write them. ``ImageTextShards`` yields the same sample dict as ``CaptionDataset``
(``image``, ``text_input``, ``image_id``, ``bad_images``) and uses its collater.

Splitting: at every pass the shard list is permuted with ``(seed, epoch)`` (the same permutation on
every rank), then dealt round-robin over all data-loader workers of all ranks: global worker
``rank * num_workers + worker_id`` of ``world_size * num_workers`` reads shards ``g, g + W, ...``.
So each sample is read exactly once per pass, by one worker of one rank; ranks may get a few
samples more or fewer (whole shards). Within a worker, samples go through a shuffle buffer seeded
with ``(seed, epoch, rank, worker)``, before any image is decoded.

An iterable data set has no length and takes no sampler: ``num_samples`` (the total over all
shards) gives a nominal per-rank length ``num_samples // world_size`` for the runner's epoch
arithmetic, and ``set_epoch(epoch, skip, batch_size)`` replaces ``TrainSampler.set_epoch``.

Bad samples (an undecodable image, no image or no caption, an unreadable shard) follow
``skip_bad_images`` as the map-style sets do: by default they raise ``BadImageError`` naming the
shard and key; with skipping on they are logged, counted in ``bad_image_count`` and reported in
the ``bad_images`` field of the next sample this worker yields (an unreadable shard loses the
rest of that shard and is logged, not counted).
"""
from __future__ import annotations

import io
import json
import logging
import random
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from lavis_lite import dist
from lavis_lite.data.datasets import (
    _IMAGE_ERRORS,
    _MAX_CONSECUTIVE_BAD,
    BadImageError,
    CaptionDataset,
    process_image,
    skip_or_raise,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# webdataset's key convention: everything up to the first dot of the base name (directory kept).
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def expand_shards(patterns: str | Sequence[str]) -> list[str]:
    """Brace-expand one pattern or a list of them (``/data/{00000..00099}.tar``), in order."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return [shard for pattern in patterns for shard in braceexpand(pattern)]


def read_tar(path: str | Path) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard: ``{"__key__": key, "<ext>": bytes, ...}``, members grouped by key
    while consecutive. Raises ``tarfile.TarError`` / ``OSError`` on a corrupt or missing file."""
    sample: dict[str, Any] = {}
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            match = _KEY_EXT.match(member.name)
            if match is None or Path(member.name).name.startswith("__"):
                continue
            key, ext = match.group(1), match.group(2).lower()
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample["__key__"] = key
            sample[ext] = tar.extractfile(member).read()
    if sample:
        yield sample


def shuffled(samples: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Buffer shuffle: keep ``buffer_size`` samples, emit a random one as each new one arrives."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(buffer_size)
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class ImageTextShards(IterableDataset):
    """Image-caption pairs from local webdataset shards, split across ranks and loader workers.

    Args:
        shards: shard paths (already expanded; see ``expand_shards``).
        num_samples: samples in all shards together (declared: iterable data has no length).
        shuffle_buffer: samples held by each worker's shuffle buffer (0 or 1: shard order only).
        shuffle_shards: permute the shard list every pass (seeded by ``seed`` and the epoch).
        rank, world_size: this process's place; default ``lavis_lite.dist`` at construction.
    Sample: {"image": [3, H, W], "text_input": processed caption, "image_id": the json's
    "image_id" if given, else the sample key, "bad_images": int}.
    """

    collater = staticmethod(CaptionDataset.collater)

    def __init__(
        self,
        shards: Sequence[str | Path],
        vis_processor: Callable[[Image.Image], torch.Tensor],
        text_processor: Callable[[str], str],
        *,
        num_samples: int,
        name: str = "dataset",
        skip_bad_images: bool = False,
        sample_ratio: float = 1.0,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.shards = [str(s) for s in shards]
        self.vis_processor, self.text_processor = vis_processor, text_processor
        self.num_samples, self.name = num_samples, name
        self.skip_bad_images, self.sample_ratio = skip_bad_images, sample_ratio
        self.shuffle_buffer, self.shuffle_shards, self.seed = shuffle_buffer, shuffle_shards, seed
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        if not self.shards:
            raise ValueError(f"{name}: no shards given")
        if len(self.shards) < self.world_size:
            raise ValueError(f"{name}: {len(self.shards)} shard(s) for {self.world_size} ranks; every rank needs "
                             f"at least one (write smaller shards, or check datasets.{name}.build_info.storage)")
        if num_samples <= 0:
            raise ValueError(f"{name}: num_samples={num_samples}; set datasets.{name}.num_samples to the number "
                             "of samples in all shards")
        self.epoch, self.skip, self.batch_size = 0, 0, 1
        self.bad_image_count = 0  # in this process only (each worker has its own copy)

    def __len__(self) -> int:
        """Nominal samples per rank and pass (the actual number differs by whole shards)."""
        return self.num_samples // self.world_size

    def set_epoch(self, epoch: int, skip: int = 0, batch_size: int = 1) -> None:
        """Select the pass (reseeds the shard permutation and the shuffle buffers); call before
        iterating. ``skip``: samples this rank already took in this pass, in batches of
        ``batch_size``, to resume mid-pass. The data order then continues exactly, provided no
        loader worker had run out of shards and no bad sample was skipped before that point
        (augmentation randomness in workers is not restored)."""
        self.epoch, self.skip, self.batch_size = epoch, skip, batch_size

    def shard_order(self) -> list[str]:
        """This pass's global shard order (identical on every rank)."""
        order = list(self.shards)
        if self.shuffle_shards:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def shards_for(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards that loader worker ``worker`` of ``num_workers`` on this rank reads this pass."""
        total = self.world_size * num_workers
        return self.shard_order()[self.rank * num_workers + worker :: total]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # A DataLoader takes batches from its workers in turn, starting with worker 0: after
        # ``taken`` batches of this pass, (logical) worker w had made batches w, w + n, ... < taken.
        # To resume, loader worker 0 plays the worker whose batch was due next.
        taken = self.skip // max(self.batch_size, 1)
        worker = (loader_worker + taken) % num_workers
        to_skip = len(range(worker, taken, num_workers)) * self.batch_size
        shards = self.shards_for(worker, num_workers)
        if not shards:
            logger.warning("%s: rank %d worker %d has no shard (%d shards for %d ranks x %d workers); it stays idle",
                           self.name, self.rank, worker, len(self.shards), self.world_size, num_workers)
            return
        rng = random.Random(((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank) * 1009 + worker)
        raw = shuffled(self._raw_samples(shards), self.shuffle_buffer, rng)
        pending_bad = consecutive_bad = 0
        for sample in raw:
            if to_skip:
                to_skip -= 1
                continue
            out = self._decode(sample)
            if out is None:
                pending_bad += 1
                consecutive_bad += 1
                if consecutive_bad > _MAX_CONSECUTIVE_BAD:
                    raise BadImageError(f"{self.name}: more than {_MAX_CONSECUTIVE_BAD} bad samples in a row (last: "
                                        f"key {sample['__key__']!r} of {sample['__shard__']}); check the shard format")
                continue
            out["bad_images"], pending_bad, consecutive_bad = pending_bad, 0, 0
            yield out

    def _raw_samples(self, shards: list[str]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            count = 0
            try:
                for sample in read_tar(shard):
                    sample["__shard__"] = shard
                    count += 1
                    yield sample
            except (tarfile.TarError, OSError, EOFError) as err:
                if not self.skip_bad_images:
                    raise BadImageError(
                        f"cannot read shard {shard} after {count} samples ({type(err).__name__}: {err}); fix or "
                        f"remove it, or set datasets.{self.name}.skip_bad_images=true to skip unreadable data"
                    ) from err
                logger.warning("%s: shard %s unreadable after %d samples (%s: %s); rest of the shard skipped",
                               self.name, shard, count, type(err).__name__, err)

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        """The processed sample, or None (logged and counted) when it is bad and skipping is on."""
        where = f"key {sample['__key__']!r} of shard {sample['__shard__']}"
        try:
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext is None:
                members = sorted(k for k in sample if not k.startswith("__"))
                raise ValueError(f"no image ({'/'.join(IMAGE_EXTENSIONS)}) among the members {members}")
            meta = json.loads(sample["json"]) if "json" in sample else {}
            if "txt" in sample:
                caption = sample["txt"].decode("utf-8")
            elif isinstance(meta, dict) and isinstance(meta.get("caption"), str):
                caption = meta["caption"]
            else:
                raise ValueError("no caption (neither a .txt member nor a .json with a string \"caption\")")
            image = process_image(io.BytesIO(sample[ext]), self.vis_processor)
        except (*_IMAGE_ERRORS, UnicodeDecodeError) as err:
            skip_or_raise(self, f"bad sample, {where}", err)
            return None
        image_id = meta.get("image_id", sample["__key__"]) if isinstance(meta, dict) else sample["__key__"]
        return {"image": image, "text_input": self.text_processor(caption), "image_id": image_id}
