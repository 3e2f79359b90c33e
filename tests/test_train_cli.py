"""The real entry points: `python -m lavis_lite.train` in one process and under torchrun (2 gloo
processes), on the embedded shapes data."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The bow_tagger project with deterministic training images (no random crop), so a 2-process
    run can be compared with a 1-process run."""
    tmp = tmp_path_factory.mktemp("cli")
    cfg = yaml.safe_load((ROOT / "projects/bow_tagger/train_shapes.yaml").read_text())
    cfg["datasets"]["shapes_caption"]["vis_processor"]["train"] = {"name": "blip_image_eval", "image_size": 64}
    cfg["datasets"]["shapes_caption"]["generator"] = {"train": 16, "val": 8, "test": 8}
    path = tmp / "project.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp


def train(project, out, options=(), nproc=1, check=True):
    path, tmp = project
    env = {**os.environ, "LAVIS_LITE_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "lavis_lite.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "lavis_lite.train"]
    args = ["--cfg-path", str(path), "--options", f"run.output_dir={out}", "run.progress_bar=false",
            "run.warmup_steps=2", *options]
    return subprocess.run(launcher + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=check)


def final_weights(out):
    last = max(Path(out).glob("checkpoint_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    return torch.load(last, weights_only=True)["model"]


def test_torchrun_two_processes_equal_one_process(project, tmp_path):
    one = train(project, tmp_path / "one", ["run.batch_size_train=8"])
    assert (tmp_path / "one" / "log.jsonl").is_file() and (tmp_path / "one" / "config.yaml").is_file()
    two = train(project, tmp_path / "two", ["run.batch_size_train=4"], nproc=2)
    assert "world_size=2" in two.stdout + two.stderr
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert sorted(p.name for p in (tmp_path / "one").glob("checkpoint_*.pth")) == [
        "checkpoint_10.pth", "checkpoint_20.pth"]  # 80 captions / 8 per step, 2 epochs
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)


def test_cli_reports_config_errors_with_key(project, tmp_path):
    result = train(project, tmp_path / "bad", ["run.init_lrr=0.1"], check=False)
    assert result.returncode != 0
    assert "run.init_lrr (set in --options)" in result.stderr
