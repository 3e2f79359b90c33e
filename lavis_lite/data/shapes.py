"""The embedded "shapes" data set: synthetic photos of coloured shapes written in the real formats.

Each image shows 1-3 shapes of distinct kinds and colours, placed in disjoint vertical bands so
"left of" is always well defined, on a textured background. From the same seeded scene we write:

- COCO Karpathy caption files (English) and COCO-CN style files (Chinese), LAVIS's format, plus
  COCO-format ground truth that ``pycocotools`` and ``pycocoevalcap`` load. Caption image ids are
  strings (``"shapes_<n>"``) on purpose: the code must not assume COCO's integer ids.
- VQAv2 question/annotation files (integer image ids ``<n>``, as VQAv2 requires; same ``n``)
  with 10 human-like answers per question, and LAVIS's own VQA json.
- ``scenes_<split>.json`` (what was drawn, for tests) and a BERT WordPiece ``vocab.txt`` covering
  every caption, question and answer, so ``transformers.BertTokenizer(vocab_file)`` needs no download.

Generation is deterministic: the same ``ShapesSpec`` gives byte-identical files. Image ``i`` of a split
draws from its own generator seeded by ``(seed, split, i)``, so changing one split's count leaves
every other image unchanged.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import re
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from lavis_lite.config import cache_dir

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump on any change to the output, so cached copies are regenerated
SPLITS = ("train", "val", "test")
# Integer image id = offset + index, so a split's ids don't depend on the other splits' sizes.
_ID_OFFSET = {"train": 0, "val": 1_000_000, "test": 2_000_000}
_JPEG_QUALITY = 90
_EN_CAPTIONS_PER_IMAGE = 5  # as COCO
_CN_CAPTIONS_PER_IMAGE = 3

# name -> (Chinese, RGB)
COLOURS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "red": ("红色", (215, 35, 35)),
    "green": ("绿色", (35, 165, 60)),
    "blue": ("蓝色", (35, 70, 215)),
    "yellow": ("黄色", (240, 215, 35)),
    "purple": ("紫色", (135, 45, 170)),
    "orange": ("橙色", (245, 135, 25)),
}
SHAPES: dict[str, str] = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "diamond": "菱形"}
BACKGROUNDS: dict[str, str] = {"plain": "纯色", "noisy": "噪点", "striped": "条纹", "gradient": "渐变", "checkered": "格子"}
_COUNT_EN = {1: "one", 2: "two", 3: "three", 4: "four"}
_COUNT_CN = {1: "一", 2: "两", 3: "三"}
_HPOS = (("left", "左侧"), ("middle", "中间"), ("right", "右侧"))
# Plausible wrong answers from human annotators, to exercise the VQA accuracy metric.
_NEAR_MISS = {
    "red": ["orange", "pink", "dark red"], "orange": ["red", "yellow"], "yellow": ["orange", "gold"],
    "green": ["dark green", "lime"], "blue": ["purple", "dark blue"], "purple": ["blue", "violet"],
    "circle": ["oval", "round"], "square": ["rectangle", "box"], "triangle": ["pyramid"],
    "star": ["starfish", "pentagon"], "diamond": ["rhombus", "square"], "yes": ["no"], "no": ["yes"],
}
# Words that prompts commonly use, so prompted text tokenizes to whole words too.
_PROMPT_WORDS = "a an the photo picture image of question answer short describe what is in this".split()


@dataclasses.dataclass
class ShapesSpec:
    """What to generate; the manifest records it, and a different spec regenerates the data."""

    seed: int = 0
    train: int = 1500  # images per split
    val: int = 200
    test: int = 200
    image_size: int = 128  # pixels, square


@dataclasses.dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    cx: float  # centre and radius in pixels
    cy: float
    r: float


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    items: tuple[Item, ...]  # left to right


def default_shapes_root() -> Path:
    """``$LAVIS_LITE_CACHE/shapes``, else ``~/.cache/lavis_lite/shapes``."""
    return cache_dir() / "shapes"


def _shapes_root_resolver() -> str:
    return str(default_shapes_root())


# YAML says ``storage: ${shapes_root:}``; resolved on access, so the env var is read at run time.
OmegaConf.register_resolver("shapes_root", _shapes_root_resolver, replace=True)


# ---------------------------------------------------------------------------------------- scenes
def sample_scene(rng: np.random.Generator, size: int) -> Scene:
    n = int(rng.choice([1, 2, 3], p=[0.25, 0.4, 0.35]))
    shapes = rng.choice(list(SHAPES), n, replace=False)
    colours = rng.choice(list(COLOURS), n, replace=False)
    band = size / n  # one band per shape: no overlap, strict left-to-right order
    items = []
    for k in range(n):
        r = min(rng.uniform(0.09, 0.14) * size, band / 2 - 2)
        cx = k * band + rng.uniform(r + 1, band - r - 1)
        cy = rng.uniform(r + 2, size - r - 2)
        items.append(Item(str(shapes[k]), str(colours[k]), round(cx, 2), round(cy, 2), round(r, 2)))
    return Scene(str(rng.choice(list(BACKGROUNDS))), tuple(items))


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A greyish colour, so saturated shape colours stay easy to name."""
    return np.clip(rng.uniform(110, 195) + rng.uniform(-20, 20, 3), 0, 255)


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size, 3] uint8."""
    a, b = _muted(rng), _muted(rng)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "plain":
        img = np.broadcast_to(a, (size, size, 3)).astype(np.float32)
    elif kind == "noisy":
        img = a + rng.normal(0, 18, (size, size, 3))
    elif kind == "striped":
        period = rng.integers(8, 21)
        coord = [x, y, x + y][rng.integers(3)]  # vertical, horizontal or diagonal stripes
        mask = ((coord // (period / 2)) % 2)[..., None]
        img = a * (1 - mask) + b * mask
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = (x * math.cos(angle) + y * math.sin(angle)) / size
        t = ((t - t.min()) / max(float(t.max() - t.min()), 1e-6))[..., None]
        img = a * (1 - t) + b * t
    elif kind == "checkered":
        cell = rng.integers(8, 21)
        mask = (((x // cell) + (y // cell)) % 2)[..., None]
        img = a * (1 - mask) + b * mask
    else:
        raise ValueError(f"unknown background {kind!r}; use one of {list(BACKGROUNDS)}")
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(item: Item) -> list[tuple[float, float]]:
    cx, cy, r = item.cx, item.cy, item.r
    if item.shape == "triangle":
        return [(cx, cy - r), (cx - 0.95 * r, cy + 0.8 * r), (cx + 0.95 * r, cy + 0.8 * r)]
    if item.shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if item.shape == "star":
        return [
            (cx + rad * math.cos(math.pi * (k / 5 - 0.5)), cy + rad * math.sin(math.pi * (k / 5 - 0.5)))
            for k, rad in enumerate([r, 0.45 * r] * 5)
        ]
    raise ValueError(f"no polygon for shape {item.shape!r}")


def draw_scene(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    image = Image.fromarray(_background(scene.background, size, rng))
    draw = ImageDraw.Draw(image)
    for item in scene.items:
        base = np.array(COLOURS[item.colour][1])
        fill = tuple(int(v) for v in np.clip(base + rng.integers(-15, 16, 3), 0, 255))  # lighting jitter
        box = (item.cx - item.r, item.cy - item.r, item.cx + item.r, item.cy + item.r)
        if item.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif item.shape == "square":
            s = 0.85 * item.r  # similar area to the circle
            draw.rectangle((item.cx - s, item.cy - s, item.cx + s, item.cy + s), fill=fill)
        else:
            draw.polygon(_polygon(item), fill=fill)
    return image


def _hpos(item: Item, size: int) -> int:
    return min(int(3 * item.cx / size), 2)


# -------------------------------------------------------------------------------------- captions
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(item: Item) -> str:
    return f"{_article(item.colour)} {item.colour} {item.shape}"


def _join_en(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _join_cn(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "、".join(parts[:-1]) + "和" + parts[-1]


def _style(caption: str, rng: np.random.Generator, stop: str) -> str:
    """Half the captions capitalised with a full stop, as human captions are."""
    return caption[0].upper() + caption[1:] + stop if rng.random() < 0.5 else caption


def english_captions(scene: Scene, size: int, rng: np.random.Generator) -> list[str]:
    items, n = scene.items, len(scene.items)
    bg = f"{_article(scene.background)} {scene.background} background"
    listed = _join_en([_np(i) for i in items])
    if n == 1:
        it = items[0]
        options = [
            f"{listed} on {bg}",
            f"a single {it.colour} {it.shape}",
            f"one shape: {listed}",
            f"there is {listed} on {bg}",
            f"a picture of {listed}",
            f"{listed} in the {_HPOS[_hpos(it, size)][0]} of the image",
        ]
    else:
        a, b = sorted(rng.choice(n, 2, replace=False))  # items[a] is left of items[b]
        shuffled = [items[k] for k in rng.permutation(n)]
        options = [
            f"{listed} on {bg}",
            f"{_COUNT_EN[n]} shapes: {listed}",
            f"{_np(items[a])} left of {_np(items[b])}",
            f"{_np(items[b])} to the right of {_np(items[a])} on {bg}",
            f"from left to right: {listed}",
            f"there are {_COUNT_EN[n]} shapes on {bg}",
            f"a picture with {_join_en([_np(i) for i in shuffled])}",
        ]
    picks = rng.choice(len(options), _EN_CAPTIONS_PER_IMAGE, replace=False)
    return [_style(options[k], rng, ".") for k in sorted(picks)]


def chinese_captions(scene: Scene, size: int, rng: np.random.Generator) -> list[str]:
    items, n = scene.items, len(scene.items)
    bg = BACKGROUNDS[scene.background]
    plain = [f"{COLOURS[i.colour][0]}的{SHAPES[i.shape]}" for i in items]  # 红色的圆形
    listed = _join_cn([f"一个{p}" for p in plain])
    if n == 1:
        options = [
            f"{bg}背景上有{listed}",
            f"图中只有{listed}",
            f"{listed}位于图片的{_HPOS[_hpos(items[0], size)][1]}",
            f"这是一张{bg}背景的图片，上面有{listed}",
        ]
    else:
        a, b = sorted(rng.choice(n, 2, replace=False))
        options = [
            f"{bg}背景上有{listed}",
            f"图中有{_COUNT_CN[n]}个图形：{_join_cn(plain)}",
            f"{plain[a]}在{plain[b]}的左边",
            f"从左到右依次是{_join_cn(plain)}",
            f"{listed}，背景是{bg}的",
        ]
    picks = rng.choice(len(options), _CN_CAPTIONS_PER_IMAGE, replace=False)
    return [options[k] + ("。" if rng.random() < 0.5 else "") for k in sorted(picks)]


# ------------------------------------------------------------------------------------------- VQA
def questions(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    """Colour, count, presence and (with 2+ shapes) position questions with their true answer."""
    items, n = scene.items, len(scene.items)
    it = items[rng.integers(n)]
    probe = str(rng.choice(list(SHAPES)))
    out = [
        dict(question=f"What color is the {it.shape}?", answer=it.colour,
             question_type="what color is the", answer_type="other"),
        dict(question="How many shapes are there?", answer=str(n), question_type="how many", answer_type="number"),
        dict(question=f"Is there {_article(probe)} {probe}?",
             answer="yes" if any(i.shape == probe for i in items) else "no",
             question_type="is there a", answer_type="yes/no"),
    ]
    if n >= 2:
        if rng.random() < 0.5:
            a, b = rng.choice(n, 2, replace=False)  # either order: answers are yes and no alike
            out.append(dict(question=f"Is the {items[a].colour} {items[a].shape} left of the "
                                     f"{items[b].colour} {items[b].shape}?",
                            answer="yes" if a < b else "no", question_type="is the", answer_type="yes/no"))
        else:
            side = str(rng.choice(["left", "right"]))
            out.append(dict(question=f"What shape is on the {side}?",
                            answer=items[0 if side == "left" else -1].shape,
                            question_type="what shape is", answer_type="other"))
    return out


def human_answers(answer: str, answer_type: str, rng: np.random.Generator) -> list[str]:
    """10 answers: mostly the truth, up to 4 realistic variants (so the majority is always right)."""
    if answer_type == "number":
        d = int(answer)
        variants = [_COUNT_EN[d], str(d + 1)] + ([str(d - 1)] if d > 1 else [])
    else:
        variants = _NEAR_MISS[answer]
    answers = [answer] * 10
    n_noisy = int(rng.choice(5, p=[0.35, 0.3, 0.2, 0.1, 0.05]))
    for pos in rng.choice(10, n_noisy, replace=False):
        answers[pos] = str(rng.choice(variants))
    return answers


# ---------------------------------------------------------------------------------------- writing
def _dump(path: Path, obj: Any) -> None:
    # ASCII-escaped: byte-stable and readable by json.load under any locale (pycocotools opens
    # files without an encoding).
    path.write_text(json.dumps(obj, ensure_ascii=True, separators=(",", ":")), encoding="ascii")


def _coco_gt(images: list[dict], captions_key: str) -> dict:
    annotations, next_id = [], 0
    for img in images:
        for caption in img[captions_key]:
            annotations.append({"image_id": img["image_id"], "caption": caption, "id": next_id})
            next_id += 1
    return {
        "info": {"description": "lavis_lite shapes (synthetic)", "version": str(GENERATOR_VERSION)},
        "licenses": [{"id": 1, "name": "CC0 1.0"}],
        "type": "captions",
        "images": [{"id": img["image_id"], "file_name": img["image"]} for img in images],
        "annotations": annotations,
    }


def _basic_tokens(text: str) -> list[str]:
    """BERT BasicTokenizer's split for our text: lowercase words, single CJK/punctuation chars."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def bert_vocab(texts: list[str]) -> list[str]:
    """[PAD]=0, [UNK], [CLS], [SEP], [MASK], words, characters, ``##`` + characters.

    Every ASCII letter, digit and punctuation mark is included with its continuation, so any
    lowercase ASCII prompt tokenizes without [UNK].
    """
    words: set[str] = set(_PROMPT_WORDS)
    chars: set[str] = set(string.ascii_lowercase + string.digits + string.punctuation)
    for text in texts:
        for token in _basic_tokens(text):
            words.add(token)
            chars.update(token)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += sorted(words) + sorted(chars - words) + sorted("##" + c for c in chars)
    return vocab


