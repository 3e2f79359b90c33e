"""Export a trained stage-2 BLIP-2 (``Blip2LLM``, any registered LLM backbone) as a transformers directory:

    python -m lavis_lite.export [--cfg-path <project or model type yaml>] --checkpoint <weights> --out DIR
        [--options model.key=value ...] [--overwrite] [--allow-eps-change] [--num-beams 5 ...]

which loads with no remote code::

    model = Blip2ForConditionalGeneration.from_pretrained(DIR)
    processor = Blip2Processor.from_pretrained(DIR, backend="pil")  # our pixels exactly: "pil" blip_image_eval's
    # backend: pil, "torchvision" (transformers' default) its backend: tensor (our default)
    inputs = processor(images=image, text=prompt, return_tensors="pt")  # text="" for a plain caption
    ids = model.generate(**inputs, generation_config=model.generation_config)  # else the LM's own defaults
    answer = processor.batch_decode(ids[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)

Written: config.json (``Blip2Config``; ``hf_blip2.hf_blip2_config``), model.safetensors (``hf_blip2.to_hf_blip2``;
a LoRA is merged into the LLM), generation_config.json (``Blip2LLM.generation_config``: eos = [stop id, eos],
pad, ids past the tokenizer suppressed; HF's BLIP-2 ``generate`` hands its language model that model's own
defaults unless given ``generation_config=``, so ``text_config`` carries the eos, pad and bos ids too, as HF's
OPT conversions' eos "\n"), the tokenizer with the ``<image>`` placeholder, processor_config.json
(a ``BlipImageProcessor`` that is our ``blip_image_eval``: bicubic resize, rescale, normalise). The directory is
also a checkpoint for us (``model.pretrained=DIR``; ``hf_blip2.py``), giving back the same weights.

The prompt layout (``Blip2LLM.build_inputs``) is reproduced by the processor's input ids, two ways:

- ``processor``: Blip2Processor's own, ``[<image> * Q] + tokenizer(prompt)``, where the tokenizer adds its bos
  itself: OPT ``[<image> * Q, </s>, prompt]``, Qwen2 ``[<image> * Q, prompt]``. The LLM's tokenizer, re-saved
  by transformers with ``<image>`` added and left padding.
- ``template``: a bos before the queries (InternLM2: ``[<s>, <image> * Q, prompt]``) or a chat turn around them
  cannot come from Blip2Processor, which puts the placeholders first; so its ``num_query_tokens`` is null and
  the tokenizer's post-processor (a tokenizers ``TemplateProcessing`` in tokenizer.json, loaded as
  ``TokenizersBackend``) writes everything around the prompt, placeholders included, whenever special tokens are
  added (InternLM2-chat, Qwen2-Instruct too). InternLM2's sentencepiece model is written as that tokenizer.json
  (``sentencepiece_tokenizer``; its ``tokenizer.model`` is kept for our own import).

Every export reloads the processor it wrote and checks its ids against ``build_inputs``'s layout.

Exact (float32 models, tests/test_export.py): pixels (with ``backend="pil"``; the default torchvision backend's
bicubic differs by up to one 8-bit level), logits, greedy and beam ids, and the weights after importing the
directory back. Where transformers cannot hold what we compute, export refuses and says why: an image
encoder that is not the EVA layout (``clip_L``: QuickGELU, a pre-norm, a k bias), ``ln_vision`` with another
LayerNorm eps than the encoder's blocks (HF's vision tower has one ``layer_norm_eps``: ``--allow-eps-change``
exports anyway, with the blocks' eps), ``text_only`` models (no queries). Other limits:

- an LLM whose embedding table has no spare row (InternLM2) gets one for ``<image>`` (zero embedding, zero output
  row: logit 0, suppressed in generation_config.json); the logits then have one more column, and a softmax over
  all of them (HF's loss, beam scores) sees it: exp(0) beside the real logits. Our import drops the row again.
- ``generate`` without ``input_ids`` (HF's default ``[<image> * Q, text_config.bos]``) is our layout only for OPT:
  always give a text, ``""`` for a caption;
- HF's answers end with the stop token ("\\n" or "<|im_end|>"): cut at it, as ``Blip2LLM.postprocess`` does;
- half-precision image encoders run under autocast here (``vit_precision``), in their dtype there.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from omegaconf import OmegaConf

from lavis_lite.config import load_yaml, merge_onto, model_config_path
from lavis_lite.data.processors import BlipImageEvalConfig
from lavis_lite.models import hf_blip2, load_model, resolve_model
from lavis_lite.models.blip2_llm import Blip2LLM
from lavis_lite.models.vision import VitArch, create_vision_encoder

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"  # Blip2Processor's placeholder, one per query
Layout = Literal["processor", "template"]
PROBE_PROMPTS = ("", "a photo of", "Question: how many circles are there? Short answer:")
# files transformers' loaders read (name starts): another export's beside ours could be read instead
LOADED_FILES = ("config.json", "generation_config", "model", "pytorch_model", "tokenizer", "special_tokens_map",
                "added_tokens", "vocab", "merges", "processor_config", "preprocessor_config", "chat_template")


class ExportError(ValueError):
    """The model holds something a transformers BLIP-2 directory cannot express exactly."""


# ----------------------------------------------------------------------------------- what can be exported
def vit_arch_of(model: Blip2LLM) -> VitArch:
    """The ``VitArch`` of the model's image encoder, if transformers' ``Blip2VisionModel`` computes what it
    does: it must be the EVA layout (``vit_model: eva``) at some size, module for module (each module's class and
    settings: activations, norms and their eps, layer scale, rope, pre-norms)."""
    encoder = model.visual_encoder
    block = encoder.blocks[0]
    arch = VitArch(width=encoder.num_features, depth=len(encoder.blocks), num_heads=block.attn.num_heads,
                   mlp_width=block.mlp.fc1.out_features, patch_size=encoder.patch_embed.proj.kernel_size[0],
                   layer_norm_eps=block.norm1.eps, qkv_bias=getattr(block.attn, "q_bias", None) is not None)
    with torch.device("meta"):
        reference = create_vision_encoder("eva", model.cfg.img_size, arch=arch)
    ours, theirs = _modules(encoder), _modules(reference)
    differ = [name for name in dict.fromkeys([*ours, *theirs]) if ours.get(name) != theirs.get(name)]
    leaves = [name for name in differ if not any(other != name and other.startswith(f"{name}." if name else "")
                                                 for other in differ)]
    if differ:
        shown = "; ".join(f"visual_encoder{'.' * bool(name)}{name}: {ours.get(name, 'nothing')} where the EVA layout "
                          f"has {theirs.get(name, 'nothing')}" for name in leaves[:3])
        raise ExportError(f"model.vit_model={model.cfg.vit_model}: transformers' Blip2VisionModel holds the EVA layout "
                          f"only (vit_model eva), and this image encoder differs from it ({shown}; {len(differ)} "
                          "modules in all); it cannot be exported exactly")
    return arch


def _modules(module: torch.nn.Module) -> dict[str, str]:
    """Each submodule's name -> its class and settings, e.g. ``"GELU(approximate='none')"``."""
    return {name: f"{type(m).__name__}({m.extra_repr()})" for name, m in module.named_modules()}


