"""Models. Importing this package registers every built-in arch (explicit imports, no ``*``).

The LAVIS verbs keep their meaning: ``load_model``, ``load_model_and_preprocess``, ``model_zoo``.
"""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf

from lavis_lite.config import available_model_types, load_yaml, model_config_path
from lavis_lite.models import blip2_llm  # noqa: F401  (registers blip2_opt, blip2_internlm, blip2_qwen2, blip2_llm)
from lavis_lite.models import blip2_qformer  # noqa: F401  (registers blip2, blip2_feature_extractor, ...)
from lavis_lite.models import bow_tagger  # noqa: F401  (registers bow_tagger)
from lavis_lite.models.base import BaseModel
from lavis_lite.registry import MODELS

__all__ = ["BaseModel", "create_model", "load_model", "load_model_and_preprocess", "model_zoo"]


def _model_node(name: str, model_type: str, overrides: dict[str, Any] | None) -> Any:
    path = model_config_path(name, model_type)
    if not path.is_file():
        raise KeyError(f"{name!r} has no model type {model_type!r} (no {path}); "
                       f"choose one of {available_model_types(name)}")
    node = load_yaml(path, f"model {name}/{model_type}")
    node.arch, node.model_type = name, model_type
    return OmegaConf.merge(node, overrides or {})


def create_model(name: str, model_type: str, **overrides: Any) -> BaseModel:
    """Build ``name``/``model_type`` from its default config; keyword overrides win."""
    node = _model_node(name, model_type, overrides)
    node.pop("preprocess", None)
    return MODELS.get(name).from_config(node)


def load_model(name: str, model_type: str, is_eval: bool = False, device: str | torch.device = "cpu",
               checkpoint: str | None = None) -> BaseModel:
    """As LAVIS: build the model, optionally load ``checkpoint``, put it on ``device``."""
    model = create_model(name, model_type)
    if checkpoint is not None:
        model.load_checkpoint(checkpoint)
    if is_eval:
        model.eval()
    return model.to(device)


def load_model_and_preprocess(name: str, model_type: str, is_eval: bool = False,
                              device: str | torch.device = "cpu") -> tuple[BaseModel, dict, dict]:
    """Model plus its ``vis_processors`` and ``txt_processors`` ({"train": ..., "eval": ...})
    from the ``preprocess`` section of the model's default config."""
    from lavis_lite.data.processors import build_processor

    preprocess = _model_node(name, model_type, None).get("preprocess")
    if preprocess is None:
        raise KeyError(f"{model_config_path(name, model_type)} has no preprocess section")
    vis = {split: build_processor(node) for split, node in preprocess.get("vis_processor", {}).items()}
    txt = {split: build_processor(node) for split, node in preprocess.get("text_processor", {}).items()}
    return load_model(name, model_type, is_eval, device), vis, txt


class ModelZoo:
    """``print(model_zoo)`` shows registered archs and their model types, as in LAVIS."""

    def __iter__(self):
        return iter((arch, available_model_types(arch)) for arch in MODELS.names())

    def __len__(self) -> int:
        return len(MODELS.names())

    def __str__(self) -> str:
        rows = [(arch, ", ".join(types) or "-") for arch, types in self]
        width = max(len(arch) for arch, _ in rows)
        lines = [f"{'Architectures':<{width}}  Types", "=" * (width + 40)]
        return "\n".join(lines + [f"{arch:<{width}}  {types}" for arch, types in rows])


model_zoo = ModelZoo()
