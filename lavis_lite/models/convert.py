"""Checkpoint conversion: original LAVIS BLIP-2 state dicts -> lavis_lite keys, and key/shape tables.

Our Q-Former keeps LAVIS's parameter names and our image encoders are timm's, so converting a LAVIS
checkpoint (``blip2_pretrained.pth``, ``blip2_pretrained_vitL.pth``, ``blip2_finetune_coco.pth``) is:

- drop ``Qformer.bert.embeddings.position_ids`` (a persistent buffer of LAVIS's BertEmbeddings holding
  ``arange(512)``; we compute positions instead);
- send ``visual_encoder.*`` through the image encoder's filter (``vision.vision_checkpoint_filter``:
  identity plus position-embedding resampling for EVA, OpenAI -> timm names for CLIP-L).

Stage-1 checkpoints hold no ``visual_encoder.*`` keys (LAVIS saves only parameters that require grad, and
the ViT is frozen); models allowlist that prefix. Tables of key names and shapes (``key_shapes``) let tests
check the mapping without the weights: tests/data_files/lavis_keys/ holds tables derived from LAVIS's
architecture code, and ``python -m lavis_lite.models.convert CKPT`` prints the table of a real file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import torch

from lavis_lite.models.base import load_state_dict_file

LAVIS_ONLY_KEYS = ("Qformer.bert.embeddings.position_ids",)
VISUAL_PREFIX = "visual_encoder."


def convert_lavis_blip2(
    state: dict[str, torch.Tensor],
    visual_filter: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """LAVIS BLIP-2 (Q-Former family) state dict -> ours; ``visual_filter`` maps un-prefixed ViT keys."""
    out = {k: v for k, v in state.items() if not k.startswith(VISUAL_PREFIX) and k not in LAVIS_ONLY_KEYS}
    visual = {k[len(VISUAL_PREFIX):]: v for k, v in state.items() if k.startswith(VISUAL_PREFIX)}
    if visual:
        out.update({VISUAL_PREFIX + k: v for k, v in visual_filter(visual).items()})
    return out


def key_shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """{key: shape} of a state dict (what the stored tables hold)."""
    return {key: list(value.shape) for key, value in state.items()}


def meta_state_dict(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Weightless tensors (``meta`` device) with the given shapes, to test loading without weights."""
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def load_key_table(path: str | Path) -> dict[str, list[int]]:
    """A stored table: JSON with ``"keys": {name: shape}`` (other fields document its origin)."""
    return {k: list(v) for k, v in json.loads(Path(path).read_text())["keys"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the key/shape table of a checkpoint as JSON")
    parser.add_argument("checkpoint", help=".pth (LAVIS: weights under 'model') or .safetensors")
    args = parser.parse_args()
    table = key_shapes(load_state_dict_file(args.checkpoint))
    print(json.dumps({"source": args.checkpoint, "keys": table}, indent=1))


if __name__ == "__main__":
    main()
