"""Image encoders: timm builds of LAVIS's EVA-CLIP-g and CLIP-L, checkpoint filters, precision, freezing."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lavis_lite.models.convert import load_key_table, meta_state_dict
from lavis_lite.models.vision import (
    checkpoint_filter_clip,
    checkpoint_filter_eva,
    create_vision_encoder,
    load_vision_weights,
    resample_pos_embed,
    set_vit_precision,
    vision_features,
)
from tests.models.tiny_blip2 import REPO

TABLES = REPO / "tests" / "data_files" / "lavis_keys"


# ------------------------------------------------------------------ LAVIS reference math (compact copies)
def lavis_eva_forward(state: dict, x: torch.Tensor, heads: int, patch: int) -> torch.Tensor:
    """LAVIS eva_vit.VisionTransformer.forward_features written out (no final norm)."""
    x = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + state["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        p = {k[len(f"blocks.{i}."):]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        B, N, C = x.shape
        h = F.layer_norm(x, (C,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        bias = torch.cat([p["attn.q_bias"], torch.zeros_like(p["attn.v_bias"]), p["attn.v_bias"]])
        q, k, v = F.linear(h, p["attn.qkv.weight"], bias).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(B, N, C), p["attn.proj.weight"], p["attn.proj.bias"])
        h = F.layer_norm(x, (C,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"])
        x = x + h
    return x


def lavis_clip_forward(state: dict, x: torch.Tensor, heads: int, patch: int) -> torch.Tensor:
    """LAVIS clip_vit.VisionTransformer.forward written out (nn.MultiheadAttention, QuickGELU, no ln_post)."""
    x = F.conv2d(x, state["conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    C = x.shape[-1]
    x = torch.cat([state["class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + state["positional_embedding"]
    x = F.layer_norm(x, (C,), state["ln_pre.weight"], state["ln_pre.bias"])
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks."))
    for i in range(depth):
        p = {k[len(f"transformer.resblocks.{i}."):]: v for k, v in state.items() if k.startswith(f"transformer.resblocks.{i}.")}
        mha = nn.MultiheadAttention(C, heads, batch_first=True)
        mha.load_state_dict({k[len("attn."):]: v for k, v in p.items() if k.startswith("attn.")})
        h = F.layer_norm(x, (C,), p["ln_1.weight"], p["ln_1.bias"])
        x = x + mha(h, h, h, need_weights=False)[0]
        h = F.layer_norm(x, (C,), p["ln_2.weight"], p["ln_2.bias"])
        h = F.linear(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
    return x


def random_state(table: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=generator) * 0.2 for k, shape in table.items()}


# ------------------------------------------------------------------------------------------- tests
def test_tiny_encoder_features_come_from_last_block_without_norm():
    encoder = create_vision_encoder("tiny", img_size=64).eval()
    out = encoder.forward_features(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1 + 4 * 4, 64)
    assert len(encoder.blocks) == 2 and isinstance(encoder.norm, nn.Identity) and encoder.num_features == 64


def test_eva_clip_g_full_size_is_lavis_architecture():
    with torch.device("meta"):
        encoder = create_vision_encoder("eva_clip_g", img_size=224)
    assert len(encoder.blocks) == 39  # LAVIS create_eva_vit_g: 40-block EVA-CLIP-g minus the last
    assert encoder.num_features == 1408 and encoder.blocks[0].attn.num_heads == 16
    assert encoder.blocks[0].mlp.fc1.out_features == int(1408 * 4.3637) == 6144
    assert encoder.patch_embed.proj.kernel_size == (14, 14) and tuple(encoder.pos_embed.shape) == (1, 257, 1408)
    assert isinstance(encoder.norm, nn.Identity) and isinstance(encoder.head, nn.Identity)
    assert encoder.blocks[0].norm1.eps == 1e-6
    assert sum(p.numel() for p in encoder.parameters()) > 0.98e9


@pytest.mark.parametrize("vit_model,table,filter_fn", [
    ("eva_clip_g", "eva_vit_g.json", checkpoint_filter_eva),
    ("clip_L", "clip_vit_L.json", checkpoint_filter_clip),
])
def test_lavis_vit_keys_map_onto_full_size_timm_encoder(vit_model, table, filter_fn):
    with torch.device("meta"):
        encoder = create_vision_encoder(vit_model, img_size=224)
    lavis = load_key_table(TABLES / table)
    # the released files may hold the encoder's unused last block and head: they must be dropped
    extra = {"blocks.39.norm1.weight": [1408], "head.weight": [1000, 1408]} if vit_model == "eva_clip_g" else \
        {"transformer.resblocks.23.ln_1.weight": [1024], "ln_post.weight": [1024], "proj": [1024, 768]}
    mapped = filter_fn(meta_state_dict({**lavis, **extra}), encoder)
    ours = encoder.state_dict()
    assert sorted(mapped) == sorted(ours), set(mapped) ^ set(ours)
    for key, value in mapped.items():
        assert value.shape == ours[key].shape, key
    encoder.load_state_dict(mapped, strict=True)


def test_eva_mapping_reproduces_lavis_eva_forward():
    encoder = create_vision_encoder("tiny", img_size=64).eval()
    table = {k: list(v.shape) for k, v in encoder.state_dict().items()}  # LAVIS names == timm names
    state = random_state(table)
    encoder.load_state_dict(checkpoint_filter_eva(state, encoder), strict=True)
    image = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(encoder.forward_features(image), lavis_eva_forward(state, image, 4, 16),
                               rtol=1e-4, atol=1e-4)


def test_clip_mapping_reproduces_lavis_clip_forward():
    encoder = timm.create_model("vit_large_patch14_clip_quickgelu_224", pretrained=False, num_classes=0,
                                global_pool="", img_size=28, embed_dim=32, depth=2, num_heads=4, final_norm=False).eval()
    width, grid = 32, 2
    table = {"class_embedding": [width], "positional_embedding": [grid * grid + 1, width],
             "conv1.weight": [width, 3, 14, 14], "ln_pre.weight": [width], "ln_pre.bias": [width]}
    for i in range(2):
        b = f"transformer.resblocks.{i}."
        table.update({b + "attn.in_proj_weight": [3 * width, width], b + "attn.in_proj_bias": [3 * width],
                      b + "attn.out_proj.weight": [width, width], b + "attn.out_proj.bias": [width],
                      b + "ln_1.weight": [width], b + "ln_1.bias": [width], b + "ln_2.weight": [width],
                      b + "ln_2.bias": [width], b + "mlp.c_fc.weight": [4 * width, width],
                      b + "mlp.c_fc.bias": [4 * width], b + "mlp.c_proj.weight": [width, 4 * width],
                      b + "mlp.c_proj.bias": [width]})
    state = random_state(table, seed=1)
    encoder.load_state_dict(checkpoint_filter_clip(state, encoder), strict=True)
    image = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = lavis_clip_forward(state, image, 4, 14)
    torch.testing.assert_close(encoder.forward_features(image), expected, rtol=1e-4, atol=1e-4)


def test_pos_embed_resampling():
    pos = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pos, (4, 4)) is pos
    constant = torch.ones(1, 1 + 16, 8) * 3.0
    constant[:, 0] = -1.0
    out = resample_pos_embed(constant, (6, 6))
    assert out.shape == (1, 37, 8) and torch.equal(out[:, 0], constant[:, 0])
    torch.testing.assert_close(out[:, 1:], torch.full((1, 36, 8), 3.0))
    # a 224 px EVA checkpoint loads into a 96 px encoder (grid 4 -> 6 with patch 16)
    encoder = create_vision_encoder("tiny", img_size=96)
    source = create_vision_encoder("tiny", img_size=64).state_dict()
    encoder.load_state_dict(checkpoint_filter_eva(source, encoder), strict=True)
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(torch.randn(1, 1 + 15, 8), (4, 4))


def test_load_vision_weights_file_roundtrip_and_mismatch(tmp_path):
    source = create_vision_encoder("tiny", img_size=64).eval()
    torch.save(source.state_dict(), tmp_path / "eva.pth")
    target = create_vision_encoder("tiny", img_size=64).eval()
    load_vision_weights(target, "tiny", tmp_path / "eva.pth")
    image = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(target.forward_features(image), source.forward_features(image))
    torch.save({k: v for k, v in source.state_dict().items() if "blocks.1." not in k}, tmp_path / "partial.pth")
    with pytest.raises(KeyError, match="missing keys"):
        load_vision_weights(target, "tiny", tmp_path / "partial.pth")


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_converts_linear_and_conv_weights_only(precision, dtype):
    reference = create_vision_encoder("tiny", img_size=64).eval()
    encoder = create_vision_encoder("tiny", img_size=64).eval()
    encoder.load_state_dict(reference.state_dict())
    set_vit_precision(encoder, precision)
    assert encoder.blocks[0].attn.qkv.weight.dtype == dtype and encoder.patch_embed.proj.weight.dtype == dtype
    assert encoder.blocks[0].norm1.weight.dtype == torch.float32 and encoder.pos_embed.dtype == torch.float32
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = vision_features(encoder, image, precision)
        expected = vision_features(reference, image, "fp32")
    assert out.shape == expected.shape
    assert (out.float() - expected).abs().max() < 0.1 * expected.abs().max()


def test_unknown_vit_model_and_bad_size():
    with pytest.raises(ValueError, match="choose one of"):
        create_vision_encoder("eva_clip_h")
    with pytest.raises(ValueError, match="not a multiple"):
        create_vision_encoder("tiny", img_size=70)


def test_vit_depth_keeps_the_first_blocks_of_a_deeper_checkpoint(tmp_path):
    full = create_vision_encoder("tiny", img_size=64)
    torch.save(full.state_dict(), tmp_path / "vit.pth")
    shallow = create_vision_encoder("tiny", img_size=64, depth=1)
    assert len(shallow.blocks) == 1 and shallow.num_features == full.num_features
    load_vision_weights(shallow, "tiny", tmp_path / "vit.pth")  # block 1 of the file is dropped
    torch.testing.assert_close(shallow.blocks[0].mlp.fc2.weight, full.blocks[0].mlp.fc2.weight)
    with pytest.raises(ValueError, match=r"model.vit_depth=3: tiny has 2 blocks; choose 1 to 2"):
        create_vision_encoder("tiny", img_size=64, depth=3)
