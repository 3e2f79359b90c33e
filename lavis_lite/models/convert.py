"""Checkpoint conversion: original LAVIS BLIP-2 state dicts -> lavis_lite keys, and key/shape tables
(Hugging Face BLIP-2 directories: ``hf_blip2.py``).

Our Q-Former keeps LAVIS's parameter names and our image encoders are timm's, so converting a LAVIS
checkpoint (``blip2_pretrained.pth``, ``blip2_pretrained_vitL.pth``, ``blip2_finetune_coco.pth``) is:

- drop ``Qformer.bert.embeddings.position_ids`` (a persistent buffer of LAVIS's BertEmbeddings holding
  ``arange(512)``; we compute positions instead);
- send ``visual_encoder.*`` through the image encoder's filter (``vision.vision_checkpoint_filter``:
  identity plus position-embedding resampling for EVA, OpenAI -> timm names for CLIP-L).

Stage-1 checkpoints hold no ``visual_encoder.*`` keys (LAVIS saves only parameters that require grad, and
the ViT is frozen); models allowlist that prefix. Tables of key names and shapes (``key_shapes``) let tests
check the mapping without the weights: tests/data_files/lavis_keys/ holds tables derived from LAVIS's
architecture code, and ``python -m lavis_lite.models.convert CKPT`` prints the table of a real file (or
Hugging Face BLIP-2 directory).

``python -m lavis_lite.models.convert --arch blip2_opt --model-type pretrain_opt2.7b --keys`` prints the
table of a model itself, built on the meta device (``meta_model``): no weight file, tokenizer or LLM
directory is read. The frozen LLM is sized from ``llm_path``'s config.json when that directory exists,
else from ``KNOWN_LLM_CONFIGS`` (the config.json sizes of the LLMs our model types name).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import torch
import transformers

from lavis_lite.models.base import BaseModel, load_state_dict_file

LAVIS_ONLY_KEYS = ("Qformer.bert.embeddings.position_ids",)
VISUAL_PREFIX = "visual_encoder."


def convert_lavis_blip2(
    state: dict[str, torch.Tensor],
    visual_filter: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """LAVIS BLIP-2 (Q-Former family) state dict -> ours; ``visual_filter`` maps un-prefixed ViT keys."""
    out = {k: v for k, v in state.items() if not k.startswith(VISUAL_PREFIX) and k not in LAVIS_ONLY_KEYS}
    visual = {k[len(VISUAL_PREFIX):]: v for k, v in state.items() if k.startswith(VISUAL_PREFIX)}
    if visual:
        out.update({VISUAL_PREFIX + k: v for k, v in visual_filter(visual).items()})
    return out


def key_shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """{key: shape} of a state dict (what the stored tables hold)."""
    return {key: list(value.shape) for key, value in state.items()}


def meta_state_dict(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Weightless tensors (``meta`` device) with the given shapes, to test loading without weights."""
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def load_key_table(path: str | Path) -> dict[str, list[int]]:
    """A stored table: JSON with ``"keys": {name: shape}`` (other fields document its origin)."""
    return {k: list(v) for k, v in json.loads(Path(path).read_text())["keys"].items()}


