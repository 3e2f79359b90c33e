"""Data set builders, registered in ``DATASETS``, and ``build_datasets``: the runner's entry point.

A builder turns one validated ``datasets.<name>`` node into ``{split: Dataset}``. The ``train``
split gets the training data set class and the ``train`` processors; every other split gets the
evaluation class and the ``eval`` processors. Defaults per data set live in
``configs/datasets/<name>.yaml`` (merged by the config loader); everything else in ``DatasetConfig``.

Every path is checked when building, and a missing one names the config key to set. A split
set to null (``build_info.annotations.<split>=null``) is left out, e.g. to evaluate without
downloading the training files. The shapes builders first generate their data (rank 0, behind a
barrier) if it is not there yet. ``laion_wds`` / ``image_text_wds`` build a training-only
``ImageTextShards`` (lavis_lite/data/webdataset.py) from local webdataset tar shards.

After building, ``build_datasets`` warns when an evaluation split's images also appear in a training
split of any configured data set (``warn_eval_overlap``), since its scores on them are not held out.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from torch.utils.data import Dataset

from lavis_lite import dist
from lavis_lite.config import ConfigError, Sources, merge_onto
from lavis_lite.data.datasets import (
    CaptionDataset,
    CaptionEvalDataset,
    ImageDataset,
    NoCapsEvalDataset,
    RetrievalEvalDataset,
    VQADataset,
    VQAEvalDataset,
)
from lavis_lite.data.processors import build_processor
from lavis_lite.data.shapes import ShapesRootError, ShapesSpec, ensure_shapes
from lavis_lite.data.webdataset import ImageTextShards, expand_shards
from lavis_lite.registry import DATASETS

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildInfo:
    """Where the files are. Every path but ``storage`` is relative to ``storage``."""

    storage: str = ""  # the data set's root folder (required)
    images: str = ""  # image folder (or an absolute path); the annotations' "image" paths are relative to it
    # split -> LAVIS-format json file, or a list of files to concatenate; null leaves the split out
    annotations: dict[str, Any] = dataclasses.field(default_factory=dict)
    # split -> COCO-format ground truth (null: none)
    caption_gt: dict[str, Optional[str]] = dataclasses.field(default_factory=dict)
    # split -> VQAv2-format questions / annotations file for the metric (null: none)
    vqa_questions: dict[str, Optional[str]] = dataclasses.field(default_factory=dict)
    vqa_annotations: dict[str, Optional[str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DatasetConfig:
    """The keys under ``datasets.<name>``. Processor nodes: ``{name: <registered>, <its fields>}``."""

    build_info: BuildInfo = dataclasses.field(default_factory=BuildInfo)
    vis_processor: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"train": {"name": "blip_image_train"}, "eval": {"name": "blip_image_eval"}}
    )
    text_processor: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"train": {"name": "blip_caption"}, "eval": {"name": "blip_caption"}}
    )
    sample_ratio: float = 1.0  # weight of this data set's train split when several are mixed
    skip_bad_images: bool = False  # see lavis_lite/data/datasets.py for what skipping does
    # caption data: text before each caption, in its language (e.g. "a photo of", "这张图片里有"); None: model.prompt
    prompt: Optional[str] = None
    language: Optional[Literal["en", "zh"]] = None  # caption data: the language it is scored in; None: run.language


@dataclasses.dataclass
class ShapesDatasetConfig(DatasetConfig):
    generator: ShapesSpec = dataclasses.field(default_factory=ShapesSpec)  # what ensure_shapes writes


class DatasetBuilder:
    """Builds the splits of one data set from its validated config."""

    config_class: ClassVar[type[DatasetConfig]] = DatasetConfig
    overlap_note: ClassVar[str] = ""  # why eval images may have been trained on, added to warn_eval_overlap's warning
    train_class: ClassVar[type[ImageDataset]]
    eval_class: ClassVar[type[ImageDataset]]

    def __init__(self, cfg: DatasetConfig, name: str, sources: Sources | None = None):
        self.cfg, self.name, self.sources = cfg, name, sources
        self.key = f"datasets.{name}"  # config prefix for messages

    def prepare(self, storage: Path) -> None:
        """Called before any path is checked; generated data sets create their files here."""

    def missing_hint(self, storage: Path) -> str:
        return ""

    def build(self) -> dict[str, Dataset]:
        info = self.cfg.build_info
        if not info.storage:
            raise ConfigError(f"{self.key}.build_info.storage is not set; set it to the folder holding "
                              f"{self.name}'s annotation files and images")
        storage = Path(info.storage).expanduser()
        self.prepare(storage)
        if not storage.is_dir():
            raise ConfigError(f"{self.key}.build_info.storage={info.storage!r}: no folder at {storage}; set it to the "
                              f"folder holding {self.name}'s annotation files and images")
        image_root = storage / info.images
        if not image_root.is_dir():
            raise ConfigError(f"{self.key}.build_info.images: no image folder at {image_root}; set "
                              f"{self.key}.build_info.storage (now {storage}) or .images (now {info.images!r})"
                              f"{self.missing_hint(storage)}")
        annotations = {split: paths for split, paths in info.annotations.items() if paths is not None}
        if not annotations:
            raise ConfigError(f"{self.key}.build_info.annotations is empty; map each split to its json file")
        processors = {
            stage: (self._processor("vis_processor", stage), self._processor("text_processor", stage))
            for stage in {"train" if split == "train" else "eval" for split in annotations}
        }
        common = dict(name=self.name, skip_bad_images=self.cfg.skip_bad_images, sample_ratio=self.cfg.sample_ratio,
                      prompt=self.cfg.prompt, language=self.cfg.language)
        splits: dict[str, Dataset] = {}
        for split, paths in annotations.items():
            files = self._files(storage, paths, f"annotations.{split}")
            vis, text = processors["train" if split == "train" else "eval"]
            cls = self.train_class if split == "train" else self.eval_class
            extra = {} if split == "train" else self.eval_files(storage, split)
            try:
                splits[split] = cls(files, image_root, vis, text, **common, **extra)
            except ConfigError:
                raise
            except (OSError, ValueError, KeyError, TypeError) as err:  # bad data; programming errors propagate
                raise ConfigError(f"{self.key}: cannot build split {split!r} from {', '.join(map(str, files))} "
                                  f"({type(err).__name__}: {err}); fix the file or set "
                                  f"{self.key}.build_info.annotations.{split}") from err
            logger.info("%s/%s: %d samples", self.name, split, len(splits[split]))
        return splits

    def eval_files(self, storage: Path, split: str) -> dict[str, Path | None]:
        """Ground-truth file arguments of ``eval_class`` for ``split``."""
        return {}

    def _optional_file(self, storage: Path, table: dict[str, str | None], field: str, split: str) -> Path | None:
        value = table.get(split)
        return None if value is None else self._files(storage, value, f"{field}.{split}")[0]

    def _files(self, storage: Path, value: Any, field: str) -> list[Path]:
        """``build_info.<field>`` as existing absolute paths (a string or a list of strings)."""
        where = f"{self.key}.build_info.{field}"
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{where}={value!r}; give a file path (relative to storage) or a list of them")
        paths = [storage / n for n in names]
        for path in paths:
            if not path.is_file():
                raise ConfigError(f"{where}: no file at {path}; set {self.key}.build_info.storage (now {storage}) "
                                  f"or {where}{self.missing_hint(storage)}")
        return paths

    def _processor(self, kind: str, stage: str) -> Any:
        nodes = getattr(self.cfg, kind)
        unknown = set(nodes) - {"train", "eval"}
        if unknown:
            raise ConfigError(f"{self.key}.{kind} has unknown key(s) {sorted(unknown)}; use train and eval")
        if stage not in nodes:
            raise ConfigError(f"{self.key}.{kind}.{stage} is missing; it is needed by the "
                              f"{'train' if stage == 'train' else 'evaluation'} split(s)")
        return build_processor(nodes[stage], f"{self.key}.{kind}.{stage}", self.sources)


class CaptionBuilder(DatasetBuilder):
    train_class = CaptionDataset
    eval_class = CaptionEvalDataset

    def eval_files(self, storage: Path, split: str) -> dict[str, Path | None]:
        return {"gt_path": self._optional_file(storage, self.cfg.build_info.caption_gt, "caption_gt", split)}


class RetrievalBuilder(DatasetBuilder):
    train_class = CaptionDataset
    eval_class = RetrievalEvalDataset


class VQABuilder(DatasetBuilder):
    train_class = VQADataset
    eval_class = VQAEvalDataset

    def eval_files(self, storage: Path, split: str) -> dict[str, Path | None]:
        info = self.cfg.build_info
        return {
            "question_path": self._optional_file(storage, info.vqa_questions, "vqa_questions", split),
            "annotation_path": self._optional_file(storage, info.vqa_annotations, "vqa_annotations", split),
        }


class ShapesMixin:
    """Generates the shapes data at ``build_info.storage`` on rank 0 while the others wait."""

    config_class = ShapesDatasetConfig
    cfg: ShapesDatasetConfig

    def prepare(self, storage: Path) -> None:
        if dist.is_main_process():
            try:
                ensure_shapes(storage, **dataclasses.asdict(self.cfg.generator))
            except ShapesRootError as err:
                raise ConfigError(f"{self.key}.build_info.storage: {err}") from None
        dist.barrier()

    def missing_hint(self, storage: Path) -> str:
        return (f" (shapes data: point {self.key}.build_info.storage at a new folder and the data set is "
                "generated there)")


class NoCapsBuilder(CaptionBuilder):
    eval_class = NoCapsEvalDataset


class GQABuilder(VQABuilder):
    """GQA in LAVIS's list format (tools/convert_gqa.py). ``run.metric=gqa`` reads an eval split's
    answers from ``build_info.vqa_annotations.<split>``: a json list of {"question_id", "answer"},
    normally the split's own annotation file. Checked here, so a wrong file fails before inference."""

    def build(self) -> dict[str, Dataset]:
        splits = super().build()
        for split, data in splits.items():
            path = getattr(data, "annotation_path", None)
            if path is None:
                continue
            where = f"{self.key}.build_info.vqa_annotations.{split}"
            answers = _gqa_answers(path, where)
            missing = [r["question_id"] for r in data.annotation if r["question_id"] not in answers]
            if missing:
                raise ConfigError(f"{where}: {path} has no answer for {len(missing)} of the {len(data)} questions of "
                                  f"split {split!r} (e.g. question_id {missing[0]!r}); point it at this split's "
                                  f"LAVIS-format json (the file of {self.key}.build_info.annotations.{split})")
        return splits


