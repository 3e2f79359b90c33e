"""Tasks own evaluation: a per-batch ``valid_step`` producing per-sample results, gathered from
every rank in memory, then ``aggregate`` into metrics. Training steps are ``model(batch)``."""
from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader

from lavis_lite import dist
from lavis_lite.registry import TASKS

logger = logging.getLogger(__name__)


class BaseTask:
    """Parent of every task. ``config_class``: dataclass of the task's keys under ``run:``
    (None when it takes none)."""

    config_class: ClassVar[type | None] = None
    id_key: ClassVar[str] = "id"  # per-sample result key that must be unique across ranks

    def __init__(self, cfg: Any = None):
        self.cfg = cfg

    @classmethod
    def metric_names(cls, cfg: Any) -> set[str] | None:
        """The metrics ``evaluation`` reports with config ``cfg`` (None: known only after evaluating);
        ``run.best_metric`` is checked against them before training."""
        return None

    def check_ready(self) -> None:
        """Raise ConfigError when evaluation could not run here (e.g. a missing program); called before
        training, so a run does not fail at its first validation."""

    def train_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return model(batch)

    def valid_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> list[dict[str, Any]]:
        return model.predict(batch)

    @torch.no_grad()
    def evaluation(self, model: torch.nn.Module, loader: DataLoader, split: str, output_dir: str | None = None) -> dict:
        """Run ``valid_step`` on this rank's share, gather every rank's results, aggregate."""
        local: list[dict[str, Any]] = []
        for batch in loader:
            local.extend(self.valid_step(model, batch))
        results = [r for part in dist.all_gather_object(local) for r in part]
        ids = [r[self.id_key] for r in results]
        if len(set(ids)) != len(ids):
            raise RuntimeError(f"evaluation on {split}: some {self.id_key}s were produced twice across ranks")
        metrics = self.aggregate(results, split, loader.dataset, output_dir)
        logger.info("%s: %s", split, metrics)
        return metrics

    def aggregate(self, results: list[dict[str, Any]], split: str, dataset: Any, output_dir: str | None) -> dict:
        """Mean of each numeric result field; ``agg_metrics`` is the mean ``score``."""
        keys = [k for k, v in results[0].items() if isinstance(v, (int, float)) and k != self.id_key]
        metrics = {k: sum(r[k] for r in results) / len(results) for k in keys}
        metrics["agg_metrics"] = metrics.get("score", 0.0)
        metrics["num_samples"] = len(results)
        return metrics


@TASKS.register("image_text_pretrain")
class ImageTextPretrainTask(BaseTask):
    """Pre-training (stage 1 and 2): losses from the model; evaluation is the model's ``predict``."""
