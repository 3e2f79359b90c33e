"""Image and text processors, registered in ``PROCESSORS`` and built from a config node.

A node is ``{name: <registered name>, <field>: <value>, ...}``; the fields are validated against the
processor's config dataclass, so a misspelled key fails when the data sets are built.

Differences from LAVIS: ``blip_image_train`` has no RandAugment (it matches LAVIS's
``blip2_image_train``, which the BLIP-2 configs use), and its horizontal flip can be switched off
(``hflip``), for data whose text talks about left and right.

Reduced-size JPEG decoding (``jpeg_draft``, on by default): the image processors' ``draft(image)``,
called on an opened, not yet decoded image (``Image.open`` before ``convert``/``load``), asks PIL to
decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's scaled IDCT, ``Image.draft``) when the smaller image
still gives the transform at least ``image_size`` pixels across every crop it can take, so nothing is
ever upsampled that a full decode would have downsampled. It does nothing to other formats or to
images already decoded, so whoever opens the file (the data set) must call it between ``Image.open``
and the decode.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, ClassVar, Literal

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, JpegImagePlugin
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from lavis_lite.config import ConfigError, Sources, merge_onto
from lavis_lite.registry import PROCESSORS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_LAVIS_PUNCT = re.compile(r"([.!\"()*#:;~])")


def build_processor(node: Any, where: str = "processor", sources: Sources | None = None) -> Any:
    """Build the processor named by ``node.name`` with the node's other keys as its config.

    ``where`` is the node's dotted config key (e.g. ``datasets.coco_caption.vis_processor.train``),
    used in error messages.
    """
    node = node if isinstance(node, DictConfig) else OmegaConf.create(node or {})
    if "name" not in node:
        raise ConfigError(f"{where}.name is missing; set it to one of {PROCESSORS.names()}")
    try:
        cls = PROCESSORS.get(node.name)
    except KeyError as err:
        raise ConfigError(f"{where}.name: {err.args[0]}") from None
    fields = {k: v for k, v in node.items() if k != "name"}
    cfg = merge_onto(cls.config_class, fields, where, sources)
    try:
        return cls(cfg)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


# ------------------------------------------------------------------------------------------ image
@dataclasses.dataclass
class BlipImageTrainConfig:
    image_size: int = 224  # BLIP-2's; LAVIS's processor default is 384
    min_scale: float = 0.5  # RandomResizedCrop area range
    max_scale: float = 1.0
    hflip: bool = True  # LAVIS always flips; switch off when text mentions left/right
    jpeg_draft: bool = True  # draft(): decode JPEGs at 1/2, 1/4, 1/8 scale when every crop keeps >= image_size px
    mean: list[float] = dataclasses.field(default_factory=lambda: list(CLIP_MEAN))
    std: list[float] = dataclasses.field(default_factory=lambda: list(CLIP_STD))


@dataclasses.dataclass
class BlipImageEvalConfig:
    image_size: int = 224
    jpeg_draft: bool = True  # draft(): decode JPEGs at 1/2, 1/4, 1/8 scale when both sides stay >= image_size
    mean: list[float] = dataclasses.field(default_factory=lambda: list(CLIP_MEAN))
    std: list[float] = dataclasses.field(default_factory=lambda: list(CLIP_STD))


def jpeg_draft(image: Image.Image, fits: Callable[[int, int], bool]) -> int:
    """Ask PIL to decode ``image`` (opened, not yet loaded) at the strongest JPEG reduction 1/k, k in
    (8, 4, 2), whose decoded size ``(ceil(W / k), ceil(H / k))`` still ``fits(width, height)``.
    Returns k: 1 when nothing was reduced (not a JPEG, already loaded or drafted, or no scale fits)."""
    if not isinstance(image, JpegImagePlugin.JpegImageFile):
        return 1
    width, height = image.size
    for k in (8, 4, 2):
        size = (-(-width // k), -(-height // k))
        # PIL picks the largest k in (8, 4, 2, 1) with k <= min(W // w, H // h): for (W // k, H // k) that is k
        if width // k and height // k and fits(*size):
            if image.draft("RGB", (width // k, height // k)) is not None and image.size == size:
                return k
            return 1
    return 1


def _check_image_config(cfg: BlipImageTrainConfig | BlipImageEvalConfig) -> None:
    if cfg.image_size <= 0:
        raise ValueError(f"image_size={cfg.image_size}; it must be positive")
    if len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0:
        raise ValueError(f"mean={cfg.mean}, std={cfg.std}; give 3 values each (RGB), std > 0")


class _ImageProcessor:
    """What both image processors share: ``cfg`` with ``image_size`` and ``jpeg_draft``, a ``transform``
    and ``fits(width, height)``, whether a decoded size still serves the transform without upsampling."""

    cfg: BlipImageTrainConfig | BlipImageEvalConfig
    transform: Callable[[Image.Image], torch.Tensor]

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    def fits(self, width: int, height: int) -> bool:
        raise NotImplementedError

    def draft(self, image: Image.Image) -> Image.Image:
        """Before decoding: a JPEG is decoded at the strongest reduced scale that still ``fits``."""
        if self.cfg.jpeg_draft:
            jpeg_draft(image, self.fits)
        return image

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)


@PROCESSORS.register("blip_image_train")
class BlipImageTrainProcessor(_ImageProcessor):
    """PIL image -> [3, image_size, image_size] float tensor: random resized crop (bicubic),
    optional horizontal flip, CLIP normalisation."""

    config_class: ClassVar[type] = BlipImageTrainConfig
    augments: ClassVar[bool] = True  # an image gives a different tensor each time

    def __init__(self, cfg: BlipImageTrainConfig | None = None):
        self.cfg = cfg = cfg or BlipImageTrainConfig()
        _check_image_config(cfg)
        if not 0 < cfg.min_scale <= cfg.max_scale <= 1:
            raise ValueError(f"min_scale={cfg.min_scale}, max_scale={cfg.max_scale}; "
                             "need 0 < min_scale <= max_scale <= 1")
        self.crop = transforms.RandomResizedCrop(
            cfg.image_size, scale=(cfg.min_scale, cfg.max_scale), interpolation=InterpolationMode.BICUBIC
        )
        steps: list[Any] = [self.crop]
        if cfg.hflip:
            steps.append(transforms.RandomHorizontalFlip())
        steps += [transforms.ToTensor(), transforms.Normalize(cfg.mean, cfg.std)]
        self.transform = transforms.Compose(steps)

    def fits(self, width: int, height: int) -> bool:
        """Whether every crop ``RandomResizedCrop`` can take of a ``width`` x ``height`` image is at
        least ``image_size`` pixels on both sides. A sampled crop of area ``a >= min_scale * W * H``
        and aspect ratio ``r`` in ``ratio`` has sides ``round(sqrt(a * r))``, ``round(sqrt(a / r))``,
        both ``>= sqrt(min_scale * W * H * min(r, 1 / r)) - 0.5``; the fallback centre crop has both
        sides ``>= min(W, H)``."""
        rmin = min(min(self.crop.ratio), 1 / max(self.crop.ratio))
        smallest_side = math.sqrt(self.cfg.min_scale * width * height * rmin) - 1  # 1 px for rounding
        return min(smallest_side, width, height) >= self.cfg.image_size


@PROCESSORS.register("blip_image_eval")
class BlipImageEvalProcessor(_ImageProcessor):
    """PIL image -> [3, image_size, image_size] float tensor: bicubic resize, CLIP normalisation."""

    config_class: ClassVar[type] = BlipImageEvalConfig
    augments: ClassVar[bool] = False

    def __init__(self, cfg: BlipImageEvalConfig | None = None):
        self.cfg = cfg = cfg or BlipImageEvalConfig()
        _check_image_config(cfg)
        self.transform = transforms.Compose([
            transforms.Resize((cfg.image_size, cfg.image_size), interpolation=InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(cfg.mean, cfg.std),
        ])

    def fits(self, width: int, height: int) -> bool:
        """The resize to ``image_size`` x ``image_size`` only shrinks both sides."""
        return min(width, height) >= self.cfg.image_size


# ------------------------------------------------------------------------------------------- text
def pre_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS's caption cleaning: lowercase, the punctuation ``.!"()*#:;~`` -> space, runs of 2+
    whitespace -> one space, strip, keep the first ``max_words`` space-separated words.

    Text without spaces (Chinese) is never truncated, as in LAVIS.
    """
    caption = _LAVIS_PUNCT.sub(" ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def pre_question(question: str, max_words: int = 50) -> str:
    """LAVIS's question cleaning: lowercase, delete ``.!"()*#:;~`` (``?`` stays), strip trailing
    spaces, keep the first ``max_words`` space-separated words."""
    question = _LAVIS_PUNCT.sub("", question.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


def _check_max_words(max_words: int) -> None:
    if max_words <= 0:
        raise ValueError(f"max_words={max_words}; it must be positive")


@dataclasses.dataclass
class BlipCaptionConfig:
    prompt: str = ""  # prepended after cleaning, e.g. "a photo of "
    max_words: int = 50
    # lavis: pre_caption (lowercase, .!"()*#:;~ -> space), for English; whitespace: only runs of
    # whitespace -> one space, so Chinese keeps its Latin letters' case ("T恤", "NBA") and punctuation
    clean: Literal["lavis", "whitespace"] = "lavis"


@PROCESSORS.register("blip_caption")
class BlipCaptionProcessor:
    config_class: ClassVar[type] = BlipCaptionConfig

    def __init__(self, cfg: BlipCaptionConfig | None = None):
        self.cfg = cfg or BlipCaptionConfig()
        _check_max_words(self.cfg.max_words)

    def __call__(self, caption: str) -> str:
        if self.cfg.clean == "whitespace":
            return self.cfg.prompt + " ".join(caption.split()[:self.cfg.max_words])
        return self.cfg.prompt + pre_caption(caption, self.cfg.max_words)


@dataclasses.dataclass
class BlipQuestionConfig:
    max_words: int = 50


@PROCESSORS.register("blip_question")
class BlipQuestionProcessor:
    config_class: ClassVar[type] = BlipQuestionConfig

    def __init__(self, cfg: BlipQuestionConfig | None = None):
        self.cfg = cfg or BlipQuestionConfig()
        _check_max_words(self.cfg.max_words)

    def __call__(self, question: str) -> str:
        return pre_question(question, self.cfg.max_words)
