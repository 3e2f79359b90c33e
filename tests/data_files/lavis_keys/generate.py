"""Write the key/shape tables of LAVIS's BLIP-2 checkpoints from LAVIS's architecture code.

Run from the repository root: ``python tests/data_files/lavis_keys/generate.py``. No lavis_lite import:
the tables are derived independently of our model code, from these LAVIS sources (salesforce/LAVIS):

- lavis/models/blip2_models/Qformer.py: BertEmbeddings (word_embeddings [vocab, 768], position_embeddings
  [512, 768], LayerNorm, persistent buffer position_ids [1, 512]); BertLayer: attention.self.query/key/value,
  attention.output.dense/LayerNorm, crossattention (same, key/value from encoder_width) when
  layer % cross_attention_freq == 0, intermediate.dense [3072, 768], output.dense [768, 3072]/LayerNorm,
  intermediate_query / output_query likewise; BertLMPredictionHead: bias [vocab], transform.dense/LayerNorm,
  decoder [vocab, 768] whose .bias is the same Parameter as predictions.bias (both keys are saved).
- lavis/models/blip2_models/blip2.py + blip2_qformer.py: bert-base-uncased sizes (hidden 768, 12 layers,
  intermediate 3072, 512 positions), vocab 30522 + [DEC] = 30523, cross_attention_freq 2, 32 queries
  (query_tokens [1, 32, 768]), ln_vision LayerNorm(vision width), vision_proj/text_proj [256, 768],
  itm_head [2, 768], temp (a 0-d Parameter).
- LAVIS's runner saves only parameters that require grad (plus buffers): the frozen ViT is absent from
  stage-1 checkpoints; ln_vision (trainable) is present.
- lavis/models/eva_vit.py create_eva_vit_g: patch 14, width 1408, depth 39, 16 heads, mlp int(1408 * 4.3637)
  = 6144, qkv without bias + q_bias/v_bias, no rel. pos. bias, 224 px -> 16 x 16 + 1 = 257 positions.
- lavis/models/clip_vit.py create_clip_vit_L: patch 14, width 1024, layers 23, 16 heads, MLP 4096, conv1
  without bias, class_embedding [1024], positional_embedding [257, 1024], ln_pre, nn.MultiheadAttention.
"""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def blip2_pretrained(vision_width: int, vocab: int = 30523, hidden: int = 768, layers: int = 12,
                     inter: int = 3072, positions: int = 512, freq: int = 2, queries: int = 32, embed: int = 256):
    keys = {"query_tokens": [1, queries, hidden], "ln_vision.weight": [vision_width], "ln_vision.bias": [vision_width]}
    q = "Qformer.bert."
    keys[q + "embeddings.position_ids"] = [1, positions]
    keys[q + "embeddings.word_embeddings.weight"] = [vocab, hidden]
    keys[q + "embeddings.position_embeddings.weight"] = [positions, hidden]
    keys[q + "embeddings.LayerNorm.weight"] = [hidden]
    keys[q + "embeddings.LayerNorm.bias"] = [hidden]

    def attention(prefix, kv_width):
        for name, width in (("query", hidden), ("key", kv_width), ("value", kv_width)):
            keys[f"{prefix}.self.{name}.weight"] = [hidden, width]
            keys[f"{prefix}.self.{name}.bias"] = [hidden]
        keys[f"{prefix}.output.dense.weight"] = [hidden, hidden]
        keys[f"{prefix}.output.dense.bias"] = [hidden]
        keys[f"{prefix}.output.LayerNorm.weight"] = [hidden]
        keys[f"{prefix}.output.LayerNorm.bias"] = [hidden]

    for i in range(layers):
        layer = f"{q}encoder.layer.{i}"
        attention(f"{layer}.attention", hidden)
        if i % freq == 0:
            attention(f"{layer}.crossattention", vision_width)
        for suffix in ("", "_query"):
            keys[f"{layer}.intermediate{suffix}.dense.weight"] = [inter, hidden]
            keys[f"{layer}.intermediate{suffix}.dense.bias"] = [inter]
            keys[f"{layer}.output{suffix}.dense.weight"] = [hidden, inter]
            keys[f"{layer}.output{suffix}.dense.bias"] = [hidden]
            keys[f"{layer}.output{suffix}.LayerNorm.weight"] = [hidden]
            keys[f"{layer}.output{suffix}.LayerNorm.bias"] = [hidden]
    c = "Qformer.cls.predictions."
    keys[c + "bias"] = [vocab]
    keys[c + "transform.dense.weight"] = [hidden, hidden]
    keys[c + "transform.dense.bias"] = [hidden]
    keys[c + "transform.LayerNorm.weight"] = [hidden]
    keys[c + "transform.LayerNorm.bias"] = [hidden]
    keys[c + "decoder.weight"] = [vocab, hidden]
    keys[c + "decoder.bias"] = [vocab]
    for name in ("vision_proj", "text_proj"):
        keys[f"{name}.weight"] = [embed, hidden]
        keys[f"{name}.bias"] = [embed]
    keys["itm_head.weight"] = [2, hidden]
    keys["itm_head.bias"] = [2]
    keys["temp"] = []
    return keys


