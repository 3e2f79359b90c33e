"""Captioning: generate one caption per image, write the COCO-style result file, score CIDEr and
BLEU-4 with pycocoevalcap. English text goes through its PTB tokenizer (Java); Chinese through a
character-level tokenizer (the PTB tokenizer would treat a whole Chinese sentence as one word)."""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import unicodedata
from pathlib import Path
from typing import Any, Literal

import torch

from lavis_lite import dist
from lavis_lite.registry import TASKS
from lavis_lite.tasks.base import BaseTask

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CaptionConfig:
    prompt: str = ""  # text the LLM continues, e.g. "a photo of"
    num_beams: int = 5
    max_len: int = 30  # new tokens at most (LAVIS key name)
    min_len: int = 8  # new tokens at least
    length_penalty: float = 1.0
    language: Literal["en", "zh"] = "en"


def tokenize_chinese(text: str) -> str:
    """Characters separated by spaces, without whitespace or punctuation; Latin words and digits
    stay whole ("3个red圆形。" -> "3 个 red 圆 形")."""
    tokens = re.findall(r"[A-Za-z]+|\d+|\S", text)
    return " ".join(t for t in tokens if not unicodedata.category(t[0]).startswith("P"))


def score_captions(gts: dict[Any, list[str]], res: dict[Any, str], language: str = "en") -> dict[str, float]:
    """CIDEr and BLEU-1..4 (fractions, as pycocoevalcap reports them) of one caption per image."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    missing = set(gts) - set(res)
    if missing:
        raise ValueError(f"no generated caption for {len(missing)} images, e.g. {sorted(map(str, missing))[:3]}")
    if language == "zh":
        gts_tok = {k: [tokenize_chinese(c) for c in v] for k, v in gts.items()}
        res_tok = {k: [tokenize_chinese(res[k])] for k in gts}
    else:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        ptb = PTBTokenizer()
        gts_tok = ptb.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
        res_tok = ptb.tokenize({k: [{"caption": res[k]}] for k in gts})
    bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
    cider, _ = Cider().compute_score(gts_tok, res_tok)
    return {"CIDEr": float(cider), **{f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}}


def load_coco_gt(path: str | Path) -> dict[Any, list[str]]:
    data = json.loads(Path(path).read_text())
    gts: dict[Any, list[str]] = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        gts[ann["image_id"]].append(ann["caption"])
    return gts


@TASKS.register("captioning")
class CaptionTask(BaseTask):
    """The model provides ``generate(batch, num_beams, max_new_tokens, min_new_tokens,
    length_penalty) -> list[str]``; the eval data set has ``gt_path`` (COCO-format ground truth)."""

    config_class = CaptionConfig
    id_key = "image_id"

    def valid_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> list[dict[str, Any]]:
        if self.cfg.prompt:
            batch = {**batch, "prompt": [self.cfg.prompt] * len(batch["image_id"])}
        captions = model.generate(batch, num_beams=self.cfg.num_beams, max_new_tokens=self.cfg.max_len,
                                  min_new_tokens=self.cfg.min_len, length_penalty=self.cfg.length_penalty)
        return [{"image_id": i, "caption": c} for i, c in zip(batch["image_id"], captions)]

    def aggregate(self, results: list[dict[str, Any]], split: str, dataset: Any, output_dir: str | None) -> dict:
        if output_dir is not None and dist.is_main_process():
            path = Path(output_dir) / "result" / f"{split.replace('/', '_')}_caption_result.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, ensure_ascii=False))
            logger.info("captions written to %s", path)
        if getattr(dataset, "gt_path", None) is None:
            raise ValueError(f"{split}: the data set has no caption ground truth file (build_info.caption_gt)")
        metrics = score_captions(load_coco_gt(dataset.gt_path), {r["image_id"]: r["caption"] for r in results},
                                 self.cfg.language)
        metrics["agg_metrics"] = metrics["CIDEr"] + metrics["Bleu_4"]  # as LAVIS
        return metrics
