"""InternLM2 as a frozen LLM, without ``trust_remote_code``.

InternLM2 (Cai et al., 2024, "InternLM2 Technical Report") is a Llama-architecture decoder with
different weight names and one fused, group-interleaved ``wqkv`` projection. We load the official
checkpoint layout (``config.json`` with ``model_type: internlm2``, ``model*.safetensors`` or
``pytorch_model*.bin``, sentencepiece ``tokenizer.model`` + ``tokenizer_config.json``) straight into
transformers' native ``LlamaForCausalLM``, so SDPA, generation, gradient checkpointing and FSDP come
from the library. LAVIS has no InternLM2 support; InternLM-XComposer runs the remote modeling file.

The mapping follows InternLM's own ``tools/convert2llama.py``:

===============================================  ============================================
official (InternLM2ForCausalLM)                  transformers LlamaForCausalLM
===============================================  ============================================
model.tok_embeddings.weight                      model.embed_tokens.weight
model.layers.N.attention.wqkv.{weight,bias}      model.layers.N.self_attn.{q,k,v}_proj.*
model.layers.N.attention.wo.{weight,bias}        model.layers.N.self_attn.o_proj.*
model.layers.N.feed_forward.w1 / w3 / w2         model.layers.N.mlp.gate_proj / up_proj / down_proj
model.layers.N.attention_norm / ffn_norm         model.layers.N.input_layernorm / post_attention_layernorm
model.norm.weight                                model.norm.weight
output.weight                                    lm_head.weight
===============================================  ============================================

``wqkv`` rows are grouped per key-value head: for each group g, its ``num_heads // num_kv_heads``
query heads, then key head g, then value head g (``head_dim`` rows each). Llama wants all query heads,
then all key heads, then all value heads; query head ``h`` attends with kv head ``h // groups`` in both.

Config: ``bias`` -> ``attention_bias`` (InternLM2's bias sits on wqkv and wo only, as Llama's does);
``rope_scaling {"type": "linear"|"dynamic", "factor": f}`` -> ``rope_parameters {"rope_type": ...}``.

Dynamic NTK rope (checked against transformers 5.23 ``_compute_dynamic_ntk_parameters`` and the
official ``InternLM2DynamicNTKScalingRotaryEmbedding``): both use, for a sequence of length L above
``max_position_embeddings`` M, ``base' = rope_theta * (f * L / M - (f - 1)) ** (d / (d - 2))`` and
``inv_freq = 1 / base' ** (arange(0, d, 2) / d)``, unscaled when L <= M. A single forward pass (and
greedy generation that only grows) therefore matches exactly, so we use transformers' rope as is.
Two stateful details of InternLM2's remote code (``rotary_emb(v, seq_len=kv_seq_len)`` with a
grow-only cos/sin cache) differ, both only above M tokens: (1) L is ``max(position_ids) + 1`` in
transformers but the padded key length there, so left-padded batches longer than M get a slightly
different base; (2) its cache never shrinks (a short call after a long one keeps the stretched
frequencies), while transformers resets to the original ones once a call is shorter than M. We keep
transformers' behaviour, which makes every call a function of its own input (tested).

Tokenizer: ``InternLM2Tokenizer`` below wraps sentencepiece directly. Conventions (official
``tokenization_internlm2(_fast).py`` and ``tokenizer_config.json``): bos ``<s>`` = 1 prepended, no eos
appended, eos ``</s>`` = 2, pad = ``</s>`` = 2 = eos. Because pad == eos, padding must be masked with
the attention mask and labels built from the mask, never by comparing ids with ``pad_token_id``
(that would also drop every real eos target). Decoding is ``sentencepiece.decode`` (it removes the
dummy-prefix space of the first piece), as InternLM2's fast tokenizer does; unlike the official slow
tokenizer we never apply ``clean_up_tokenization`` (which rewrites " ." to "."), so decoding
round-trips the text.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
from transformers import BatchEncoding, GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

logger = logging.getLogger(__name__)

# Defaults of the official InternLM2Config.__init__ (configuration_internlm2.py), used for keys a
# config.json leaves out, so a sparse config means what it means to the official code.
INTERNLM2_CONFIG_DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": None,  # None -> num_attention_heads (MHA)
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "bias": True,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "initializer_range": 0.02,
    "use_cache": True,
}
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Bookkeeping and generation keys that real configs carry and that do not change the network.
_IGNORED_KEYS = frozenset(
    {
        "auto_map", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "attn_implementation",
        "pretraining_tp",  # InternLM2.5's remote code slices matmuls with it; mathematically a no-op
        "return_dict", "output_attentions", "output_hidden_states", "torchscript", "use_bfloat16",
        "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
        "is_decoder", "tokenizer_class", "pruned_heads", "tie_encoder_decoder", "add_cross_attention",
        "cross_attention_hidden_size", "finetuning_task", "prefix", "task_specific_params",
        "tf_legacy_loss", "sep_token_id", "decoder_start_token_id",
    }
    | set(GenerationConfig().to_dict())
)
_ROPE_TYPES = ("linear", "dynamic")

CONFIG_NAME = "config.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
_WEIGHT_FILES = (  # in the order we look for them
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def internlm2_config_to_llama(cfg: Mapping[str, Any]) -> LlamaConfig:
    """An official InternLM2 ``config.json`` dict -> the equivalent ``LlamaConfig``.

    Raises ``ValueError`` naming the key for anything the Llama model would compute differently
    (another architecture, unknown keys, rope scaling other than linear/dynamic, non-SiLU MLP).
    """
    cfg = dict(cfg)
    if cfg.get("model_type", "internlm2") != "internlm2":
        raise ValueError(f"config model_type={cfg['model_type']!r}; expected 'internlm2'")
    archs = cfg.get("architectures") or ["InternLM2ForCausalLM"]
    if "InternLM2ForCausalLM" not in archs:
        raise ValueError(
            f"config architectures={archs}; only InternLM2ForCausalLM checkpoints can be loaded "
            f"(reward/classification heads are not supported)"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"InternLM2 config lacks required key(s) {missing}")
    if "quantization_config" in cfg or "quantization" in cfg:
        raise ValueError("config has a quantization setting; quantized InternLM2 checkpoints are not supported")
    known = set(_REQUIRED_KEYS) | set(INTERNLM2_CONFIG_DEFAULTS) | {"model_type", "architectures", "head_dim"}
    unknown = sorted(k for k in cfg if k not in known and k not in _IGNORED_KEYS)
    if unknown:
        raise ValueError(
            f"InternLM2 config has unknown key(s) {unknown}: the official InternLM2ForCausalLM does not read "
            f"them, so the checkpoint may be another architecture. If a key is harmless bookkeeping, add it "
            f"to _IGNORED_KEYS in {__name__}"
        )
    c = {**INTERNLM2_CONFIG_DEFAULTS, **cfg}
    heads, hidden = int(c["num_attention_heads"]), int(c["hidden_size"])
    kv_heads = int(c["num_key_value_heads"] or heads)
    if hidden % heads or heads % kv_heads:
        raise ValueError(
            f"config hidden_size={hidden}, num_attention_heads={heads}, num_key_value_heads={kv_heads}: "
            f"hidden_size must divide by num_attention_heads and num_attention_heads by num_key_value_heads"
        )
    if c.get("head_dim") not in (None, hidden // heads):
        raise ValueError(
            f"config head_dim={c['head_dim']} but InternLM2 always uses hidden_size // num_attention_heads "
            f"= {hidden // heads}; remove head_dim or fix it"
        )
    if c["hidden_act"] != "silu":
        raise ValueError(f"config hidden_act={c['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    return LlamaConfig(
        vocab_size=int(c["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(c["intermediate_size"]),
        num_hidden_layers=int(c["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        hidden_act="silu",
        max_position_embeddings=int(c["max_position_embeddings"]),
        rms_norm_eps=float(c["rms_norm_eps"]),
        rope_parameters=_rope_parameters(c["rope_scaling"], float(c["rope_theta"])),
        attention_bias=bool(c["bias"]),
        mlp_bias=False,
        tie_word_embeddings=bool(c["tie_word_embeddings"]),
        bos_token_id=c["bos_token_id"],
        eos_token_id=c["eos_token_id"],
        pad_token_id=c["pad_token_id"],
        initializer_range=float(c["initializer_range"]),
        use_cache=bool(c["use_cache"]),
        architectures=["LlamaForCausalLM"],
    )


def _rope_parameters(rope_scaling: Any, rope_theta: float) -> dict[str, Any]:
    """InternLM2 ``rope_scaling`` -> transformers 5.x ``rope_parameters``."""
    if rope_scaling is None:
        return {"rope_type": "default", "rope_theta": rope_theta}
    if not isinstance(rope_scaling, Mapping) or set(rope_scaling) != {"type", "factor"}:
        raise ValueError(
            f"config rope_scaling={rope_scaling!r}; InternLM2 expects null or exactly "
            f'{{"type": "linear"|"dynamic", "factor": float >= 1}}'
        )
    kind, factor = rope_scaling["type"], rope_scaling["factor"]
    if kind not in _ROPE_TYPES:
        raise ValueError(f"config rope_scaling.type={kind!r} is not supported; use one of {list(_ROPE_TYPES)} or null")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
        raise ValueError(f"config rope_scaling.factor={factor!r}; it must be a number >= 1")
    return {"rope_type": kind, "factor": float(factor), "rope_theta": rope_theta}


def llama_config_to_internlm2(config: LlamaConfig) -> dict[str, Any]:
    """Inverse of ``internlm2_config_to_llama``: the official ``config.json`` dict."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    rope = dict(config.rope_parameters or {})
    kind = rope.get("rope_type", "default")
    if kind not in ("default", *_ROPE_TYPES) or set(rope) - {"rope_type", "rope_theta", "factor"}:
        raise ValueError(f"rope_parameters={rope} cannot be written as InternLM2 rope_scaling")
    if config.head_dim != hidden // heads or config.mlp_bias or config.hidden_act != "silu":
        raise ValueError(
            f"head_dim={config.head_dim}, mlp_bias={config.mlp_bias}, hidden_act={config.hidden_act!r}: "
            f"InternLM2 needs head_dim == hidden_size // num_attention_heads, no MLP bias and silu"
        )
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "vocab_size": config.vocab_size,
        "hidden_size": hidden,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": config.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": None if kind == "default" else {"type": kind, "factor": rope["factor"]},
        "bias": bool(config.attention_bias),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "initializer_range": config.initializer_range,
        "use_cache": config.use_cache,
    }


