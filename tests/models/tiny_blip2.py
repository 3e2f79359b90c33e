"""Helpers shared by the model tests and their 2-process workers: tiny BLIP-2 models and batches."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import torch

from lavis_lite.models import blip2_qformer  # noqa: F401  (registers the blip2 archs)
from lavis_lite.models.blip2_qformer import Blip2Qformer, Blip2QformerConfig

REPO = Path(__file__).resolve().parents[2]
TINY_TOKENIZER = REPO / "tests" / "data_files" / "tiny_bert_tokenizer"
CAPTIONS = ["a red circle", "two blue squares on the left", "a green star on the right", "the purple diamond",
            "one yellow triangle", "an orange circle at the top"]


def tiny_model(arch: str = "blip2", seed: int = 0, **overrides: Any) -> Blip2Qformer:
    """The ``tiny`` model type with ``overrides`` merged onto its yaml (nested dicts for ``qformer``)."""
    from lavis_lite.models import create_model

    torch.manual_seed(seed)
    return create_model(arch, "tiny", **overrides)


def tiny_config(**overrides: Any) -> Blip2QformerConfig:
    from lavis_lite.config import load_yaml, merge_onto, model_config_path
    from omegaconf import OmegaConf

    node = load_yaml(model_config_path("blip2", "tiny"), "tiny")
    node.pop("preprocess")
    return merge_onto(Blip2QformerConfig, OmegaConf.merge(node, overrides), "model")


def make_batch(batch_size: int, seed: int = 0, image_size: int = 64, offset: int = 0,
               image_ids: list[Any] | None = None) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "text_input": [CAPTIONS[(offset + i) % len(CAPTIONS)] for i in range(batch_size)],
        "image_id": image_ids if image_ids is not None else [f"shapes_{offset + i}" for i in range(batch_size)],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_process_group(rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    """``torch.multiprocessing.spawn`` target: join a CPU gloo group via lavis_lite.dist, run ``fn``."""
    import os

    from lavis_lite import dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_distributed(timeout_minutes=2.0, device="cpu")
    try:
        fn(*args)
    finally:
        dist.destroy_distributed()

