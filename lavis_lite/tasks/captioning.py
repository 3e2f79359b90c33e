"""Captioning: generate one caption per image, write the COCO-style result file, score it with
:mod:`lavis_lite.tasks.caption_eval`: BLEU-1..4, ROUGE-L and CIDEr; English through pycocoevalcap's PTB
tokenizer (Java), Chinese both per character (``*_char``) and per jieba word as the AI Challenger 2017
scorer (``*_jieba``)."""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import torch

from lavis_lite import dist
from lavis_lite.config import ConfigError
from lavis_lite.registry import TASKS
from lavis_lite.tasks.base import BaseTask

logger = logging.getLogger(__name__)
_FROM_CAPTION_EVAL = ("load_coco_gt", "score_captions", "tokenize_chinese")


def _caption_eval():
    # Imported on use: were it imported with this module (so with the package), `python -m
    # lavis_lite.tasks.caption_eval` would find itself already imported and warn.
    return importlib.import_module("lavis_lite.tasks.caption_eval")


def __getattr__(name: str) -> Any:
    """``load_coco_gt``, ``score_captions``, ``tokenize_chinese``: re-exported from caption_eval."""
    if name in _FROM_CAPTION_EVAL:
        return getattr(_caption_eval(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass
class CaptionConfig:
    prompt: str = ""  # text the LLM continues, e.g. "a photo of"
    num_beams: int = 5
    max_len: int = 30  # new tokens at most (LAVIS key name)
    min_len: int = 8  # new tokens at least
    length_penalty: float = 1.0
    language: Literal["en", "zh"] = "en"


@TASKS.register("captioning")
class CaptionTask(BaseTask):
    """The model provides ``generate(batch, num_beams, max_new_tokens, min_new_tokens,
    length_penalty) -> list[str]``; the eval data set has ``gt_path`` (COCO-format ground truth).
    ``agg_metrics`` is CIDEr + Bleu_4, for Chinese ``CIDEr_char + Bleu_4_char`` (:meth:`agg_metrics`)."""

    config_class = CaptionConfig
    id_key = "image_id"

    @classmethod
    def metric_names(cls, cfg: CaptionConfig) -> set[str]:
        """English: CIDEr, Bleu_1..4, ROUGE_L; Chinese: each as ``*_char`` and ``*_jieba``; and agg_metrics."""
        return {*_caption_eval().metric_names(cfg.language), "agg_metrics"}

    def check_ready(self) -> None:
        if self.cfg.language == "en" and shutil.which("java") is None:
            raise ConfigError("captioning with run.language=en scores through pycocoevalcap's PTB tokenizer, which "
                              "runs Java, and no `java` is on PATH: install a Java runtime (e.g. apt-get install "
                              "default-jre-headless) or run without evaluation splits")

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
        caption_eval = _caption_eval()
        language = getattr(dataset, "language", None) or self.cfg.language  # a data set's own, else run.language
        metrics = caption_eval.score_captions(caption_eval.load_coco_gt(dataset.gt_path),
                                              {r["image_id"]: r["caption"] for r in results}, language)
        metrics["agg_metrics"] = self.agg_metrics(metrics, language)
        return metrics

    def agg_metrics(self, metrics: dict[str, float], language: str | None = None) -> float:
        """CIDEr + BLEU-4, as LAVIS; for Chinese the character-level ones (``CIDEr_char + Bleu_4_char``),
        which depend on no word dictionary."""
        suffix = "_char" if (language or self.cfg.language) == "zh" else ""
        return metrics[f"CIDEr{suffix}"] + metrics[f"Bleu_4{suffix}"]
