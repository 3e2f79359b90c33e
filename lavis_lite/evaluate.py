"""Evaluate: ``python -m lavis_lite.evaluate --cfg-path projects/.../x.yaml [--options ...]``.

Evaluates ``run.test_splits`` (or ``run.valid_splits`` when none) with the model as configured
(``model.pretrained`` / ``model.finetuned``); one process or torchrun.
"""
from __future__ import annotations

import json
import sys

from lavis_lite import dist
from lavis_lite.config import ConfigError
from lavis_lite.train import build_runner


def main(argv: list[str] | None = None) -> None:
    try:
        runner = build_runner(argv, evaluate=True)
    except (ConfigError, FileNotFoundError, KeyError) as err:
        sys.exit(f"error: {err}")
    try:
        metrics = runner.evaluate(runner.cfg.test_splits or runner.cfg.valid_splits)
        if dist.is_main_process():
            print(json.dumps(metrics, indent=2))
    except ConfigError as err:
        sys.exit(f"error: {err}")
    finally:
        dist.destroy_distributed()


if __name__ == "__main__":
    main()