# ---------------------------------------------------------------------------------------------
# State dict conversion
# ---------------------------------------------------------------------------------------------

_RENAMES = (  # (official, llama); {i} is the layer index, {p} weight or bias. wqkv is split separately.
    ("model.tok_embeddings.weight", "model.embed_tokens.weight"),
    ("model.layers.{i}.attention.wo.{p}", "model.layers.{i}.self_attn.o_proj.{p}"),
    ("model.layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("model.layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("model.layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("model.layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("model.layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("model.norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)


def _pattern(template: str) -> re.Pattern[str]:
    escaped = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(escaped)


_TO_LLAMA = [(_pattern(official), llama) for official, llama in _RENAMES]
_TO_INTERNLM2 = [(_pattern(llama), official) for official, llama in _RENAMES]
_WQKV = _pattern("model.layers.{i}.attention.wqkv.{p}")
_QKV = re.compile(r"model\.layers\.(?P<i>\d+)\.self_attn\.(?P<qkv>[qkv])_proj\.(?P<p>weight|bias)")
# Non-persistent rotary caches that older exports sometimes saved; recomputed, so dropped.
_SKIP = re.compile(r".*rotary_emb\.(inv_freq|cos_cached|sin_cached)")


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        if m := pattern.fullmatch(key):
            return template.format(**m.groupdict())
    return None


def _heads(cfg: Mapping[str, Any] | LlamaConfig) -> tuple[int, int, int]:
    """(num_attention_heads, num_key_value_heads, head_dim) from an InternLM2 dict or a LlamaConfig."""
    get = cfg.get if isinstance(cfg, Mapping) else lambda k, d=None: getattr(cfg, k, d)
    heads = int(get("num_attention_heads"))
    kv_heads = int(get("num_key_value_heads", None) or heads)
    return heads, kv_heads, int(get("hidden_size")) // heads


def _qkv_rows(heads: int, kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Row indices of wqkv that hold q (in Llama's head order), k and v."""
    groups = heads // kv_heads
    rows = torch.arange(kv_heads * (groups + 2) * head_dim).view(kv_heads, groups + 2, head_dim)
    return {"q": rows[:, :groups].reshape(-1), "k": rows[:, groups].reshape(-1), "v": rows[:, groups + 1].reshape(-1)}


def internlm2_to_llama_state_dict(
    sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any] | LlamaConfig
) -> dict[str, torch.Tensor]:
    """Official InternLM2 tensor names -> ``LlamaForCausalLM`` names; splits the fused ``wqkv``.

    Works key by key, so it can be applied to one shard at a time. ``cfg`` is the InternLM2 config
    dict (or the converted ``LlamaConfig``). Unknown keys raise ``KeyError``.
    """
    qkv_rows = _qkv_rows(*_heads(cfg))
    n_rows = sum(len(r) for r in qkv_rows.values())
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if m := _WQKV.fullmatch(key):
            if t.shape[0] != n_rows:
                raise ValueError(
                    f"{key} has {t.shape[0]} rows but the config implies {n_rows} "
                    f"((num_attention_heads + 2 * num_key_value_heads) * head_dim)"
                )
            for name, rows in qkv_rows.items():
                out[f"model.layers.{m['i']}.self_attn.{name}_proj.{m['p']}"] = t.index_select(0, rows)
        elif (new := _rename(key, _TO_LLAMA)) is not None:
            out[new] = t
        elif not _SKIP.fullmatch(key):
            raise KeyError(f"unexpected tensor {key!r} in InternLM2 checkpoint; is this an InternLM2ForCausalLM?")
    return out


def llama_to_internlm2_state_dict(
    sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any] | LlamaConfig
) -> dict[str, torch.Tensor]:
    """Inverse of ``internlm2_to_llama_state_dict``: Llama names -> official names, fused ``wqkv``."""
    qkv_rows = _qkv_rows(*_heads(cfg))
    n_rows = sum(len(r) for r in qkv_rows.values())
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        if m := _QKV.fullmatch(key):
            parts.setdefault((m["i"], m["p"]), {})[m["qkv"]] = t
        elif (new := _rename(key, _TO_INTERNLM2)) is not None:
            out[new] = t
        elif not _SKIP.fullmatch(key):
            raise KeyError(f"unexpected tensor {key!r}; not part of a LlamaForCausalLM converted from InternLM2")
    for (layer, kind), qkv in parts.items():
        if set(qkv) != set(qkv_rows):
            raise KeyError(f"layer {layer} {kind}: found only {sorted(qkv)} of the q/k/v projections")
        fused = qkv["q"].new_empty((n_rows, *qkv["q"].shape[1:]))
        for name, rows in qkv_rows.items():
            fused[rows] = qkv[name]
        out[f"model.layers.{layer}.attention.wqkv.{kind}"] = fused
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


class InternLM2Tokenizer:
    """InternLM2's sentencepiece tokenizer with the HF-tokenizer surface BLIP-2 code uses.

    Encoding: special-token strings in the text (``<s>``, ``</s>``, ``<unk>`` and the
    ``added_tokens_decoder`` / ``additional_special_tokens`` of ``tokenizer_config.json``) map to
    their ids, and each stretch of text in between is ``sp.encode(stretch)`` (so plain text gives
    exactly sentencepiece's ids), as InternLM2's slow and fast tokenizers do; then bos is prepended.
    Decoding: ``sp.decode`` of each stretch, special tokens written as their text (or dropped with
    ``skip_special_tokens``).

    An ``added_tokens_decoder`` entry may rename a piece of ``tokenizer.model``: internlm2-chat-*
    ships pieces 92538-92543 as "[UNUSED_TOKEN_141]".."[UNUSED_TOKEN_146]" and its config names them
    "<|plugin|>".."<|im_start|>" (92542 = "<|im_end|>"). As with the official tokenizers, the config's
    name is the token's text both ways (encoding "<|im_end|>", decoding 92542).
    """

    def __init__(
        self,
        model_proto: bytes,
        tokenizer_config: Mapping[str, Any] | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ):
        import sentencepiece as spm

        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.tokenizer_config = dict(tokenizer_config or {})
        tc = self.tokenizer_config
        n = self.sp.get_piece_size()
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.unk_token_id = self.sp.unk_id()
        if self.bos_token_id < 0 or self.eos_token_id < 0:
            raise ValueError("tokenizer.model defines no bos or eos piece; InternLM2 uses <s>=1 and </s>=2")
        added = {int(i): entry for i, entry in (tc.get("added_tokens_decoder") or {}).items()}
        for i, entry in added.items():
            if i >= n:
                raise ValueError(
                    f"tokenizer_config added_tokens_decoder[{i}]={_token_content(entry)!r} is past the {n} pieces of "
                    f"tokenizer.model; tokens added on top of the sentencepiece vocabulary are not supported"
                )
        # the config's text of a renamed piece (chat models: 92542 "[UNUSED_TOKEN_145]" -> "<|im_end|>")
        self._renamed = {i: _token_content(e) for i, e in added.items() if _token_content(e) != self.sp.id_to_piece(i)}
        self._renamed_ids = {text: i for i, text in self._renamed.items()}
        for key, i in (("bos_token", self.bos_token_id), ("eos_token", self.eos_token_id)):
            if key in tc and self._piece_id(key, tc[key]) != i:
                raise ValueError(f"tokenizer_config {key}={tc[key]!r} but tokenizer.model's {key} is id {i}")
        self.pad_token_id = self._piece_id("pad_token", tc.get("pad_token", "</s>"))
        self.add_bos_token = bool(tc.get("add_bos_token", True))
        self.add_eos_token = bool(tc.get("add_eos_token", False))
        self.padding_side = padding_side or tc.get("padding_side", "right")
        self.truncation_side = tc.get("truncation_side", "right")
        for key in ("padding_side", "truncation_side"):
            if getattr(self, key) not in ("left", "right"):
                raise ValueError(f"{key}={getattr(self, key)!r}; use 'left' or 'right'")

        special = {self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id}
        special |= {i for i in range(n) if self.sp.is_control(i)}
        special |= {i for i, entry in added.items() if not isinstance(entry, Mapping) or entry.get("special", True)}
        special |= {self._piece_id("additional_special_tokens", t) for t in tc.get("additional_special_tokens") or []}
        self.all_special_ids = sorted(special)
        self._special_ids = frozenset(special)
        # Longest first, so a token wins over a shorter special token that is its prefix.
        strings = sorted({self._token(i) for i in special | set(self._renamed)}, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, strings)) + ")")

    def _piece_id(self, key: str, token: Any) -> int:
        """Id of a tokenizer_config token; it must be a piece of tokenizer.model or a renamed one."""
        token = _token_content(token)
        i = self._token_id(token)
        if self._token(i) != token:
            raise ValueError(f"tokenizer_config {key} has {token!r}, which is not a piece of tokenizer.model")
        return i

    def _token(self, i: int) -> str:
        """Text of token ``i``: its ``added_tokens_decoder`` name, else its sentencepiece piece."""
        return self._renamed.get(i) or self.sp.id_to_piece(i)

    def _token_id(self, token: str) -> int:
        return self._renamed_ids.get(token, self.sp.piece_to_id(token))

    @classmethod
    def from_pretrained(cls, path: str | Path, padding_side: Literal["left", "right"] | None = None) -> "InternLM2Tokenizer":
        return load_internlm2_tokenizer(path, padding_side=padding_side)

    # -- vocabulary ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_token(self) -> str:
        return self._token(self.bos_token_id)

    @property
    def eos_token(self) -> str:
        return self._token(self.eos_token_id)

    @property
    def pad_token(self) -> str:
        return self._token(self.pad_token_id)

    @property
    def unk_token(self) -> str:
        return self._token(self.unk_token_id)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self._token(ids)
        return [self._token(int(i)) for i in _as_list(ids)]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._token_id(tokens)
        return [self._token_id(t) for t in tokens]

    # -- encoding --------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text: [bos] + sentencepiece ids (special-token strings become their ids)."""
        ids: list[int] = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:  # odd parts are the special-token strings matched by the split
                ids.append(self._token_id(part))
            elif part:
                ids.extend(self.sp.encode(part))
        return self._add_special(ids) if add_special_tokens else ids

    def _add_special(self, ids: list[int]) -> list[int]:
        return [self.bos_token_id] * self.add_bos_token + ids + [self.eos_token_id] * self.add_eos_token

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | Literal["longest", "max_length", "do_not_pad"] = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: Literal["pt"] | None = None,
        add_special_tokens: bool = True,
        return_attention_mask: bool = True,
    ) -> BatchEncoding:
        """HF-style batch encoding: ``input_ids`` and ``attention_mask`` (1 = real token, 0 = pad).

        Truncation keeps the bos (it cuts the text tokens on ``truncation_side``); padding goes on
        ``padding_side`` with ``pad_token_id`` (== eos for InternLM2: mask it, never compare ids).
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        budget = None
        if truncation and max_length is not None:
            budget = max_length - (self.add_bos_token + self.add_eos_token) * add_special_tokens
            if budget < 0:
                raise ValueError(f"max_length={max_length} leaves no room for the special tokens")
        seqs = []
        for t in texts:
            ids = self.encode(t, add_special_tokens=False)
            if budget is not None and len(ids) > budget:
                ids = ids[:budget] if self.truncation_side == "right" else ids[len(ids) - budget :]
            seqs.append(self._add_special(ids) if add_special_tokens else ids)

        if padding is True:
            padding = "longest"
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max(max_length, max((len(s) for s in seqs), default=0))
        elif padding == "longest":
            target = max((len(s) for s in seqs), default=0)
        elif padding in (False, "do_not_pad"):
            target = None
        else:
            raise ValueError(f"padding={padding!r}; use True/'longest', 'max_length' or False/'do_not_pad'")
        masks = [[1] * len(s) for s in seqs]
        if target is not None:
            for k, s in enumerate(seqs):
                pad = target - len(s)
                if self.padding_side == "right":
                    seqs[k], masks[k] = s + [self.pad_token_id] * pad, masks[k] + [0] * pad
                else:
                    seqs[k], masks[k] = [self.pad_token_id] * pad + s, [0] * pad + masks[k]
        if return_tensors is not None and len({len(s) for s in seqs}) > 1:
            raise ValueError("sequences have different lengths; pass padding=True to return tensors")
        data: dict[str, Any] = {"input_ids": seqs[0] if single and return_tensors is None else seqs}
        if return_attention_mask:
            data["attention_mask"] = masks[0] if single and return_tensors is None else masks
        return BatchEncoding(data, tensor_type=return_tensors)

    # -- decoding --------------------------------------------------------------------------------
    def decode(self, ids: int | Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ids: ``sp.decode`` on each run between special tokens (those are written as their text)."""
        ids = [int(ids)] if isinstance(ids, int) else _as_list(ids)
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._special_ids or i in self._renamed:  # written as their text, never sp.decode'd
                if not (skip_special_tokens and i in self._special_ids):
                    out.append(self.sp.decode(run))
                    out.append(self._token(i))
                    run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def batch_decode(self, sequences: Iterable[Iterable[int]] | torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # -- saving ----------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write ``tokenizer.model`` (the original bytes) and ``tokenizer_config.json``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / TOKENIZER_MODEL).write_bytes(self._proto)
        tc = dict(self.tokenizer_config) or {
            "tokenizer_class": "InternLM2Tokenizer",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
        }
        (out / TOKENIZER_CONFIG).write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")


def _token_content(token: Any) -> str:
    """A tokenizer_config token: a string or an AddedToken dict with ``content``."""
    return token["content"] if isinstance(token, Mapping) else str(token)


def _as_list(ids: Iterable[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).tolist()
    return [int(i) for i in ids]


def load_internlm2_tokenizer(
    path: str | Path, padding_side: Literal["left", "right"] | None = None
) -> InternLM2Tokenizer:
    """The tokenizer of an InternLM2 checkpoint directory (``tokenizer.model`` + ``tokenizer_config.json``)."""
    path = Path(path)
    model_file = path / TOKENIZER_MODEL
    if not model_file.is_file():
        raise FileNotFoundError(
            f"no {TOKENIZER_MODEL} at {model_file}; copy the sentencepiece model of the InternLM2 checkpoint "
            f"(e.g. internlm/internlm2-7b/{TOKENIZER_MODEL}) into {path}"
        )
    config_file = path / TOKENIZER_CONFIG
    tc = json.loads(config_file.read_text()) if config_file.is_file() else None
    if tc is None:
        logger.warning("no %s in %s; using InternLM2's defaults (bos <s>, pad </s>, no eos)", TOKENIZER_CONFIG, path)
    return InternLM2Tokenizer(model_file.read_bytes(), tc, padding_side=padding_side)


# ---------------------------------------------------------------------------------------------
# Load / save
# ---------------------------------------------------------------------------------------------


def read_internlm2_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"no {CONFIG_NAME} at {path / CONFIG_NAME}; pass the directory of an official InternLM2 checkpoint "
            f"(config.json, model*.safetensors or pytorch_model*.bin, tokenizer.model)"
        )
    return json.loads((path / CONFIG_NAME).read_text())


def _weight_files(path: Path) -> list[Path]:
    for name in _WEIGHT_FILES:
        f = path / name
        if f.is_file():
            if name.endswith(".index.json"):
                shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
                missing = [s for s in shards if not (path / s).is_file()]
                if missing:
                    raise FileNotFoundError(f"{f} lists shard(s) {missing} that are not in {path}; download them too")
                return [path / s for s in shards]
            return [f]
    raise FileNotFoundError(
        f"no weights in {path}: expected one of {list(_WEIGHT_FILES)}; found {sorted(p.name for p in path.iterdir())}"
    )


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)


