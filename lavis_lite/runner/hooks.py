"""Hooks: code that watches the loop. Five points; add one only when a real feature needs it."""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lavis_lite import dist

if TYPE_CHECKING:
    from lavis_lite.runner.runner import Runner

logger = logging.getLogger(__name__)


class Hook:
    def before_train(self, runner: "Runner") -> None: ...

    def after_step(self, runner: "Runner", iteration: int, outputs: dict[str, float]) -> None: ...

    def after_eval(self, runner: "Runner", split: str, metrics: dict[str, Any]) -> None: ...

    def before_save(self, runner: "Runner", state: dict[str, Any]) -> None: ...

    def after_train(self, runner: "Runner") -> None: ...


class JsonLogHook(Hook):
    """Appends JSON lines to ``<output_dir>/log.jsonl`` on rank 0: every ``log_freq`` iterations the
    mean of each logged scalar since the last line (``train_loss``, ``train_loss_itc``, ``train_lr``,
    ...), and each evaluation's metrics (``val_agg_metrics``, ...)."""

    def __init__(self, output_dir: str | Path, log_freq: int):
        self.path = Path(output_dir) / "log.jsonl"
        self.log_freq = log_freq
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)  # a skipped (inf/nan) step logs its lr only
        self.count = 0
        self.start = time.perf_counter()

    def after_step(self, runner: "Runner", iteration: int, outputs: dict[str, float]) -> None:
        for key, value in outputs.items():
            self.sums[key] += value
            self.counts[key] += 1
        self.count += 1
        if (iteration + 1) % self.log_freq == 0 or iteration + 1 == runner.total_iters:
            elapsed = time.perf_counter() - self.start
            record = {"iteration": iteration + 1, "epoch": runner.epoch}
            record.update({f"train_{k}": v / self.counts[k] for k, v in self.sums.items()})
            record["samples_per_s"] = self.count * runner.global_batch_size / max(elapsed, 1e-9)
            if runner.nonfinite_steps:
                record["nonfinite_steps"] = runner.nonfinite_steps  # skipped so far in this run
            self._write(record)
            self.sums.clear()
            self.counts.clear()
            self.count = 0
            self.start = time.perf_counter()

    def after_eval(self, runner: "Runner", split: str, metrics: dict[str, Any]) -> None:
        record = {"iteration": runner.iteration, "epoch": runner.epoch}
        record.update({f"{split}_{k}": v for k, v in metrics.items()})
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, record)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    if dist.is_main_process():
        with path.open("a") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


class CaptionSamplesHook(Hook):
    """Every ``every_n_steps`` iterations rank 0 captions a fixed handful of images and logs them
    (and a ``{"iteration", "samples"}`` line in log.jsonl), to show what the model says while it trains."""

    def __init__(self, output_dir: str | Path, batch: dict[str, Any], every_n_steps: int):
        self.path = Path(output_dir) / "log.jsonl"
        self.batch, self.every_n_steps = batch, every_n_steps

    def after_step(self, runner: "Runner", iteration: int, outputs: dict[str, float]) -> None:
        if (iteration + 1) % self.every_n_steps:
            return
        with runner.strategy.full_weights():  # every rank: FSDP gathers the weights
            if not dist.is_main_process():
                return
            runner.model.eval()
            captions = runner.model.generate(self.batch, num_beams=1, max_new_tokens=30)
            runner.model.train()
        samples = [{"image_id": i, "caption": c} for i, c in zip(self.batch["image_id"], captions)]
        for sample in samples:
            logger.info("iteration %d, %s: %s", iteration + 1, sample["image_id"], sample["caption"])
        append_jsonl(self.path, {"iteration": iteration + 1, "samples": samples})
