"""Frozen image-encoder outputs kept across epochs (``model.cache_image_features``).

A frozen encoder maps an image to the same features every time, so when training images are not
augmented (``blip_image_eval`` as the train processor) its forward pass is needed once per image. An
entry is found by the processed image itself, never by an id a data set could reuse: its fingerprint is
eight fixed random projections of the pixels in float64 (computed on the image's device, so only 64
bytes per image travel), and two different images would have to agree on all eight to be confused.
Entries stay on the CPU in the encoder's output precision, up to ``max_gb`` per process; images beyond
that are encoded every time. ``stats()`` counts hits, misses and those uncached misses.
"""
from __future__ import annotations

from typing import Callable

import torch

NUM_PROJECTIONS = 8


class ImageFeatureCache:
    def __init__(self, max_gb: float):
        self.max_bytes = int(max_gb * 2**30)
        self.entries: dict[bytes, torch.Tensor] = {}
        self.bytes_used = 0
        self.hits = self.misses = self.uncached = 0
        self._directions: torch.Tensor | None = None

    def fingerprints(self, images: torch.Tensor) -> list[bytes]:
        flat = images.flatten(1).double()
        directions = self._directions
        if directions is None or directions.shape[0] != flat.shape[1]:
            generator = torch.Generator().manual_seed(0)
            directions = torch.randn(flat.shape[1], NUM_PROJECTIONS, generator=generator, dtype=torch.float64)
        self._directions = directions = directions.to(flat.device)  # kept where the images are
        # one product per image, so an image's fingerprint does not depend on the batch it comes in
        return [row.tobytes() for row in torch.stack([pixels @ directions for pixels in flat]).cpu().numpy()]

    def encode(self, images: torch.Tensor, encoder: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``encoder(images)``, running it once on each image not seen before (repeats in a batch too)."""
        keys = self.fingerprints(images)
        new: dict[bytes, int] = {}  # unseen image -> its first position in the batch
        for i, key in enumerate(keys):
            if key not in self.entries and key not in new:
                new[key] = i
        self.misses += len(new)
        self.hits += len(keys) - len(new)
        if not new:
            return torch.stack([self.entries[key] for key in keys]).to(images.device, non_blocking=True)
        fresh = dict(zip(new, encoder(images[list(new.values())])))
        for key, features in fresh.items():
            self._store(key, features)
        device = images.device
        return torch.stack([fresh[key] if key in fresh else self.entries[key].to(device) for key in keys])

    def _store(self, key: bytes, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if self.bytes_used + size > self.max_bytes:
            self.uncached += 1
            return
        self.entries[key] = features.detach().to("cpu", copy=True)
        self.bytes_used += size

    def stats(self) -> dict[str, float]:
        return {"images": len(self.entries), "gb": self.bytes_used / 2**30, "hits": self.hits,
                "misses": self.misses, "uncached": self.uncached}
