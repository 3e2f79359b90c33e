"""Peak memory per process of a BLIP-2 stage-2 training step (``blip2_internlm``, random weights) under
``run.strategy`` ddp and fsdp, with and without activation checkpointing; and the same at full depth,
scaled from runs at two depths.

    # CPU, 2 gloo processes (peak RSS per process stands in for GPU memory): cut models (about 2 min per
    # configuration), then scaled to full depth (bench/RESULTS.md)
    torchrun --standalone --nproc_per_node 2 bench/bench_memory.py --llm 1.8b --llm-layers 1 --vit-depth 1 \
        --matmuls skip --json bench/results/memory_1.8b_l1_v1_cpu.json          # and --llm-layers 2, --vit-depth 5
    torchrun --standalone --nproc_per_node 2 bench/bench_memory.py --llm 7b --llm-layers 1 --vit-depth 1 \
        --matmuls skip --json bench/results/memory_7b_l1_v1_cpu.json            # and --llm-layers 2
    python bench/bench_memory.py --scale bench/results/memory_*_l?_v?_cpu.json  # the full-depth table
    # 2 GPUs (nccl, bf16 autocast as run.amp), full depth measured directly:
    torchrun --standalone --nproc_per_node 2 bench/bench_memory.py --llm 7b --json bench/results/memory_7b_gpu.json

Per configuration and process: the peak over ``--steps`` training steps at ``--batch-size`` (per process,
as ``run.batch_size_train``), after one warm-up step on ``--warmup-batch-size`` samples so that AdamW's
state exists, as in every step but the first (0: no warm-up, the first step's peak). CUDA: torch's max
allocated and max reserved bytes (the CUDA context, about 0.5 GB, comes on top); CPU: peak RSS since the
model was built (``common.reset_peak``), which includes what the process holds besides tensors (about
0.8 GB after importing torch, transformers and lavis_lite), with glibc's mmap threshold fixed
(``fix_mmap_threshold``). Also this process's bytes of weights (its shards under fsdp), of trainable
weights and of AdamW state. torchrun sets one thread per process (``OMP_NUM_THREADS=1``).

``--matmuls skip`` (``SkipMatmuls``) leaves out the arithmetic of the matrix products, for CPUs where bf16
products take hours; checked against ``compute`` with a float32 LLM and ViT (1.8B, 1 layer, 1 ViT block,
ddp, batch 32): peaks 7,768 vs 7,785 MB.

The step is the runner's (``Runner._train_step``): the strategy built before the optimizer
(``build_adamw`` with ``RunConfig``'s defaults, fused), ``strategy.sync_gradients(True)``, the forward under
``optim.autocast()`` (bf16 on CUDA, none on CPU: AMP is GPU-only), ``optim.backward``, ``optim.step``.

Model: ``pretrain_internlm2_1.8b`` / ``pretrain_internlm2_7b`` (ViT-g, 39 blocks, frozen; BERT-base Q-Former,
32 queries; frozen LLM in bf16), built as ``bench_train.py`` builds its real size: the config's model with
the tiny InternLM2's tokenizer, then ``llm_model`` replaced by a random ``LlamaForCausalLM`` of the
official InternLM2 config in bf16 (``--llm-layers`` of its decoder layers), ``--vit-depth`` ViT blocks
(``model.vit_depth``). ``--checkpointing``: ``none``; ``llm`` (``llm_use_checkpoint``); ``all`` (also
``qformer_use_checkpoint`` and ``vit_use_checkpoint``). ``--captions long`` (default) makes every caption
longer than ``max_txt_len``, so every sequence has the most tokens the config allows (the worst batch);
``shapes``: the shapes captions (about 13 tokens).

``--scale FILE...``: JSON files of runs that differ in LLM layers and ViT blocks. Per LLM, strategy and
checkpointing, the larger rank's peak as ``a + b * llm_layers + c * vit_blocks``: ``c`` per strategy from
runs that differ in ViT depth only (``vit_block_mb``), ``a`` and ``b`` fitted to the runs at two or more LLM
depths; evaluated at full depth (24 or 32 LLM layers, 39 ViT blocks).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from bench_train import INTERNLM2_1_8B, captions, swap_in_random_llm
from common import (add_run_args, current_memory_mb, environment, peak_memory_mb, print_table, process_peak_rss_mb,
                    release_memory, reset_peak, set_threads, sync, write_json)
from lavis_lite import dist
from lavis_lite.config import RunConfig, cache_dir
from lavis_lite.data.shapes import ensure_shapes
from lavis_lite.models import create_model
from lavis_lite.models.blip2_qformer import Blip2Base
from lavis_lite.models.blocks import checkpoint_blocks, transformer_blocks
from lavis_lite.models.llm.tiny import build_tiny_internlm2
from lavis_lite.registry import LR_SCHEDULERS, STRATEGIES
from lavis_lite.runner.optim import OptimWrapper, build_adamw
from lavis_lite.runner.strategy import Strategy

# internlm/internlm2-7b config.json: the widths that differ from 1.8B (vocabulary, kv heads, rope theta as there;
# its rope scaling is taken as the 1.8B's, which acts only past 32,768 tokens)
INTERNLM2_7B = {**INTERNLM2_1_8B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32}
LLMS = {"1.8b": ("pretrain_internlm2_1.8b", INTERNLM2_1_8B), "7b": ("pretrain_internlm2_7b", INTERNLM2_7B)}
VIT_DEPTH = 39  # eva_clip_g as BLIP-2 builds it
MB = 2**20
GPU_GB = (24, 40, 80)  # GPU memory sizes the table answers for (GiB, as the MB here are MiB)


# ------------------------------------------------------------------------------------------ model
class SkipMatmuls(TorchDispatchMode):
    """Inside, matrix products of plain tensors (``mm``, ``addmm``, ``bmm``, ``baddbmm``) return zeros of their
    shape, dtype and device instead of being computed: every tensor of the step is still allocated, at its
    real size and place, so its memory is still measured; only the products' arithmetic (their kernels'
    scratch memory too) is left out. On the avx2 development CPU a bf16 product runs at 9 GFLOP/s forward
    and 0.3 GFLOP/s as the input gradient of a Linear (one thread; float32: 40), so one real step of a
    cut model at batch 32 takes hours. Everything else (attention, norms, the loss, collectives, AdamW) runs."""

    PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                torch.ops.aten.baddbmm.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.PRODUCTS or any(t is not torch.Tensor for t in types):
            return func(*args, **kwargs)
        def to_meta(a: Any) -> Any:
            return a.to("meta") if torch.is_tensor(a) else a

        meta = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
        return torch.zeros(meta.shape, dtype=meta.dtype, device=args[0].device)


def build_model(args: argparse.Namespace, checkpointing: str, device: torch.device) -> nn.Module:
    # Memory benchmark: the image encoder is random on purpose (weights are never downloaded).
    Blip2Base.vit_loaded = True
    model_type, official = LLMS[args.llm]
    tiny_llm = build_tiny_internlm2(ensure_shapes(), cache_dir() / "tiny_internlm2")
    dtype = getattr(torch, args.llm_dtype)
    model = create_model("blip2_internlm", model_type, llm_path=str(tiny_llm), llm_dtype=args.llm_dtype,
                         max_txt_len=args.max_txt_len, vit_depth=args.vit_depth, vit_precision=args.vit_precision,
                         vit_use_checkpoint=checkpointing == "all", qformer_use_checkpoint=checkpointing == "all")
    swap_in_random_llm(model, {**official, "num_hidden_layers": args.llm_layers}, dtype)
    if checkpointing != "none":  # llm_use_checkpoint acts at build time, on the LLM swapped out above
        checkpoint_blocks(transformer_blocks(model)["llm"])
    return model


def make_batch(args: argparse.Namespace, n: int, device: torch.device, image_size: int) -> dict[str, Any]:
    texts = captions(4 * n)
    if args.captions == "long":  # 4 captions (about 50 tokens) each: cut to max_txt_len
        texts = [" and ".join(texts[4 * i: 4 * i + 4]) for i in range(n)]
    else:
        texts = texts[:n]
    generator = torch.Generator().manual_seed(args.seed)
    image = torch.randn(n, 3, image_size, image_size, generator=generator)
    return {"image": image.to(device), "text_input": texts, "image_id": list(range(n))}


def sequence_length(model: nn.Module, batch: dict[str, Any]) -> int:
    """Tokens per LLM sequence of ``batch``: queries, bos, the answers cut to max_txt_len, padded to the longest."""
    n = len(batch["text_input"])
    queries = torch.zeros(n, model.cfg.qformer.num_query_token, model.llm_proj.out_features,
                          dtype=model.llm_model.dtype, device=batch["image"].device)
    with torch.no_grad():
        inputs, _, _ = model.build_inputs(queries, model.prompts(batch, n), batch["text_input"])
    return inputs.shape[1]


def fix_mmap_threshold(kib: int) -> None:
    """glibc: serve every allocation over ``kib`` KiB by its own mmap, unmapped when freed (``mallopt``).
    By default glibc raises that threshold as blocks are freed (up to 32 MiB), and later tensors below it
    come from heaps that keep freed memory: peak RSS then depends on allocation history (+480 MB of 7.8 GB
    between two runs allocating the same tensors, one of which also ran the matrix products' kernels,
    whose small internal buffers shift the heaps). With a fixed threshold RSS follows the live tensors, as
    the CUDA allocator's ``max_memory_allocated`` does (the same two runs: 7,768 and 7,785 MB)."""
    M_MMAP_THRESHOLD = -3
    if kib and not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, kib * 1024):
        raise RuntimeError(f"mallopt(M_MMAP_THRESHOLD, {kib} KiB) failed; pass --mmap-threshold-kib 0")


