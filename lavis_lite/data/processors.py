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

The tensor pipeline (``backend: tensor``, the default; ``pil`` is the transform above, unchanged):
``load(file)`` reads the JPEG's header, draws the crop first (``RandomResizedCrop.get_params`` on the
header's size, the same RNG draws as the PIL transform), then decodes at 1/2, 1/4 or 1/8 scale when
*that* crop (not every possible one) keeps ``image_size`` px, else in full with
``torchvision.io.decode_jpeg``; crop, bicubic resize (antialiased, as PIL) and flip run on uint8
tensors and one multiply-add normalises. Measured at 1 thread (bench/bench_images.py): PIL's scaled
decode beats a full ``decode_jpeg`` whenever it applies, ``decode_jpeg`` beats PIL's full decode, and
the uint8 resize is ~4x PIL's. On the same decode, pixels are within one grey level of the PIL
transform except about 1 value in a million, which differs by 2: torch's uint8 kernel rounds the filter
coefficients to 16 bits, Pillow to 32 (tests/data/test_image_tensor_pipeline.py, bench/RESULTS.md).
Other files (PNG, WebP, CMYK JPEGs) are decoded by PIL, and decoded images (PIL or uint8 tensors) go
through ``__call__``, then the same tensor steps.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import math
import re
from pathlib import Path
from typing import IO, Any, Callable, ClassVar, Literal

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, JpegImagePlugin
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from lavis_lite.config import ConfigError, Sources, merge_onto
from lavis_lite.registry import PROCESSORS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_LAVIS_PUNCT = re.compile(r"([.!\"()*#:;~])")
ImageSource = str | Path | bytes | bytearray | IO[bytes]  # what ``load`` reads
Box = tuple[int, int, int, int]  # top, left, height, width (RandomResizedCrop.get_params's order)


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
    jpeg_draft: bool = True  # decode JPEGs at 1/2, 1/4, 1/8 scale when the crop keeps >= image_size px
    # tensor (default): load() picks the crop before decoding, uint8 tensor resize; pil: PIL transforms
    backend: Literal["tensor", "pil"] = "tensor"
    mean: list[float] = dataclasses.field(default_factory=lambda: list(CLIP_MEAN))
    std: list[float] = dataclasses.field(default_factory=lambda: list(CLIP_STD))


@dataclasses.dataclass
class BlipImageEvalConfig:
    image_size: int = 224
    jpeg_draft: bool = True  # draft(): decode JPEGs at 1/2, 1/4, 1/8 scale when both sides stay >= image_size
    backend: Literal["tensor", "pil"] = "tensor"  # tensor (default): uint8 tensor resize; pil: PIL transforms
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


def scale_box(box: Box, k: int, full: tuple[int, int], reduced: tuple[int, int]) -> Box:
    """``box`` of a ``full`` (width, height) image in the 1/k-scale decode of size ``reduced``: edges
    divided by k and rounded, an edge on the image's border kept on it (libjpeg's reduced size is
    ``ceil(W / k)``, one pixel more than ``round(W / k)`` for some W)."""
    top, left, height, width = box
    bottom = reduced[1] if top + height == full[1] else min(round((top + height) / k), reduced[1])
    right = reduced[0] if left + width == full[0] else min(round((left + width) / k), reduced[0])
    top, left = round(top / k), round(left / k)
    return top, left, bottom - top, right - left


def read_file(file: ImageSource) -> bytearray:
    """The bytes of a path, a bytes object or a binary file object, writable (torch.frombuffer warns
    about read-only buffers)."""
    if isinstance(file, (str, Path)):
        with open(file, "rb") as handle:
            return bytearray(handle.read())
    if isinstance(file, (bytes, bytearray, memoryview)):
        return bytearray(file)
    return bytearray(file.read())


