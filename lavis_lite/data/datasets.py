"""Map-style data sets over LAVIS-format annotation json, each with a ``collater``.

Annotations are held in ``PackedRecords`` (see records.py) and image paths are relative to
``image_root``. Ids (``image_id``, ``question_id``, ``index``) stay Python lists in a batch: they
may be strings and never go to a device.

Unreadable images: by default a missing, corrupt or truncated image raises ``BadImageError`` naming
the file and the config key ``datasets.<name>.skip_bad_images``. With ``skip_bad_images=True``:

- training sets replace the sample by the next readable one (image *and* its text);
- evaluation sets keep the sample but give it a black image, so every id still gets exactly one
  prediction (a duplicated or missing id would corrupt the metric) and the score counts it as
  whatever the model says about a black image.

Either way each bad file is logged with its path and counted. ``bad_image_count`` counts in this
process only (each DataLoader worker has its own copy), so every batch also carries
``"bad_images"``: the number of bad files met while making it, which reaches the main process
with the batch and sums to the epoch total.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import IO, Any, Callable, ClassVar, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from lavis_lite.data.records import PackedRecords

logger = logging.getLogger(__name__)

_MAX_CONSECUTIVE_BAD = 100  # more than this in a row means a wrong path, not a few bad files
# What PIL raises for missing, unidentifiable, truncated or absurdly large files.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class BadImageError(RuntimeError):
    """An image file could not be read and skipping is off."""


def skip_or_raise(dataset: Any, what: str, err: Exception) -> None:
    """The bad-sample policy of ``dataset`` (``name``, ``skip_bad_images``, ``bad_image_count``):
    raise naming ``what`` and the config key, or, with skipping on, count and log it."""
    if not dataset.skip_bad_images:
        raise BadImageError(
            f"{what} ({type(err).__name__}: {err}); fix or remove it, or set "
            f"datasets.{dataset.name}.skip_bad_images=true to skip unreadable samples"
        ) from err
    dataset.bad_image_count += 1
    logger.warning("%s: %s (%s: %s); skipped", dataset.name, what, type(err).__name__, err)


def load_image(path: Path | IO[bytes], draft: Callable[[Image.Image], Any] | None = None) -> Image.Image:
    """Decode ``path`` as RGB. ``draft`` (an image processor's ``draft``) may first ask PIL to decode
    a JPEG at a reduced scale that its transform can still use without upsampling."""
    with Image.open(path) as image:
        if draft is not None:
            draft(image)
        return image.convert("RGB")  # forces the decode, so a truncated file fails here


def process_image(file: Path | IO[bytes], processor: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """``file`` through ``processor``: its ``load(file)`` when it has one (the image processors: they
    choose the crop before decoding, see processors.py), else ``processor(load_image(file))``."""
    if hasattr(processor, "load"):
        return processor.load(file)
    return processor(load_image(file, getattr(processor, "draft", None)))


def load_annotations(paths: Sequence[str | Path], required: dict[str, type | tuple[type, ...]],
                     what: str) -> list[dict[str, Any]]:
    """Concatenate the json lists in ``paths``, checking each record has the ``required`` keys and
    types. ``what`` names the config key that chose the files, for error messages."""
    records: list[dict[str, Any]] = []
    for path in paths:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read annotation file {path} ({err}); check {what}") from None
        if not isinstance(data, list):
            raise ValueError(f"{path} holds a {type(data).__name__}, not a list of records; check {what} "
                             "(LAVIS-format json, not COCO/VQAv2 ground truth)")
        for i, record in enumerate(data):
            for key, kind in required.items():
                if not isinstance(record, dict) or key not in record:
                    found = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise ValueError(f"{path}: record {i} has no {key!r} (has {found}); "
                                     f"needed keys: {list(required)}; check {what}")
                if not isinstance(record[key], kind):
                    raise ValueError(f"{path}: record {i} {key!r} is {type(record[key]).__name__}, expected "
                                     f"{kind}; check {what} (train and eval files differ in format)")
        records += data
    return records


def image_id_of(record: dict[str, Any]) -> int | str:
    """The record's ``image_id``, else derived from the file name as LAVIS does for COCO Karpathy
    val/test (``COCO_val2014_000000391895.jpg`` -> 391895)."""
    if "image_id" in record:
        return record["image_id"]
    tail = Path(record["image"]).stem.split("_")[-1]
    return int(tail) if tail.isdigit() else Path(record["image"]).stem


class ImageDataset(Dataset):
    """Common part: annotations, image loading, bad-image policy. Subclasses set ``required``,
    ``is_train`` and build samples."""

    required: ClassVar[dict[str, type | tuple[type, ...]]] = {"image": str}
    is_train: ClassVar[bool] = False

    def __init__(
        self,
        ann_paths: str | Path | Sequence[str | Path],
        image_root: str | Path,
        vis_processor: Callable[[Image.Image], torch.Tensor],
        text_processor: Callable[[str], str] | None = None,
        *,
        name: str = "dataset",
        skip_bad_images: bool = False,
        sample_ratio: float = 1.0,
        prompt: str | None = None,
        language: str | None = None,
    ):
        """``name``: the data set's key under ``datasets:`` (for error messages).
        ``sample_ratio``: relative weight when several training sets are mixed (read by the runner).
        ``prompt``: caption data: the text before each caption (in training and generation), in the
        captions' language; None leaves it to ``model.prompt``. ``language``: caption data: the
        captions' language for scoring; None leaves it to ``run.language``."""
        paths = [ann_paths] if isinstance(ann_paths, (str, Path)) else list(ann_paths)
        self.ann_paths = [Path(p) for p in paths]
        self.image_root = Path(image_root)
        self.vis_processor, self.text_processor = vis_processor, text_processor
        self.name, self.skip_bad_images, self.sample_ratio = name, skip_bad_images, sample_ratio
        self.prompt, self.language = prompt, language
        self.bad_image_count = 0  # in this process only; see the module docstring
        records = load_annotations(self.ann_paths, self.required, f"datasets.{name}.build_info.annotations")
        self.annotation = PackedRecords(self.prepare(records))
        self._image_size = getattr(vis_processor, "image_size", None)  # of the placeholder for a bad image
        logger.debug("%s: %d records (%d bytes) from %s", name, len(self.annotation),
                     self.annotation.nbytes, [str(p) for p in self.ann_paths])

    def _prompt(self) -> dict[str, str]:
        """``{"prompt": ...}`` for a sample when this data set sets a prompt, else {}."""
        return {} if self.prompt is None else {"prompt": self.prompt}

    def prepare(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Records as stored; subclasses may reshape or index them here."""
        return records

    def __len__(self) -> int:
        return len(self.annotation)

    def _try_load(self, record: dict[str, Any]) -> torch.Tensor | None:
        """The processed image, or None (logged and counted) when it is unreadable and skipping is on."""
        path = self.image_root / record["image"]
        try:
            return process_image(path, self.vis_processor)
        except _IMAGE_ERRORS as err:
            skip_or_raise(self, f"cannot read image {path}", err)
            return None

    def load(self, index: int) -> tuple[dict[str, Any], torch.Tensor, int]:
        """(record, processed image [3, H, W], number of bad files met) for ``index``, applying the
        bad-image policy."""
        if not self.is_train:
            record = self.annotation[index]
            image = self._try_load(record)
            if image is None:
                size = self._image_size or 224
                return record, self.vis_processor(Image.new("RGB", (size, size))), 1
            return record, image, 0
        tries = min(len(self), _MAX_CONSECUTIVE_BAD)
        for bad in range(tries):
            record = self.annotation[(index + bad) % len(self)]
            image = self._try_load(record)
            if image is not None:
                return record, image, bad
        raise BadImageError(
            f"{self.name}: {tries} image(s) in a row from index {index} are unreadable (e.g. "
            f"{self.image_root / record['image']}); check datasets.{self.name}.build_info.storage and .images"
        )


# ---------------------------------------------------------------------------------------- caption
class CaptionDataset(ImageDataset):
    """Training captions, one record per caption (COCO Karpathy train format).

    Sample: {"image": [3, H, W], "text_input": processed caption, "image_id": raw id, "bad_images": int}.
    """

    required = {"image": str, "caption": str}
    is_train = True

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, image, bad = self.load(index)
        return {"image": image, "text_input": self.text_processor(record["caption"]),
                "image_id": image_id_of(record), "bad_images": bad, **self._prompt()}

    @staticmethod
    def collater(samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Batch: image [B, 3, H, W]; text_input, image_id: lists; bad_images: int; prompt: a list
        (None where the sample's data set sets none) when any sample's data set sets one."""
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "text_input": [s["text_input"] for s in samples],
            "image_id": [s["image_id"] for s in samples],
            "bad_images": sum(s["bad_images"] for s in samples),
            **_prompts(samples),
        }


def _prompts(samples: list[dict[str, Any]]) -> dict[str, list[str | None]]:
    """``{"prompt": [...]}`` when a sample carries a data-set prompt (mixed data sets may differ), else {}."""
    prompts = [s.get("prompt") for s in samples]
    return {"prompt": prompts} if any(p is not None for p in prompts) else {}


class CaptionEvalDataset(ImageDataset):
    """Caption evaluation, one record per image (Karpathy val/test format).

    ``gt_path``: COCO-format ground truth for the captioning metric (or None).
    Sample: {"image": [3, H, W], "image_id": raw id, "bad_images": int}.
    """

    def __init__(self, *args: Any, gt_path: str | Path | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.gt_path = Path(gt_path) if gt_path is not None else None

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, image, bad = self.load(index)
        return {"image": image, "image_id": image_id_of(record), "bad_images": bad, **self._prompt()}

    @staticmethod
    def collater(samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Batch: image [B, 3, H, W]; image_id: list; bad_images: int; prompt as ``CaptionDataset``'s."""
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "image_id": [s["image_id"] for s in samples],
            "bad_images": sum(s["bad_images"] for s in samples),
            **_prompts(samples),
        }


class NoCapsEvalDataset(CaptionEvalDataset):
    """NoCaps evaluation (LAVIS's ``nocaps_{val,test}.json``: "image" and the integer "img_id" of the
    official COCO-format ground truth; Open Images file names carry no usable id).

    Sample: as ``CaptionEvalDataset``, with ``image_id`` = the record's ``img_id``.
    """

    required = {"image": str, "img_id": (int, str)}

    def prepare(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**record, "image_id": record["img_id"]} for record in records]


class RetrievalEvalDataset(ImageDataset):
    """Image-text retrieval evaluation (Karpathy val/test format), as LAVIS's retrieval eval set.

    Attributes: ``text`` (every processed caption), ``image`` (image paths, one per item),
    ``txt2img[caption index] -> image index``, ``img2txt[image index] -> caption indices``.
    Sample: {"image": [3, H, W], "index": image index, "bad_images": int}.
    """

    required = {"image": str, "caption": list}

    def prepare(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.text: list[str] = []
        self.image: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        for img_index, record in enumerate(records):
            self.image.append(record["image"])
            self.img2txt.append(list(range(len(self.text), len(self.text) + len(record["caption"]))))
            for caption in record["caption"]:
                self.text.append(self.text_processor(caption))
                self.txt2img.append(img_index)
        return records

    def __getitem__(self, index: int) -> dict[str, Any]:
        _, image, bad = self.load(index)
        return {"image": image, "index": index, "bad_images": bad}

    @staticmethod
    def collater(samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Batch: image [B, 3, H, W]; index: list of image indices; bad_images: int."""
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "index": [s["index"] for s in samples],
            "bad_images": sum(s["bad_images"] for s in samples),
        }


# -------------------------------------------------------------------------------------------- VQA
class VQADataset(ImageDataset):
    """VQA training (LAVIS's json: question, list of answers, image).

    Sample: {"image": [3, H, W], "text_input": processed question, "answers": distinct answers,
    "weights": their frequency among the given answers (LAVIS), "question_id", "bad_images": int}.
    """

    required = {"image": str, "question": str, "answer": (list, str)}
    is_train = True

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, image, bad = self.load(index)
        given = record["answer"] if isinstance(record["answer"], list) else [record["answer"]]
        weights: dict[str, float] = {}
        for answer in given:
            weights[answer] = weights.get(answer, 0.0) + 1.0 / len(given)
        return {"image": image, "text_input": self.text_processor(record["question"]),
                "answers": list(weights), "weights": list(weights.values()),
                "question_id": record.get("question_id"), "bad_images": bad}

    @staticmethod
    def collater(samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Batch: image [B, 3, H, W]; text_input: list; answer: flat list over the batch;
        weight: [sum n_answers] float; n_answers: [B] long; question_id: list; bad_images: int."""
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "text_input": [s["text_input"] for s in samples],
            "answer": [a for s in samples for a in s["answers"]],
            "weight": torch.tensor([w for s in samples for w in s["weights"]], dtype=torch.float32),
            "n_answers": torch.tensor([len(s["answers"]) for s in samples], dtype=torch.long),
            "question_id": [s["question_id"] for s in samples],
            "bad_images": sum(s["bad_images"] for s in samples),
        }


class VQAEvalDataset(ImageDataset):
    """VQA evaluation. ``question_path`` / ``annotation_path``: the official VQAv2-format files for
    the accuracy metric (or None, e.g. test-dev).

    Sample: {"image": [3, H, W], "text_input": processed question, "question_id", "bad_images": int}.
    """

    required = {"image": str, "question": str, "question_id": (int, str)}

    def __init__(self, *args: Any, question_path: str | Path | None = None,
                 annotation_path: str | Path | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.question_path = Path(question_path) if question_path is not None else None
        self.annotation_path = Path(annotation_path) if annotation_path is not None else None

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, image, bad = self.load(index)
        return {"image": image, "text_input": self.text_processor(record["question"]),
                "question_id": record["question_id"], "bad_images": bad}

    @staticmethod
    def collater(samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Batch: image [B, 3, H, W]; text_input, question_id: lists; bad_images: int."""
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "text_input": [s["text_input"] for s in samples],
            "question_id": [s["question_id"] for s in samples],
            "bad_images": sum(s["bad_images"] for s in samples),
        }
