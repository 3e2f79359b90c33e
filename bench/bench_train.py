"""Training-step throughput and peak memory of stage 1 and stage 2 on synthetic images.

    python bench/bench_train.py --size tiny --steps 10 --json bench/out.json

Random weights, random 3-channel images, fixed captions; one process. Reports samples/s over the
timed steps (after warm-up steps), peak memory (CUDA: max allocated; CPU: process max RSS), and for
stage 2 the number of LLM parameters holding gradients or optimizer state (must be 0: frozen).
Sizes: ``tiny`` (the CPU test models). Real sizes (ViT-g + BERT-base Q-Former + InternLM2-1.8B)
need a GPU and are not wired in yet.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lavis_lite.config import cache_dir  # noqa: E402
from lavis_lite.data.shapes import ensure_shapes  # noqa: E402
from lavis_lite.models import create_model  # noqa: E402
from lavis_lite.models.llm.tiny import build_tiny_internlm2  # noqa: E402
from lavis_lite.runner.optim import build_adamw  # noqa: E402

CAPTIONS = ["a red circle left of a blue square", "two shapes on a striped background"]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench(model: torch.nn.Module, batch_size: int, image_size: int, steps: int, warmup: int,
          device: torch.device) -> dict:
    model.to(device).train()
    optimizer = build_adamw(model, 0.05, 0.999, True, device)
    batch = {"image": torch.randn(batch_size, 3, image_size, image_size, device=device),
             "text_input": [CAPTIONS[i % 2] for i in range(batch_size)],
             "image_id": list(range(batch_size))}
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = model(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    llm = getattr(model, "llm_model", None)
    frozen_with_state = 0 if llm is None else sum(
        p.numel() for p in llm.parameters() if p.grad is not None or p in optimizer.state)
    return {"samples_per_s": batch_size * steps / elapsed, "step_s": elapsed / steps,
            "peak_memory_mb": peak_memory_mb(device),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "llm_params_with_grad_or_optimizer_state": frozen_with_state}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny"], default="tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    shapes = ensure_shapes()
    results = {}
    stage1 = create_model("blip2", "tiny", tokenizer_path=str(shapes / "bert_vocab"), freeze_vit=False)
    results["stage1"] = bench(stage1, args.batch_size, 64, args.steps, args.warmup, device)
    build_tiny_internlm2(shapes, cache_dir() / "tiny_internlm2")
    stage2 = create_model("blip2_internlm", "tiny")
    results["stage2"] = bench(stage2, args.batch_size, 64, args.steps, args.warmup, device)
    results["device"] = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    results["batch_size"], results["size"] = args.batch_size, args.size
    print(f"{'stage':<8}{'samples/s':>12}{'step s':>10}{'peak MB':>10}{'trainable':>12}{'LLM w/ state':>14}")
    for stage in ("stage1", "stage2"):
        r = results[stage]
        print(f"{stage:<8}{r['samples_per_s']:>12.1f}{r['step_s']:>10.3f}{r['peak_memory_mb']:>10.0f}"
              f"{r['trainable_params']:>12,}{r['llm_params_with_grad_or_optimizer_state']:>14}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
