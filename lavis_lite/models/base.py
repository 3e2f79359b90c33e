"""BaseModel: config-driven construction, checkpoint loading that reports every key, freezing."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Iterable, Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from lavis_lite.config import merge_onto

logger = logging.getLogger(__name__)


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], Optional[str]]:
    """(tensors, the run's resolved config as YAML or None) from a ``.safetensors`` file, a torch
    checkpoint (loaded with ``weights_only=True``) or a Hugging Face BLIP-2 directory (``hf_blip2.py``).

    A LAVIS ``.pth`` keeps the weights under ``"model"`` (a bare state dict is accepted too); ours also
    keep the run's config under ``"config"`` (``lavis_lite/runner/checkpoint.py``).
    """
    path = Path(path)
    if path.is_dir():  # a Hugging Face save_pretrained directory
        from lavis_lite.models.hf_blip2 import read_hf_blip2

        return read_hf_blip2(path, what), None
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no file or directory at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    config = ckpt.get("config") if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), str) else None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict):
        raise ValueError(f"{what}: {path} holds a {type(ckpt).__name__}, not a state dict")
    return ckpt, config


def building_weightless() -> bool:
    """Whether models are being built under ``torch.device("meta")``: parameters get shapes but no memory,
    so files that only give weights or token ids (a tokenizer, the LLM's weights) are not needed
    (``python -m lavis_lite.models.convert --keys``)."""
    return torch.get_default_device().type == "meta"


def load_state_dict_file(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of ``read_checkpoint``."""
    return read_checkpoint(path, what)[0]


class BaseModel(nn.Module):
    """Parent of every registered model.

    Subclasses set ``config_class`` (a dataclass holding every default of the family) and may list
    ``ignore_missing_prefixes``: keys deliberately absent from checkpoints (e.g. a frozen LLM).
    ``forward(batch)`` returns a dict with ``loss`` plus scalars to log.
    """

    config_class: ClassVar[type]
    ignore_missing_prefixes: ClassVar[tuple[str, ...]] = ()
    # config keys naming local files or folders: a checkpoint's stored config is reused only if they exist
    path_keys: ClassVar[tuple[str, ...]] = ("pretrained", "finetuned")

    @classmethod
    def from_config(cls, node: Any, warn_untrained: bool = True) -> "BaseModel":
        """Build from ``node`` (merged onto ``config_class``; sizes a ``pretrained`` or ``finetuned`` checkpoint
        dictates win, see ``checkpoint_config``), then load ``pretrained`` and ``finetuned``.

        ``warn_untrained``: warn if a part still has no weights (``untrained_parts``); False when the
        caller loads more weights first and warns itself (``load_model``).
        """
        cfg = merge_onto(cls.config_class, node, "model")
        for key in ("pretrained", "finetuned"):
            given = cls.checkpoint_config(getattr(cfg, key), cfg) if getattr(cfg, key, None) else {}
            if given:
                cfg = merge_onto(cls.config_class, OmegaConf.merge(OmegaConf.structured(cfg), given), "model")
        model = cls(cfg)
        for key in ("pretrained", "finetuned"):  # LAVIS's order: pre-training, then fine-tuning
            if getattr(cfg, key, None):
                model.load_checkpoint(getattr(cfg, key))
        if warn_untrained:
            model.warn_untrained()
        return model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def load_checkpoint(self, path: str | Path, strict: bool = True) -> None:
        """Load weights, converting foreign key names with ``convert_state_dict``.

        Reports missing and unexpected keys; with ``strict`` any of them outside
        ``ignore_missing_prefixes`` raises.
        """
        self.load_weights(load_state_dict_file(path), str(path), strict)

    def load_weights(self, state: dict[str, torch.Tensor], source: str, strict: bool = True) -> None:
        """``load_checkpoint`` for tensors already read from ``source``."""
        state = self.fill_tied(self.convert_state_dict(state))
        self.load_state_dict_checked(state, source=source, strict=strict, allow_missing=self.allow_missing(state))
        self.mark_loaded(state)

    def mark_loaded(self, state: dict[str, torch.Tensor]) -> None:
        """Record which parts the (converted, loaded) ``state`` gave weights to; see ``untrained_parts``."""

    def untrained_parts(self) -> list[tuple[str, str]]:
        """(part, config keys that give it weights) for each part still randomly initialised where a
        real model needs pretrained weights; none by default."""
        return []

    def warn_untrained(self) -> None:
        """One loud warning line naming every randomly initialised part and the keys to set."""
        parts = self.untrained_parts()
        if parts:
            cfg = getattr(self, "cfg", None)
            name = f"{getattr(cfg, 'arch', type(self).__name__)}/{getattr(cfg, 'model_type', '?')}"
            verb = "is" if len(parts) == 1 else "are"
            logger.warning("%s: %s %s randomly initialised: set %s", name, " and ".join(p for p, _ in parts), verb,
                           " and ".join(keys for _, keys in parts))

    @classmethod
    def checkpoint_config(cls, path: str | Path, cfg: Any) -> dict[str, Any]:
        """Config keys a checkpoint at ``path`` dictates before the model is built (e.g. the sizes in a
        Hugging Face directory's config.json), given the current config ``cfg``; none by default."""
        return {}

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a foreign checkpoint's keys onto ours; identity by default."""
        return state

    def fill_tied(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with every name of a tied parameter that it lacks taken from a partner it has.

        safetensors and ``save_pretrained`` store each shared tensor once (e.g. the Q-Former's LM head
        ``decoder.weight``, tied to the word embeddings, and ``decoder.bias``, which is ``predictions.bias``).
        """
        names: dict[int, list[str]] = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        filled = dict(state)
        for group in names.values():
            source = next((n for n in group if n in state), None)
            if source is not None:
                for name in group:
                    filled.setdefault(name, state[source])
        return filled

    def allow_missing(self, state: dict[str, torch.Tensor]) -> tuple[str, ...]:
        """Key prefixes this particular (converted) checkpoint may lack, beyond ``ignore_missing_prefixes``."""
        return ()

    def load_state_dict_checked(self, state: dict[str, torch.Tensor], source: str, strict: bool = True,
                                allow_missing: tuple[str, ...] = ()) -> None:
        own = self.state_dict()
        mismatched = [f"{k}: checkpoint {list(v.shape)} but the model {list(own[k].shape)}"
                      for k, v in state.items() if k in own and v.shape != own[k].shape]
        if mismatched:
            raise RuntimeError(f"{source}: size mismatch for {len(mismatched)} tensors ({'; '.join(mismatched[:3])}); "
                               "is this checkpoint for this model.arch/model_type and its size overrides?")
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
