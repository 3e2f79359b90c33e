"""Hugging Face BLIP-2 directories as lavis_lite checkpoints.

A directory written by transformers' ``save_pretrained`` for ``Blip2ForConditionalGeneration``,
``Blip2Model`` or ``Blip2ForImageTextRetrieval`` (``config.json`` with ``model_type: blip-2`` and
``model.safetensors``, shards with an index, or ``pytorch_model.bin``) is accepted wherever a
checkpoint is: ``model.pretrained`` / ``model.finetuned`` and ``load_model(..., checkpoint=...)``.

- Sizes: ``model_config`` maps ``config.json`` onto our config keys before the model is built: the
  image encoder becomes ``vit_model: eva`` with ``vit_arch`` from ``vision_config``, the Q-Former takes
  ``qformer_config`` and ``num_query_tokens``. For a stage-2 arch whose ``model.llm_path`` is not a local
  directory, ``llm_path`` becomes the BLIP-2 directory itself: the frozen LLM is its ``text_config`` with
  its ``language_model.*`` weights and the tokenizer saved beside them (``load_llm``).
- Weights: ``read_hf_blip2`` reads the tensors except the language model's (the LLM always comes from
  ``llm_path``), ``convert_hf_blip2`` renames them to LAVIS's names (``HF_RENAMES``).
- The inverse, for ``lavis_lite/export.py``: ``to_hf_blip2`` renames our state dict back (the same table,
  read right to left) and ``hf_blip2_config`` writes the sizes as a ``Blip2Config``. What a directory we
  exported adds for its own import sits under the config's ``lavis_lite`` key (``EXPORT_KEY``): the LLM
  backbone (an InternLM2 is saved as its Llama conversion, ``model_type: llama``) and how many embedding
  rows the export appended for the ``<image>`` placeholder, which ``load_language_model`` drops again, and
  whether its tokenizer's post-processor writes the whole layout (``layout: template``), which ``load_llm``
  switches off (our models add their own bos and template).

Where HF's BLIP-2 differs from LAVIS's (transformers 5.23):
- the vision tower's ``post_layernorm`` is LAVIS's ``ln_vision``, but with the vision ``layer_norm_eps``
  (1e-6 in Salesforce/blip2-*) where LAVIS's ``nn.LayerNorm`` has 1e-5: imports set ``ln_vision_eps``;
- the fused ``qkv.bias`` is one parameter whose k third LAVIS's EVA does not have (``q_bias``,
  ``v_bias``); converted checkpoints hold zeros there, a nonzero k part (HF fine-tuning) is refused;
- ``qformer.layernorm`` is LAVIS's ``Qformer.bert.embeddings.LayerNorm`` (HF's text embeddings of
  ``Blip2ForImageTextRetrieval`` have none of their own);
- ``Blip2ForImageTextRetrieval`` has no ITC temperature and no LM head, ``Blip2Model`` and
  ``Blip2ForConditionalGeneration`` no text branch at all: a stage-1 arch keeps its initialisation for
  what a directory lacks, and says so (``Blip2Qformer.allow_missing``).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import transformers

from lavis_lite.models.base import building_weightless, load_state_dict_file

logger = logging.getLogger(__name__)

MODEL_TYPE = "blip-2"
LANGUAGE_MODEL = "language_model."  # never read as part of a checkpoint: the LLM comes from llm_path
# (HF key pattern, LAVIS key), first match wins; fused qkv biases are split by ``split_qkv_bias``
HF_RENAMES: tuple[tuple[str, str], ...] = (
    (r"vision_model\.embeddings\.class_embedding", "visual_encoder.cls_token"),
    (r"vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"vision_model\.embeddings\.position_embedding", "visual_encoder.pos_embed"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"visual_encoder.blocks.\1.norm\2."),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight", r"visual_encoder.blocks.\1.attn.qkv.weight"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
    (r"vision_model\.post_layernorm\.", "ln_vision."),
    (r"qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
    (r"qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.", r"Qformer.bert.encoder.layer.\1.\2.self."),
    (r"qformer\.encoder\.", "Qformer.bert.encoder."),
    (r"embeddings\.(word_embeddings|position_embeddings)\.", r"Qformer.bert.embeddings.\1."),
    (r"vision_projection\.", "vision_proj."),
    (r"text_projection\.", "text_proj."),
    (r"language_projection\.", "llm_proj."),
)
_QKV_BIAS = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias")
_DROPPED = (LANGUAGE_MODEL, "embeddings.position_ids", "qformer.embeddings.position_ids")
_HF_PREFIXES = ("vision_model.", "qformer.", "language_projection.", "vision_projection.")
EXPORT_KEY = "lavis_lite"  # config.json: {"llm": backbone, "placeholder_rows": n, "layout": ..., "files": [...]}


# ------------------------------------------------------------------------------------------ reading
def is_hf_blip2_dir(path: str | Path | None) -> bool:
    """Whether ``path`` is a directory whose ``config.json`` says ``model_type: blip-2``."""
    if not path or not (Path(path) / "config.json").is_file():
        return False
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def read_config(path: str | Path) -> transformers.Blip2Config:
    """The directory's ``config.json`` as transformers' ``Blip2Config`` (HF's defaults fill absent keys)."""
    if not is_hf_blip2_dir(path):
        raise ValueError(f"{path}: not a Hugging Face BLIP-2 directory (config.json with model_type "
                         f"'{MODEL_TYPE}'); give a checkpoint file or such a directory")
    return transformers.Blip2Config.from_pretrained(str(path), local_files_only=True)


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a ``save_pretrained`` directory: safetensors (sharded or not), else torch ``.bin``."""
    path = Path(path)
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            absent = [s for s in shards if not (path / s).is_file()]
            if absent:
                raise FileNotFoundError(f"{path / index} names {len(absent)} missing shard files {absent[:3]}; "
                                        "copy the whole directory")
            return [path / s for s in shards]
        if (path / single).is_file():
            return [path / single]
    raise FileNotFoundError(f"{path}: no model.safetensors, sharded safetensors (with their index) or "
                            "pytorch_model.bin; is the save_pretrained output complete?")


def read_hf_blip2(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face BLIP-2 directory except ``language_model.*`` (read by ``load_llm``)."""
    read_config(path)
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys() if not k.startswith(LANGUAGE_MODEL)})
        else:
            tensors = load_state_dict_file(file, what)
            state.update({k: v for k, v in tensors.items() if not k.startswith(LANGUAGE_MODEL)})
    return state


