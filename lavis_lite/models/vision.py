"""Image encoders of BLIP-2 (EVA01-CLIP-g/14, OpenAI CLIP-L/14), built by timm, and their checkpoint filters.

LAVIS ships its own ViT copies (lavis/models/eva_vit.py, lavis/models/clip_vit.py). We build the same
networks with timm (``pretrained=False`` always: weights come from files we load) and map LAVIS's
checkpoint keys onto timm's:

- ``eva_clip_g``: EVA01-g/14 as timm's ``eva_giant_patch14_224`` (width 1408, 16 heads, MLP 6144 =
  int(1408 * 4.3637), patch 14, LayerNorm eps 1e-6, q/v biases, no k bias) with **39** blocks: LAVIS's
  ``create_eva_vit_g`` builds 39 of EVA-CLIP-g's 40 blocks, so features come from the penultimate block,
  with no final norm. LAVIS's key names (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
  ``blocks.N.norm1/attn.qkv/attn.q_bias/attn.v_bias/attn.proj/norm2/mlp.fc1/mlp.fc2``) equal timm's.
- ``clip_L``: OpenAI CLIP ViT-L/14 as timm's ``vit_large_patch14_clip_quickgelu_224`` with 23 of 24
  blocks and no final norm (LAVIS ``create_clip_vit_L``: ``layers=23``). LAVIS keeps OpenAI's names
  (``conv1``, ``class_embedding``, ``transformer.resblocks.N.attn.in_proj_weight`` ...), renamed here.
- ``tiny``: the EVA layout with 2 blocks of width 64 and patch 16, for tests and CPU demos.
- ``eva``: the EVA layout at any size, from ``VitArch`` (``model.vit_arch``): width, depth, heads, MLP
  width, patch, LayerNorm eps, q/v biases. A Hugging Face BLIP-2 ``vision_config`` maps onto it
  (``hf_blip2.py``); HF's fused ``qkv.bias`` is LAVIS's ``q_bias``/``v_bias`` with a zero k part.

Differences from LAVIS:
- ``vit_precision`` fp16/bf16 converts Linear/Conv weights as LAVIS's ``convert_weights_to_fp16`` does
  (norms, biases of q/v, position embeddings stay fp32) and runs the encoder under ``torch.autocast`` to
  that dtype; LAVIS leaves the autocast to its caller.
- activation checkpointing (``model.vit_use_checkpoint``) is applied by the model to every block with
  ``blocks.checkpoint_blocks``, not timm's ``set_grad_checkpointing``; LAVIS's CLIP-L only checkpoints
  blocks 13 and up.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from functools import partial
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm
from torch import nn

from lavis_lite.models.base import load_state_dict_file

logger = logging.getLogger(__name__)

VitModel = Literal["eva_clip_g", "clip_L", "tiny", "eva"]
VitPrecision = Literal["fp32", "fp16", "bf16"]
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class VitSpec:
    """How one ``vit_model`` name is built by timm and which checkpoint layout it reads."""

    timm_name: str
    layout: Literal["eva", "clip"]  # key names of the LAVIS checkpoints for this encoder
    timm_kwargs: tuple[tuple[str, Any], ...]  # overrides of timm's architecture arguments


VIT_SPECS: dict[str, VitSpec] = {
    # LAVIS create_eva_vit_g: depth=39 of EVA-CLIP-g's 40; forward_features returns the last block's
    # output without a norm (timm's post-transformer norm is switched off).
    "eva_clip_g": VitSpec("eva_giant_patch14_224", "eva", (("depth", 39), ("use_post_transformer_norm", False))),
    # LAVIS create_clip_vit_L: layers=23 of 24, QuickGELU, ln_pre, no ln_post.
    "clip_L": VitSpec("vit_large_patch14_clip_quickgelu_224", "clip", (("depth", 23), ("final_norm", False))),
    # Same code path as eva_clip_g, at test size.
    "tiny": VitSpec(
        "eva_giant_patch14_224",
        "eva",
        (("depth", 2), ("embed_dim", 64), ("num_heads", 4), ("mlp_ratio", 4.0), ("patch_size", 16),
         ("use_post_transformer_norm", False)),
    ),
}


@dataclasses.dataclass
class VitArch:
    """Sizes of ``vit_model: eva``, an EVA-layout ViT built from config values (defaults: EVA-CLIP-g as
    LAVIS builds it). The Hugging Face ``Blip2VisionConfig`` names are in the comments."""

    width: int = 1408  # hidden_size
    depth: int = 39  # num_hidden_layers
    num_heads: int = 16  # num_attention_heads
    mlp_width: int = 6144  # intermediate_size
    patch_size: int = 14  # patch_size
    layer_norm_eps: float = 1e-6  # layer_norm_eps
    qkv_bias: bool = True  # qkv_bias: q and v biases; EVA has no k bias


def eva_spec(arch: VitArch) -> VitSpec:
    """The timm build of ``arch`` (the code path of ``eva_clip_g`` with other sizes)."""
    if arch.width % arch.num_heads:
        raise ValueError(f"model.vit_arch.width={arch.width} is not a multiple of "
                         f"model.vit_arch.num_heads={arch.num_heads}")
    return VitSpec("eva_giant_patch14_224", "eva", (
        ("depth", arch.depth), ("embed_dim", arch.width), ("num_heads", arch.num_heads),
        # timm sizes the MLP as int(width * mlp_ratio): the half keeps float rounding from losing a unit
        ("mlp_ratio", (arch.mlp_width + 0.5) / arch.width), ("patch_size", arch.patch_size),
        ("qkv_bias", arch.qkv_bias), ("norm_layer", partial(LayerNorm, eps=arch.layer_norm_eps)),
        ("use_post_transformer_norm", False),
    ))


def _spec(vit_model: str, arch: VitArch | None = None) -> VitSpec:
    if vit_model == "eva":
        return eva_spec(arch or VitArch())
    if vit_model not in VIT_SPECS:
        raise ValueError(f"model.vit_model={vit_model!r} is not a known image encoder; "
                         f"choose one of {sorted(VIT_SPECS) + ['eva']} (eva: sizes from model.vit_arch)")
    return VIT_SPECS[vit_model]


# ---------------------------------------------------------------------------------------- model
def create_vision_encoder(
    vit_model: str, img_size: int = 224, drop_path_rate: float = 0.0, depth: int | None = None,
    arch: VitArch | None = None,
) -> nn.Module:
    """The timm ViT for ``vit_model``, randomly initialised (load weights with ``load_vision_weights``).

    ``arch``: the sizes of ``vit_model="eva"`` (ignored by the named encoders).

    ``depth``: fewer blocks than the encoder's own (None), e.g. for tests at the real width; a checkpoint's
    extra blocks are then dropped on load, as LAVIS drops EVA-CLIP-g's 40th.
    ``encoder.forward_features(image [B, 3, H, W])`` -> ``[B, 1 + (H/p)*(W/p), width]``;
    ``encoder.num_features`` is the width (1408 for eva_clip_g, 1024 for clip_L).
    """
    spec = _spec(vit_model, arch)
    kwargs = dict(spec.timm_kwargs)
    patch = kwargs.get("patch_size", 14)
    if img_size % patch:
        raise ValueError(f"model.img_size={img_size} is not a multiple of {vit_model}'s patch size {patch}")
    if depth is not None:
        if not 1 <= depth <= kwargs["depth"]:
            raise ValueError(f"model.vit_depth={depth}: {vit_model} has {kwargs['depth']} blocks; choose 1 to "
                             f"{kwargs['depth']}, or null for all of them")
        kwargs["depth"] = depth
    encoder = timm.create_model(
        spec.timm_name,
        pretrained=False,
        num_classes=0,
        global_pool="",
        img_size=img_size,
        drop_path_rate=drop_path_rate,
        **kwargs,
    )
    return encoder


def set_vit_precision(encoder: nn.Module, precision: str) -> None:
    """Store Linear/Conv weights and biases in ``precision`` (LAVIS ``convert_weights_to_fp16``)."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"model.vit_precision={precision!r}; choose one of {sorted(PRECISION_DTYPES)}")
    dtype = PRECISION_DTYPES[precision]
    if dtype == torch.float32:
        return
    for module in encoder.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)


