"""Models. Importing this package registers every built-in arch (explicit imports, no ``*``).

The LAVIS verbs keep their meaning: ``load_model``, ``load_model_and_preprocess``, ``model_zoo``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lavis_lite.config import CONFIG_ROOT, Sources, available_model_types, load_yaml, merge_onto, model_config_path
from lavis_lite.models import blip2_llm  # noqa: F401  (registers blip2_opt, blip2_internlm, blip2_qwen2, blip2_llm)
from lavis_lite.models import blip2_qformer  # noqa: F401  (registers blip2, blip2_feature_extractor, ...)
from lavis_lite.models import bow_tagger  # noqa: F401  (registers bow_tagger)
from lavis_lite.models.base import BaseModel, read_checkpoint
from lavis_lite.registry import MODELS

__all__ = ["BaseModel", "create_model", "load_model", "load_model_and_preprocess", "model_zoo", "resolve_model",
           "stored_model_config"]

logger = logging.getLogger(__name__)


def _defaults(name: str, model_type: str) -> DictConfig:
    """``configs/models/<name>/<model_type>.yaml``, ``preprocess`` section included."""
    path = model_config_path(name, model_type)
    if not path.is_file():
        raise KeyError(f"{name!r} has no model type {model_type!r} (no {path}); "
                       f"choose one of {available_model_types(name)}")
    return load_yaml(path, f"model {name}/{model_type}")


def _model_node(name: str, model_type: str, *layers: tuple[str, Any]) -> DictConfig:
    """The model type's defaults with each ``(origin, node)`` of ``layers`` merged over them (later wins),
    validated against the arch's config dataclass: an unknown key or bad value names its origin."""
    node = _defaults(name, model_type)
    node.pop("preprocess", None)
    sources = Sources()
    sources.add(str(model_config_path(name, model_type)), OmegaConf.create({"model": node}))
    for origin, layer in layers:
        layer = OmegaConf.create(_plain(layer or {}))
        sources.add(origin, OmegaConf.create({"model": layer}))
        node = OmegaConf.merge(node, layer)
    node.arch, node.model_type = name, model_type
    merge_onto(MODELS.get(name).config_class, node, "model", sources)
    return node


