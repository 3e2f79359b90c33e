"""The learning demo: the whole BLIP-2 recipe on the embedded shapes data, on CPU, with no network.

    python -m lavis_lite.demo            # or: bash run_scripts/blip2/demo.sh

(a) the tiny InternLM2 stand-in for a pretrained LLM: warm-up on the shapes captions and
question-answer text only (cached under ``$LAVIS_LITE_CACHE/tiny_internlm2``, so a second run skips it);
(b) stage 1 (``projects/blip2/train/pretrain_stage1_shapes.yaml``); (c) stage 2 on captions only, from
stage 1's best checkpoint (``pretrain_stage2_shapes.yaml``); (d) zero-shot VQA on the held-out test split
(``projects/blip2/eval/vqa_shapes_zeroshot.yaml``). Two baselines answer the same questions and are
scored by the same official VQA accuracy: the most frequent training answer of each question type,
and the LLM alone, without the image (``model.text_only=true``). Each step runs as the user would
run it (``python -m lavis_lite.train`` / ``lavis_lite.evaluate``) and logs to its own folder's
``log.jsonl``; the demo writes ``summary.json`` and ``loss_curves.png`` beside them.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from lavis_lite.config import cache_dir
from lavis_lite.data.shapes import ensure_shapes
from lavis_lite.models.llm.tiny import build_tiny_internlm2
from lavis_lite.tasks import vqa_eval

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
STAGE1, STAGE2 = "projects/blip2/train/pretrain_stage1_shapes.yaml", "projects/blip2/train/pretrain_stage2_shapes.yaml"
VQA = "projects/blip2/eval/vqa_shapes_zeroshot.yaml"
SPLIT = "test"  # held out: stage 1 and 2 pick their best checkpoints on val
METRICS = ("agg_metrics", "yes/no", "number", "other")


def run_step(module: str, cfg_path: str, options: list[str]) -> None:
    command = [sys.executable, "-m", module, "--cfg-path", str(ROOT / cfg_path), "--options", *options]
    logger.info("$ %s", " ".join(command))
    subprocess.run(command, check=True, cwd=ROOT)


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def vqa_metrics(output_dir: Path) -> dict[str, float]:
    """The last ``<split>_<metric>`` record of an evaluation's log.jsonl."""
    record = [r for r in read_log(output_dir / "log.jsonl") if f"{SPLIT}_agg_metrics" in r][-1]
    return {m: record[f"{SPLIT}_{m}"] for m in METRICS}


def most_frequent_answer_baseline(annotations_dir: Path) -> dict[str, float]:
    """Answer each test question with the most frequent training answer of its question type."""
    train = json.loads((annotations_dir / "vqa_train_annotations.json").read_text())["annotations"]
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for ann in train:
        counts[ann["question_type"]][ann["multiple_choice_answer"]] += 1
    prior = {qtype: counter.most_common(1)[0][0] for qtype, counter in counts.items()}
    questions = json.loads((annotations_dir / f"vqa_{SPLIT}_questions.json").read_text())
    annotations = json.loads((annotations_dir / f"vqa_{SPLIT}_annotations.json").read_text())
    results = [{"question_id": a["question_id"], "answer": prior[a["question_type"]]}
               for a in annotations["annotations"]]
    return vqa_eval.evaluate_vqa(questions, annotations, results)


def loss_curves(stage_dirs: dict[str, Path], path: Path) -> None:
    """One panel per stage: every ``train_loss*`` key of its log.jsonl against the iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stage_dirs), figsize=(6 * len(stage_dirs), 4))
    for ax, (name, directory) in zip(axes, stage_dirs.items()):
        records = [r for r in read_log(directory / "log.jsonl") if "train_loss" in r]
        for key in sorted({k for r in records for k in r if k.startswith("train_loss")}):
            ax.plot([r["iteration"] for r in records if key in r], [r[key] for r in records if key in r],
                    label=key.removeprefix("train_"))
        ax.set(title=name, xlabel="iteration", ylabel="loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| answers from | overall | yes/no | number | other |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | " + " | ".join(f"{m[k]:.2f}" for k in METRICS) + " |" for name, m in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("output/demo"))
    parser.add_argument("--stage1-epochs", type=int, default=8)
    parser.add_argument("--stage2-epochs", type=int, default=3)
    parser.add_argument("--options", nargs="*", default=[], help="run.* options for every step, e.g. run.num_workers=0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = args.output_dir.resolve()

    shapes = ensure_shapes()  # (a) the data, then the LLM stand-in; both cached
    build_tiny_internlm2(shapes, cache_dir() / "tiny_internlm2")
    stage1, stage2 = out / "stage1", out / "stage2"
    # a rerun moves the previous demo's stage files into <stage>/previous/<time>/ (run.overwrite)
    run_step("lavis_lite.train", STAGE1, [f"run.output_dir={stage1}", f"run.max_epoch={args.stage1_epochs}",
                                          "run.overwrite=true", *args.options])
    checkpoint1, checkpoint2 = stage1 / "checkpoint_best.pth", stage2 / "checkpoint_best.pth"
    run_step("lavis_lite.train", STAGE2, [f"run.output_dir={stage2}", f"run.max_epoch={args.stage2_epochs}",
                                          f"model.pretrained={checkpoint1}", "run.overwrite=true", *args.options])
    evaluation = [f"model.pretrained={checkpoint1}", f"model.finetuned={checkpoint2}", f"run.test_splits=[{SPLIT}]",
                  *args.options]
    run_step("lavis_lite.evaluate", VQA, [f"run.output_dir={out / 'vqa'}", *evaluation])
    run_step("lavis_lite.evaluate", VQA, [f"run.output_dir={out / 'vqa_no_image'}", "model.text_only=true",
                                          *evaluation])

    rows = {
        "BLIP-2 (image + LLM), zero-shot": vqa_metrics(out / "vqa"),
        "most frequent answer per question type": most_frequent_answer_baseline(shapes / "annotations"),
        "LLM alone, no image": vqa_metrics(out / "vqa_no_image"),
    }
    loss_curves({"stage 1": stage1, "stage 2": stage2}, out / "loss_curves.png")
    summary = {"split": SPLIT, "vqa": rows, "stage1_epochs": args.stage1_epochs, "stage2_epochs": args.stage2_epochs}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nZero-shot VQA on the shapes {SPLIT} split (official VQA accuracy):\n{table(rows)}\n"
          f"logs: {stage1 / 'log.jsonl'}, {stage2 / 'log.jsonl'}; curves: {out / 'loss_curves.png'}")
    return summary


if __name__ == "__main__":
    main()
