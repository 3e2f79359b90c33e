"""Faults that used to lose work, each reproduced: a second run into a used output folder, rotation
of another run's checkpoints, mistakes that only showed at validation, divergence, and run-key
mistakes that reached the loop. Each is now caught early with one line that says what to do."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import lavis_lite  # noqa: F401  (registers everything)
from lavis_lite.config import ConfigError, load_config
from lavis_lite.runner import checkpoint
from lavis_lite.runner.hooks import Hook
from lavis_lite.runner.runner import NonFiniteError, validate
from lavis_lite.tasks.captioning import CaptionConfig, CaptionTask
from tests.runner.toys import ToyCaptions, make_runner

ROOT = Path(__file__).resolve().parents[2]
STAGE1 = ROOT / "projects/blip2/train/pretrain_stage1_shapes.yaml"
STAGE2 = ROOT / "projects/blip2/train/pretrain_stage2_shapes.yaml"


# ------------------------------------------------------------------------------ the CLI, one process
@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The bow_tagger project on 16 generated training images: a few seconds per run."""
    tmp = tmp_path_factory.mktemp("guards")
    cfg = yaml.safe_load((ROOT / "projects/bow_tagger/train_shapes.yaml").read_text())
    cfg["datasets"]["shapes_caption"]["generator"] = {"train": 16, "val": 8, "test": 8}
    path = tmp / "project.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp


def train(project, out, *options, cfg_path=None):
    path, tmp = project
    env = {**os.environ, "LAVIS_LITE_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["--cfg-path", str(cfg_path or path), "--options", f"run.output_dir={out}", "run.progress_bar=false",
            "run.max_epoch=1", *options]
    return subprocess.run([sys.executable, "-m", "lavis_lite.train", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def one_error_line(result) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), result.stderr[-3000:]
    return lines[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_run_into_a_used_folder_refuses_then_overwrite_moves_the_old_run_aside(project, tmp_path):
    out = tmp_path / "run"
    first = train(project, out, "run.amp=true")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "run.amp=true has no effect on cpu" in first.stdout  # said, not silently ignored
    before = snapshot(out)
    assert "checkpoint_2.pth" in before and "summary.json" in before

    error = one_error_line(train(project, out))
    assert f"run.resume_ckpt_path={out / 'checkpoint_2.pth'}" in error and "run.overwrite=true" in error
    assert snapshot(out) == before  # nothing touched: not the log, not config.yaml, not a checkpoint

    again = train(project, out, "run.overwrite=true", "run.seed=7")
    assert again.returncode == 0, again.stderr[-3000:]
    (moved,) = (out / "previous").iterdir()
    assert snapshot(moved) == before  # the old run, whole, byte for byte
    assert "seed: 7" in (out / "config.yaml").read_text()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2]  # this run's lines only


def test_errors_that_showed_only_at_validation_are_caught_before_training(project, tmp_path):
    error = one_error_line(train(project, tmp_path / "a", "run.valid_splits=[vall]"))
    assert "run.valid_splits names split 'vall'" in error and "shapes_caption/val" in error
    assert not (tmp_path / "a" / "log.jsonl").exists()  # no iteration ran

    empty = train(project, tmp_path / "b", "run.test_splits=[test]", "datasets.shapes_caption.generator.test=0")
    assert "run.test_splits: shapes_caption/test has no samples" in one_error_line(empty)
    assert not (tmp_path / "b" / "log.jsonl").exists()


def test_best_metric_typo_is_caught_when_the_config_is_validated():
    cfg, sources = load_config(STAGE2, ["run.best_metric=CIDER"])
    with pytest.raises(ConfigError, match=r"run\.best_metric='CIDER' \(set in --options\) .* did you mean CIDEr"):
        validate(cfg, sources)
    cfg, sources = load_config(STAGE1, ["run.best_metric=txt_r_1"])
    with pytest.raises(ConfigError, match="did you mean txt_r1"):
        validate(cfg, sources)


def test_missing_java_is_reported_before_training(monkeypatch):
    monkeypatch.setattr("lavis_lite.tasks.captioning.shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match="runs Java"):
        CaptionTask(CaptionConfig(language="en")).check_ready()
    CaptionTask(CaptionConfig(language="zh")).check_ready()  # Chinese scoring needs no Java


@pytest.mark.parametrize("option,message", [
    ("run.max_epochs=2", r"run\.max_epochs .* did you mean run\.max_epoch\?"),
    ("run.num_beam=2", r"run\.num_beam .* did you mean run\.num_beams\?"),  # a task key, same message
    ("run.batch_size_train=-4", r"run\.batch_size_train=-4 .*must be >= 1"),
    ("run.num_workers=-1", r"run\.num_workers=-1 .*must be >= 0"),
    ("run.max_iters=100", r"run\.max_iters=100 .*applies to run\.runner=runner_iter only"),
    ("run.init_lr=0", r"run\.init_lr=0\.0 .*must be > 0"),
])
def test_run_key_mistakes_name_the_key_and_the_fix(option, message):
    cfg, sources = load_config(STAGE2, [option])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, sources)


def test_unwritable_output_dir_is_a_config_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    cfg, sources = load_config(STAGE2, [f"run.output_dir={tmp_path / 'a_file' / 'run'}"])
    with pytest.raises(ConfigError, match="run.output_dir=.*a_file.*not writable"):
        validate(cfg, sources)


# ----------------------------------------------------------------------------- the loop, on toys
class NanAt(ToyCaptions):
    """Toy captions whose sample ``index`` has a NaN image: the loss of its batch is NaN."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        if index == self.index:
            sample["image"] = torch.full_like(sample["image"], math.nan)
        return sample


def nan_iteration(runner) -> int:
    """The iteration whose batch holds the NaN sample (the sampler's order is seeded)."""
    runner.train_loader.sampler.set_epoch(0)
    order = list(iter(runner.train_loader.sampler))
    return order.index(runner.train_loader.dataset.index) // runner.cfg.batch_size_train


def test_nonfinite_loss_stops_with_iteration_losses_and_learning_rate(tmp_path):
    runner = make_runner(tmp_path, NanAt(5), max_epoch=1)
    bad = nan_iteration(runner)
    with pytest.raises(NonFiniteError) as err:
        runner.train()
    message = str(err.value)
    assert message.startswith(f"iteration {bad} (epoch 0): the loss is not finite; losses: loss=nan")
    assert f"learning rate {runner.optim.schedule(bad):.3g}" in message
    assert "run.init_lr" in message and "run.max_nonfinite_steps" in message
    assert "float16" not in message and "bfloat16" not in message  # this run uses no half precision


def test_allowed_nonfinite_steps_are_skipped_and_counted_in_the_log(tmp_path):
    runner = make_runner(tmp_path, NanAt(5), max_epoch=1, max_nonfinite_steps=1)
    bad = nan_iteration(runner)
    runner.train()
    assert runner.nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in runner.model.parameters())
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r.get("nonfinite_steps", 0) for r in records] == [0] * bad + [1] * (len(records) - bad)
    assert "train_loss" not in records[bad] and math.isfinite(records[-1]["train_loss"])