def _plain(value: Any) -> Any:
    """Keyword overrides as OmegaConf takes them: paths as strings, nested dicts kept."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _exists(path: str) -> bool:
    """As the loaders resolve paths: from the working directory, then (relative ones) from the checkout."""
    return Path(path).exists() or (not Path(path).is_absolute() and (CONFIG_ROOT.parent / path).exists())


def _stored_model_config(config_yaml: str | None, name: str, checkpoint: str | Path,
                         overrides: dict[str, Any]) -> DictConfig | None:
    """The ``model:`` section a runner checkpoint was trained with, without its arch and model type, if
    that arch shares ``name``'s config class (``blip2`` -> ``blip2_feature_extractor``); else None: a
    checkpoint without a stored config (LAVIS's) or of another family (stage 1 into a stage-2 arch),
    which loads into the model type's defaults as before.

    The stored ``pretrained``, ``vit_pretrained``, ``llm_path``, ... give the parts the checkpoint does
    not hold (frozen ones), so each must still exist unless ``overrides`` replaces it.
    """
    run_config = OmegaConf.create(config_yaml) if config_yaml else None
    stored = run_config.get("model") if isinstance(run_config, DictConfig) else None
    if not isinstance(stored, DictConfig):
        return None
    trained_as, model_cls = stored.get("arch"), MODELS.get(name)
    if trained_as not in MODELS or MODELS.get(trained_as).config_class is not model_cls.config_class:
        logger.info("%s was trained as %s, not a %s model: its stored config is not used", checkpoint,
                    trained_as, model_cls.config_class.__name__)
        return None
    for key in model_cls.path_keys:
        value = stored.get(key)
        if value and key not in overrides and not _exists(str(value)):
            raise FileNotFoundError(f"{checkpoint} was trained with model.{key}={value}, which no longer exists; "
                                    f"give its new location as load_model(..., {key}=...)")
    logger.info("%s: building the model it was trained with (the stored config of %s/%s, as %s)",
                checkpoint, trained_as, stored.get("model_type"), name)
    return OmegaConf.masked_copy(stored, [k for k in stored if k not in ("arch", "model_type")])


def create_model(name: str, model_type: str, **overrides: Any) -> BaseModel:
    """Build ``name``/``model_type`` from its default config; keyword overrides win."""
    node = _model_node(name, model_type, ("create_model keyword arguments", overrides))
    return MODELS.get(name).from_config(node)


def load_model(name: str, model_type: str, is_eval: bool = False, device: str | torch.device = "cpu",
               checkpoint: str | Path | None = None, **overrides: Any) -> BaseModel:
    """As LAVIS: build the model, optionally load ``checkpoint``, put it on ``device``.

    ``overrides``: model config keys, nested ones as dicts (``qformer={"num_hidden_layers": 2}``,
    ``llm_path=...``, ``pretrained=...``). A checkpoint of our runner rebuilds the model it was trained
    with: layers (later wins) are the model type's defaults, the checkpoint's stored ``model:`` config
    (``name`` replaces its arch), ``overrides``; its weights are loaded last. A LAVIS ``.pth`` (no
    stored config) is loaded into the model type's defaults with ``overrides``. A Hugging Face BLIP-2
    directory dictates the sizes in its config.json (``BaseModel.checkpoint_config``).
    """
    state = stored = None
    model_cls = MODELS.get(name)
    if checkpoint is not None:
        state, config_yaml = read_checkpoint(checkpoint, "load_model(checkpoint=...)")
        stored = _stored_model_config(config_yaml, name, checkpoint, overrides)
    node = _model_node(name, model_type, (f"checkpoint {checkpoint}", stored),
                       ("load_model keyword arguments", overrides))
    if checkpoint is not None:
        node = OmegaConf.merge(node, model_cls.checkpoint_config(checkpoint, merge_onto(model_cls.config_class, node,
                                                                                         "model")))
    model = model_cls.from_config(node, warn_untrained=state is None)
    if state is not None:
        model.load_weights(state, str(checkpoint))
        model.warn_untrained()
    if is_eval:
        model.eval()
    return model.to(device)


def load_model_and_preprocess(name: str, model_type: str, is_eval: bool = False, device: str | torch.device = "cpu",
                              checkpoint: str | Path | None = None, **overrides: Any
                              ) -> tuple[BaseModel, dict, dict]:
    """``load_model`` plus its ``vis_processors`` and ``txt_processors`` ({"train": ..., "eval": ...})
    from the ``preprocess`` section of the model type's default config."""
    from lavis_lite.data.processors import build_processor

    preprocess = _defaults(name, model_type).get("preprocess")
    if preprocess is None:
        raise KeyError(f"{model_config_path(name, model_type)} has no preprocess section")
    vis = {split: build_processor(node) for split, node in preprocess.get("vis_processor", {}).items()}
    txt = {split: build_processor(node) for split, node in preprocess.get("text_processor", {}).items()}
    return load_model(name, model_type, is_eval, device, checkpoint, **overrides), vis, txt


def resolve_model(cfg: str | None, checkpoint: str | None, cfg_option: str = "cfg=",
                  checkpoint_option: str = "checkpoint=") -> tuple[str, str, dict[str, Any]]:
    """(arch, model_type, model config overrides) that ``cfg`` names: a project yaml (its ``model:`` section), a
    model type's yaml (``configs/models/<arch>/<model_type>.yaml``, or a copy elsewhere whose keys are overrides)
    or ``<arch>/<model_type>``; without it, ``checkpoint``'s stored run config. ``*_option``: how the caller's
    user gives each (``cfg=`` for lmms-eval's model args, ``--cfg-path `` for a CLI), for error messages."""
    if cfg is None:
        if checkpoint is None:
            raise ValueError(f"name the model: {cfg_option}<project yaml, configs/models/<arch>/<model_type>.yaml or "
                             f"<arch>/<model_type>> and/or {checkpoint_option}<runner checkpoint>")
        node = stored_model_config(checkpoint, cfg_option, checkpoint_option)
        return str(node.arch), str(node.model_type), {}
    path = Path(cfg)
    if not path.is_file() and cfg.count("/") == 1 and model_config_path(*cfg.split("/")).is_file():
        arch, model_type = cfg.split("/")
        return arch, model_type, {}
    yaml = load_yaml(path, cfg_option.strip(" ="))
    if "model" in yaml:  # a project yaml
        node = OmegaConf.to_container(yaml.model, resolve=True)
        missing = [key for key in ("arch", "model_type") if key not in node]
        if missing:
            raise ValueError(f"{cfg_option}{cfg}: its model section has no {' or '.join(missing)}; name the model "
                             "type as load_model does (model.arch, model.model_type)")
        return node.pop("arch"), node.pop("model_type"), node
    arch, model_type = path.parent.name, path.stem  # a model type's yaml: configs/models/<arch>/<model_type>.yaml
    default = model_config_path(arch, model_type)
    if not default.is_file():
        raise ValueError(f"{cfg_option}{cfg} is neither a project yaml (it has no model: section) nor a model type's "
                         f"yaml (there is no {default}); give one of those or <arch>/<model_type>")
    if path.resolve() == default.resolve():
        return arch, model_type, {}
    overrides = OmegaConf.to_container(yaml, resolve=True)  # a copy elsewhere: its keys win over the defaults
    overrides.pop("preprocess", None)
    return arch, model_type, overrides


def stored_model_config(checkpoint: str, cfg_option: str = "cfg=",
                        checkpoint_option: str = "checkpoint=") -> DictConfig:
    """The ``model:`` section of the run config a lavis_lite runner checkpoint stores (memory-mapped: no
    weights are read)."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"{checkpoint_option}{checkpoint}: no such file or directory")
    config = None
    if path.is_file() and path.suffix != ".safetensors":
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        config = state.get("config") if isinstance(state, dict) else None
    node = OmegaConf.create(config).get("model") if isinstance(config, str) else None
    if not isinstance(node, DictConfig) or "arch" not in node or "model_type" not in node:
        raise ValueError(f"{checkpoint_option}{checkpoint} stores no run config naming its model (only lavis_lite "
                         f"runner checkpoints do): also give {cfg_option}<project yaml or <arch>/<model_type>>")
    return node


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
