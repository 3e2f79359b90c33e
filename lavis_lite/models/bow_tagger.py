"""Bag-of-words tagger: a tiny image -> caption-words model that the runner's own tests train.

It predicts which caption words (hashed into ``num_buckets``) describe an image. Its loss is a
per-sample mean with no batch coupling, dropout or batch norm, so accumulation, DDP and resume
can be checked for exact equality. Not a BLIP-2 component.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lavis_lite.models.base import BaseModel
from lavis_lite.registry import MODELS


@dataclasses.dataclass
class BowTaggerConfig:
    arch: str = "bow_tagger"
    model_type: str = "tiny"
    width: int = 16
    num_buckets: int = 256
    freeze_encoder: bool = False
    pretrained: Optional[str] = None


def word_buckets(text: str, num_buckets: int) -> list[int]:
    return sorted({zlib.crc32(word.encode()) % num_buckets for word in text.lower().split()})


@MODELS.register("bow_tagger")
class BowTagger(BaseModel):
    config_class = BowTaggerConfig

    def __init__(self, cfg: BowTaggerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Sequential(
            nn.Conv2d(3, cfg.width, kernel_size=8, stride=8), nn.GELU(), nn.AdaptiveAvgPool2d(4), nn.Flatten()
        )
        self.head = nn.Linear(16 * cfg.width, cfg.num_buckets)
        if cfg.freeze_encoder:
            self.freeze(["encoder."])

    def targets(self, texts: list[str]) -> torch.Tensor:
        """Multi-hot [B, num_buckets] of the words in each text."""
        target = torch.zeros(len(texts), self.cfg.num_buckets, device=self.device)
        for row, text in enumerate(texts):
            target[row, word_buckets(text, self.cfg.num_buckets)] = 1.0
        return target

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.head(self.encoder(batch["image"].to(self.device)))
        loss = F.binary_cross_entropy_with_logits(logits, self.targets(batch["text_input"]))
        return {"loss": loss}

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Per image: word-bucket F1 of the predicted set against the caption's."""
        logits = self.head(self.encoder(batch["image"].to(self.device)))
        target = self.targets(batch["text_input"]).bool()
        predicted = logits > 0
        hits = (predicted & target).sum(1).float()
        f1 = 2 * hits / (predicted.sum(1) + target.sum(1)).clamp(min=1)
        return [{"id": image_id, "score": float(s)} for image_id, s in zip(batch["image_id"], f1)]