def _write_split(root: Path, split: str, spec: ShapesSpec) -> list[str]:
    """Write one split's images and annotations; return its text (for the vocabulary)."""
    count = getattr(spec, split)
    (root / "images" / split).mkdir(parents=True)
    ann = root / "annotations"
    images, scenes, vqa_q, vqa_a, vqa_lavis, texts = [], [], [], [], [], []
    for i in range(count):
        rng = np.random.default_rng([spec.seed, SPLITS.index(split), i])
        n = _ID_OFFSET[split] + i
        rel = f"images/{split}/shapes_{n}.jpg"
        scene = sample_scene(rng, spec.image_size)
        buffer = io.BytesIO()
        draw_scene(scene, spec.image_size, rng).save(buffer, format="JPEG", quality=_JPEG_QUALITY)
        (root / rel).write_bytes(buffer.getvalue())
        en, cn = english_captions(scene, spec.image_size, rng), chinese_captions(scene, spec.image_size, rng)
        images.append({"image": rel, "image_id": f"shapes_{n}", "en": en, "cn": cn})
        scenes.append({"image": rel, "image_id": f"shapes_{n}", "vqa_image_id": n,
                       "background": scene.background, "shapes": [dataclasses.asdict(it) for it in scene.items]})
        for k, qa in enumerate(questions(scene, rng)):
            qid = n * 10 + k
            answers = human_answers(qa["answer"], qa["answer_type"], rng)
            vqa_q.append({"image_id": n, "question": qa["question"], "question_id": qid})
            vqa_a.append({
                "question_id": qid, "image_id": n, "question_type": qa["question_type"],
                "answer_type": qa["answer_type"], "multiple_choice_answer": qa["answer"],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                            for j, a in enumerate(answers)],
            })
            vqa_lavis.append({"question_id": qid, "question": qa["question"], "answer": answers,
                              "image": rel, "image_id": n, "dataset": "shapes"})
            texts += [qa["question"], *answers]
        texts += en + cn

    for lang, suffix in (("en", ""), ("cn", "_cn")):
        if split == "train":  # one entry per caption
            entries = [{"image": im["image"], "caption": c, "image_id": im["image_id"]} for im in images for c in im[lang]]
        else:  # one entry per image with all its captions, plus COCO-format ground truth
            entries = [{"image": im["image"], "caption": im[lang], "image_id": im["image_id"]} for im in images]
            _dump(ann / f"caption{suffix}_{split}_gt.json", _coco_gt(images, lang))
        _dump(ann / f"caption{suffix}_{split}.json", entries)
    header = {"info": {"description": "lavis_lite shapes (synthetic)", "version": str(GENERATOR_VERSION)},
              "license": {"name": "CC0 1.0"}, "data_subtype": split, "data_type": "shapes"}
    _dump(ann / f"vqa_{split}_questions.json", {**header, "task_type": "Open-Ended", "questions": vqa_q})
    _dump(ann / f"vqa_{split}_annotations.json", {**header, "annotations": vqa_a})
    _dump(ann / f"vqa_{split}.json", vqa_lavis)
    _dump(ann / f"scenes_{split}.json", scenes)
    return texts