def to_uint8(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """A decoded image as a uint8 [3, H, W] tensor: PIL images converted to RGB as the PIL transform's
    callers do (a channels-last view of one uint8 copy, no float copy), uint8 tensors as they are."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor of dtype {image.dtype} and shape {tuple(image.shape)}; "
                             "give a uint8 [3, H, W] tensor (RGB), or a PIL image")
        return image
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _check_image_config(cfg: BlipImageTrainConfig | BlipImageEvalConfig) -> None:
    if cfg.image_size <= 0:
        raise ValueError(f"image_size={cfg.image_size}; it must be positive")
    if len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0:
        raise ValueError(f"mean={cfg.mean}, std={cfg.std}; give 3 values each (RGB), std > 0")


class _ImageProcessor:
    """What both image processors share: ``cfg`` with ``image_size``, ``jpeg_draft`` and ``backend``,
    the PIL ``transform``, ``fits(width, height)`` (whether a decoded size still serves every crop of
    the transform without upsampling), and the tensor pipeline: ``box`` (the crop of a width x height
    image, drawn before decoding) and ``resize`` (uint8 crop/resize/flip).

    ``decoded_scales`` counts the JPEG reductions ``load`` used ({k: files decoded at 1/k}), in this
    process: the benchmark reports it, and it shows whether reduced decoding applies to a data set."""

    cfg: BlipImageTrainConfig | BlipImageEvalConfig
    transform: Callable[[Image.Image], torch.Tensor]

    def _init_tensor_pipeline(self) -> None:
        # (x / 255 - mean) / std = (x - 255 mean) / (255 std), rounded as transformers' torchvision backend
        # rounds it, so an exported BlipImageProcessor (backend="torchvision") gives these pixels exactly
        self._mean255 = (torch.tensor(self.cfg.mean) * 255.0).view(3, 1, 1)
        self._std255 = (torch.tensor(self.cfg.std) * 255.0).view(3, 1, 1)
        self.decoded_scales: collections.Counter[int] = collections.Counter()

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    def fits(self, width: int, height: int) -> bool:
        raise NotImplementedError

    def box(self, width: int, height: int) -> Box:
        """The region of a ``width`` x ``height`` image that ``resize`` turns into the output."""
        raise NotImplementedError

    def resize(self, pixels: torch.Tensor, box: Box) -> torch.Tensor:
        """uint8 [3, H, W] -> uint8 [3, image_size, image_size]: ``box`` resized, flipped if augmenting."""
        raise NotImplementedError

    def draft(self, image: Image.Image) -> Image.Image:
        """Before decoding: a JPEG is decoded at the strongest reduced scale that still ``fits``."""
        if self.cfg.jpeg_draft:
            jpeg_draft(image, self.fits)
        return image

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """A decoded image (PIL, or a uint8 [3, H, W] tensor) -> [3, image_size, image_size] float."""
        if self.cfg.backend == "pil" and isinstance(image, Image.Image):
            return self.transform(image)
        pixels = to_uint8(image)
        return self.normalise(self.resize(pixels, self.box(pixels.shape[2], pixels.shape[1])))

    def load(self, file: ImageSource) -> torch.Tensor:
        """An image file (path, bytes or binary file) -> [3, image_size, image_size] float.

        ``tensor`` backend, RGB or grey JPEG: the box is drawn from the header's size, then the file
        is decoded at the strongest 1/k whose scaled box keeps ``image_size`` px on both sides (PIL's
        scaled decode), else in full (``decode_jpeg``). Anything else: PIL decodes (with ``draft``)
        and ``__call__`` processes. Raises OSError (or another ``datasets._IMAGE_ERRORS``) for a
        missing, unreadable or truncated file."""
        data = read_file(file)
        with Image.open(io.BytesIO(data)) as image:
            if self.cfg.backend == "pil" or image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return self(self.draft(image).convert("RGB"))
            full = image.size
            box = self.box(*full)
            k = self._reduction(box, full) if self.cfg.jpeg_draft else 1
            if k > 1 and image.draft("RGB", (full[0] // k, full[1] // k)) is not None:
                self.decoded_scales[k] += 1
                pixels = to_uint8(image)  # decodes; RGB already (grey is converted), so no convert() copy
                box = scale_box(box, k, full, image.size)
            else:
                try:
                    pixels = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
                except RuntimeError:  # truncated, or a JPEG libjpeg-turbo refuses: PIL decodes, or raises OSError
                    pixels = to_uint8(image.convert("RGB"))
                self.decoded_scales[1] += 1
        return self.normalise(self.resize(pixels, box))

    def _reduction(self, box: Box, full: tuple[int, int]) -> int:
        """The largest k in (8, 4, 2) whose 1/k decode keeps ``image_size`` px across ``box``, else 1."""
        for k in (8, 4, 2):
            reduced = (-(-full[0] // k), -(-full[1] // k))
            if full[0] // k and full[1] // k and min(scale_box(box, k, full, reduced)[2:]) >= self.cfg.image_size:
                return k
        return 1

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [3, S, S] -> float [3, S, S], ``(x / 255 - mean) / std`` as one subtraction (which
        converts) and one in-place division."""
        out = torch.empty(pixels.shape, dtype=torch.float32)
        return torch.sub(pixels, self._mean255, out=out).div_(self._std255)


@PROCESSORS.register("blip_image_train")
class BlipImageTrainProcessor(_ImageProcessor):
    """Image -> [3, image_size, image_size] float tensor: random resized crop (bicubic), optional
    horizontal flip, CLIP normalisation."""

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
        self._init_tensor_pipeline()

    def fits(self, width: int, height: int) -> bool:
        """Whether every crop ``RandomResizedCrop`` can take of a ``width`` x ``height`` image is at
        least ``image_size`` pixels on both sides. A sampled crop of area ``a >= min_scale * W * H``
        and aspect ratio ``r`` in ``ratio`` has sides ``round(sqrt(a * r))``, ``round(sqrt(a / r))``,
        both ``>= sqrt(min_scale * W * H * min(r, 1 / r)) - 0.5``; the fallback centre crop has both
        sides ``>= min(W, H)``."""
        rmin = min(min(self.crop.ratio), 1 / max(self.crop.ratio))
        smallest_side = math.sqrt(self.cfg.min_scale * width * height * rmin) - 1  # 1 px for rounding
        return min(smallest_side, width, height) >= self.cfg.image_size

    def box(self, width: int, height: int) -> Box:
        """``RandomResizedCrop.get_params`` on the size alone (a zero-byte expanded tensor), so the
        torch RNG draws, and a seeded run's crops, are the PIL transform's."""
        size_only = torch.empty((), dtype=torch.uint8).expand(1, height, width)
        return tuple(self.crop.get_params(size_only, self.crop.scale, self.crop.ratio))

    def resize(self, pixels: torch.Tensor, box: Box) -> torch.Tensor:
        size = [self.cfg.image_size] * 2
        out = TF.resized_crop(pixels, *box, size, InterpolationMode.BICUBIC, antialias=True)
        if self.cfg.hflip and torch.rand(1) < 0.5:  # RandomHorizontalFlip's draw, after the crop's
            out = out.flip(-1)
        return out


@PROCESSORS.register("blip_image_eval")
class BlipImageEvalProcessor(_ImageProcessor):
    """Image -> [3, image_size, image_size] float tensor: bicubic resize, CLIP normalisation."""

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
        self._init_tensor_pipeline()

    def fits(self, width: int, height: int) -> bool:
        """The resize to ``image_size`` x ``image_size`` only shrinks both sides."""
        return min(width, height) >= self.cfg.image_size

    def box(self, width: int, height: int) -> Box:
        return 0, 0, height, width

    def resize(self, pixels: torch.Tensor, box: Box) -> torch.Tensor:
        return TF.resized_crop(pixels, *box, [self.cfg.image_size] * 2, InterpolationMode.BICUBIC, antialias=True)


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