def test_nonfinite_gradient_is_caught_before_the_optimizer_step(tmp_path):
    runner = make_runner(tmp_path, max_epoch=1, warmup_steps=0)

    def poison(grad):
        return grad * math.inf

    head = runner.model.head.weight
    before = head.detach().clone()
    handle = head.register_hook(poison)
    with pytest.raises(NonFiniteError, match=r"^iteration 0 \(epoch 0\): the gradient norm is (inf|nan)"):
        runner.train()
    handle.remove()
    assert torch.equal(head.detach(), before)  # the poisoned step was never applied


def test_stage1_divergence_is_reported_not_a_sampling_crash(project, tmp_path):
    result = train(project, tmp_path / "s1", "run.init_lr=1e6", "run.warmup_steps=0", "run.valid_splits=[]",
                   "run.batch_size_train=8", "datasets.shapes_retrieval.generator={train: 32, val: 8, test: 8}",
                   cfg_path=STAGE1)
    error = one_error_line(result)
    assert error.startswith("error: iteration ") and "learning rate " in error and "run.init_lr=1e+06" in error
    assert "probability tensor" not in result.stderr


class Boom(Exception):
    pass


def test_epoch_checkpoint_is_written_before_validation(tmp_path):
    runner = make_runner(tmp_path, max_epoch=1, valid_splits=["val"], eval_data=ToyCaptions(size=4))

    def fail(*args, **kwargs):
        raise Boom("evaluation failed")

    runner.task.evaluation = fail
    with pytest.raises(Boom):
        runner.train()
    assert checkpoint.load(tmp_path / "checkpoint_3.pth")["iteration"] == 3  # the epoch survives


def test_rotation_never_deletes_another_runs_checkpoints(tmp_path):
    foreign = tmp_path / "checkpoint_999.pth"  # e.g. copied here by hand, or an old run's
    foreign.write_bytes(b"not ours")
    runner = make_runner(tmp_path, max_epoch=4, keep_last_k=1)
    runner.train()
    assert foreign.read_bytes() == b"not ours"
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")) == ["checkpoint_12.pth", "checkpoint_999.pth"]
    assert runner.run_checkpoints == ["checkpoint_12.pth"]


def test_resume_keeps_rotating_its_own_checkpoints_marks_the_log_and_summarises(tmp_path):
    class StopAt(Hook):
        def after_step(self, runner, iteration, outputs):
            if iteration == 4:
                raise KeyboardInterrupt

    options = dict(max_epoch=3, keep_last_k=2, valid_splits=["val"], eval_data=ToyCaptions(size=4))
    part = make_runner(tmp_path, **options)
    part.hooks.append(StopAt())
    with pytest.raises(KeyboardInterrupt):
        part.train()
    resumed = make_runner(tmp_path, resume_ckpt_path=str(tmp_path / "checkpoint_3.pth"), **options)
    assert resumed.run_checkpoints == ["checkpoint_3.pth"]
    resumed.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")) == [
        "checkpoint_6.pth", "checkpoint_9.pth", "checkpoint_best.pth"]
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    marks = [i for i, r in enumerate(records) if "resumed_from" in r]
    assert len(marks) == 1 and records[marks[0]]["iteration"] == 3
    after = [r["iteration"] for r in records[marks[0]:] if "train_loss" in r]
    assert after == list(range(4, 10))  # each iteration after the resume point once
    summary = json.loads((tmp_path / "summary.json").read_text())
    evals = [r["val_agg_metrics"] for r in records if "val_agg_metrics" in r]
    assert summary["iterations"] == 9 and summary["best"]["value"] == pytest.approx(max(evals))
    assert summary["final_metrics"]["val"]["agg_metrics"] == pytest.approx(evals[-1])
    assert summary["checkpoints"] == [str(tmp_path / "checkpoint_6.pth"), str(tmp_path / "checkpoint_9.pth")]