# ------------------------------------------------------------------------------------------- config
# (our key, transformers' key): VitArch <-> Blip2VisionConfig, QFormerConfig <-> Blip2QFormerConfig
VIT_ARCH_KEYS = (("width", "hidden_size"), ("depth", "num_hidden_layers"), ("num_heads", "num_attention_heads"),
                 ("mlp_width", "intermediate_size"), ("patch_size", "patch_size"),
                 ("layer_norm_eps", "layer_norm_eps"), ("qkv_bias", "qkv_bias"))
QFORMER_KEYS = (("hidden_size", "hidden_size"), ("num_hidden_layers", "num_hidden_layers"),
                ("num_attention_heads", "num_attention_heads"), ("intermediate_size", "intermediate_size"),
                ("max_position_embeddings", "max_position_embeddings"), ("layer_norm_eps", "layer_norm_eps"),
                ("hidden_dropout_prob", "hidden_dropout_prob"),
                ("attention_probs_dropout_prob", "attention_probs_dropout_prob"),
                ("cross_attention_freq", "cross_attention_frequency"))


def exported(hf: transformers.Blip2Config) -> dict[str, Any]:
    """What a directory written by ``lavis_lite.export`` records for its import (``EXPORT_KEY``); {} otherwise."""
    return dict(getattr(hf, EXPORT_KEY, None) or {})


