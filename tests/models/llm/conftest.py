"""Tiny InternLM2 checkpoints written in the OFFICIAL on-disk format, for any test that needs one.

``write_tiny_internlm2(out_dir, ...)`` writes what ``internlm/internlm2-*`` ships: ``config.json``
(official keys, ``model_type: internlm2``), weights under the official tensor names (bf16, in
``model.safetensors``, sharded safetensors + index, or ``pytorch_model.bin``), a sentencepiece
``tokenizer.model`` trained here (BPE, byte fallback, English + Chinese) and ``tokenizer_config.json``.
It does not import lavis_lite, so the loader is tested against an independent writer.

Fixtures: ``internlm2_sp_proto`` (the trained tokenizer bytes), ``make_internlm2_checkpoint(**kw)``
(cached per keyword set) and ``tiny_internlm2_dir`` (the default checkpoint).
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable, Literal

import pytest
import torch

TINY = {  # hidden 64, 4 heads over 2 kv heads (GQA), 2 layers
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
}

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A picture of a cat sitting on a red sofa next to the window.",
    "Question: what is in the image? Answer: two dogs playing in the park.",
    "Describe the image in detail. Short answer:",
    "A man riding a bicycle down a busy street in the city.",
    "Two children are flying a kite on the beach at sunset.",
    "There is a bowl of fruit, with apples, bananas and oranges, on the table.",
    "Hello world! How are you today? I am fine, thank you.",
    "A photo of a blue car parked in front of an old building.",
    "The weather is nice; the sky is clear and the sun is shining.",
    "def forward(self, x):\n    return self.proj(x) * 2",
    "Numbers: 0 1 2 3 4 5 6 7 8 9, 2024, 3.14",
    "一只猫坐在红色的沙发上，旁边是窗户。",
    "图片中有两只狗在公园里玩耍。",
    "你好，世界！今天天气很好。",
    "请详细描述这张图片。简短回答：",
    "一个男人骑着自行车穿过繁忙的城市街道。",
    "两个孩子在日落时分的海滩上放风筝。",
    "桌子上有一碗水果，有苹果、香蕉和橙子。",
    "这是一张照片，照片里有一辆蓝色的汽车停在老建筑前面。",
]
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]  # InternLM2-chat's, as control symbols at ids 3 and 4


def train_tiny_sentencepiece(vocab_size: int = 500) -> bytes:
    """A BPE sentencepiece model like InternLM2's: unk=0, bos=1, eos=2, byte fallback, no pad piece."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 8),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        control_symbols=SPECIAL_TOKENS,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def _tokenizer_config() -> dict[str, Any]:
    def added(content: str) -> dict[str, Any]:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    tokens = ["<unk>", "<s>", "</s>", *SPECIAL_TOKENS]
    return {  # the keys of internlm/internlm2-chat-*'s tokenizer_config.json
        "added_tokens_decoder": {str(i): added(t) for i, t in enumerate(tokens)},
        "additional_special_tokens": SPECIAL_TOKENS,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>",
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }


def tiny_internlm2_config(vocab_size: int, **overrides: Any) -> dict[str, Any]:
    """An official-format config.json dict (keys as in internlm/internlm2-1_8b)."""
    cfg = {
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        **TINY,
        "initializer_range": 0.02,
        "max_position_embeddings": 64,
        "model_type": "internlm2",
        "pad_token_id": 2,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.0",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    cfg.update(overrides)
    return cfg


def random_internlm2_state_dict(cfg: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random weights under the official InternLM2 names and shapes (fused, group-interleaved wqkv)."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = hidden // cfg["num_attention_heads"]
    qkv_rows = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head_dim

    def w(*shape: int, std: float = 0.1) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm(n: int) -> torch.Tensor:
        return (1 + torch.randn(n, generator=g) * 0.1).to(dtype)

    sd = {"model.tok_embeddings.weight": w(vocab, hidden, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "attention.wqkv.weight"] = w(qkv_rows, hidden)
        sd[p + "attention.wo.weight"] = w(hidden, hidden)
        if cfg["bias"]:
            sd[p + "attention.wqkv.bias"] = w(qkv_rows)
            sd[p + "attention.wo.bias"] = w(hidden)
        sd[p + "feed_forward.w1.weight"] = w(inter, hidden)
        sd[p + "feed_forward.w3.weight"] = w(inter, hidden)
        sd[p + "feed_forward.w2.weight"] = w(hidden, inter)
        sd[p + "attention_norm.weight"] = norm(hidden)
        sd[p + "ffn_norm.weight"] = norm(hidden)
    sd["model.norm.weight"] = norm(hidden)
    sd["output.weight"] = w(vocab, hidden)
    return sd


def write_tiny_internlm2(
    out_dir: str | Path,
    sp_proto: bytes,
    weights: Literal["safetensors", "sharded", "bin"] = "safetensors",
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random InternLM2 checkpoint in the official layout; returns ``out_dir``."""
    import sentencepiece as spm
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = spm.SentencePieceProcessor(model_proto=sp_proto).get_piece_size()
    cfg = tiny_internlm2_config(vocab, **config_overrides)
    sd = random_internlm2_state_dict(cfg, seed=seed)
    if weights == "safetensors":
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    elif weights == "bin":
        torch.save(sd, out / "pytorch_model.bin")
    elif weights == "sharded":  # two shards, split mid-model like the official 7B/20B repos
        keys = list(sd)
        shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
        for name, ks in shards.items():
            save_file({k: sd[k] for k in ks}, str(out / name), metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                 "weight_map": {k: name for name, ks in shards.items() for k in ks}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    else:
        raise ValueError(f"weights={weights!r}")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "tokenizer.model").write_bytes(sp_proto)
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2))
    return out


@pytest.fixture(scope="session")
def internlm2_sp_proto() -> bytes:
    return train_tiny_sentencepiece()


@pytest.fixture(scope="session")
def make_internlm2_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, internlm2_sp_proto: bytes
) -> Callable[..., Path]:
    """``make(**kw)`` -> directory of ``write_tiny_internlm2(..., **kw)``; cached per ``kw``."""
    cache: dict[str, Path] = {}

    def make(**kw: Any) -> Path:
        key = json.dumps(kw, sort_keys=True)
        if key not in cache:
            cache[key] = write_tiny_internlm2(tmp_path_factory.mktemp("internlm2"), internlm2_sp_proto, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_internlm2_dir(make_internlm2_checkpoint: Callable[..., Path]) -> Path:
    """The default tiny checkpoint: dynamic NTK (factor 2), max_position_embeddings 64, pad = eos = 2."""
    return make_internlm2_checkpoint()