def load_internlm2(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa",
) -> LlamaForCausalLM:
    """An official InternLM2 checkpoint directory as a transformers ``LlamaForCausalLM`` (eval mode).

    Weights are converted shard by shard into a model built on the meta device, so peak memory is
    about one copy of the weights. Missing or unexpected tensors raise ``KeyError``.
    """
    path = Path(path)
    icfg = read_internlm2_config(path)
    config = internlm2_config_to_llama(icfg)
    config._attn_implementation = attn_implementation
    config.dtype = dtype
    sd: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        shard = internlm2_to_llama_state_dict(_load_tensors(file), config)
        sd.update({k: v.to(dtype) for k, v in shard.items()})
        del shard
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise KeyError(f"InternLM2 checkpoint {path} does not match its config: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    # The rotary buffers are not in the state dict; build them for real (float32, like from_pretrained).
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()]), "tensor left on meta device"
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    logger.info("loaded InternLM2 %s as LlamaForCausalLM (%s, %s)", path, dtype, attn_implementation)
    return model.eval()


def save_internlm2(
    model: LlamaForCausalLM, tokenizer_dir_or_tokenizer: str | Path | InternLM2Tokenizer, out_dir: str | Path
) -> Path:
    """Write ``model`` in the official InternLM2 layout: config.json, model.safetensors, tokenizer files.

    The directory loads with ``load_internlm2`` (and with InternLM2's remote code once its
    ``*.py`` files and ``auto_map`` are added). Tensors keep the model's dtype.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_dir_or_tokenizer
    if not isinstance(tok, InternLM2Tokenizer):
        tok = load_internlm2_tokenizer(tok)
    if len(tok) != model.config.vocab_size:
        logger.warning("tokenizer has %d pieces but the model vocab_size is %d", len(tok), model.config.vocab_size)
    icfg = llama_config_to_internlm2(model.config)
    icfg["torch_dtype"] = str(model.get_input_embeddings().weight.dtype).replace("torch.", "")
    sd = llama_to_internlm2_state_dict(model.state_dict(), model.config)
    if model.config.tie_word_embeddings:
        sd.pop("output.weight", None)  # shared with tok_embeddings; safetensors stores it once
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(icfg, indent=2) + "\n")
    tok.save_pretrained(out)
    if isinstance(tokenizer_dir_or_tokenizer, (str, Path)):
        src = Path(tokenizer_dir_or_tokenizer) / "special_tokens_map.json"
        if src.is_file():
            shutil.copyfile(src, out / src.name)
    logger.info("saved InternLM2 checkpoint to %s", out)
    return out
