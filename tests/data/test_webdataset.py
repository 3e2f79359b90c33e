"""webdataset shards: pairing, exactly-once splitting over ranks x loader workers, shuffling,
resuming, the bad-sample policy, and the ``laion_wds`` / ``image_text_wds`` builders."""
from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from lavis_lite.config import ConfigError, load_config
from lavis_lite.data.builders import build_datasets
from lavis_lite.data.datasets import BadImageError, CaptionDataset
from lavis_lite.data.webdataset import ImageTextShards, expand_shards, read_tar

SHARDS, PER_SHARD = 5, 4  # 5 shards on 2 ranks x 2 workers: one worker reads two, so counts differ


def _colour(k: int) -> tuple[int, int, int]:
    return (10 * k % 250, 255 - 10 * k % 250, 128)


def _jpeg(k: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), _colour(k)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_shards(folder: Path, shards: int = SHARDS, per_shard: int = PER_SHARD, bad: dict | None = None) -> str:
    """Shards of solid-colour JPEGs whose caption names the colour's index. Even shards carry the
    caption in ``.txt``, odd ones only in ``.json`` (img2dataset writes both). ``bad``: key ->
    members replacing that sample's. Returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as writer:
            for _ in range(per_shard):
                key = f"{k:06d}"
                sample = {"__key__": key, "jpg": _jpeg(k)}
                if s % 2 == 0:
                    sample["txt"] = f"Sample {k}."
                else:
                    sample["json"] = {"caption": f"Sample {k}.", "url": f"http://example.com/{k}.jpg"}
                if bad and key in bad:
                    sample = {"__key__": key, **bad[key]}
                writer.write(sample)
                k += 1
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def centre_pixel(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.getpixel((8, 8)), dtype=torch.int64)


def check_pair(sample: dict) -> int:
    """The caption's index, after checking the image has that index's colour (JPEG: +-4)."""
    k = int(sample["text_input"].split()[1])
    assert (sample["image"] - torch.tensor(_colour(k))).abs().max() <= 4, (sample["text_input"], sample["image"])
    assert sample["image_id"] == f"{k:06d}"
    return k


def caption(text: str) -> str:
    return text.rstrip(".").lower()


def dataset(pattern: str, **kwargs) -> ImageTextShards:
    kwargs.setdefault("num_samples", SHARDS * PER_SHARD)
    return ImageTextShards(expand_shards(pattern), centre_pixel, caption, **kwargs)


def test_shards_written_by_tarwriter_pair_images_and_captions(tmp_path):
    pattern = write_shards(tmp_path)
    assert [s["__key__"] for s in read_tar(tmp_path / "00001.tar")] == [f"{k:06d}" for k in range(4, 8)]
    data = dataset(pattern, shuffle_buffer=0, shuffle_shards=False)
    samples = list(data)
    assert [check_pair(s) for s in samples] == list(range(SHARDS * PER_SHARD))
    assert samples[0]["text_input"] == "sample 0" and samples[0]["bad_images"] == 0
    assert set(samples[0]) == {"image", "text_input", "image_id", "bad_images"}  # as CaptionDataset
    assert data.collater is CaptionDataset.collater and data.collater(samples[:2])["image"].shape == (2, 3)


def _one_pass(pattern: str, epoch: int, world_size: int = 2, num_workers: int = 2, **kwargs) -> list[list[int]]:
    """Caption indices each rank receives through a real DataLoader with ``num_workers`` workers."""
    per_rank = []
    for rank in range(world_size):
        data = dataset(pattern, rank=rank, world_size=world_size, shuffle_buffer=3, **kwargs)
        data.set_epoch(epoch)
        loader = DataLoader(data, batch_size=None, num_workers=num_workers)
        per_rank.append([check_pair(s) for s in loader])
    return per_rank


def test_every_sample_exactly_once_per_epoch_across_2_ranks_x_2_workers(tmp_path):
    pattern = write_shards(tmp_path)
    everything = list(range(SHARDS * PER_SHARD))
    epoch0, epoch1 = _one_pass(pattern, 0), _one_pass(pattern, 1)
    for ranks in (epoch0, epoch1):
        assert sorted(ranks[0] + ranks[1]) == everything  # none twice, none missing
        assert all(ranks)  # both ranks get data
    assert epoch0 != epoch1  # reshuffled per epoch ...
    assert _one_pass(pattern, 0) == epoch0  # ... and deterministic given (seed, epoch)
    assert _one_pass(pattern, 0, seed=1) != epoch0


def test_shards_are_dealt_over_all_workers_of_all_ranks(tmp_path):
    pattern = write_shards(tmp_path)
    shards = expand_shards(pattern)
    dealt = [dataset(pattern, rank=r, world_size=2).shards_for(w, 2) for r in range(2) for w in range(2)]
    assert sorted(s for part in dealt for s in part) == sorted(shards)
    assert sorted(map(len, dealt)) == [1, 1, 1, 2]
    assert len(dataset(pattern, rank=1, world_size=2)) == SHARDS * PER_SHARD // 2  # nominal, per rank


def test_rank_defaults_come_from_lavis_lite_dist(tmp_path, monkeypatch):
    pattern = write_shards(tmp_path)
    monkeypatch.setattr("lavis_lite.dist.get_rank", lambda: 1)
    monkeypatch.setattr("lavis_lite.dist.get_world_size", lambda: 2)
    data = dataset(pattern)
    assert (data.rank, data.world_size) == (1, 2)
    with pytest.raises(ValueError, match="5 shard.*6 ranks"):
        dataset(pattern, world_size=6)


def test_resume_mid_pass_skips_what_each_worker_already_gave(tmp_path):
    pattern = write_shards(tmp_path, shards=4)
    def batches(skip: int) -> list[list[str]]:
        data = dataset(pattern, num_samples=16, shuffle_buffer=4)
        data.set_epoch(3, skip=skip, batch_size=2)
        loader = DataLoader(data, batch_size=2, num_workers=2, collate_fn=data.collater, drop_last=True)
        return [b["text_input"] for b in loader]
    full = batches(0)
    assert len(full) == 8
    for taken in (1, 3, 4, 7):  # the runner passes skip = batches taken x batch size
        assert batches(taken * 2) == full[taken:]


def test_bad_image_fails_by_default_naming_shard_and_key(tmp_path):
    pattern = write_shards(tmp_path, bad={"000006": {"jpg": b"not a jpeg", "txt": "broken"}})
    with pytest.raises(BadImageError) as err:
        list(dataset(pattern, shuffle_buffer=0, shuffle_shards=False))
    message = str(err.value)
    assert "'000006'" in message and str(tmp_path / "00001.tar") in message
    assert "datasets.dataset.skip_bad_images=true" in message


def test_bad_samples_are_skipped_counted_and_reported_in_batches(tmp_path, caplog):
    bad = {"000006": {"jpg": b"not a jpeg", "txt": "broken"}, "000013": {"jpg": _jpeg(13)}}  # no caption
    pattern = write_shards(tmp_path, bad=bad)
    data = dataset(pattern, skip_bad_images=True, name="laion_wds")
    with caplog.at_level(logging.WARNING, logger="lavis_lite.data.webdataset"):
        batches = list(DataLoader(data, batch_size=3, collate_fn=data.collater))
    seen = sorted(int(t.split()[1]) for b in batches for t in b["text_input"])
    assert seen == [k for k in range(SHARDS * PER_SHARD) if k not in (6, 13)]
    assert sum(b["bad_images"] for b in batches) == 2 == data.bad_image_count
    assert "000006" in caplog.text and "no caption" in caplog.text


def test_truncated_shard(tmp_path, caplog):
    pattern = write_shards(tmp_path)
    shard = tmp_path / "00002.tar"
    shard.write_bytes(shard.read_bytes()[:1500])  # cut inside the first member
    with pytest.raises(BadImageError, match=f"cannot read shard {re.escape(str(shard))}"):
        list(dataset(pattern, shuffle_buffer=0, shuffle_shards=False))
    with caplog.at_level(logging.WARNING, logger="lavis_lite.data.webdataset"):
        kept = [check_pair(s) for s in dataset(pattern, shuffle_buffer=0, shuffle_shards=False, skip_bad_images=True)]
    assert kept == [k for k in range(SHARDS * PER_SHARD) if not 8 <= k < 12]
    assert str(shard) in caplog.text


# ------------------------------------------------------------------------------------ builders
SMALL = {"train": {"name": "blip_image_train", "image_size": 16}}


def _build(tmp_path: Path, datasets: dict):
    project = tmp_path / "project.yaml"
    project.write_text(OmegaConf.to_yaml({"model": {"arch": "bow_tagger"}, "datasets": datasets}))
    cfg, sources = load_config(project)
    return build_datasets(cfg.datasets, sources)


@pytest.mark.parametrize("name", ["laion_wds", "image_text_wds"])
def test_builder_makes_a_train_loader_of_caption_batches(tmp_path, name):
    pattern = write_shards(tmp_path / "shards")
    built = _build(tmp_path, {name: {"build_info": {"storage": pattern}, "num_samples": 20,
                                     "vis_processor": SMALL, "shuffle_buffer": 8}})
    data = built[name]["train"]
    assert set(built[name]) == {"train"} and isinstance(data, ImageTextShards)
    assert len(data) == 20 and data.vis_processor.image_size == 16
    batch = next(iter(DataLoader(data, batch_size=4, collate_fn=data.collater, drop_last=True)))
    assert batch["image"].shape == (4, 3, 16, 16)
    assert all(t.startswith("sample ") for t in batch["text_input"]) and batch["bad_images"] == 0


def test_builder_counts_samples_from_stats_files(tmp_path):
    pattern = write_shards(tmp_path / "shards")
    node = {"laion_wds": {"build_info": {"storage": pattern}, "vis_processor": SMALL}}
    with pytest.raises(ConfigError, match=r"datasets\.laion_wds\.num_samples is not set.*00000_stats\.json"):
        _build(tmp_path, node)
    for s in range(SHARDS):
        (tmp_path / "shards" / f"{s:05d}_stats.json").write_text(json.dumps({"successes": PER_SHARD}))
    assert len(_build(tmp_path, node)["laion_wds"]["train"]) == SHARDS * PER_SHARD


def test_builder_fails_on_missing_shards_naming_path_and_key(tmp_path):
    write_shards(tmp_path / "shards")
    pattern = str(tmp_path / "shards" / "{00000..00009}.tar")  # only 00000-00004 exist
    with pytest.raises(ConfigError) as err:
        _build(tmp_path, {"laion_wds": {"build_info": {"storage": pattern}, "num_samples": 20}})
    message = str(err.value)
    assert "datasets.laion_wds.build_info.storage" in message and "5 of 10 shard" in message
    assert str(tmp_path / "shards" / "00005.tar") in message
    with pytest.raises(ConfigError, match=r"datasets\.laion_wds\.build_info\.storage=''"):
        _build(tmp_path, {"laion_wds": {"num_samples": 20}})
    with pytest.raises(ConfigError, match="not a local path"):
        _build(tmp_path, {"laion_wds": {"build_info": {"storage": "https://x.org/{0..3}.tar"}, "num_samples": 4}})
    with pytest.raises(ConfigError, match=r"datasets\.laion_wds\.shuffle_bufer"):
        _build(tmp_path, {"laion_wds": {"build_info": {"storage": pattern}, "shuffle_bufer": 3}})