# ------------------------------------------------------------------------------ weightless models
# config.json sizes of the LLMs the shipped model types name (llm_path), for ``--keys`` without them on disk
_OPT = {"model_type": "opt", "vocab_size": 50272, "max_position_embeddings": 2048, "do_layer_norm_before": True,
        "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2}
_QWEN2_1_5B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
               "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
               "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}
_INTERNLM2 = {"model_type": "internlm2", "vocab_size": 92544, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
              "rope_theta": 1000000, "max_position_embeddings": 32768, "tie_word_embeddings": False}
_INTERNLM2_1_8B = {**_INTERNLM2, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                   "num_attention_heads": 16}
KNOWN_LLM_CONFIGS: dict[str, dict[str, Any]] = {
    "facebook/opt-2.7b": {**_OPT, "hidden_size": 2560, "word_embed_proj_dim": 2560, "ffn_dim": 10240,
                          "num_hidden_layers": 32, "num_attention_heads": 32},
    "facebook/opt-6.7b": {**_OPT, "hidden_size": 4096, "word_embed_proj_dim": 4096, "ffn_dim": 16384,
                          "num_hidden_layers": 32, "num_attention_heads": 32},
    "Qwen/Qwen2-1.5B": {**_QWEN2_1_5B, "max_position_embeddings": 131072},
    "Qwen/Qwen2-1.5B-Instruct": {**_QWEN2_1_5B, "max_position_embeddings": 32768},
    "internlm/internlm2-1_8b": _INTERNLM2_1_8B,
    "internlm/internlm2-chat-1_8b": _INTERNLM2_1_8B,
    "internlm/internlm2-7b": {**_INTERNLM2, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                              "num_attention_heads": 32},
}


def llm_config(llm_path: str) -> transformers.PretrainedConfig:
    """The transformers config of ``llm_path``'s LLM: the text_config of a Hugging Face BLIP-2 directory,
    an LLM directory's config.json, else the ``KNOWN_LLM_CONFIGS`` entry of its hub name."""
    from lavis_lite.models import hf_blip2
    from lavis_lite.models.llm.internlm2 import internlm2_config_to_llama

    if hf_blip2.is_hf_blip2_dir(llm_path):
        return hf_blip2.read_config(llm_path).text_config
    file = Path(llm_path) / "config.json"
    name = "/".join(Path(llm_path).parts[-2:])
    if file.is_file():
        values = json.loads(file.read_text())
    elif name in KNOWN_LLM_CONFIGS:
        values = KNOWN_LLM_CONFIGS[name]
    else:
        raise FileNotFoundError(f"model.llm_path={llm_path}: no config.json there and no known sizes for {name!r} "
                                f"(known: {sorted(KNOWN_LLM_CONFIGS)}); to list keys without weights, point "
                                "model.llm_path at a directory holding the LLM's config.json (weights not needed)")
    if values.get("model_type") == "internlm2":  # loaded as Llama (llm/internlm2.py)
        return internlm2_config_to_llama(values)
    return transformers.AutoConfig.for_model(**values)


def weightless_llm(llm_path: str, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """The causal LM of ``llm_path`` (sizes from ``llm_config``) on the meta device: shapes, no weights."""
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(llm_config(llm_path), dtype=dtype).eval()


def meta_model(arch: str, model_type: str, **overrides: Any) -> BaseModel:
    """``arch``/``model_type`` (with config ``overrides``) built on the meta device, nothing loaded: its
    ``state_dict()`` gives every key and shape. Needs no weights, tokenizer or LLM directory."""
    from lavis_lite.models import _model_node
    from lavis_lite.config import merge_onto
    from lavis_lite.registry import MODELS

    cls = MODELS.get(arch)
    cfg = merge_onto(cls.config_class, _model_node(arch, model_type, ("meta_model overrides", overrides)), "model")
    with torch.device("meta"):
        return cls(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Print a key/shape table as JSON: of a checkpoint, or (--keys) of a model built on the meta "
                    "device. The latter reads no weights: the LLM's sizes come from llm_path's config.json if that "
                    f"directory exists, else from a table of known LLMs ({', '.join(KNOWN_LLM_CONFIGS)}), and "
                    "missing tokenizers are skipped.")
    parser.add_argument("checkpoint", nargs="?",
                        help=".pth (LAVIS: weights under 'model'), .safetensors or a Hugging Face BLIP-2 directory")
    parser.add_argument("--arch", help="with --keys: a registered arch, e.g. blip2_opt")
    parser.add_argument("--model-type", help="with --keys: its model type, e.g. pretrain_opt2.7b")
    parser.add_argument("--keys", action="store_true", help="the table of --arch/--model-type, built on meta")
    parser.add_argument("--options", nargs="*", default=[], help="with --keys: model config overrides key=value")
    args = parser.parse_args()
    if args.keys:
        if not (args.arch and args.model_type) or args.checkpoint:
            parser.error("--keys takes --arch and --model-type, and no checkpoint")
        from omegaconf import OmegaConf

        overrides = OmegaConf.to_container(OmegaConf.from_dotlist(args.options))
        table = key_shapes(meta_model(args.arch, args.model_type, **overrides).state_dict())
        source = f"{args.arch}/{args.model_type} built on the meta device"
    elif args.checkpoint:
        table = key_shapes(load_state_dict_file(args.checkpoint))
        source = args.checkpoint
    else:
        parser.error("give a checkpoint, or --keys with --arch and --model-type")
    print(json.dumps({"source": source, "keys": table}, indent=1))


if __name__ == "__main__":
    main()
