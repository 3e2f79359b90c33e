"""A/B in one process: the real-size stage-1 step (BERT-base Q-Former, 32 queries, ITC + ITM + ITG,
AdamW, float32) of this checkout against another checkout of lavis_lite, the two taking steps in turn.

Separate runs of each side on a shared or throttled machine vary by 10% and more from run to run; here
every step of one side is next to a step of the other, so both see the same machine, and the ratio of
their medians is the figure to trust. The other checkout is imported under another name
(``lavis_lite_baseline``, from a copy whose imports are rewritten), so both live in one process.

    git worktree add /tmp/base df8601d    # the commit to compare with
    python bench/bench_ab.py --baseline /tmp/base --threads 1 --rounds 4 --json bench/results/ab_stage1.json

Both sides: random weights (seed 0), image features from the frozen-encoder cache after the first
step (``--vit-depth`` blocks of ViT-g in bf16 fill it), the same batch of shapes captions (real caption
lengths) and ``--text-padding`` settings (``max_length``: every text padded to ``max_txt_len`` 32, the
work LAVIS does; ``longest``: dynamic padding). Reports each configuration's process CPU seconds per
step (median and all values) and the ratios.
"""
from __future__ import annotations

import argparse
import importlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench_train import bert_base_vocab, captions, use_text_padding
from common import add_run_args, environment, print_table, setup_run, write_json
from lavis_lite.data.shapes import ensure_shapes

ALIAS = "lavis_lite_baseline"


def import_baseline(checkout: Path, workdir: Path) -> str:
    """Copy ``checkout``'s package and configs to ``workdir`` as ``ALIAS`` (every ``lavis_lite`` name in
    its Python files rewritten) and put it on ``sys.path``; returns the package name."""
    if not (checkout / "lavis_lite" / "__init__.py").is_file():
        raise SystemExit(f"--baseline {checkout}: no lavis_lite package there; give a checkout of the repository")
    root = workdir / "baseline"
    shutil.copytree(checkout / "lavis_lite", root / ALIAS, ignore=shutil.ignore_patterns("__pycache__"))
    if (checkout / "configs").is_dir():
        shutil.copytree(checkout / "configs", root / "configs")
    for path in (root / ALIAS).rglob("*.py"):
        path.write_text(re.sub(r"\blavis_lite\b", ALIAS, path.read_text()))
    sys.path.insert(0, str(root))
    return ALIAS


def build_side(package: str, vocab: str, vit_depth: int, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The real-size stage-1 model of ``package`` with a feature cache, and the runner's AdamW."""
    models = importlib.import_module(f"{package}.models")
    importlib.import_module(f"{package}.models.blip2_qformer").Blip2Base.vit_loaded = True  # random ViT on purpose
    torch.manual_seed(seed)
    model = models.create_model("blip2", "pretrain", tokenizer_path=vocab, vit_depth=vit_depth).train()
    model.image_feature_cache = importlib.import_module(f"{package}.models.feature_cache").ImageFeatureCache(max_gb=64)
    optimizer = importlib.import_module(f"{package}.runner.optim").build_adamw(model, 0.05, 0.999, True,
                                                                                torch.device("cpu"))
    for group in optimizer.param_groups:
        group["lr"] = 1e-5
    return model, optimizer


def commit_of(checkout: Path) -> str | None:
    """The checkout's commit, with "+changes" when its tracked files differ from it (None: not git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD")
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "") if commit else None


def step_cpu_s(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> float:
    start = time.process_time()
    loss = model(batch)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.process_time() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of lavis_lite to compare with")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration first")
    parser.add_argument("--text-padding", nargs="+", default=["max_length", "longest"], choices=["max_length", "longest"])
    parser.add_argument("--vit-depth", type=int, default=1)
    add_run_args(parser)
    args = parser.parse_args(argv)
    device = setup_run(args)
    if device.type != "cpu":
        raise SystemExit("bench_ab.py times process CPU seconds: run it with --device cpu")
    with tempfile.TemporaryDirectory() as tmp:
        baseline = import_baseline(args.baseline.resolve(), Path(tmp))
        vocab = bert_base_vocab(Path(tmp), ensure_shapes())
        sides = {"baseline": build_side(baseline, vocab, args.vit_depth, args.seed),
                 "this": build_side("lavis_lite", vocab, args.vit_depth, args.seed)}
        batch = {"image": torch.randn(args.batch_size, 3, 224, 224), "text_input": captions(args.batch_size),
                 "image_id": list(range(args.batch_size))}
        configs = [(side, padding) for padding in args.text_padding for side in sides]
        times: dict[tuple[str, str], list[float]] = {config: [] for config in configs}
        for step in range(args.warmup + args.rounds):
            for side, padding in configs[step % len(configs):] + configs[:step % len(configs)]:  # rotate the order
                model, optimizer = sides[side]
                use_text_padding(model, padding)
                seconds = step_cpu_s(model, optimizer, batch)
                if step >= args.warmup:
                    times[(side, padding)].append(seconds)
    median = {config: statistics.median(values) for config, values in times.items()}
    rows = [{"side": side, "text_padding": padding, "median_cpu_s": median[(side, padding)],
             "cpu_s": [round(t, 2) for t in times[(side, padding)]],
             "speedup": median[("baseline", padding)] / median[(side, padding)]} for side, padding in configs]
    if {"max_length", "longest"} <= set(args.text_padding):
        rows.append({"side": "this", "text_padding": "longest vs baseline max_length",
                     "median_cpu_s": median[("this", "longest")], "cpu_s": None,
                     "speedup": median[("baseline", "max_length")] / median[("this", "longest")]})
    print_table(rows, [("side", "side"), ("text_padding", "text padding"), ("median_cpu_s", "CPU s/step (median)"),
                       ("cpu_s", "CPU s per step"), ("speedup", "gain over baseline")])
    result = {**environment(device), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "baseline_commit": commit_of(args.baseline), "this_commit": commit_of(Path(__file__).parent), "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