def vision_features(encoder: nn.Module, image: torch.Tensor, precision: str) -> torch.Tensor:
    """Patch features ``[B, 1 + num_patches, width]`` (class token first), in ``precision`` or float32."""
    dtype = PRECISION_DTYPES[precision]
    if dtype == torch.float32:
        return encoder.forward_features(image)
    with torch.autocast(device_type=image.device.type, dtype=dtype):
        return encoder.forward_features(image)


def load_vision_weights(encoder: nn.Module, vit_model: str, path: str | Path) -> None:
    """Load a LAVIS image-encoder file (``eva_vit_g.pth``, ``clip_vit_L.pth``) or a timm state dict.

    Fails on any key that is missing or left over after ``vision_checkpoint_filter``.
    """
    state = vision_checkpoint_filter(vit_model, load_state_dict_file(path, "model.vit_pretrained"), encoder)
    result = encoder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise KeyError(
            f"model.vit_pretrained={path}: {len(result.missing_keys)} missing keys {result.missing_keys[:10]}, "
            f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:10]}; "
            f"is this a {vit_model} checkpoint? (model.vit_model={vit_model})"
        )
    logger.info("image encoder %s: loaded %d tensors from %s", vit_model, len(state), path)


# ---------------------------------------------------------------------------- checkpoint filter
def resample_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1, align_corners: bool = False
) -> torch.Tensor:
    """Bicubic resampling of ``[1, prefix + h*w, C]`` position embeddings to ``grid``; prefix kept.

    LAVIS uses ``align_corners=False`` for EVA (eva_vit.interpolate_pos_embed) and ``True`` for CLIP.
    """
    prefix, tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"position embedding has {tokens.shape[1]} patch positions, not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    logger.info("resampling position embeddings from %dx%d to %dx%d", side, side, *grid)
    channels = tokens.shape[-1]
    tokens = tokens.float().reshape(1, side, side, channels).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=tuple(grid), mode="bicubic", align_corners=align_corners)
    tokens = tokens.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], channels).to(pos_embed.dtype)
    return torch.cat([prefix, tokens], dim=1)


