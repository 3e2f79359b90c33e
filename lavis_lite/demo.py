"""The learning demo: the whole BLIP-2 recipe on the embedded shapes data, on CPU, with no network.

    python -m lavis_lite.demo            # or: bash run_scripts/blip2/demo.sh

(a) the tiny InternLM2 stand-in for a pretrained LLM: warm-up on the shapes captions and
question-answer text only (cached under ``$LAVIS_LITE_CACHE/tiny_internlm2``, so a second run skips it);
(b) stage 1 (``projects/blip2/train/pretrain_stage1_shapes.yaml``); (c) stage 2 on captions only, from
stage 1's best checkpoint (``pretrain_stage2_shapes.yaml``); (d) zero-shot VQA on the held-out test split
(``projects/blip2/eval/vqa_shapes_zeroshot.yaml``). Two baselines answer the same questions and are
scored by the same official VQA accuracy: the most frequent training answer of each question type,
and the LLM alone, without the image (``model.text_only=true``). (e) Chinese stage 2 from the same
stage-1 checkpoint (``caption_cn_stage2_shapes.yaml``); both caption models then caption the test
images, next to the LLM alone given the same prompt (English CIDEr, Chinese CIDEr at character and
jieba word level). Each step runs as the user would run it (``python -m lavis_lite.train`` /
``lavis_lite.evaluate``) and logs to its own folder's ``log.jsonl``; the demo writes ``summary.json``
and ``loss_curves.png`` beside them.
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
STAGE2_ZH = "projects/blip2/train/caption_cn_stage2_shapes.yaml"
VQA = "projects/blip2/eval/vqa_shapes_zeroshot.yaml"
SPLIT = "test"  # held out: stage 1 and 2 pick their best checkpoints on val
METRICS = ("agg_metrics", "yes/no", "number", "other")
CAPTION_METRICS = {"en": ("CIDEr", "Bleu_4"), "zh": ("CIDEr_char", "CIDEr_jieba", "Bleu_4_char")}
SAMPLES = 3  # test images whose captions the summary shows


def run_step(module: str, cfg_path: str, options: list[str]) -> None:
    command = [sys.executable, "-m", module, "--cfg-path", str(ROOT / cfg_path), "--options", *options]
    logger.info("$ %s", " ".join(command))
    subprocess.run(command, check=True, cwd=ROOT)


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def split_metrics(output_dir: Path, keys: tuple[str, ...]) -> dict[str, float]:
    """``keys`` of the last ``<split>_<metric>`` record of an evaluation's log.jsonl."""
    record = [r for r in read_log(output_dir / "log.jsonl") if f"{SPLIT}_{keys[0]}" in r][-1]
    return {k: record[f"{SPLIT}_{k}"] for k in keys}


def caption_samples(model_dir: Path, no_image_dir: Path, gt_path: Path) -> list[dict[str, str]]:
    """The first ``SAMPLES`` test images: a reference caption, the model's, the LLM alone's."""
    name = f"result/{SPLIT}_caption_result.json"
    model = {r["image_id"]: r["caption"] for r in json.loads((model_dir / name).read_text())}
    alone = {r["image_id"]: r["caption"] for r in json.loads((no_image_dir / name).read_text())}
    references = {}
    for ann in json.loads(gt_path.read_text())["annotations"]:
        references.setdefault(ann["image_id"], ann["caption"])
    return [{"image_id": i, "reference": references[i], "model": model[i], "no_image": alone[i]}
            for i in list(model)[:SAMPLES]]


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


def table(first: str, rows: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per entry of ``rows``, one column per metric."""
    keys = list(next(iter(rows.values())))
    lines = [f"| {first} | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{m[k]:.2f}" for k in keys) + " |" for name, m in rows.items()]
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
    stage2_zh = out / "stage2_zh"  # (e) Chinese captioning, then both languages on the test images
    run_step("lavis_lite.train", STAGE2_ZH, [f"run.output_dir={stage2_zh}", f"run.max_epoch={args.stage2_epochs}",
                                             f"model.pretrained={checkpoint1}", "run.overwrite=true", *args.options])
    captions = {}
    for language, cfg_path, trained in (("en", STAGE2, stage2), ("zh", STAGE2_ZH, stage2_zh)):
        common = [f"model.pretrained={checkpoint1}", f"model.finetuned={trained / 'checkpoint_best.pth'}",
                  f"run.test_splits=[{SPLIT}]", *args.options]
        folders = {"model": out / f"caption_{language}", "no_image": out / f"caption_{language}_no_image"}
        run_step("lavis_lite.evaluate", cfg_path, [f"run.output_dir={folders['model']}", *common])
        run_step("lavis_lite.evaluate", cfg_path, [f"run.output_dir={folders['no_image']}", "model.text_only=true",
                                                   *common])
        gt = "caption_test_gt.json" if language == "en" else "caption_cn_test_gt.json"
        captions[language] = {
            "scores": {"BLIP-2 (image + LLM)": split_metrics(folders["model"], CAPTION_METRICS[language]),
                       "LLM alone, no image": split_metrics(folders["no_image"], CAPTION_METRICS[language])},
            "samples": caption_samples(folders["model"], folders["no_image"], shapes / "annotations" / gt),
        }

    rows = {
        "BLIP-2 (image + LLM), zero-shot": split_metrics(out / "vqa", METRICS),
        "most frequent answer per question type": most_frequent_answer_baseline(shapes / "annotations"),
        "LLM alone, no image": split_metrics(out / "vqa_no_image", METRICS),
    }
    loss_curves({"stage 1": stage1, "stage 2": stage2, "stage 2, Chinese": stage2_zh}, out / "loss_curves.png")
    summary = {"split": SPLIT, "vqa": rows, "captions": captions, "stage1_epochs": args.stage1_epochs,
               "stage2_epochs": args.stage2_epochs}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    report = [f"\nZero-shot VQA on the shapes {SPLIT} split (official VQA accuracy):\n{table('answers from', rows)}"]
    for language, title in (("en", "English"), ("zh", "Chinese")):
        report.append(f"\n{title} captions of the {SPLIT} images:\n{table('captions from', captions[language]['scores'])}")
        report += [f"  {s['image_id']}: model: {s['model']!r} | no image: {s['no_image']!r} | a reference: "
                   f"{s['reference']!r}" for s in captions[language]["samples"]]
    report.append(f"\nlogs: {stage1 / 'log.jsonl'}, {stage2 / 'log.jsonl'}, {stage2_zh / 'log.jsonl'}; "
                  f"curves: {out / 'loss_curves.png'}")
    print("\n".join(report))
    return summary

if __name__ == "__main__":
    main()