def local_bytes(tensors) -> int:
    """Bytes this process holds of ``tensors`` (its shard of an FSDP DTensor)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


# -------------------------------------------------------------------------------------- measuring
def train_step(strategy: Strategy, optim: OptimWrapper, batch: dict[str, Any], skip_matmuls: bool) -> float:
    """One step as ``Runner._train_step`` takes it (no accumulation); returns the loss."""
    with SkipMatmuls() if skip_matmuls else contextlib.nullcontext():
        with strategy.sync_gradients(True):
            with optim.autocast():
                loss = strategy.train_module(batch)["loss"]
            optim.backward(loss)
        optim.step(0)
    return float(loss.detach())


def measure(args: argparse.Namespace, strategy_name: str, checkpointing: str, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = build_model(args, checkpointing, device)
    batch = make_batch(args, args.batch_size, device, model.cfg.img_size)
    tokens = sequence_length(model, batch)
    amp_dtype = torch.bfloat16 if args.amp == "bfloat16" else None
    # as Runner.from_config: the strategy before the optimizer
    strategy = STRATEGIES.get(strategy_name)(model, device, amp_dtype)
    model.train()
    run = RunConfig()
    schedule = LR_SCHEDULERS.get("constant_lr")(init_lr=1e-5, min_lr=0.0, warmup_lr=0.0, warmup_steps=0,
                                                total_steps=1, steps_per_epoch=1, decay_rate=1.0)
    optim = OptimWrapper(build_adamw(model, run.weight_decay, run.beta2, run.fused_adamw, device), schedule,
                         run.accum_grad_iters, run.max_grad_norm, amp_dtype, device.type)
    build_s = time.perf_counter() - start

    skip = args.matmuls == "skip"
    if args.warmup_batch_size:
        train_step(strategy, optim, {k: v[: args.warmup_batch_size] for k, v in batch.items()}, skip)
    release_memory(device)
    sync(device)
    before_mb = current_memory_mb(device)
    reset_peak(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(strategy, optim, batch, skip)
    sync(device)
    step_s = (time.perf_counter() - start) / args.steps
    peak_mb, scope = peak_memory_mb(device)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    vit_blocks = transformer_blocks(model)["vision"]
    result = {
        "rank": dist.get_rank(), "strategy": strategy_name, "checkpointing": checkpointing, "llm": args.llm,
        "llm_layers": args.llm_layers, "vit_depth": args.vit_depth, "batch_size": args.batch_size,
        "tokens_per_sequence": tokens, "matmuls": args.matmuls, "llm_dtype": args.llm_dtype,
        "vit_precision": args.vit_precision, "amp": args.amp, "loss": loss, "step_s": step_s, "build_s": build_s,
        "weights_mb": local_bytes(params) / MB, "trainable_mb": local_bytes(trainable) / MB,
        "adamw_state_mb": local_bytes(t for s in optim.optimizer.state.values() for t in s.values()
                                      if torch.is_tensor(t) and t.ndim > 0) / MB,
        "vit_block_bytes": local_bytes(vit_blocks[0].parameters()) if vit_blocks else 0,
        "memory_before_steps_mb": before_mb, "peak_mb": peak_mb, "peak_scope": scope,
    }
    if device.type == "cuda":
        result["peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / MB
    del strategy, optim, model, batch
    release_memory(device)
    dist.barrier()
    return result


COLUMNS = [("llm", "LLM"), ("llm_layers", "LLM layers"), ("vit_depth", "ViT blocks"), ("strategy", "strategy"),
           ("checkpointing", "checkpointing"), ("batch_size", "batch"), ("tokens_per_sequence", "tokens"),
           ("weights_mb", "weights MB"), ("trainable_mb", "trainable MB"), ("adamw_state_mb", "AdamW state MB"),
           ("memory_before_steps_mb", "before step MB"), ("peak_mb", "peak MB"), ("peak_reserved_mb", "reserved MB"),
           ("step_s", "step s")]


# ---------------------------------------------------------------------------------------- scaling
def vit_block_mb(runs: list[dict[str, Any]], strategy: str) -> tuple[float, str]:
    """MB per ViT block under ``strategy``: the peak's slope between runs that differ in ViT depth only
    (any LLM and checkpointing: the frozen encoder keeps nothing for backward, so a block costs its
    weights whatever the rest); else this process's weight bytes of one block."""
    slopes = []
    for r in runs:
        for q in runs:
            same = all(r[k] == q[k] for k in ("llm", "strategy", "checkpointing", "llm_layers", "batch_size"))
            if same and r["strategy"] == strategy and q["vit_depth"] > r["vit_depth"]:
                slopes.append((q["peak_mb"] - r["peak_mb"]) / (q["vit_depth"] - r["vit_depth"]))
    if slopes:
        return sum(slopes) / len(slopes), f"measured ({len(slopes)} pair(s))"
    return next(r["vit_block_bytes"] for r in runs if r["strategy"] == strategy) / MB, "weight bytes"


