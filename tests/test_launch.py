"""run_scripts/launch.sh: one process on one node runs the module directly, so a config error is
the last line printed, not buried under torchrun's ChildFailedError."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_one_process_prints_the_config_error_without_torchrun(tmp_path):
    env = {**os.environ, "NPROC": "1", "LAVIS_LITE_CACHE": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(ROOT / "run_scripts/blip2/eval/vqa_shapes_zeroshot.sh"), "run.max_epochs=1"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.strip().splitlines()[-1].startswith("error: ") and "run.max_epochs" in output, output[-3000:]
    assert "ChildFailedError" not in output and "torch.distributed.run" not in output and "Traceback" not in output
    assert not (tmp_path / "cache").exists()  # failed before any data was generated