def eva_vit_g(width=1408, depth=39, mlp=6144, patch=14, img=224):
    keys = {"cls_token": [1, 1, width], "pos_embed": [1, (img // patch) ** 2 + 1, width],
            "patch_embed.proj.weight": [width, 3, patch, patch], "patch_embed.proj.bias": [width]}
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({
            b + "norm1.weight": [width], b + "norm1.bias": [width],
            b + "attn.q_bias": [width], b + "attn.v_bias": [width],
            b + "attn.qkv.weight": [3 * width, width],
            b + "attn.proj.weight": [width, width], b + "attn.proj.bias": [width],
            b + "norm2.weight": [width], b + "norm2.bias": [width],
            b + "mlp.fc1.weight": [mlp, width], b + "mlp.fc1.bias": [mlp],
            b + "mlp.fc2.weight": [width, mlp], b + "mlp.fc2.bias": [width],
        })
    return keys


def clip_vit_L(width=1024, layers=23, patch=14, img=224):
    keys = {"class_embedding": [width], "positional_embedding": [(img // patch) ** 2 + 1, width],
            "conv1.weight": [width, 3, patch, patch], "ln_pre.weight": [width], "ln_pre.bias": [width]}
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        keys.update({
            b + "attn.in_proj_weight": [3 * width, width], b + "attn.in_proj_bias": [3 * width],
            b + "attn.out_proj.weight": [width, width], b + "attn.out_proj.bias": [width],
            b + "ln_1.weight": [width], b + "ln_1.bias": [width],
            b + "mlp.c_fc.weight": [4 * width, width], b + "mlp.c_fc.bias": [4 * width],
            b + "mlp.c_proj.weight": [width, 4 * width], b + "mlp.c_proj.bias": [width],
            b + "ln_2.weight": [width], b + "ln_2.bias": [width],
        })
    return keys


TABLES = {
    "blip2_pretrained.json": ("LAVIS blip2_pretrained.pth ('model'): EVA-CLIP-g width 1408", blip2_pretrained(1408)),
    "blip2_pretrained_vitL.json": ("LAVIS blip2_pretrained_vitL.pth ('model'): CLIP-L width 1024", blip2_pretrained(1024)),
    "eva_vit_g.json": ("LAVIS create_eva_vit_g(224) state dict (eva_vit_g.pth loads into it)", eva_vit_g()),
    "clip_vit_L.json": ("LAVIS create_clip_vit_L(224) state dict (clip_vit_L.pth loads into it)", clip_vit_L()),
}

if __name__ == "__main__":
    for name, (source, keys) in TABLES.items():
        rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in keys.items())
        text = (f'{{"source": {json.dumps(source)},\n "derived_from": "tests/data_files/lavis_keys/generate.py",\n'
                f' "keys": {{\n{rows}\n}}}}\n')
        json.loads(text)
        (HERE / name).write_text(text)
        print(name, len(keys))