def manifest(spec: ShapesSpec) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": spec.seed,
        "counts": {split: getattr(spec, split) for split in SPLITS},
        "image_size": spec.image_size,
    }


def generate_shapes(root: str | Path, spec: ShapesSpec) -> Path:
    """Write the data set into ``root`` (which must not exist yet); return it."""
    for split in SPLITS:
        if not 0 <= getattr(spec, split) < 1_000_000:
            raise ValueError(f"shapes: {split}={getattr(spec, split)}; counts must be in [0, 1000000)")
    if spec.image_size < 32:
        raise ValueError(f"shapes: image_size={spec.image_size}; use at least 32 pixels")
    root = Path(root)
    (root / "annotations").mkdir(parents=True)
    texts: list[str] = []
    for split in SPLITS:
        texts += _write_split(root, split, spec)
    (root / "bert_vocab").mkdir()
    (root / "bert_vocab" / "vocab.txt").write_text("\n".join(bert_vocab(texts)) + "\n", encoding="utf-8")
    _dump(root / "manifest.json", manifest(spec))  # last: its presence marks a complete data set
    return root


class ShapesRootError(ValueError):
    """The generator was pointed at a path it may not write to; nothing was written."""


def ensure_shapes(root: str | Path | None = None, **spec_fields: int) -> Path:
    """Generate the data set at ``root`` (default ``default_shapes_root()``) unless its manifest
    already matches ``ShapesSpec(**spec_fields)``; return the root.

    Writes only into a path that does not exist yet (whose parent exists, unless it is the
    default root), an empty folder, or a shapes data set written here before (an outdated one is
    replaced); anything else raises ``ShapesRootError`` before a byte is written, so a user's
    folder is never deleted. Writes into a temporary sibling folder and renames it into place,
    so an interrupted run never leaves half a data set behind.
    """
    spec = ShapesSpec(**spec_fields)
    default = default_shapes_root()
    root = Path(root) if root is not None else default
    if _manifest_matches(root, spec):
        return root
    ours = _is_ours(root)
    _check_writable(root, ours, is_default=root.resolve() == default.resolve())
    root.parent.mkdir(parents=True, exist_ok=True)
    logger.info("generating the shapes data set at %s (%s)%s", root, spec,
                ", replacing our outdated one" if ours else "")
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        generate_shapes(tmp / "data", spec)
        if _is_ours(root):  # outdated: move it aside first, as a folder can't be renamed onto another
            root.rename(tmp / "old")
        elif root.is_dir():
            root.rmdir()  # empty, as checked above; fails rather than delete anything put there since
        try:
            (tmp / "data").rename(root)
        except OSError:  # another process finished first; keep its copy if it is the same spec
            if not _manifest_matches(root, spec):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _check_writable(root: Path, ours: bool, is_default: bool) -> None:
    """Raise ``ShapesRootError`` unless ``root`` is ours, an empty folder, or may be created."""
    default = f"leave it at the default ({default_shapes_root()})"
    if root.is_dir():
        if not ours and any(root.iterdir()):
            raise ShapesRootError(f"{root} is not empty and is not a shapes data set written by lavis_lite (no shapes "
                                  f"manifest.json), so it is left untouched; point it at a new or empty folder (the "
                                  f"data set is generated there), or {default}")
    elif root.exists() or root.is_symlink():
        raise ShapesRootError(f"{root} exists and is not a folder, so it is left untouched; point it at a new or "
                              f"empty folder, or {default}")
    elif not root.parent.is_dir() and not is_default:
        raise ShapesRootError(f"cannot create {root}: its parent folder {root.parent} does not exist (a typo?); "
                              f"fix the path or create {root.parent} first, or {default}")


def _is_ours(root: Path) -> bool:
    """Whether ``root`` holds a shapes data set written by this generator (any version or spec)."""
    try:
        found = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and set(found) >= {"generator_version", "counts"}


def _manifest_matches(root: Path, spec: ShapesSpec) -> bool:
    try:
        return json.loads((root / "manifest.json").read_text()) == manifest(spec)
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> None:
    defaults = ShapesSpec()
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes data set.")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {default_shapes_root()})")
    for field in dataclasses.fields(ShapesSpec):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=getattr(defaults, field.name))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        root = ensure_shapes(args.out, **{f.name: getattr(args, f.name) for f in dataclasses.fields(ShapesSpec)})
    except ShapesRootError as err:
        parser.error(f"--out: {err}")
    logger.info("shapes data set ready at %s", root)


if __name__ == "__main__":
    main()
