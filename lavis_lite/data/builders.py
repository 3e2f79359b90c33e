"""Data set builders, registered in ``DATASETS``, and ``build_datasets``: the runner's entry point.

A builder turns one validated ``datasets.<name>`` node into ``{split: Dataset}``. The ``train``
split gets the training data set class and the ``train`` processors; every other split gets the
evaluation class and the ``eval`` processors. Defaults per data set live in
``configs/datasets/<name>.yaml`` (merged by the config loader); everything else in ``DatasetConfig``.

Every path is checked when building, and a missing one names the config key to set. The shapes
builders first generate their data (rank 0, behind a barrier) if it is not there yet.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import Dataset

from lavis_lite import dist
from lavis_lite.config import ConfigError, Sources, merge_onto
from lavis_lite.data.datasets import (
    CaptionDataset,
    CaptionEvalDataset,
    ImageDataset,
    RetrievalEvalDataset,
    VQADataset,
    VQAEvalDataset,
)
from lavis_lite.data.processors import build_processor
from lavis_lite.data.shapes import ShapesSpec, ensure_shapes
from lavis_lite.registry import DATASETS

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildInfo:
    """Where the files are. Every path but ``storage`` is relative to ``storage``."""

    storage: str = ""  # the data set's root folder (required)
    images: str = ""  # image folder; the annotations' "image" paths are relative to it
    # split -> LAVIS-format json file, or a list of files to concatenate
    annotations: dict[str, Any] = dataclasses.field(default_factory=dict)
    caption_gt: dict[str, str] = dataclasses.field(default_factory=dict)  # split -> COCO-format ground truth
    vqa_questions: dict[str, str] = dataclasses.field(default_factory=dict)  # split -> VQAv2 questions file
    vqa_annotations: dict[str, str] = dataclasses.field(default_factory=dict)  # split -> VQAv2 annotations file


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


@dataclasses.dataclass
class ShapesDatasetConfig(DatasetConfig):
    generator: ShapesSpec = dataclasses.field(default_factory=ShapesSpec)  # what ensure_shapes writes


class DatasetBuilder:
    """Builds the splits of one data set from its validated config."""

    config_class: ClassVar[type[DatasetConfig]] = DatasetConfig
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
        image_root = storage / info.images
        if not image_root.is_dir():
            raise ConfigError(f"{self.key}.build_info.images: no image folder at {image_root}; set "
                              f"{self.key}.build_info.storage (now {storage}) or .images (now {info.images!r})"
                              f"{self.missing_hint(storage)}")
        if not info.annotations:
            raise ConfigError(f"{self.key}.build_info.annotations is empty; map each split to its json file")
        processors = {
            stage: (self._processor("vis_processor", stage), self._processor("text_processor", stage))
            for stage in {"train" if split == "train" else "eval" for split in info.annotations}
        }
        common = dict(name=self.name, skip_bad_images=self.cfg.skip_bad_images, sample_ratio=self.cfg.sample_ratio)
        splits: dict[str, Dataset] = {}
        for split, paths in info.annotations.items():
            files = self._files(storage, paths, f"annotations.{split}")
            vis, text = processors["train" if split == "train" else "eval"]
            if split == "train":
                splits[split] = self.train_class(files, image_root, vis, text, **common)
            else:
                splits[split] = self.eval_class(files, image_root, vis, text, **common, **self.eval_files(storage, split))
            logger.info("%s/%s: %d samples", self.name, split, len(splits[split]))
        return splits

    def eval_files(self, storage: Path, split: str) -> dict[str, Path | None]:
        """Ground-truth file arguments of ``eval_class`` for ``split``."""
        return {}

    def _optional_file(self, storage: Path, table: dict[str, str], field: str, split: str) -> Path | None:
        return self._files(storage, table[split], f"{field}.{split}")[0] if split in table else None

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
            ensure_shapes(storage, **dataclasses.asdict(self.cfg.generator))
        dist.barrier()

    def missing_hint(self, storage: Path) -> str:
        return f" (shapes data: delete {storage} and it is generated again)"


DATASETS.register("coco_caption")(CaptionBuilder)
DATASETS.register("coco_retrieval")(RetrievalBuilder)
DATASETS.register("coco_vqa")(VQABuilder)


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
    for name, node in (datasets_node or {}).items():
        try:
            builder_cls = DATASETS.get(name)
        except KeyError as err:
            raise ConfigError(f"datasets.{name}: {err.args[0]}") from None
        cfg = merge_onto(builder_cls.config_class, node, f"datasets.{name}", sources)
        out[name] = builder_cls(cfg, name, sources).build()
    return out