def _block_index(key: str, prefix: str) -> int | None:
    if not key.startswith(prefix):
        return None
    return int(key[len(prefix):].split(".", 1)[0])


def checkpoint_filter_eva(state: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
    """LAVIS ``eva_vit_g.pth`` -> timm Eva: same names; blocks beyond the encoder's depth and the
    classifier ``norm``/``fc_norm``/``head`` (unused by LAVIS, which loads with strict=False) are dropped,
    ``pos_embed`` is resampled when ``img_size`` differs."""
    depth = len(encoder.blocks)
    out, dropped = {}, []
    for key, value in state.items():
        index = _block_index(key, "blocks.")
        if (index is not None and index >= depth) or key.startswith(("norm.", "fc_norm.", "head.")):
            dropped.append(key)
            continue
        if key == "pos_embed":
            value = resample_pos_embed(value, encoder.patch_embed.grid_size, 1, align_corners=False)
        out[key] = value
    if dropped:
        logger.info("EVA checkpoint: dropped %d keys the encoder does not use (e.g. %s)", len(dropped), dropped[:3])
    return out


# OpenAI / LAVIS CLIP block names -> timm VisionTransformer block names
_CLIP_BLOCK_RENAMES = (
    ("ln_1.", "norm1."),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.", "attn.proj."),
    ("ln_2.", "norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)


def checkpoint_filter_clip(state: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
    """LAVIS ``clip_vit_L.pth`` (OpenAI names) -> timm VisionTransformer; extra blocks, ``ln_post`` and
    ``proj`` are dropped, ``positional_embedding`` is resampled when ``img_size`` differs."""
    depth = len(encoder.blocks)
    out, dropped = {}, []
    for key, value in state.items():
        if key.startswith("visual."):  # a full OpenAI CLIP state dict: keep the image tower
            key = key[len("visual."):]
        index = _block_index(key, "transformer.resblocks.")
        if (index is not None and index >= depth) or key.startswith(("ln_post.", "proj")):
            dropped.append(key)
            continue
        if index is not None:
            rest = key[len(f"transformer.resblocks.{index}."):]
            for old, new in _CLIP_BLOCK_RENAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[f"blocks.{index}.{rest}"] = value
        elif key == "conv1.weight":
            out["patch_embed.proj.weight"] = value
        elif key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            grid = encoder.patch_embed.grid_size
            out["pos_embed"] = resample_pos_embed(value.unsqueeze(0), grid, 1, align_corners=True)
        elif key.startswith("ln_pre."):
            out["norm_pre." + key[len("ln_pre."):]] = value
        else:
            out[key] = value  # already timm-named (or unknown: reported by the caller)
    if dropped:
        logger.info("CLIP checkpoint: dropped %d keys the encoder does not use (e.g. %s)", len(dropped), dropped[:3])
    return out


def vision_checkpoint_filter(
    vit_model: str, state: dict[str, torch.Tensor], encoder: nn.Module
) -> dict[str, torch.Tensor]:
    """Map a LAVIS image-encoder state dict (no ``visual_encoder.`` prefix) onto the timm encoder."""
    layout = _spec(vit_model).layout
    return checkpoint_filter_eva(state, encoder) if layout == "eva" else checkpoint_filter_clip(state, encoder)