def check_exportable(model: Blip2LLM, allow_eps_change: bool = False) -> VitArch:
    """The image encoder's ``VitArch``; raises ``ExportError`` naming what transformers cannot hold."""
    if not isinstance(model, Blip2LLM):
        raise ExportError(f"{type(model).__name__} is no stage-2 model: only Blip2LLM archs (blip2_opt, blip2_qwen2, "
                          "blip2_internlm, blip2_llm) export as Blip2ForConditionalGeneration")
    if model.cfg.text_only:
        raise ExportError("model.text_only=true: the LLM sees no image queries, which Blip2ForConditionalGeneration "
                          "always inserts; export the LLM itself instead")
    arch = vit_arch_of(model)
    if model.ln_vision.eps != arch.layer_norm_eps and not allow_eps_change:
        raise ExportError(
            f"model.ln_vision_eps={model.ln_vision.eps:g} but the image encoder's LayerNorms use "
            f"{arch.layer_norm_eps:g}; "
            "transformers' Blip2VisionModel has one layer_norm_eps for both, so post_layernorm (our ln_vision) would "
            f"use {arch.layer_norm_eps:g} and the logits differ slightly (as in HF's own Salesforce/blip2-* "
            "conversions of LAVIS); pass --allow-eps-change to export anyway")
    return arch


