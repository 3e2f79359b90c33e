"""InternLM2 -> transformers Llama: config, weights, logits against the published formulas, tokenizer."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lavis_lite.models.llm.internlm2 import (
    internlm2_config_to_llama,
    internlm2_to_llama_state_dict,
    llama_to_internlm2_state_dict,
    load_internlm2,
    load_internlm2_tokenizer,
    save_internlm2,
)


def _official_sd(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


# ------------------------------------------------------------------------------------------------
# An independent InternLM2 forward, written from modeling_internlm2.py's formulas on official names.
# ------------------------------------------------------------------------------------------------


def reference_internlm2_logits(sd: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """float32 logits [B, T, vocab] of InternLM2ForCausalLM for unpadded ids [B, T]."""
    f = {k: v.float() for k, v in sd.items()}
    hidden, heads, kv_heads = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim, groups, eps = hidden // heads, heads // kv_heads, cfg["rms_norm_eps"]
    B, T = ids.shape

    # RoPE as InternLM2(Linear|DynamicNTK)ScalingRotaryEmbedding computes it for a T-token call.
    base, scaling = float(cfg["rope_theta"]), cfg["rope_scaling"]
    t = torch.arange(T, dtype=torch.float32)
    if scaling and scaling["type"] == "dynamic" and T > cfg["max_position_embeddings"]:
        a = scaling["factor"]
        base = base * ((a * T / cfg["max_position_embeddings"]) - (a - 1)) ** (head_dim / (head_dim - 2))
    if scaling and scaling["type"] == "linear":
        t = t / scaling["factor"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1)
    cos, sin = emb.cos(), emb.sin()

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    def rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, f[name + ".weight"], f.get(name + ".bias"))

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = f["model.tok_embeddings.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, f[p + "attention_norm.weight"])
        # "b q (h gs d) -> b q h gs d": per kv group, `groups` query heads, then k, then v
        qkv = linear(h, p + "attention.wqkv").view(B, T, kv_heads, groups + 2, head_dim)
        q = qkv[:, :, :, :groups].reshape(B, T, heads, head_dim).transpose(1, 2)
        k = qkv[:, :, :, groups].transpose(1, 2)
        v = qkv[:, :, :, groups + 1].transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # query head h -> kv h // groups
        att = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + linear((att @ v).transpose(1, 2).reshape(B, T, hidden), p + "attention.wo")
        h = rms_norm(x, f[p + "ffn_norm.weight"])
        x = x + linear(F.silu(linear(h, p + "feed_forward.w1")) * linear(h, p + "feed_forward.w3"), p + "feed_forward.w2")
    return linear(rms_norm(x, f["model.norm.weight"]), "output")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------

ROPE = {"none": None, "dynamic": {"type": "dynamic", "factor": 2.0}, "linear": {"type": "linear", "factor": 2.0}}


@pytest.mark.parametrize("rope", list(ROPE))
@pytest.mark.parametrize("seq_len", [12, 24])  # below and above max_position_embeddings=16
def test_logits_match_reference(make_internlm2_checkpoint, rope, seq_len):
    path = make_internlm2_checkpoint(rope_scaling=ROPE[rope], max_position_embeddings=16)
    model = load_internlm2(path, dtype=torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(input_ids=ids).logits
    want = reference_internlm2_logits(_official_sd(path), _config(path), ids)
    assert got.shape == want.shape == (2, seq_len, model.config.vocab_size)
    assert _rel_err(got, want) < 1e-5


def test_logits_match_reference_with_bias_and_eager(make_internlm2_checkpoint):
    path = make_internlm2_checkpoint(bias=True, seed=3)
    model = load_internlm2(path, dtype=torch.float32, attn_implementation="eager")
    assert model.config.attention_bias and model.model.layers[0].self_attn.k_proj.bias is not None
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert _rel_err(got, reference_internlm2_logits(_official_sd(path), _config(path), ids)) < 1e-5


def test_dynamic_ntk_resets_after_a_long_call(make_internlm2_checkpoint):
    """transformers 5.23 goes back to the unscaled frequencies for a call shorter than
    max_position_embeddings (InternLM2's remote code would keep the stretched ones): documented."""
    path = make_internlm2_checkpoint(rope_scaling=ROPE["dynamic"], max_position_embeddings=16)
    model = load_internlm2(path, dtype=torch.float32)
    long_ids = torch.randint(3, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(4))
    short_ids = long_ids[:, :10]
    sd, cfg = _official_sd(path), _config(path)
    with torch.no_grad():
        assert _rel_err(model(input_ids=long_ids).logits, reference_internlm2_logits(sd, cfg, long_ids)) < 1e-5
        assert _rel_err(model(input_ids=short_ids).logits, reference_internlm2_logits(sd, cfg, short_ids)) < 1e-5


def test_config_mapping(tiny_internlm2_dir):
    cfg = _config(tiny_internlm2_dir)
    c = internlm2_config_to_llama(cfg)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 16)
    assert c.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)
    assert not c.tie_word_embeddings and not c.attention_bias and not c.mlp_bias
    assert c.rms_norm_eps == 1e-5 and c.max_position_embeddings == 64 and c.vocab_size == cfg["vocab_size"]
    # keys left out take the official InternLM2Config defaults (bias=True, no rope scaling, theta 1e4)
    sparse = {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}
    s = internlm2_config_to_llama(sparse)
    assert s.attention_bias and s.num_key_value_heads == 4
    assert s.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}