def hf_blip2_config(cfg: Any, vit_arch: Any, text_config: transformers.PretrainedConfig, image_token_index: int,
                    export_info: dict[str, Any]) -> transformers.Blip2Config:
    """The inverse of ``model_config``: a stage-2 model's config ``cfg`` (image encoder sizes ``vit_arch``, a
    ``VitArch``) and its LLM's ``text_config`` as a ``Blip2Config``; ``export_info`` goes under ``EXPORT_KEY``."""
    vision = {theirs: getattr(vit_arch, ours) for ours, theirs in VIT_ARCH_KEYS}
    qformer = {theirs: getattr(cfg.qformer, ours) for ours, theirs in QFORMER_KEYS}
    qformer.update(encoder_hidden_size=cfg.qformer.encoder_width or vit_arch.width, hidden_act="gelu",
                   initializer_range=cfg.qformer.initializer_range, pad_token_id=cfg.qformer.pad_token_id)
    return transformers.Blip2Config(
        vision_config={**vision, "image_size": cfg.img_size, "hidden_act": "gelu"}, qformer_config=qformer,
        text_config=text_config.to_dict(), num_query_tokens=cfg.qformer.num_query_token,
        image_token_index=image_token_index, **{EXPORT_KEY: export_info})
def _square(path: str | Path, value: Any, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{path}/config.json: vision_config.{key}={list(value)} is not square; only square "
                             "images and patches are supported")
        value = value[0]
    return int(value)


def _require_gelu(path: str | Path, section: str, sub: Any) -> None:
    if sub.hidden_act != "gelu":
        raise ValueError(f"{path}/config.json: {section}.hidden_act={sub.hidden_act!r}; lavis_lite's "
                         f"{'image encoder' if section == 'vision_config' else 'Q-Former'} uses exact GELU ('gelu') only")


def _local_dir(path: str | None) -> bool:
    from lavis_lite.config import CONFIG_ROOT

    return bool(path) and (Path(path).is_dir() or (not Path(path).is_absolute() and (CONFIG_ROOT.parent / path).is_dir()))


def model_config(path: str | Path, cfg: Any) -> dict[str, Any]:
    """Our config keys that the directory's ``config.json`` dictates, for a model whose current config is
    ``cfg`` (its class tells which keys exist): sizes of the image encoder and Q-Former; ``embed_dim``
    and, if ``tokenizer_path`` is no local directory, the directory's BERT tokenizer (stage 1);
    ``llm``/``llm_path`` when ``llm_path`` is no local directory (stage 2: the directory's own LLM)."""
    hf = read_config(path)
    vision, qformer = hf.vision_config, hf.qformer_config
    _require_gelu(path, "vision_config", vision)
    _require_gelu(path, "qformer_config", qformer)
    out: dict[str, Any] = {
        "vit_model": "eva",
        "vit_depth": None,
        "vit_arch": {ours: getattr(vision, theirs) for ours, theirs in VIT_ARCH_KEYS},
        "img_size": _square(path, vision.image_size, "image_size"),
        "ln_vision_eps": vision.layer_norm_eps,
        "qformer": {**{ours: getattr(qformer, theirs) for ours, theirs in QFORMER_KEYS},
                    "num_query_token": hf.num_query_tokens, "encoder_width": None},
    }
    out["vit_arch"]["patch_size"] = _square(path, vision.patch_size, "patch_size")
    if hasattr(cfg, "embed_dim"):  # stage 1
        out["embed_dim"] = hf.image_text_hidden_size
        if qformer.use_qformer_text_input:
            out["qformer"]["vocab_size"] = qformer.vocab_size
        if not _local_dir(cfg.tokenizer_path) and (Path(path) / "vocab.txt").is_file():
            out["tokenizer_path"] = str(path)
    if hasattr(cfg, "llm_path") and not _local_dir(cfg.llm_path) and _has_language_model(path):
        from lavis_lite.registry import LLMS

        text_type = exported(hf).get("llm", hf.text_config.model_type)
        if text_type not in LLMS.names():
            raise ValueError(f"{path}: its language model is {text_type!r}, which no LLM backbone handles "
                             f"(registered: {LLMS.names()}); set model.llm_path to a supported LLM's directory")
        logger.info("%s: the frozen LLM is its own %s language model (model.llm_path=%s is no local directory)",
                    path, text_type, cfg.llm_path)
        out.update(llm=text_type, llm_path=str(path))
    return out


