"""Training-step throughput, peak memory and FLOPs of BLIP-2 stage 1 (``blip2``) and stage 2
(``blip2_internlm``), random weights, synthetic images, one process.

    python bench/bench_train.py                                   # tiny, both stages (CPU: ~20 s)
    python bench/bench_train.py --adamw foreach fused --text-padding max_length longest --stages 1
    python bench/bench_train.py --size real --stages 2 --steps 1 --warmup 0 --batch-size 2   # CPU: 1 min, 8.2 GB
    python bench/bench_train.py --size real --json bench/results/train_real_h100.json             # GPU
    python bench/bench_train.py --stages 2 --cache-image-features   # frozen encoder output from the cache
    python bench/bench_train.py --size real --stages 1 --batch-size 8 --cache-image-features --vit-depth 1 \
        --warmup 1 --text-padding max_length longest   # the Q-Former step on given image features (CPU)
    # the lavis_lite half of a side-by-side with LAVIS: the stage-1 step on the same image embeddings
    # (ViT output before ln_vision, [B, 257, 1408], safetensors key "image_embeds") and captions (JSON list)
    python bench/bench_train.py --size real --stages 1 --vit-depth 1 --image-embeds embeds.safetensors \
        --captions captions.json --text-padding max_length longest --threads 1

Per configuration: samples/s over ``--steps`` timed steps after ``--warmup`` steps (forward,
backward, AdamW step), the step's process CPU time (with ``--threads 1`` on a shared machine: the
step's time without the waits for a busy core), the optimizer step's share, peak memory over the steps (CUDA: max allocated
by torch; CPU: peak RSS, reset after the model is built), trainable parameters, and for stage 2 the
frozen LLM's parameters that hold a gradient, AdamW state or a place in the optimizer's groups, and
the bytes of their gradients and state (both must be 0).
FLOPs of one step are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the first step
(matmuls, convolutions, attention; forward and backward as actually executed, so the frozen ViT
counts forward only and the frozen LLM forward plus the input-gradient half of its backward); TFLOP/s
is that over the mean step time, and MFU divides it by ``--peak-tflops`` (default 989: H100 SXM dense
bf16; reported on CUDA, or on CPU when the flag is given).

Sizes:
- ``tiny``: the CPU test models (``model_type: tiny``: 2-block ViT width 64 at 64 px, 2-layer Q-Former
  hidden 64 with 4 queries, the warmed tiny InternLM2 in float32); stage 1 trains the ViT, as
  ``projects/blip2/train/pretrain_stage1_shapes.yaml``.
- ``small``: the tiny ViT, the real Q-Former (BERT-base: 12 layers, hidden 768, 32 queries, max_txt_len
  32, a 30,523-token vocabulary) and, in stage 2, InternLM2-1.8B cut to 2 of its 24 layers (bf16).
- ``real``: ViT-g (``eva_clip_g``, 39 blocks, 224 px, frozen) + BERT-base Q-Former (32 queries) +
  InternLM2-1.8B (hidden 2048, 24 layers, 16 heads, 8 kv heads, MLP 8192, vocabulary 92,544, rope theta
  1e6, dynamic NTK x2: the official ``config.json``), the LLM in bf16.

How the random real-size models are built without any file of weights: the BERT tokenizer is a
``vocab.txt`` of bert-base-uncased's size (30,522: the shapes words, then filler) written to a temp
dir. Stage 2 is built by ``create_model`` with its real model type but ``llm_path`` pointing at the
tiny InternLM2 (so the tokenizer and the bos/stop/pad ids are the tiny one's, all valid ids of the
92,544 vocabulary), then ``llm_model`` is replaced by ``LlamaForCausalLM(internlm2_config_to_llama(
<1.8B config>))`` built directly in bf16 (``torch.set_default_dtype``, about 3.8 GB, never in float32),
frozen with ``requires_grad_(False)`` as ``Blip2LLM.__init__`` freezes a loaded LLM, and ``llm_proj``
by a fresh ``Linear(768, 2048)``: what loading the real checkpoint gives, with random weights and
the tiny tokenizer's (similar) token counts. The random ViT-g is on purpose: ``Blip2Base.vit_loaded``
is set so no guard against random encoders stops the benchmark.

Defaults by device: CUDA runs the step under ``torch.autocast`` bf16 (``run.amp``), the ViT in the
config's fp16; CPU runs without autocast (as the runner: AMP on GPU only) and the ViT in bf16.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common import (add_run_args, current_memory_mb, environment, peak_memory_mb, print_table, process_peak_rss_mb,
                    release_memory, reset_peak, setup_run, sync, write_json)
from lavis_lite.config import cache_dir
from lavis_lite.data.shapes import ensure_shapes
from lavis_lite.models import create_model
from lavis_lite.models.blip2_qformer import Blip2Base
from lavis_lite.models.feature_cache import ImageFeatureCache
from lavis_lite.models.llm.internlm2 import internlm2_config_to_llama
from lavis_lite.models.llm.tiny import build_tiny_internlm2
from lavis_lite.models.qformer import QFormerConfig
from lavis_lite.runner.optim import build_adamw, param_groups

# internlm/internlm2-1_8b config.json (the keys that shape the network)
INTERNLM2_1_8B = {
    "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": 92544,
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bias": False,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}
QFORMER_BASE = {**dataclasses.asdict(QFormerConfig()), "vocab_size": None, "encoder_width": None}
DEFAULT_BATCH = {"tiny": 32, "small": 8, "real": 32}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ------------------------------------------------------------------------------------------ models
def bert_base_vocab(workdir: Path, shapes: Path) -> str:
    """A vocab.txt of bert-base-uncased's size: the shapes vocabulary first (so captions tokenize as
    words), then filler tokens up to 30,522 entries."""
    words = (shapes / "bert_vocab" / "vocab.txt").read_text().split("\n")
    words = [w for w in words if w]
    words += [f"[filler{i}]" for i in range(30522 - len(words))]
    out = workdir / "bert_base_vocab"
    out.mkdir(exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(words) + "\n")
    return str(out)


def swap_in_random_llm(model: nn.Module, official_config: dict, dtype: torch.dtype) -> None:
    """Replace ``model.llm_model`` by a random LlamaForCausalLM of ``official_config`` built in
    ``dtype`` (never materialised in float32) and frozen; ``llm_proj`` by a fresh Linear of its width."""
    from transformers import GenerationConfig, LlamaForCausalLM

    config = internlm2_config_to_llama(official_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        llm = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    llm.requires_grad_(False)  # as Blip2LLM.__init__ freezes a loaded LLM
    llm.generation_config = GenerationConfig()
    model.llm_model = llm.eval()
    model.llm_proj = nn.Linear(model.llm_proj.in_features, config.hidden_size)


def build(stage: int, size: str, args: argparse.Namespace, workdir: Path) -> nn.Module:
    # Speed benchmark: the image encoder is random on purpose (weights are never downloaded).
    Blip2Base.vit_loaded = True
    shapes = ensure_shapes()
    vit = {} if args.vit_precision is None else {"vit_precision": args.vit_precision}
    if args.vit_depth is not None:
        vit["vit_depth"] = args.vit_depth
    if stage == 1:
        if size == "tiny":
            return create_model("blip2", "tiny", tokenizer_path=str(shapes / "bert_vocab"), freeze_vit=False,
                                max_txt_len=32)
        vocab = bert_base_vocab(workdir, shapes)
        if size == "small":
            return create_model("blip2", "tiny", tokenizer_path=vocab, qformer=QFORMER_BASE, max_txt_len=32,
                                embed_dim=256)
        return create_model("blip2", "pretrain", tokenizer_path=vocab, **vit)
    tiny_llm = str(build_tiny_internlm2(shapes, cache_dir() / "tiny_internlm2"))
    if size == "tiny":
        return create_model("blip2_internlm", "tiny", **({"llm_dtype": args.llm_dtype} if args.llm_dtype else {}))
    llm_dtype = args.llm_dtype or "bfloat16"
    if size == "small":
        model = create_model("blip2_internlm", "tiny", qformer=QFORMER_BASE, llm_dtype=llm_dtype)
        swap_in_random_llm(model, {**INTERNLM2_1_8B, "num_hidden_layers": 2}, DTYPES[llm_dtype])
        return model
    model = create_model("blip2_internlm", "pretrain_internlm2_1.8b", llm_path=tiny_llm, llm_dtype=llm_dtype, **vit)
    swap_in_random_llm(model, INTERNLM2_1_8B, DTYPES[llm_dtype])
    return model


def make_optimizer(model: nn.Module, kind: str, device: torch.device) -> torch.optim.Optimizer:
    """``runner``: exactly what the runner builds (fused on CUDA and CPU);
    ``foreach`` / ``fused`` / ``forloop``: AdamW forced to that implementation, same groups."""
    if kind == "runner":
        optimizer = build_adamw(model, 0.05, 0.999, True, device)
    else:
        flags = {"foreach": {"foreach": True}, "fused": {"fused": True}, "forloop": {"foreach": False}}[kind]
        optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=0.0, betas=(0.9, 0.999), **flags)
    for group in optimizer.param_groups:
        group["lr"] = 1e-5
    return optimizer


def use_text_padding(model: nn.Module, padding: str) -> str:
    """Stage 1 pads text to the longest caption of the batch (``Blip2Qformer.forward``: dynamic
    padding); ``max_length`` rebinds this instance's ``tokenize`` to pad every text to ``max_txt_len``
    as LAVIS does (the bench only). Stage 2 (``Blip2LLM._pad``) always pads to the longest sequence."""
    if not hasattr(model, "tokenize"):
        return "longest (built in)"
    model.__dict__.pop("tokenize", None)  # back to the class's method
    if padding == "max_length":
        bound = type(model).tokenize
        model.tokenize = lambda texts, max_length=None, padding="max_length": bound(model, texts, max_length,
                                                                                   "max_length")
    return padding


# --------------------------------------------------------------------------------------- measuring
def captions(n: int, join: int = 1) -> list[str]:
    """The first ``n`` shapes training captions (cycled): real caption lengths. ``join`` > 1: each text
    joins that many captions (4: 40+ tokens, so every text fills ``max_txt_len`` and none is padded)."""
    records = json.loads((ensure_shapes() / "annotations" / "caption_train.json").read_text())
    texts = [records[i % len(records)]["caption"] for i in range(n * join)]
    return [" ".join(texts[i::n]) for i in range(n)]


def given_inputs(args: argparse.Namespace) -> tuple[list[str] | None, torch.Tensor | None]:
    """``--captions`` (a JSON list of strings, or of records with "caption") and ``--image-embeds`` (a
    safetensors file whose "image_embeds" is the image encoder's output [B, N, C], before ``ln_vision``)."""
    texts = embeds = None
    if args.captions is not None:
        if not args.captions.is_file():
            raise SystemExit(f"--captions {args.captions}: no such file")
        items = json.loads(args.captions.read_text())
        texts = [item["caption"] if isinstance(item, dict) else item for item in items]
    if args.image_embeds is not None:
        if not args.image_embeds.is_file():
            raise SystemExit(f"--image-embeds {args.image_embeds}: no such file")
        from safetensors.torch import load_file

        tensors = load_file(str(args.image_embeds))
        if "image_embeds" not in tensors:
            raise SystemExit(f"--image-embeds {args.image_embeds}: no tensor 'image_embeds' (has {sorted(tensors)})")
        embeds = tensors["image_embeds"].float()
    sizes = {len(x) for x in (texts, embeds) if x is not None}
    if len(sizes) > 1:
        raise SystemExit(f"--captions has {len(texts)} texts but --image-embeds {len(embeds)} images: give as many")
    if sizes:
        args.batch_size = sizes.pop()
    return texts, embeds


def bench(model: nn.Module, stage: int, adamw: str, padding: str, args: argparse.Namespace,
          device: torch.device, given: tuple[list[str] | None, torch.Tensor | None]) -> dict[str, Any]:
    """One configuration; ``given``: ``given_inputs(args)``, read once for all of them."""
    release_memory(device)
    model.to(device).train()
    padding = use_text_padding(model, padding)
    texts, embeds = given
    if embeds is not None:  # the encoder's output as given, every step (this instance only)
        if stage != 1 or any(p.requires_grad for p in model.visual_encoder.parameters()):
            raise SystemExit("--image-embeds: stage 1 with a frozen image encoder (--size real) only")
        embeds = embeds.to(device)
        model.image_features = lambda image: embeds
    if args.cache_image_features:  # every step after the first reuses the first step's encoder output
        if any(p.requires_grad for p in model.visual_encoder.parameters()):
            raise SystemExit(f"--cache-image-features needs a frozen image encoder; stage {stage} at this size trains it")
        model.image_feature_cache = ImageFeatureCache(max_gb=64)
    optimizer = make_optimizer(model, adamw, device)
    size = model.cfg.img_size
    batch = {"image": torch.randn(args.batch_size, 3, size, size, device=device),
             "text_input": texts or captions(args.batch_size, args.join_captions),
             "image_id": list(range(args.batch_size))}
    amp = (torch.autocast(device.type, dtype=DTYPES[args.amp]) if args.amp != "none"
           else contextlib.nullcontext())
    sync(device)
    weights_mb = current_memory_mb(device)
    reset_peak(device)
    flops, optimizer_s, start, start_cpu = None, 0.0, time.perf_counter(), time.process_time()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            optimizer_s, start, start_cpu = 0.0, time.perf_counter(), time.process_time()
        counter = FlopCounterMode(display=False) if step == 0 else contextlib.nullcontext()
        with counter:
            with amp:
                loss = model(batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if step == 0:
            flops = counter.get_total_flops()
        sync(device)
        t = time.perf_counter()
        optimizer.step()
        sync(device)
        optimizer_s += time.perf_counter() - t
    elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    peak_mb, peak_scope = peak_memory_mb(device)
    step_s = elapsed / args.steps
    result = {
        "stage": stage, "adamw": adamw, "text_padding": padding, "batch_size": args.batch_size,
        "image_features": "given" if embeds is not None else "cached" if args.cache_image_features else "encoded",
        "image_size": size, "loss": loss.detach().item(), "samples_per_s": args.batch_size / step_s, "step_s": step_s,
        "step_cpu_s": elapsed_cpu / args.steps,
        "optimizer_step_s": optimizer_s / args.steps, "memory_before_steps_mb": weights_mb,
        "peak_memory_mb": peak_mb, "peak_memory_scope": peak_scope,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "grad_bytes": sum(p.grad.nbytes for p in model.parameters() if p.grad is not None),
        "optimizer_state_bytes": sum(t.nbytes for s in optimizer.state.values() for t in s.values()
                                     if torch.is_tensor(t)),
        "flops_per_step": flops, "flops_per_sample": flops / args.batch_size if flops else None,
        "gflops_per_sample": flops / args.batch_size / 1e9 if flops else None,
        "flops_counted_in_timed_step": args.warmup == 0,
        "tflops_per_s": flops / step_s / 1e12 if flops else None,
    }
    peak_tflops = args.peak_tflops if args.peak_tflops is not None else (989.0 if device.type == "cuda" else None)
    result["mfu"] = result["tflops_per_s"] / peak_tflops if flops and peak_tflops else None
    result["peak_tflops"] = peak_tflops
    llm = getattr(model, "llm_model", None)
    if llm is not None:
        params = list(llm.parameters())
        in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
        held = [p for p in params if p.grad is not None or p in optimizer.state or id(p) in in_groups]
        result["llm_params"] = sum(p.numel() for p in params)
        result["llm_params_with_grad_or_optimizer_state"] = sum(p.numel() for p in held)
        result["llm_grad_and_optimizer_bytes"] = sum(
            (p.grad.nbytes if p.grad is not None else 0)
            + sum(t.nbytes for t in optimizer.state.get(p, {}).values() if torch.is_tensor(t)) for p in held)
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    return result


COLUMNS = [("stage", "stage"), ("adamw", "AdamW"), ("text_padding", "text padding"), ("image_features", "image features"),
           ("samples_per_s", "samples/s"), ("step_s", "step s"), ("step_cpu_s", "step CPU s"), ("optimizer_step_s", "optimizer s"),
           ("peak_memory_mb", "peak MB"), ("trainable_params", "trainable"), ("llm_params", "LLM params"),
           ("llm_params_with_grad_or_optimizer_state", "LLM params w/ grad or state"),
           ("llm_grad_and_optimizer_bytes", "LLM grad+state bytes"), ("gflops_per_sample", "GFLOP/sample"),
           ("tflops_per_s", "TFLOP/s"), ("mfu", "MFU")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "small", "real"], default="tiny")
    parser.add_argument("--stages", type=int, nargs="+", choices=[1, 2], default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=None, help="default: tiny 32, small 8, real 32")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (FLOPs are counted on step 0)")
    parser.add_argument("--adamw", nargs="+", default=["runner"], choices=["runner", "foreach", "fused", "forloop"],
                        help="AdamW implementations to compare (runner: what build_adamw picks)")
    parser.add_argument("--text-padding", nargs="+", default=["longest"], choices=["max_length", "longest"],
                        help="stage-1 text padding to compare (stage 2 always pads to the longest)")
    parser.add_argument("--vit-precision", choices=["fp32", "fp16", "bf16"], default=None,
                        help="real size; default: the config's fp16 on CUDA, bf16 on CPU")
    parser.add_argument("--vit-depth", type=int, default=None,
                        help="real size: the image encoder's first N blocks only (with --cache-image-features the "
                             "timed steps never run it: the step on given image features, without building and "
                             "encoding the whole ViT-g first)")
    parser.add_argument("--join-captions", type=int, default=1,
                        help="each text joins this many shapes captions (4: every stage-1 text is max_txt_len "
                             "tokens long, none padded)")
    parser.add_argument("--captions", type=Path, default=None,
                        help="stage 1: the batch's texts from this JSON file (sets the batch size)")
    parser.add_argument("--image-embeds", type=Path, default=None,
                        help="stage 1, real size: the image encoder's output from this safetensors file (key "
                             "image_embeds, [B, N, C] before ln_vision) instead of encoding random images")
    parser.add_argument("--llm-dtype", choices=list(DTYPES), default=None,
                        help="default: bfloat16 (small, real), the config's float32 (tiny)")
    parser.add_argument("--amp", choices=["none", "bfloat16", "float16"], default=None,
                        help="autocast around the forward; default bfloat16 on CUDA, none on CPU")
    parser.add_argument("--cache-image-features", action="store_true",
                        help="model.cache_image_features: time steps whose (frozen) encoder output comes from the cache")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak dense TFLOP/s of the device for MFU (default 989: H100 SXM bf16, CUDA only)")
    add_run_args(parser)
    args = parser.parse_args(argv)
    given = given_inputs(args)  # a missing or mismatched --captions / --image-embeds fails before any model is built
    device = setup_run(args)
    args.batch_size = args.batch_size or DEFAULT_BATCH[args.size]
    if args.amp is None:
        args.amp = "bfloat16" if device.type == "cuda" else "none"
    if args.vit_precision is None and args.size == "real" and device.type != "cuda":
        args.vit_precision = "bf16"
    results: dict[str, Any] = {"size": args.size, **environment(device), "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            torch.manual_seed(args.seed)
            start = time.perf_counter()
            model = build(stage, args.size, args, Path(tmp))
            build_s = time.perf_counter() - start
            paddings = args.text_padding if stage == 1 else args.text_padding[:1]
            for adamw in args.adamw:
                for padding in paddings:
                    run = bench(model, stage, adamw, padding, args, device, given)
                    run["build_s"] = build_s
                    results["runs"].append(run)
            del model
            release_memory(device)
    results["process_peak_rss_mb"] = process_peak_rss_mb()  # CPU side, model building included
    print(f"size {args.size}, batch {args.batch_size}, {results['device']}, amp {args.amp}, "
          f"{args.steps} timed steps after {args.warmup}")
    print_table(results["runs"], COLUMNS)
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
