"""Train: ``python -m lavis_lite.train --cfg-path projects/.../x.yaml [--options key=value ...]``.

Runs unchanged as one process or under ``torchrun --nproc_per_node=N`` (multi-node too).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from lavis_lite import dist
from lavis_lite.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="lavis_lite train / evaluate")
    parser.add_argument("--cfg-path", required=True, help="project yaml")
    parser.add_argument("--options", nargs="+", default=[], help="overrides, e.g. run.init_lr=1e-4")
    parser.add_argument("--imports", nargs="+", default=[], help="modules that register models, backbones, ...")
    return parser.parse_args(argv)


def build_runner(argv: list[str] | None, evaluate: bool):
    import lavis_lite.models  # noqa: F401  (registers models)
    import lavis_lite.runner  # noqa: F401  (registers runners and LR schedules)
    import lavis_lite.tasks  # noqa: F401  (registers tasks)
    from lavis_lite.registry import RUNNERS

    args = parse_args(argv)
    for module in args.imports:
        importlib.import_module(module)
    options = list(args.options) + (["run.evaluate=true"] if evaluate else [])
    cfg, sources = load_config(args.cfg_path, options)
    runner_name = cfg.run.get("runner", "runner_base")
    return RUNNERS.get(runner_name).from_config(cfg, sources)


def main(argv: list[str] | None = None) -> None:
    from lavis_lite.runner.runner import NonFiniteError

    try:
        runner = build_runner(argv, evaluate=False)
    except (ConfigError, FileNotFoundError, KeyError) as err:
        sys.exit(f"error: {err}")
    try:
        runner.train()
    except (ConfigError, NonFiniteError) as err:  # found late (a metric, a diverging run): still one line
        sys.exit(f"error: {err}")
    finally:
        dist.destroy_distributed()


if __name__ == "__main__":
    main()
