"""BaseModel: config-driven construction, checkpoint loading that reports every key, freezing."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from lavis_lite.config import merge_onto

logger = logging.getLogger(__name__)


def load_state_dict_file(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a torch checkpoint (``weights_only=True``).

    A LAVIS ``.pth`` keeps the weights under ``"model"``; a bare state dict is accepted too.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict):
        raise ValueError(f"{what}: {path} holds a {type(ckpt).__name__}, not a state dict")
    return ckpt


class BaseModel(nn.Module):
    """Parent of every registered model.

    Subclasses set ``config_class`` (a dataclass holding every default of the family) and may list
    ``ignore_missing_prefixes``: keys deliberately absent from checkpoints (e.g. a frozen LLM).
    ``forward(batch)`` returns a dict with ``loss`` plus scalars to log.
    """

    config_class: ClassVar[type]
    ignore_missing_prefixes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_config(cls, node: Any) -> "BaseModel":
        cfg = merge_onto(cls.config_class, node, "model")
        model = cls(cfg)
        for key in ("pretrained", "finetuned"):  # LAVIS's order: pre-training, then fine-tuning
            if getattr(cfg, key, None):
                model.load_checkpoint(getattr(cfg, key))
        return model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def load_checkpoint(self, path: str | Path, strict: bool = True) -> None:
        """Load weights, converting foreign key names with ``convert_state_dict``.

        Reports missing and unexpected keys; with ``strict`` any of them outside
        ``ignore_missing_prefixes`` raises.
        """
        state = self.convert_state_dict(load_state_dict_file(path))
        self.load_state_dict_checked(state, source=str(path), strict=strict, allow_missing=self.allow_missing(state))

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a foreign checkpoint's keys onto ours; identity by default."""
        return state

    def allow_missing(self, state: dict[str, torch.Tensor]) -> tuple[str, ...]:
        """Key prefixes this particular (converted) checkpoint may lack, beyond ``ignore_missing_prefixes``."""
        return ()

    def load_state_dict_checked(self, state: dict[str, torch.Tensor], source: str, strict: bool = True,
                                allow_missing: tuple[str, ...] = ()) -> None:
        result = self.load_state_dict(state, strict=False)
        allowed = self.ignore_missing_prefixes + allow_missing
        missing = [k for k in result.missing_keys if not k.startswith(allowed)]
        unexpected = list(result.unexpected_keys)
        if missing or unexpected:
            msg = (f"{source}: {len(missing)} missing keys {missing[:10]}, "
                   f"{len(unexpected)} unexpected keys {unexpected[:10]}")
            if strict:
                raise KeyError(msg + "; is this checkpoint for this model.arch/model_type?")
            logger.warning(msg)
        logger.info("loaded %d tensors from %s", len(state), source)

    def freeze(self, prefixes: Iterable[str]) -> None:
        """Stop gradients for parameters whose names start with any of ``prefixes``."""
        prefixes = tuple(prefixes)
        matched = False
        for name, param in self.named_parameters():
            if name.startswith(prefixes):
                param.requires_grad_(False)
                matched = True
        if prefixes and not matched:
            raise KeyError(f"freeze {list(prefixes)}: no parameter name starts with these prefixes")

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters with gradients plus buffers of modules that have any; what checkpoints hold."""
        params = dict(self.named_parameters(remove_duplicate=False))  # every name of a tied weight
        trainable = {n for n, p in params.items() if p.requires_grad}
        trainable_modules = {n.rpartition(".")[0] for n in trainable}
        return {
            key: value
            for key, value in self.state_dict().items()
            if key in trainable or (key not in params and key.rpartition(".")[0] in trainable_modules)
        }

    def no_decay_names(self) -> set[str]:
        """Parameter names excluded from weight decay beyond biases and norms (e.g. query tokens)."""
        return set()