def _gqa_answers(path: Path, where: str) -> set[Any]:
    """Question ids with an answer in a LAVIS-format GQA list."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{where}: cannot read {path} ({err})") from None
    if not isinstance(data, list):
        raise ConfigError(f"{where}: {path} holds a {type(data).__name__}, not a list of {{question_id, answer}} "
                          "(the official GQA dict? convert it with tools/convert_gqa.py)")
    return {r["question_id"] for r in data if isinstance(r, dict) and "question_id" in r and "answer" in r}


# ------------------------------------------------------------------------------------ webdataset
@dataclasses.dataclass
class ShardsBuildInfo:
    """Where the shards are."""

    # shard path pattern(s), brace-expanded, e.g. /data/laion/{00000..00099}.tar (LAVIS's key); local files
    storage: Any = ""


@dataclasses.dataclass
class ShardsDatasetConfig:
    """The keys under ``datasets.<name>`` for webdataset shards (training only)."""

    build_info: ShardsBuildInfo = dataclasses.field(default_factory=ShardsBuildInfo)
    vis_processor: dict[str, Any] = dataclasses.field(default_factory=lambda: {"train": {"name": "blip_image_train"}})
    text_processor: dict[str, Any] = dataclasses.field(default_factory=lambda: {"train": {"name": "blip_caption"}})
    # samples in all shards; 0: sum the "successes" of the img2dataset-style <shard>_stats.json files
    num_samples: int = 0
    shuffle_buffer: int = 1000  # samples per loader worker
    shuffle_shards: bool = True
    seed: int = 0  # with the epoch, seeds the shard order and the shuffle buffers
    sample_ratio: float = 1.0
    skip_bad_images: bool = False


class ShardsBuilder(DatasetBuilder):
    """Builds ``{"train": ImageTextShards}`` from local tar shards, checking that every one exists."""

    config_class = ShardsDatasetConfig
    cfg: ShardsDatasetConfig

    def build(self) -> dict[str, Dataset]:
        where = f"{self.key}.build_info.storage"
        pattern = self.cfg.build_info.storage
        if isinstance(pattern, (list, tuple)) and pattern and all(isinstance(p, str) for p in pattern):
            pattern = list(pattern)
        elif not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{where}={pattern!r}; set it to the shard path pattern, e.g. "
                              "/data/laion/{00000..00099}.tar (or a list of patterns)")
        shards = expand_shards(pattern)
        remote = [s for s in shards if re.match(r"^[a-z][a-z0-9+]*:", s)]
        if remote:
            raise ConfigError(f"{where}: {remote[0]} is not a local path; only local shard files are supported "
                              "(mount or download them first)")
        paths = [Path(s).expanduser() for s in shards]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"{where}: {len(missing)} of {len(paths)} shard file(s) missing, e.g. {missing[0]}; "
                              f"set {where} (now {pattern!r}) to the pattern of existing shards")
        num_samples = self.cfg.num_samples or self._count_from_stats(paths)
        splits = {"train": ImageTextShards(
            paths, self._processor("vis_processor", "train"), self._processor("text_processor", "train"),
            num_samples=num_samples, name=self.name, skip_bad_images=self.cfg.skip_bad_images,
            sample_ratio=self.cfg.sample_ratio, shuffle_buffer=self.cfg.shuffle_buffer,
            shuffle_shards=self.cfg.shuffle_shards, seed=self.cfg.seed,
        )}
        logger.info("%s/train: %d shards, %d samples (nominal)", self.name, len(paths), num_samples)
        return splits

    def _count_from_stats(self, shards: list[Path]) -> int:
        """Sum of ``successes`` in each shard's ``<stem>_stats.json`` (written by img2dataset and
        tools/make_wds_shards.py)."""
        total = 0
        for shard in shards:
            stats = shard.with_name(f"{shard.stem}_stats.json")
            try:
                total += int(json.loads(stats.read_text())["successes"])
            except (OSError, ValueError, KeyError, TypeError):
                raise ConfigError(f"{self.key}.num_samples is not set and {stats} is missing or has no "
                                  f"\"successes\"; set {self.key}.num_samples to the number of samples in the "
                                  "shards") from None
        return total


DATASETS.register("coco_caption")(CaptionBuilder)
DATASETS.register("coco_retrieval")(RetrievalBuilder)
DATASETS.register("coco_vqa")(VQABuilder)
DATASETS.register("vg_caption")(CaptionBuilder)
DATASETS.register("ok_vqa")(VQABuilder)
DATASETS.register("gqa")(GQABuilder)
DATASETS.register("nocaps")(NoCapsBuilder)
DATASETS.register("laion_wds")(ShardsBuilder)
DATASETS.register("image_text_wds")(ShardsBuilder)


@DATASETS.register("shapes_caption")
@DATASETS.register("shapes_caption_cn")
class ShapesCaptionBuilder(ShapesMixin, CaptionBuilder):
    pass


@DATASETS.register("shapes_retrieval")
class ShapesRetrievalBuilder(ShapesMixin, RetrievalBuilder):
    pass


@DATASETS.register("shapes_vqa")
class ShapesVQABuilder(ShapesMixin, VQABuilder):
    pass


def build_datasets(datasets_node: Any, sources: Sources | None = None) -> dict[str, dict[str, Dataset]]:
    """``{name: {split: Dataset}}`` for each data set under ``datasets:`` (with its
    ``configs/datasets/<name>.yaml`` defaults already merged in, as ``load_config`` does)."""
    out: dict[str, dict[str, Dataset]] = {}
    notes: dict[str, str] = {}
    for name, node in (datasets_node or {}).items():
        try:
            builder_cls = DATASETS.get(name)
        except KeyError as err:
            raise ConfigError(f"datasets.{name}: {err.args[0]}") from None
        cfg = merge_onto(builder_cls.config_class, node, f"datasets.{name}", sources)
        out[name] = builder_cls(cfg, name, sources).build()
        notes[name] = builder_cls.overlap_note
    warn_eval_overlap(out, notes)
    return out


# ------------------------------------------------------------------------------- Chinese captions
# tools/convert_{coco_cn,flickr_cn,aic_caption,xm3600}.py write their files; configs/datasets/<name>.yaml
# keep the Chinese as written (text_processor clean: whitespace).
class CocoCNCaptionBuilder(CaptionBuilder):
    overlap_note = ("COCO-CN's images come from COCO train2014 and val2014, which COCO-trained checkpoints "
                    "such as BLIP-2's have seen")


DATASETS.register("coco_cn_caption")(CocoCNCaptionBuilder)
DATASETS.register("flickr8k_cn_caption")(CaptionBuilder)
DATASETS.register("flickr30k_cn_caption")(CaptionBuilder)
DATASETS.register("aic_caption")(CaptionBuilder)
DATASETS.register("xm3600_zh_caption")(CaptionBuilder)


# ----------------------------------------------------------------- evaluation images seen in training
def image_paths(data: Dataset) -> set[str]:
    """The resolved image paths of a data set's records; empty for one without a record list (shards)."""
    annotation, root = getattr(data, "annotation", None), getattr(data, "image_root", None)
    if annotation is None or root is None:
        return set()
    root = Path(root).resolve()
    return {os.path.normpath(root / record["image"]) for record in annotation}


def warn_eval_overlap(built: dict[str, dict[str, Dataset]], notes: dict[str, str] | None = None) -> None:
    """Log one warning per evaluation split whose images (by resolved path) also appear in the train
    split of any data set in ``built``, with the count and the train splits; ``notes[name]`` is added."""
    train = {f"{name}/train": image_paths(splits["train"]) for name, splits in built.items() if "train" in splits}
    train = {key: paths for key, paths in train.items() if paths}
    if not train:
        return
    for name, splits in built.items():
        for split, data in splits.items():
            if split == "train":
                continue
            paths = image_paths(data)
            shared = {key: paths & seen for key, seen in train.items()}
            shared = {key: common for key, common in shared.items() if common}
            if not shared:
                continue
            count = len(set().union(*shared.values()))
            where = ", ".join(f"{len(common):,} in {key}" for key, common in shared.items())
            note = (notes or {}).get(name)
            logger.warning("%s/%s: %s of %s images also appear in the training annotations (%s), so its scores "
                           "on them are not held out%s", name, split, f"{count:,}", f"{len(paths):,}", where,
                           f"; {note}" if note else "")