def _has_language_model(path: str | Path) -> bool:
    """Whether the directory's weights include ``language_model.*`` (not: Blip2ForImageTextRetrieval)."""
    index = next((Path(path) / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (Path(path) / n).is_file()), None)
    if index is not None:
        return any(k.startswith(LANGUAGE_MODEL) for k in json.loads(index.read_text())["weight_map"])
    files = weight_files(path)
    if files[0].suffix != ".safetensors":
        return True  # a .bin cannot be listed without reading it: the LLM load reports what is missing
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        return any(k.startswith(LANGUAGE_MODEL) for k in f.keys())


# ------------------------------------------------------------------------------------------ weights
def is_hf_blip2_state(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(_HF_PREFIXES) for k in state)


def split_qkv_bias(key: str, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's fused ``qkv.bias`` [3 * width] -> (q_bias, v_bias); its k third must be zero (EVA has no k bias)."""
    q, k, v = bias.chunk(3)
    if k.device.type != "meta" and k.any():
        raise ValueError(f"{key}: the k part of the fused qkv bias is nonzero (max |k| = {k.abs().max():.3g}); the "
                         "EVA image encoder (LAVIS's q_bias/v_bias) has no k bias, so these weights (fine-tuned with "
                         "one) cannot be loaded exactly")
    return q, v


def convert_hf_blip2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face BLIP-2 keys -> LAVIS's (``HF_RENAMES``); ``language_model.*`` is dropped (the LLM comes
    from ``model.llm_path``); keys matching no rule are kept, so loading reports them."""
    out, dropped = {}, []
    for key, value in state.items():
        if key.startswith(_DROPPED):
            dropped.append(key)
            continue
        if match := _QKV_BIAS.fullmatch(key):
            prefix = f"visual_encoder.blocks.{match[1]}.attn."
            out[prefix + "q_bias"], out[prefix + "v_bias"] = split_qkv_bias(key, value)
            continue
        out[_rename(key, HF_RENAMES)] = value
    if any(k.startswith(LANGUAGE_MODEL) for k in dropped):
        logger.info("Hugging Face BLIP-2 weights: language_model.* not loaded here (the LLM comes from model.llm_path)")
    return out


def _rename(key: str, table: tuple[tuple[str, str], ...]) -> str:
    """``key`` renamed by the first rule of ``table`` whose pattern matches its start; as it is if none does."""
    for pattern, replacement in table:
        renamed, n = re.subn(f"^{pattern}", replacement, key)
        if n:
            return renamed
    return key


def _inverse(pattern: str, replacement: str) -> tuple[str, str]:
    """A ``HF_RENAMES`` rule read right to left: ``replacement``'s backreferences become ``pattern``'s groups
    and ``pattern``'s groups backreferences (the table's patterns are literals, ``\\.`` and plain groups)."""
    groups = re.findall(r"\(([^()]*)\)", pattern)
    refs = [int(k) for k in re.findall(r"\\(\d)", replacement)]  # pattern group of each backreference, in order
    assert sorted(refs) == list(range(1, len(groups) + 1)), f"{pattern} -> {replacement} is not invertible"
    inverse_pattern = "".join(f"({groups[int(part[1:]) - 1]})" if re.fullmatch(r"\\\d", part) else re.escape(part)
                              for part in re.split(r"(\\\d)", replacement) if part)
    parts = [part for part in re.split(r"(\([^()]*\))", pattern) if part]
    group_numbers = iter(range(1, len(groups) + 1))  # pattern group g is group refs.index(g) + 1 of the inverse
    inverse_replacement = "".join(f"\\{refs.index(next(group_numbers)) + 1}" if part.startswith("(")
                                  else part.replace("\\", "") for part in parts)
    return inverse_pattern, inverse_replacement


LAVIS_RENAMES = tuple(_inverse(pattern, replacement) for pattern, replacement in HF_RENAMES)
_Q_V_BIAS = re.compile(r"visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias")


def to_hf_blip2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``convert_hf_blip2`` for a stage-2 state dict: LAVIS keys -> Hugging Face's (``LAVIS_RENAMES``),
    ``q_bias``/``v_bias`` fused into ``qkv.bias`` with a zero k part, ``llm_model.*`` -> ``language_model.*``;
    keys matching no rule are kept, so loading reports them."""
    out, biases = {}, {}
    for key, value in state.items():
        if match := _Q_V_BIAS.fullmatch(key):
            biases.setdefault(match[1], {})[match[2]] = value
            continue
        if key.startswith("llm_model."):
            out[LANGUAGE_MODEL + key.removeprefix("llm_model.")] = value
            continue
        out[_rename(key, LAVIS_RENAMES)] = value
    for block, qv in biases.items():
        out[f"vision_model.encoder.layers.{block}.self_attn.qkv.bias"] = torch.cat(
            [qv["q"], torch.zeros_like(qv["q"]), qv["v"]])
    return out