@pytest.mark.parametrize(
    "override, match",
    [
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling.type='yarn'"),
        ({"rope_scaling": {"type": "dynamic"}}, "rope_scaling="),
        ({"rope_scaling": {"type": "dynamic", "factor": 0.5}}, "rope_scaling.factor"),
        ({"model_type": "llama"}, "model_type='llama'"),
        ({"architectures": ["InternLM2ForRewardModel"]}, "architectures"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"head_dim": 32}, "head_dim=32"),
        ({"sliding_window": 4096}, "sliding_window"),
    ],
)
def test_config_rejects_unsupported_settings(tiny_internlm2_dir, override, match):
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("(", r"\(")):
        internlm2_config_to_llama({**_config(tiny_internlm2_dir), **override})


def test_state_dict_round_trip_is_bitwise(tiny_internlm2_dir):
    sd, cfg = _official_sd(tiny_internlm2_dir), _config(tiny_internlm2_dir)
    llama = internlm2_to_llama_state_dict(sd, cfg)
    assert llama["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert llama["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    # group 1's first query head (Llama head 2) sits after group 0's 2 query heads + k + v
    assert torch.equal(llama["model.layers.1.self_attn.q_proj.weight"][32:48],
                       sd["model.layers.1.attention.wqkv.weight"][64:80])
    assert torch.equal(llama["model.layers.1.self_attn.v_proj.weight"][16:32],
                       sd["model.layers.1.attention.wqkv.weight"][112:128])
    back = llama_to_internlm2_state_dict(llama, cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(KeyError, match="model.layers.0.attention.rotary"):
        internlm2_to_llama_state_dict({"model.layers.0.attention.rotary": sd["model.norm.weight"]}, cfg)


def test_save_and_reload_is_bitwise(tiny_internlm2_dir, tmp_path):
    model = load_internlm2(tiny_internlm2_dir)  # bf16, as stored
    out = save_internlm2(model, tiny_internlm2_dir, tmp_path / "saved")
    original, saved = _official_sd(tiny_internlm2_dir), _official_sd(out)
    assert saved.keys() == original.keys()
    assert all(saved[k].dtype == original[k].dtype and torch.equal(saved[k], original[k]) for k in original)
    cfg = _config(out)
    assert cfg["model_type"] == "internlm2" and cfg["architectures"] == ["InternLM2ForCausalLM"]
    assert cfg["rope_scaling"] == {"type": "dynamic", "factor": 2.0} and cfg["bias"] is False
    assert (out / "tokenizer.model").read_bytes() == (tiny_internlm2_dir / "tokenizer.model").read_bytes()
    reloaded = load_internlm2(out)
    a, b = model.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert internlm2_config_to_llama(cfg).to_dict() == internlm2_config_to_llama(_config(tiny_internlm2_dir)).to_dict()


@pytest.mark.parametrize("weights", ["sharded", "bin"])
def test_other_weight_layouts_load_the_same(make_internlm2_checkpoint, weights):
    ref = load_internlm2(make_internlm2_checkpoint()).state_dict()
    got = load_internlm2(make_internlm2_checkpoint(weights=weights)).state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_left_padded_batch_generates_like_single_prompts(tiny_internlm2_dir):
    """pad id == eos id: the attention mask alone must keep padding out."""
    model = load_internlm2(tiny_internlm2_dir, dtype=torch.float32)
    tok = load_internlm2_tokenizer(tiny_internlm2_dir, padding_side="left")
    prompts = ["A picture of a cat", "一只猫坐在红色的沙发上，旁边是"]
    batch = tok(prompts, padding=True, return_tensors="pt")
    assert batch.attention_mask[0].eq(0).any()  # the first prompt is padded with eos ids
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        together = model.generate(**batch, **kw)[:, batch.input_ids.shape[1] :]
        for row, p in enumerate(prompts):
            one = tok(p, return_tensors="pt")
            alone = model.generate(**one, **kw)[0, one.input_ids.shape[1] :]
            assert together[row].tolist() == alone.tolist()


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------

TEXTS = [
    "A picture of a cat sitting on a red sofa.",
    "Hello world",
    "你好，世界！今天天气很好。",
    "图片中有龘字",  # a character outside the training corpus: byte fallback
    "  two leading spaces,   three inside",
    " one leading space",
    "trailing spaces  ",
    "line one\nline two\n\n\tindented",
    "\n",
    "Mixed 中文 and English 123",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_are_sentencepiece_plus_bos_and_decode_round_trips(tiny_internlm2_dir, text):
    tok = load_internlm2_tokenizer(tiny_internlm2_dir)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_internlm2_dir / "tokenizer.model"))
    ids = tok.encode(text)
    assert ids == [1] + sp.encode(text)
    assert tok(text).input_ids == ids and tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == "<s>" + text


def test_tokenizer_conventions(tiny_internlm2_dir):
    tok = load_internlm2_tokenizer(tiny_internlm2_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "</s>")
    assert len(tok) == _config(tiny_internlm2_dir)["vocab_size"] and tok.padding_side == "right"
    assert tok.convert_ids_to_tokens([1, 2]) == ["<s>", "</s>"] and tok.convert_ids_to_tokens(0) == "<unk>"
    # chat special tokens (control symbols) are matched in text, the stretches between them encoded alone
    sp = spm.SentencePieceProcessor(model_file=str(tiny_internlm2_dir / "tokenizer.model"))
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    text = "<|im_start|>user\n你好<|im_end|>\n"
    ids = tok.encode(text)
    assert ids == [1, im_start] + sp.encode("user\n你好") + [im_end] + sp.encode("\n")
    assert tok.decode(ids) == "<s>" + text
    # skipping merges the stretches, so the dummy-prefix space of "\n" shows, as in InternLM2's tokenizers
    assert tok.decode(ids, skip_special_tokens=True) == "user\n你好 \n"
    eos_text = tok.encode("Hello world", add_special_tokens=False) + [tok.eos_token_id]
    assert tok.batch_decode(torch.tensor([eos_text]), skip_special_tokens=True) == ["Hello world"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_tokenizer_batch_padding_and_truncation(tiny_internlm2_dir, side):
    tok = load_internlm2_tokenizer(tiny_internlm2_dir, padding_side=side)
    texts = ["Hello world", "A picture of a cat sitting on a red sofa next to the window.", "你好"]
    singles = [tok.encode(t) for t in texts]
    batch = tok(texts, padding="longest", return_tensors="pt")
    width = max(map(len, singles))
    assert batch.input_ids.shape == batch.attention_mask.shape == (3, width)
    assert batch.input_ids.dtype == torch.long
    for row, ids in enumerate(singles):
        mask = batch.attention_mask[row]
        assert mask.sum().item() == len(ids)
        assert batch.input_ids[row][mask.bool()].tolist() == ids
        assert batch.input_ids[row][~mask.bool()].eq(tok.pad_token_id).all()
        real = torch.nonzero(mask).flatten()
        assert real[0].item() == (0 if side == "right" else width - len(ids))
        assert real[-1].item() == (len(ids) - 1 if side == "right" else width - 1)

    cut = tok(texts, padding="max_length", truncation=True, max_length=6, return_tensors="pt")
    assert cut.input_ids.shape == (3, 6)
    assert cut.input_ids[1].tolist() == singles[1][:6]  # bos kept, text cut on the right
    assert tok(texts, padding=False).input_ids == singles
    with pytest.raises(ValueError, match="padding=True"):
        tok(texts, return_tensors="pt")


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_missing_files_raise_helpful_errors(tiny_internlm2_dir, tmp_path):
    broken = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_internlm2_dir, broken)
    (broken / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.model at .*no_tokenizer/tokenizer\.model"):
        load_internlm2_tokenizer(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*model\.safetensors"):
        load_internlm2(broken)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_internlm2(tmp_path)


def test_unsupported_rope_scaling_on_disk_fails_at_load(make_internlm2_checkpoint):
    path = make_internlm2_checkpoint(rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="rope_scaling.type='yarn' is not supported"):
        load_internlm2(path)