def scale(files: list[Path]) -> list[dict[str, Any]]:
    """Full-depth peaks per LLM, strategy and checkpointing from the runs in ``files`` (each the larger rank's
    peak): ``peak = a + b * llm_layers + c * vit_depth``, ``c`` from ``vit_block_mb``, ``a`` and ``b`` by least
    squares over the runs at two or more LLM depths, evaluated at the LLM's layers and 39 ViT blocks."""
    runs = [r for f in files for r in json.loads(f.read_text())["summary"]]
    rows = []
    for key in sorted({(r["llm"], r["strategy"], r["checkpointing"]) for r in runs}):
        group = [r for r in runs if (r["llm"], r["strategy"], r["checkpointing"]) == key]
        if len({r["llm_layers"] for r in group}) < 2:
            print(f"{key}: runs at one LLM depth only ({group[0]['llm_layers']}); not scaled")
            continue
        c, c_from = vit_block_mb(runs, key[1])
        layers = torch.tensor([float(r["llm_layers"]) for r in group], dtype=torch.float64)
        peaks = torch.tensor([r["peak_mb"] - c * r["vit_depth"] for r in group], dtype=torch.float64)
        design = torch.stack([torch.ones_like(layers), layers], 1)
        a, b = torch.linalg.lstsq(design, peaks[:, None]).solution[:, 0].tolist()
        full = LLMS[key[0]][1]["num_hidden_layers"]
        rows.append({"llm": key[0], "strategy": key[1], "checkpointing": key[2],
                     "measured": ", ".join(f"{r['llm_layers']}L/{r['vit_depth']}V {r['peak_mb'] / 1024:.2f}"
                                           for r in sorted(group, key=lambda r: (r["llm_layers"], r["vit_depth"]))),
                     "base_gb": a / 1024, "per_llm_layer_mb": b, "per_vit_block_mb": c, "per_vit_block_from": c_from,
                     "llm_layers": full, "full_depth_gb": (a + b * full + c * VIT_DEPTH) / 1024})
        rows[-1]["fits_gb"] = ", ".join(str(g) for g in GPU_GB if rows[-1]["full_depth_gb"] <= g) or "none"
    return rows


