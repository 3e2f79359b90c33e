"""Zero-shot VQA throughput (questions/s) of the tiny ``blip2_internlm`` model on the shapes val questions,
through ``model.predict_answers`` as the ``vqa`` task calls it.

    python bench/bench_vqa.py                        # all 754 val questions, 3 modes, ~40 s on 2 cores
    python bench/bench_vqa.py --modes beam3 --batch-size 16 --json bench/results/vqa_beam3_b16.json

Model: ``create_model("blip2_internlm", "tiny")``: random tiny ViT and Q-Former, the warmed tiny
InternLM2 from ``$LAVIS_LITE_CACHE/tiny_internlm2`` (built if missing), float32. Answers are
meaningless (nothing is trained); this measures speed. Images are decoded and processed
(``blip_image_eval``, 64 px) and questions cleaned (``blip_question``) before timing, so the numbers
are the model's. Modes: ``beam3`` (generate, 3 beams, as run_scripts/blip2/eval/vqa_shapes_zeroshot.sh),
``greedy`` (generate, 1 beam), ``rank`` (the 35 distinct training answers as the answer list).
The prompt is the task's default ``Question: {} Short answer:``, max 10 new tokens, min 1.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from common import add_run_args, environment, peak_memory_mb, print_table, reset_peak, setup_run, sync, write_json
from lavis_lite.config import cache_dir
from lavis_lite.data.processors import build_processor
from lavis_lite.data.shapes import ensure_shapes
from lavis_lite.models import create_model
from lavis_lite.models.llm.tiny import build_tiny_internlm2

MODES = {
    "beam3": {"inference_method": "generate", "num_beams": 3},
    "greedy": {"inference_method": "generate", "num_beams": 1},
    "rank": {"inference_method": "rank"},
}


def load_questions(shapes: Path, count: int, image_size: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """(images [N, 3, S, S], cleaned questions, answer list) from the shapes val split."""
    records = json.loads((shapes / "annotations" / "vqa_val.json").read_text())[:count]
    vis = build_processor({"name": "blip_image_eval", "image_size": image_size})
    question = build_processor({"name": "blip_question"})
    cache: dict[str, torch.Tensor] = {}
    for record in records:
        if record["image"] not in cache:
            with Image.open(shapes / record["image"]) as image:
                cache[record["image"]] = vis(image.convert("RGB"))
    train = json.loads((shapes / "annotations" / "vqa_train.json").read_text())
    answer_list = sorted({answer for record in train for answer in record["answer"]})
    return (torch.stack([cache[r["image"]] for r in records]), [question(r["question"]) for r in records],
            answer_list)


def bench(model: Any, images: torch.Tensor, questions: list[str], answer_list: list[str], mode: str,
          args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    kwargs = {**MODES[mode], "max_new_tokens": 10, "min_new_tokens": 1, "answer_list": answer_list}
    batches = [(images[i: i + args.batch_size].to(device), questions[i: i + args.batch_size])
               for i in range(0, len(questions), args.batch_size)]
    model.predict_answers({"image": batches[0][0], "text_input": batches[0][1]}, **kwargs)  # warm-up
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    answers = []
    for image, text in batches:
        answers += model.predict_answers({"image": image, "text_input": text}, **kwargs)
    sync(device)
    elapsed = time.perf_counter() - start
    return {"mode": mode, **MODES[mode], "questions": len(questions), "batch_size": args.batch_size,
            "questions_per_s": len(questions) / elapsed, "s_per_batch": elapsed / len(batches),
            "peak_memory_mb": peak_memory_mb(device)[0], "distinct_answers": len(set(answers)),
            "example_answers": answers[:3]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=754, help="the first N val questions (754: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    add_run_args(parser)
    args = parser.parse_args(argv)
    device = setup_run(args)
    torch.manual_seed(args.seed)
    shapes = ensure_shapes()
    build_tiny_internlm2(shapes, cache_dir() / "tiny_internlm2")
    model = create_model("blip2_internlm", "tiny").to(device).eval()
    images, questions, answer_list = load_questions(shapes, args.questions, model.cfg.img_size)
    results: dict[str, Any] = {**environment(device), "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "answer_list_size": len(answer_list),
        "runs": [bench(model, images, questions, answer_list, mode, args, device) for mode in args.modes]}
    print(f"tiny blip2_internlm, {len(questions)} shapes val questions, batch {args.batch_size}, {results['device']}")
    print_table(results["runs"], [("mode", "mode"), ("questions_per_s", "questions/s"), ("s_per_batch", "s/batch"),
                                  ("peak_memory_mb", "peak MB"), ("distinct_answers", "distinct answers")])
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
