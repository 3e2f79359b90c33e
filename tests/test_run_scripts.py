"""The launchers end to end on CPU, as a user runs them: stage 1 on shapes, stage 2 from its
checkpoint, zero-shot VQA on the stage-2 model (shortened epochs, default data)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch checkout-like folder: outputs land in ./output relative to the launch directory."""
    return tmp_path_factory.mktemp("scripts")


def run(script, workdir, *options, nproc=1):
    env = {**os.environ, "LAVIS_LITE_CACHE": str(workdir / "cache"), "NPROC": str(nproc),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(ROOT / script), "run.progress_bar=false", *options], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_stage1_stage2_and_vqa(workdir):
    stage1 = workdir / "output" / "stage1"
    run("run_scripts/blip2/train_stage1.sh", workdir, "run.max_epoch=3", f"run.output_dir={stage1}")
    log = records(stage1 / "log.jsonl")
    train = [r for r in log if "train_loss" in r]
    for key in ("train_loss_itc", "train_loss_itm", "train_loss_lm"):
        assert train[-1][key] < train[0][key], key
    val = [r for r in log if "val_txt_r1" in r][-1]
    chance = 100 * 5 / 1000  # an image's 5 captions among the 1000 val captions
    assert val["val_txt_r1"] > 5 * chance and val["val_img_r1"] > 5 * 100 / 200

    stage2 = workdir / "output" / "stage2"
    run("run_scripts/blip2/train_stage2.sh", workdir, "run.max_epoch=1", f"run.output_dir={stage2}",
        f"model.pretrained={stage1 / 'checkpoint_best.pth'}")
    log = records(stage2 / "log.jsonl")
    train = [r for r in log if "train_loss" in r]
    assert train[-1]["train_loss"] < train[0]["train_loss"]
    samples = [r for r in log if "samples" in r]  # run.sample_captions_every: 50 in the project
    assert [r["iteration"] for r in samples] == [50, 100] and len(samples[0]["samples"]) == 4
    cider = [r["val_CIDEr"] for r in log if "val_CIDEr" in r][-1]
    assert math.isfinite(cider) and cider > 0

    chinese = workdir / "output" / "stage2_cn"
    run("run_scripts/blip2/train_stage2_cn.sh", workdir, "run.max_epoch=1", f"run.output_dir={chinese}",
        f"model.pretrained={stage1 / 'checkpoint_best.pth'}")
    # scored at character level against the Chinese ground truth (how well it learns: README)
    scores = [r for r in records(chinese / "log.jsonl") if "val_CIDEr" in r][-1]
    assert all(math.isfinite(scores[k]) and scores[k] >= 0 for k in ("val_CIDEr", "val_Bleu_4"))
    captions = json.loads((chinese / "result" / "val_caption_result.json").read_text())
    assert len(captions) == 200 and all(c["caption"] for c in captions)

    vqa = workdir / "output" / "vqa"
    run("run_scripts/blip2/eval/vqa_shapes_zeroshot.sh", workdir, f"run.output_dir={vqa}",
        f"model.pretrained={stage1 / 'checkpoint_best.pth'}", f"model.finetuned={stage2 / 'checkpoint_best.pth'}")
    results = json.loads((vqa / "result" / "val_vqa_result.json").read_text())
    questions = json.loads((workdir / "cache/shapes/annotations/vqa_val_questions.json").read_text())["questions"]
    assert sorted(r["question_id"] for r in results) == sorted(q["question_id"] for q in questions)
    metrics = [r for r in records(vqa / "log.jsonl") if "val_agg_metrics" in r][-1]
    assert {"val_yes/no", "val_number", "val_other"} <= set(metrics)

    # the same evaluation on 2 gloo processes: each question exactly once. Batches are composed
    # differently there, and left padding changes float rounding (~1e-6 in the logits), which can flip
    # a beam between near-tied answers of this barely trained model: allow a few such flips. (With a
    # deterministic model the numbers are equal: tests/tasks/test_vqa.py.)
    vqa2 = workdir / "output" / "vqa2"
    run("run_scripts/blip2/eval/vqa_shapes_zeroshot.sh", workdir, f"run.output_dir={vqa2}",
        f"model.pretrained={stage1 / 'checkpoint_best.pth'}", f"model.finetuned={stage2 / 'checkpoint_best.pth'}",
        nproc=2)
    results2 = json.loads((vqa2 / "result" / "val_vqa_result.json").read_text())
    assert [r["question_id"] for r in results2] == [r["question_id"] for r in results]
    same = sum(a["answer"] == b["answer"] for a, b in zip(results, results2))
    assert same >= 0.98 * len(results)
    metrics2 = [r for r in records(vqa2 / "log.jsonl") if "val_agg_metrics" in r][-1]
    assert abs(metrics2["val_agg_metrics"] - metrics["val_agg_metrics"]) <= 100 * (len(results) - same) / len(results)