SCALE_COLUMNS = [("llm", "LLM"), ("strategy", "strategy"), ("checkpointing", "checkpointing"),
                 ("measured", "measured peaks GB (LLM layers/ViT blocks)"), ("base_gb", "fit: base GB"),
                 ("per_llm_layer_mb", "MB per LLM layer"), ("per_vit_block_mb", "MB per ViT block"),
                 ("llm_layers", "full LLM layers"), ("full_depth_gb", "full depth GB per process"),
                 ("fits_gb", "fits (GB per GPU)")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", choices=list(LLMS), default="1.8b")
    parser.add_argument("--llm-layers", type=int, default=None, help="decoder layers (default: all)")
    parser.add_argument("--vit-depth", type=int, default=VIT_DEPTH, help="ViT-g blocks (default: all 39)")
    parser.add_argument("--strategy", nargs="+", choices=["ddp", "fsdp"], default=["ddp", "fsdp"])
    parser.add_argument("--checkpointing", nargs="+", choices=["none", "llm", "all"], default=["none", "llm", "all"])
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--max-txt-len", type=int, default=32)
    parser.add_argument("--captions", choices=["long", "shapes"], default="long")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup-batch-size", type=int, default=1, help="0: no warm-up step")
    parser.add_argument("--vit-precision", choices=["fp32", "fp16", "bf16"], default=None,
                        help="default: the config's fp16 on CUDA, bf16 on CPU")
    parser.add_argument("--llm-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--matmuls", choices=["compute", "skip"], default="compute",
                        help="skip: matrix products return zeros of their shape (SkipMatmuls; for slow CPUs)")
    parser.add_argument("--mmap-threshold-kib", type=int, default=128,
                        help="CPU: glibc's fixed mmap threshold (fix_mmap_threshold); 0: glibc's dynamic default")
    parser.add_argument("--amp", choices=["none", "bfloat16"], default=None, help="default: bfloat16 on CUDA")
    parser.add_argument("--scale", type=Path, nargs="+", default=None, help="JSON files to scale to full depth")
    add_run_args(parser)
    args = parser.parse_args(argv)
    if args.scale:
        rows = scale(args.scale)
        print_table(rows, SCALE_COLUMNS)
        write_json(args.json, {"scaled_from": [str(f) for f in args.scale], "rows": rows})
        return {"rows": rows}

    device = dist.init_distributed(device=args.device)
    if dist.is_main_process():  # the tiny LLM (its tokenizer is used) is built once, not by every rank into one folder
        build_tiny_internlm2(ensure_shapes(), cache_dir() / "tiny_internlm2")
    dist.barrier()
    if device.type == "cpu":
        fix_mmap_threshold(args.mmap_threshold_kib)
    set_threads(args.threads)  # torchrun sets OMP_NUM_THREADS=1 unless given
    args.llm_layers = args.llm_layers or LLMS[args.llm][1]["num_hidden_layers"]
    if args.amp is None:
        args.amp = "bfloat16" if device.type == "cuda" else "none"
    if args.vit_precision is None:  # the config's fp16 is emulated, slowly, on CPU
        args.vit_precision = "fp16" if device.type == "cuda" else "bf16"
    runs = []
    for strategy in args.strategy:
        for checkpointing in args.checkpointing:
            runs.extend(dist.all_gather_object(measure(args, strategy, checkpointing, device)))
            if dist.is_main_process():
                last = runs[-dist.get_world_size():]
                print(f"{strategy} / {checkpointing}: peak MB per rank {[round(r['peak_mb']) for r in last]}, "
                      f"step {last[0]['step_s']:.1f} s", flush=True)
    summary = []  # per configuration: the larger rank's peak
    for i in range(0, len(runs), dist.get_world_size()):
        ranks = runs[i: i + dist.get_world_size()]
        summary.append({**max(ranks, key=lambda r: r["peak_mb"]), "peak_mb_per_rank": [r["peak_mb"] for r in ranks]})
    results = {**environment(device), "world_size": dist.get_world_size(),
               "args": {k: [str(x) for x in v] if isinstance(v, list) and v and isinstance(v[0], Path)
                        else str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "process_peak_rss_mb": process_peak_rss_mb(), "runs": runs, "summary": summary}
    if dist.is_main_process():
        print(f"{args.llm}, {dist.get_world_size()} processes, {results['device']}, amp {args.amp}, "
              f"ViT {args.vit_precision}; the larger rank's peak per configuration ({summary[0]['peak_scope']})")
        print_table(summary, COLUMNS)
        write_json(args.json, results)
    dist.destroy_distributed()
    return results


if __name__ == "__main__":
    main()