def merged_llm(model: Blip2LLM) -> transformers.PreTrainedModel:
    """The LLM as a plain transformers model: a LoRA (peft) is merged into a copy of the weights."""
    if model.cfg.lora_r == 0:
        return model.llm_model
    logger.info("merging the LoRA adapters (r=%d) into the exported LLM's weights", model.cfg.lora_r)
    return copy.deepcopy(model.llm_model).merge_and_unload()


# -------------------------------------------------------------------------------------------- tokenizer
def layout_of(model: Blip2LLM) -> Layout:
    """``processor`` when Blip2Processor's ``[<image> * Q] + tokenizer(prompt)`` is our layout (no bos before the
    queries, the plain prompt template), else ``template`` (the tokenizer's post-processor lays it out)."""
    backbone = model.backbone
    plain = backbone.format_prompt("{}") == ("", "{}")
    return "processor" if plain and (model.bos_id is None or not backbone.bos_before_queries) else "template"


def sentencepiece_tokenizer(tokenizer: Any) -> Any:
    """A tokenizers ``Tokenizer`` encoding and decoding as our sentencepiece ``InternLM2Tokenizer``: its BPE pieces
    with merges ranked by piece score, the normaliser of its ``normalizer_spec`` (dummy prefix "▁" on every
    stretch between special tokens, spaces as "▁"), byte fallback, its special tokens (renamed ones by their
    config name) and user-defined pieces as added tokens. Raises ``ExportError`` for sentencepiece settings it
    does not reproduce."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers.convert_slow_tokenizer import generate_merges

    sp = tokenizer.sp
    pieces, trainer, normalizer = _sentencepiece_specs(sp.serialized_model_proto())
    problems = [name for name, bad in (
        ("model_type is not BPE", trainer.get(3, 1) != 2), ("treat_whitespace_as_suffix", trainer.get(24, 0)),
        ("escape_whitespaces off", not normalizer.get(5, 1)), ("remove_extra_whitespaces", normalizer.get(4, 1)))
        if bad]
    if problems:
        raise ExportError(f"the sentencepiece model has settings the exported tokenizer does not reproduce: "
                          f"{', '.join(problems)}")
    n = sp.get_piece_size()
    names = tokenizer.convert_ids_to_tokens(list(range(n)))  # pieces, renamed ones by their config name
    special = sorted(set(tokenizer.all_special_ids) | {i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)})
    user_defined = [i for i, kind in enumerate(pieces) if kind == 4 and i not in special]
    plain = [i for i in range(n) if pieces[i] == 1 and i not in special]  # NORMAL pieces: what BPE merges into
    plain_set = set(plain)
    merges = generate_merges({name: i for i, name in enumerate(names)}, {names[i]: sp.get_score(i) for i in plain},
                             skip_tokens=[names[i] for i in range(n) if i not in plain_set])
    backend = Tokenizer(models.BPE(vocab={name: i for i, name in enumerate(names)}, merges=merges,
                                   unk_token=names[sp.unk_id()], fuse_unk=True, byte_fallback=bool(trainer.get(35, 0))))
    dummy_prefix = bool(normalizer.get(3, 1))
    steps = [normalizers.Precompiled(normalizer[2])] if normalizer.get(2) else []
    backend.normalizer = normalizers.Sequence([*steps, *[normalizers.Prepend("▁")] * dummy_prefix,
                                               normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *[decoders.Strip(" ", 1, 0)] * dummy_prefix])
    backend.add_special_tokens([AddedToken(names[i], special=True, normalized=False) for i in special])
    backend.add_tokens([AddedToken(names[i], normalized=False) for i in user_defined])
    return backend


def _sentencepiece_specs(proto: bytes) -> tuple[list[int], dict[int, Any], dict[int, Any]]:
    """(type of each piece, trainer_spec, normalizer_spec) of a serialized sentencepiece ``ModelProto``, the specs
    as {field number: value}; read from the protobuf wire format directly, since transformers' generated parser
    needs a matching protobuf runtime. Piece types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte."""
    def fields(buf: bytes) -> list[tuple[int, Any]]:
        out, i = [], 0
        while i < len(buf):
            key, i = varint(buf, i)
            kind = key & 7
            if kind == 0:
                value, i = varint(buf, i)
            elif kind == 2:
                size, i = varint(buf, i)
                value, i = buf[i:i + size], i + size
            elif kind in (1, 5):
                size = 8 if kind == 1 else 4
                value, i = buf[i:i + size], i + size
            else:
                raise ExportError(f"tokenizer.model: protobuf wire type {kind} is not sentencepiece's")
            out.append((key >> 3, value))
        return out

    def varint(buf: bytes, i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = buf[i]
            value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
            if not byte & 0x80:
                return value, i

    top = fields(proto)
    pieces = [dict(fields(value)).get(3, 1) for number, value in top if number == 1]  # SentencePiece.type
    specs = {number: dict(fields(value)) for number, value in top if number in (2, 3)}
    return pieces, specs.get(2, {}), specs.get(3, {})


def build_tokenizer(model: Blip2LLM, layout: Layout) -> tuple[Any, int]:
    """(the tokenizer to save, ``IMAGE_TOKEN`` added, and that token's id) for ``layout``. ``processor``: a copy of
    the model's transformers tokenizer. ``template``: a ``TokenizersBackend`` whose post-processor writes
    ``build_inputs``'s layout around the prompt: ``[bos] + head + <image> * Q + tail``, the tail's text split at
    the prompt (the check in ``verify_layout`` proves the split tokenizes as the whole)."""
    from tokenizers import AddedToken, Tokenizer, processors

    source, queries = model.tokenizer, model.cfg.qformer.num_query_token
    if layout == "processor":
        if not isinstance(source, transformers.PreTrainedTokenizerBase):
            raise ExportError(f"{type(source).__name__} is no transformers tokenizer; give the backbone one")
        tokenizer = copy.deepcopy(source)
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
        tokenizer.padding_side = "left"  # as our batched generation: prompts end where the answers start
        return tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if hasattr(source, "sp"):  # our sentencepiece InternLM2Tokenizer
        backend = sentencepiece_tokenizer(source)
    elif getattr(source, "is_fast", False):
        if source(["a"], add_special_tokens=True)["input_ids"] != source(["a"], add_special_tokens=False)["input_ids"]:
            raise ExportError(f"{type(source).__name__} adds special tokens of its own: the {layout} layout replaces "
                              "its post-processor, which our import could not give back; not supported")
        backend = Tokenizer.from_str(source.backend_tokenizer.to_str())
    else:
        raise ExportError(f"{type(source).__name__}: the {layout} layout needs a tokenizers (fast) tokenizer or a "
                          "sentencepiece one to write its post-processor into")
    backend.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    image_id = backend.token_to_id(IMAGE_TOKEN)
    bos = [] if model.bos_id is None else [model.bos_id]
    first, after_queries = (bos, []) if model.backbone.bos_before_queries else ([], bos)  # as build_inputs
    head, tail = model.backbone.format_prompt("\0")
    pre, post = tail.split("\0")
    template = [("[BEFORE_QUERIES]", first + _encode(model, head)), *[(IMAGE_TOKEN, [image_id])] * queries,
                ("[BEFORE_PROMPT]", after_queries + _encode(model, pre)), ("$A", None),
                ("[AFTER_PROMPT]", _encode(model, post))]
    specials = {name: ids for name, ids in template if ids}
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(name for name, ids in template if ids is None or ids),
        special_tokens=[{"id": name, "ids": ids, "tokens": [backend.id_to_token(i) for i in ids]}
                        for name, ids in specials.items()])
    names = {key: getattr(source, key, None) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    tokenizer = transformers.TokenizersBackend(tokenizer_object=backend, padding_side="left",
                                               **{k: v for k, v in names.items() if v is not None})
    return tokenizer, image_id


def _encode(model: Blip2LLM, text: str) -> list[int]:
    return model.backbone.encode(model.tokenizer, text) if text else []


# ----------------------------------------------------------------------------------- model and settings
def build_hf_model(model: Blip2LLM, vit_arch: VitArch, image_id: int, layout: Layout,
                   **settings: Any) -> transformers.Blip2ForConditionalGeneration:
    """Our weights in a ``Blip2ForConditionalGeneration`` (built on the meta device, our tensors assigned, no
    copies but the fused qkv biases and a padded embedding table): every HF tensor must come from us. Its
    ``generation_config`` is ours (``generation_config`` with ``settings``); ``text_config`` gets its eos, pad
    and bos ids too, because HF's ``generate`` hands the language model its own defaults (built from
    ``text_config``) unless given ``generation_config=model.generation_config``, as HF's BLIP-2 conversions
    set OPT's eos to "\\n"."""
    llm = merged_llm(model)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("llm_model.")}
    state.update({f"llm_model.{k}": v for k, v in llm.state_dict().items()})
    rows = llm.get_input_embeddings().weight.shape[0]
    if image_id > rows:
        raise ExportError(f"the tokenizer gives {IMAGE_TOKEN} id {image_id}, past the LLM's {rows} embedding rows: it "
                          "has tokens the LLM has no rows for")
    added = int(image_id == rows)
    if added:  # no spare row for the placeholder: a zero one (its logit is 0, suppressed in generation)
        tables = {id(llm.get_input_embeddings().weight), id(llm.get_output_embeddings().weight)}
        padded: dict[int, torch.Tensor] = {}
        for name, param in llm.named_parameters(remove_duplicate=False):
            if id(param) in tables:
                key = id(param)
                padded.setdefault(key, torch.cat([param.detach(), param.new_zeros(1, param.shape[1])]))
                state[f"llm_model.{name}"] = padded[key]
    text_config = copy.deepcopy(llm.config)
    text_config.vocab_size = rows + added
    generation = generation_config(model, image_id, rows + added, **settings)
    text_config.eos_token_id, text_config.pad_token_id = generation.eos_token_id, generation.pad_token_id
    text_config.bos_token_id = generation.bos_token_id
    config = hf_blip2.hf_blip2_config(model.cfg, vit_arch, text_config, image_id,
                                      {"llm": model.cfg.llm, "placeholder_rows": added, "layout": layout})
    config.dtype = llm.dtype
    with torch.device("meta"):
        hf = transformers.Blip2ForConditionalGeneration(config)
    result = hf.load_state_dict(hf_blip2.to_hf_blip2({k: v.detach() for k, v in state.items()}), strict=False,
                                assign=True)
    tied = set(getattr(hf, "all_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ExportError(f"the converted weights do not fill Blip2ForConditionalGeneration: missing {missing[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}")
    hf.tie_weights()
    hf.generation_config = generation
    return hf.eval()


GENERATION_SETTINGS = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty")


def generation_config(model: Blip2LLM, image_id: int, rows: int, **settings: Any) -> transformers.GenerationConfig:
    """``Blip2LLM.generation_config`` with ``settings`` (``GENERATION_SETTINGS``; absent or None:
    ``Blip2LLM.generate``'s default), every id past our tokenizer suppressed, the ``IMAGE_TOKEN`` row included."""
    if set(settings) - set(GENERATION_SETTINGS):
        raise TypeError(f"unknown generation settings {sorted(set(settings) - set(GENERATION_SETTINGS))}; "
                        f"give {GENERATION_SETTINGS}")
    defaults = {name: p.default for name, p in inspect.signature(Blip2LLM.generate).parameters.items()
                if name in GENERATION_SETTINGS}
    config = model.generation_config(**{k: defaults[k] if settings.get(k) is None else settings[k] for k in defaults})
    config.suppress_tokens = sorted(set(range(len(model.tokenizer), rows)) | {image_id})
    return config


def image_processor(cfg: BlipImageEvalConfig) -> transformers.BlipImageProcessor:
    """Our ``blip_image_eval`` (``BlipImageEvalProcessor``) as transformers' BLIP image processor: RGB, bicubic
    resize to ``image_size`` square, rescale by 1/255, normalise with ``mean``/``std``."""
    return transformers.BlipImageProcessor(
        size={"height": cfg.image_size, "width": cfg.image_size}, resample=3,  # PIL.Image.BICUBIC
        do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(cfg.mean),
        image_std=list(cfg.std), do_convert_rgb=True)


# ------------------------------------------------------------------------------------------------ export
def export(model: Blip2LLM, out: str | Path, eval_processor: BlipImageEvalConfig | None = None,
           overwrite: bool = False, allow_eps_change: bool = False, **generation: Any) -> Path:
    """Write ``model`` to ``out`` as a transformers BLIP-2 directory (see the module docstring) and return it.

    ``eval_processor``: the image processor to write (default: ``blip_image_eval`` at ``model.cfg.img_size``);
    ``generation``: ``num_beams``, ``max_new_tokens``, ``min_new_tokens``, ``length_penalty`` of
    generation_config.json (default ``Blip2LLM.generate``'s). ``out`` must be empty or absent, or, with
    ``overwrite``, hold files of an earlier export, which are replaced (other files are left alone)."""
    out = Path(out)
    previous = _check_out(out, overwrite)
    vit_arch = check_exportable(model, allow_eps_change)
    layout = layout_of(model)
    tokenizer, image_id = build_tokenizer(model, layout)
    hf = build_hf_model(model, vit_arch, image_id, layout, **generation)
    processor = transformers.Blip2Processor(
        image_processor(eval_processor or BlipImageEvalConfig(image_size=model.cfg.img_size)), tokenizer,
        num_query_tokens=model.cfg.qformer.num_query_token if layout == "processor" else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf.save_pretrained(staging)
        processor.save_pretrained(staging)
        if hasattr(model.tokenizer, "sp"):  # our own import reads sentencepiece's file and names
            _add_sentencepiece_files(model.tokenizer, staging)
        verify_layout(model, staging, image_id)
        files = sorted(p.name for p in staging.iterdir())
        config = json.loads((staging / "config.json").read_text())
        config[hf_blip2.EXPORT_KEY]["files"] = files
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _install(staging, out, files, previous)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported %s (%s layout, <image> = %d) to %s", type(hf.language_model).__name__, layout, image_id, out)
    return out


def _add_sentencepiece_files(tokenizer: Any, staging: Path) -> None:
    """``tokenizer.model`` and the sentencepiece tokenizer's own config keys (renamed pieces, extra special
    tokens) beside the transformers tokenizer, so ``InternLM2Tokenizer`` loads the directory too."""
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        shutil.copyfile(Path(scratch) / "tokenizer.model", staging / "tokenizer.model")
    config_file = staging / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for key in ("added_tokens_decoder", "additional_special_tokens"):
        if key in tokenizer.tokenizer_config:
            config[key] = tokenizer.tokenizer_config[key]
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def verify_layout(model: Blip2LLM, directory: Path, image_id: int) -> None:
    """The saved processor, reloaded, lays each of ``PROBE_PROMPTS`` and ``model.cfg.prompt`` out as
    ``build_inputs`` does: the same embeddings, queries at the placeholders. Raises ``ExportError`` otherwise."""
    from PIL import Image

    processor = transformers.Blip2Processor.from_pretrained(str(directory), backend="pil")
    image = Image.new("RGB", (model.cfg.img_size, model.cfg.img_size))
    embed = model.llm_model.get_input_embeddings()
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(1, model.cfg.qformer.num_query_token, embed.embedding_dim, generator=generator)
    for prompt in dict.fromkeys([*PROBE_PROMPTS, model.cfg.prompt]):
        ids = processor(images=image, text=prompt, return_tensors="pt").input_ids[0]
        placeholders = ids == image_id
        with torch.no_grad():
            ours = model.build_inputs(queries.to(embed.weight), [prompt])[0][0]
            theirs = embed(ids.masked_fill(placeholders, 0))
            if int(placeholders.sum()) == queries.shape[1]:
                theirs[placeholders] = queries[0].to(embed.weight)
        if theirs.shape != ours.shape or not torch.equal(theirs, ours):
            raise ExportError(f"the exported processor lays out {prompt!r} as {ids.tolist()}, which is not "
                              "lavis_lite's layout (Blip2LLM.build_inputs); the tokenizer may not split the prompt "
                              "template where the prompt goes")


def _check_out(out: Path, overwrite: bool) -> list[str]:
    """The files an earlier export wrote to ``out`` (to be replaced); raises if ``out`` may not be written."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a directory")
    present = sorted(p.name for p in out.iterdir())
    if not present:
        return []
    if not overwrite:
        raise FileExistsError(f"--out {out} is not empty ({len(present)} entries, e.g. {present[:3]}); give an empty "
                              "or new directory, or --overwrite to replace an earlier export there")
    previous = []
    if hf_blip2.is_hf_blip2_dir(out):
        previous = list(hf_blip2.exported(hf_blip2.read_config(out)).get("files", []))
    return previous


def _install(staging: Path, out: Path, files: list[str], previous: list[str]) -> None:
    """Move ``files`` from ``staging`` into ``out``; remove what an earlier export wrote there and this one does
    not; refuse when other weight files would sit beside ours (a loader could read them instead)."""
    present = {p.name for p in out.iterdir()} if out.is_dir() else set()
    foreign = sorted(name for name in present - set(files) - set(previous) if name.startswith(LOADED_FILES))
    if foreign:
        raise FileExistsError(f"--out {out} holds {foreign}, which this export neither writes nor wrote before; a "
                              "loader could read them beside ours: remove them or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for name in sorted(set(previous) & present - set(files)):
        (out / name).unlink()
    for name in files:
        (staging / name).replace(out / name)


# --------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Export a stage-2 BLIP-2 as a transformers "
                                                 "Blip2ForConditionalGeneration directory")
    parser.add_argument("--cfg-path", help="project yaml, model type yaml or <arch>/<model_type>; optional with a "
                                           "runner checkpoint (its stored config)")
    parser.add_argument("--checkpoint", help="weights loaded last: a runner checkpoint, LAVIS .pth, .safetensors, "
                                             "a Hugging Face BLIP-2 directory")
    parser.add_argument("--out", required=True, type=Path, help="the directory to write (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    parser.add_argument("--options", nargs="+", default=[], help="model overrides, e.g. model.llm_path=/models/opt")
    parser.add_argument("--imports", nargs="+", default=[], help="modules that register models, backbones, ...")
    parser.add_argument("--allow-eps-change", action="store_true",
                        help="export although ln_vision's LayerNorm eps differs from the image encoder's")
    for flag, kind in (("--num-beams", int), ("--max-new-tokens", int), ("--min-new-tokens", int),
                       ("--length-penalty", float)):
        parser.add_argument(flag, type=kind, help="generation_config.json (default: Blip2LLM.generate's)")
    return parser.parse_args(argv)


def eval_processor_config(cfg_path: str | None, arch: str, model_type: str) -> BlipImageEvalConfig | None:
    """The ``blip_image_eval`` settings to export: the project's data sets' ``vis_processor.eval`` (they must
    agree), else the model type's ``preprocess``; None when neither names one (``export``'s default)."""
    nodes = []
    if cfg_path and Path(cfg_path).is_file():
        for name, dataset in (load_yaml(cfg_path, "--cfg-path").get("datasets") or {}).items():
            node = (dataset.get("vis_processor") or {}).get("eval")
            if node is not None:
                nodes.append((f"datasets.{name}.vis_processor.eval", node))
    if not nodes and model_config_path(arch, model_type).is_file():
        node = (load_yaml(model_config_path(arch, model_type), "model defaults").get("preprocess") or {})
        if node.get("vis_processor", {}).get("eval") is not None:
            nodes.append((f"{arch}/{model_type} preprocess.vis_processor.eval", node["vis_processor"]["eval"]))
    configs = {}
    for where, node in nodes:
        if node.get("name") != "blip_image_eval":
            raise ExportError(f"{where}.name={node.get('name')!r}: only blip_image_eval has a transformers equivalent")
        fields = OmegaConf.to_container(node, resolve=True)
        fields.pop("name")
        configs[where] = merge_onto(BlipImageEvalConfig, fields, where)
    if len({repr(c) for c in configs.values()}) > 1:
        raise ExportError(f"the data sets' eval image processors differ ({configs}); export one model per setting")
    return next(iter(configs.values()), None)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for module in args.imports:
        importlib.import_module(module)
    try:
        arch, model_type, overrides = resolve_model(args.cfg_path, args.checkpoint, "--cfg-path ", "--checkpoint ")
        options = OmegaConf.from_dotlist(args.options)
        if set(options) - {"model"}:
            raise ValueError(f"--options {args.options}: only model.* keys configure an export")
        overrides = OmegaConf.to_container(OmegaConf.merge(overrides, options.get("model") or {}), resolve=True)
        model = load_model(arch, model_type, is_eval=True, checkpoint=args.checkpoint, **overrides)
        return export(model, args.out, eval_processor_config(args.cfg_path, arch, model_type), args.overwrite,
                      args.allow_eps_change, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                      min_new_tokens=args.min_new_tokens, length_penalty=args.length_penalty)
    except (ExportError, FileExistsError, FileNotFoundError, KeyError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
