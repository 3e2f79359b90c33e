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


def test_torchrun_fsdp_equals_one_process(project, tmp_path):
    """run.strategy=fsdp through the entry point: ranks start from rank 0's weights (each rank seeds
    differently), the strategy is built before the optimizer, checkpoints hold full tensors."""
    one = train(project, tmp_path / "one", ["run.batch_size_train=8"])
    fsdp = train(project, tmp_path / "fsdp", ["run.batch_size_train=4", "run.strategy=fsdp"], nproc=2)
    assert "run.strategy=fsdp: 0 LLM blocks, 0 image-encoder blocks and the rest sharded over 2" in fsdp.stdout + fsdp.stderr
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "fsdp")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)


def test_cli_reports_config_errors_with_key(project, tmp_path):
    result = train(project, tmp_path / "bad", ["run.init_lrr=0.1"], check=False)
    assert result.returncode != 0
    assert "run.init_lrr (set in --options)" in result.stderr


BACKBONE_MODULE = '''
from lavis_lite.models.llm.base import LLMBackbone
from lavis_lite.registry import LLMS


@LLMS.register("my_qwen")
class MyQwen(LLMBackbone):
    """Not shipped: registered by the user's own module."""
    end_of_answer = "."
    default_dtype = "float32"
'''


def test_user_registered_backbone_trains_through_the_cli(tmp_path, tiny_qwen2_dir):
    (tmp_path / "my_backbones.py").write_text(BACKBONE_MODULE)
    tiny = yaml.safe_load((ROOT / "configs/models/blip2_internlm/tiny.yaml").read_text())
    tiny.pop("preprocess")
    model = {**tiny, "arch": "blip2_llm", "llm": "my_qwen", "llm_path": str(tiny_qwen2_dir)}
    project = {
        "model": model,
        "datasets": {"shapes_caption": {
            "generator": {"train": 8, "val": 2, "test": 2},
            "vis_processor": {"train": {"name": "blip_image_eval", "image_size": 64}}}},
        "run": {"task": "image_text_pretrain", "runner": "runner_iter", "max_iters": 2, "iters_per_inner_epoch": 2,
                "batch_size_train": 4, "progress_bar": False, "log_freq": 1, "output_dir": str(tmp_path / "out")},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(project))
    env = {**os.environ, "LAVIS_LITE_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    result = subprocess.run([sys.executable, "-m", "lavis_lite.train", "--imports", "my_backbones",
                             "--cfg-path", str(tmp_path / "p.yaml")], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "out" / "checkpoint_2.pth", weights_only=True)["model"]
    assert "llm_proj.weight" in state and not any(k.startswith("llm_model.") for k in state)
    assert (tmp_path / "out" / "log.jsonl").read_text().count("train_loss") == 2