# -------------------------------------------------------------------------------------- language model
def load_language_model(path: str | Path, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """The directory's language model: transformers' causal LM built from ``text_config`` with the
    ``language_model.*`` weights, in ``dtype``, in eval mode (without the embedding rows ``lavis_lite.export``
    appended for the image placeholder)."""
    hf = read_config(path)
    if not hf.use_decoder_only_language_model:
        raise ValueError(f"{path}: its language model ({hf.text_config.model_type}) is an encoder-decoder, which "
                         "lavis_lite's stage-2 models do not support; set model.llm_path to a causal LM's directory")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the vision and Q-Former tensors are "unexpected" to the LM
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), config=hf.text_config, key_mapping={rf"^{re.escape(LANGUAGE_MODEL)}": ""}, dtype=dtype,
            local_files_only=True, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = sorted(info["missing_keys"])
    if missing or info["mismatched_keys"]:
        raise KeyError(f"{path}: the language model lacks {len(missing)} weights {missing[:5]} (mismatched: "
                       f"{list(info['mismatched_keys'])[:5]}); is it a Blip2ForConditionalGeneration or Blip2Model "
                       "directory? Otherwise set model.llm_path to the LLM's own directory")
    rows = exported(hf).get("placeholder_rows", 0)
    if rows:  # appended by lavis_lite.export for the "<image>" placeholder: not part of the LLM
        model.resize_token_embeddings(hf.text_config.vocab_size - rows)
    logger.info("loaded %s from %s (text_config, language_model.*; %s)", type(model).__name__, path, dtype)
    return model.eval()


def load_llm(backbone: Any, path: str, dtype: torch.dtype) -> tuple[Any, transformers.PreTrainedModel]:
    """(tokenizer, frozen causal LM) of ``model.llm_path``: an LLM directory (loaded by ``backbone``), a
    Hugging Face BLIP-2 directory (its language model, and the tokenizer saved beside it), or, when
    building on the meta device, a weightless LLM of the right sizes and no tokenizer (``convert.py``)."""
    if building_weightless():
        from lavis_lite.models.convert import weightless_llm

        return None, weightless_llm(path, dtype)
    if is_hf_blip2_dir(path):
        if not any((Path(path) / n).is_file() for n in ("tokenizer_config.json", "tokenizer.json", "vocab.json")):
            raise FileNotFoundError(f"model.llm_path={path}: this BLIP-2 directory has no tokenizer files "
                                    "(tokenizer_config.json, tokenizer.json); save the Blip2Processor (or its "
                                    "tokenizer) into it, or set model.llm_path to the LLM's own directory")
        tokenizer = backbone.load_tokenizer(path)
        if exported(read_config(path)).get("layout") == "template" and hasattr(tokenizer, "backend_tokenizer"):
            tokenizer.backend_tokenizer.post_processor = None  # it writes the whole BLIP-2 layout; we add our own
        return tokenizer, load_language_model(path, dtype)
    return backbone.load_tokenizer(path), backbone.load_model(path, dtype)
