"""Runner: gets built objects, owns the training loop, evaluates through the task, fires hooks.

One loop serves both LAVIS runners: ``runner_base`` trains ``max_epoch`` passes over the data;
``runner_iter`` trains ``max_iters`` iterations in inner epochs of ``iters_per_inner_epoch``
(evaluation and checkpoints at each inner-epoch end), cycling the data as needed.
"""
from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset

from lavis_lite import dist
from lavis_lite.config import ConfigError, RunConfig, Sources, did_you_mean, merge_onto, split_run_config, to_yaml
from lavis_lite.data.builders import build_datasets  # also registers the ${shapes_root:} resolver
from lavis_lite.data.samplers import EvalSampler, TrainSampler, mixing_weights
from lavis_lite.logging import setup_logging
from lavis_lite.registry import DATASETS, LR_SCHEDULERS, MODELS, RUNNERS, STRATEGIES, TASKS
from lavis_lite.runner import checkpoint
from lavis_lite.runner.hooks import CaptionSamplesHook, Hook, JsonLogHook, append_jsonl
from lavis_lite.runner.optim import OptimWrapper, amp_dtype, build_adamw
from lavis_lite.runner.strategy import DDPStrategy, Strategy
from lavis_lite.tasks.base import BaseTask

logger = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """Training met an inf/nan loss or gradient more often than ``run.max_nonfinite_steps`` allows."""


def move_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@RUNNERS.register("runner_iter")
@RUNNERS.register("runner_base")
class Runner:
    def __init__(
        self,
        model: torch.nn.Module,
        task: BaseTask,
        cfg: RunConfig,
        optim: OptimWrapper | None = None,
        train_loader: DataLoader | None = None,
        eval_loaders: dict[str, DataLoader] | None = None,
        hooks: list[Hook] | None = None,
        device: torch.device = torch.device("cpu"),
        config_yaml: str = "",
        strategy: Strategy | None = None,
    ):
        """``strategy``: how ``model`` is spread over the processes, built before ``optim`` (FSDP replaces the
        parameters the optimizer must hold); None: DDP when training, else the bare model."""
        self.model, self.task, self.cfg, self.optim = model, task, cfg, optim
        self.train_loader, self.eval_loaders = train_loader, eval_loaders or {}
        self.device, self.config_yaml = device, config_yaml
        self.output_dir = Path(cfg.output_dir)
        if dist.is_main_process():
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.hooks = hooks if hooks is not None else [JsonLogHook(self.output_dir, cfg.log_freq)]
        if strategy is None:
            if cfg.strategy != "ddp" and train_loader is not None:
                raise ValueError(f"run.strategy={cfg.strategy}: pass Runner(strategy=...) built before the optimizer")
            strategy = DDPStrategy(model, device) if train_loader is not None else Strategy(model, device)
        self.strategy = strategy
        self.iteration = 0  # next training iteration (micro-batch) to run
        self.data_epoch, self.data_position = 0, 0  # passes over the data; batches taken in this pass
        self.best_metric, self.best_iteration = -math.inf, -1
        self.bad_images = 0  # skipped unreadable images this epoch (datasets.<name>.skip_bad_images)
        self.nonfinite_steps = 0  # steps skipped for an inf/nan loss or gradient (run.max_nonfinite_steps)
        self.run_checkpoints: list[str] = []  # checkpoint_<iteration>.pth files this run wrote: rotation's only prey
        self.last_metrics: dict[str, dict] = {}  # the latest evaluation of each split
        if train_loader is not None:
            if cfg.runner == "runner_iter":
                self.iters_per_epoch, self.total_iters = cfg.iters_per_inner_epoch, cfg.max_iters
            else:
                self.iters_per_epoch = len(train_loader)
                self.total_iters = cfg.max_epoch * self.iters_per_epoch
            self.global_batch_size = cfg.batch_size_train * dist.get_world_size()
            self.loader_generator = train_loader.generator
        if cfg.resume_ckpt_path:
            self.resume(cfg.resume_ckpt_path)

    @property
    def epoch(self) -> int:
        return self.iteration // max(getattr(self, "iters_per_epoch", 1), 1)

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        if self.train_loader is None or self.optim is None:
            raise RuntimeError("this runner was built without training data or optimizer (run.evaluate=True?)")
        self._fire("before_train")
        batches = self._batches()
        progress = self._progress_bar()
        self.model.train()
        while self.iteration < self.total_iters:
            epoch_end = min((self.epoch + 1) * self.iters_per_epoch, self.total_iters)
            while self.iteration < epoch_end:
                batch = next(batches)
                self.bad_images += batch.get("bad_images", 0)
                outputs = self._train_step(move_to_device(batch, self.device), epoch_end)
                self._fire("after_step", self.iteration, outputs)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{outputs['loss']:.4f}", lr=f"{outputs['lr']:.2e}")
                self.iteration += 1
                if self.cfg.save_every_n_steps and self.iteration % self.cfg.save_every_n_steps == 0:
                    self.save(f"checkpoint_{self.iteration}.pth", rotate=True)
            self._end_of_epoch()
            cache = getattr(self.model, "image_feature_cache", None)
            if cache is not None:
                logger.info("image feature cache: %s", cache.stats())
        if progress is not None:
            progress.close()
        if self.cfg.test_splits:
            best = self.output_dir / "checkpoint_best.pth"
            if best.is_file():
                self.model.load_state_dict(self.strategy.local_tensors(checkpoint.load(best)["model"]), strict=False)
                logger.info("testing the best checkpoint (iteration %d)", self.best_iteration)
            self.evaluate(self.cfg.test_splits)
        self._fire("after_train")
        self.write_summary()

    def write_summary(self) -> dict[str, Any]:
        """``summary.json`` in the output folder (rank 0): the best metric and its iteration, the last
        metrics of every evaluated split, and where the checkpoints, log and result files are."""
        best = self.output_dir / "checkpoint_best.pth"
        summary = {
            "iterations": self.iteration,
            "best": {"metric": self.cfg.best_metric, "value": self.best_metric, "iteration": self.best_iteration,
                     "checkpoint": str(best)} if best.is_file() else None,
            "final_metrics": self.last_metrics,
            "checkpoints": [str(self.output_dir / n) for n in self.run_checkpoints],
            "log": str(self.output_dir / "log.jsonl"),
            "results": str(self.output_dir / "result") if (self.output_dir / "result").is_dir() else None,
            "nonfinite_steps": self.nonfinite_steps,
        }
        if dist.is_main_process():
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            logger.info("run finished at iteration %d; summary (also in %s):\n%s", self.iteration,
                        self.output_dir / "summary.json", json.dumps(summary, indent=2))
        return summary

    def _train_step(self, batch: dict[str, Any], epoch_end: int) -> dict[str, float]:
        model = self.strategy.train_module
        accum = self.cfg.accum_grad_iters
        sync = (self.iteration + 1) % accum == 0 or self.iteration + 1 == epoch_end
        lr = self.optim.schedule(self.iteration)
        with self.strategy.sync_gradients(sync):
            problem = None
            try:
                with self.optim.autocast():
                    outputs = self.task.train_step(model, batch)
            except FloatingPointError as err:  # model code that met inf/nan first (ITM sampling, LLM logits)
                outputs, problem = {}, str(err)
            logs = {k: float(v.detach()) for k, v in outputs.items() if torch.is_tensor(v) and v.numel() == 1}
            if problem is None and not all(math.isfinite(v) for v in logs.values()):
                problem = "the loss is not finite"
            # every rank skips together, or the others would wait in the gradient all-reduce
            if dist.max_over_ranks(int(problem is not None), self.device):
                return self._skip_nonfinite(problem or "another process met a non-finite loss", logs, lr)
            self.optim.backward(outputs["loss"])
        logs["lr"] = lr
        if sync:
            stats = self.optim.step(self.iteration)
            if stats.pop("skipped", False):
                return self._skip_nonfinite(f"the gradient norm is {stats['grad_norm']}", logs, lr)
            logs.update(stats)
        return logs

    def _skip_nonfinite(self, problem: str, logs: dict[str, float], lr: float) -> dict[str, float]:
        """Report an inf/nan step with everything needed to act on it; skip it (its gradients, and those
        accumulated before it in the same optimizer step, are dropped) or stop past the allowance."""
        self.nonfinite_steps += 1
        self.optim.optimizer.zero_grad(set_to_none=True)
        values = ", ".join(f"{k}={v:.4g}" for k, v in logs.items()) or "none computed"
        message = (f"iteration {self.iteration} (epoch {self.epoch}): {problem}; losses: {values}; learning rate "
                   f"{lr:.3g} (run.init_lr={self.cfg.init_lr:g})")
        if self.nonfinite_steps > self.cfg.max_nonfinite_steps:
            half = ", run.amp_dtype=bfloat16" if self.optim.amp_dtype == torch.float16 else ""
            raise NonFiniteError(f"{message}. The run is diverging: try a lower run.init_lr, run.max_grad_norm=1.0"
                                 f"{half}, or let up to N such steps be skipped with run.max_nonfinite_steps=N (now "
                                 f"{self.cfg.max_nonfinite_steps}; this is step {self.nonfinite_steps})")
        logger.warning("%s; step skipped (%d of run.max_nonfinite_steps=%d)", message, self.nonfinite_steps,
                       self.cfg.max_nonfinite_steps)
        return {"lr": lr}

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Endless batches continuing from (data_epoch, data_position); reseeded every pass."""
        data, batch_size = self.train_loader.dataset, self.cfg.batch_size_train
        while True:
            skip = self.data_position * batch_size
            if isinstance(data, IterableDataset):  # webdataset shards: the data set itself is the sampler
                data.set_epoch(self.data_epoch, skip=skip, batch_size=batch_size)
            else:
                self.train_loader.sampler.set_epoch(self.data_epoch, skip=skip)
            if self.loader_generator is not None:  # seeds the workers' augmentations
                self.loader_generator.manual_seed(self.cfg.seed * 7919 + self.data_epoch * 104_729 + dist.get_rank())
            for batch in self.train_loader:
                self.data_position += 1
                yield batch
            self.data_epoch, self.data_position = self.data_epoch + 1, 0

    def _end_of_epoch(self) -> None:
        finished_epoch = self.epoch - 1
        bad = int(dist.all_reduce_sum(torch.tensor(self.bad_images)))
        if bad:
            logger.warning("epoch %d: skipped %d unreadable images (see the warnings above for their paths)",
                           finished_epoch, bad)
        self.bad_images = 0
        saved = None
        if self.cfg.save_freq_epochs and (finished_epoch + 1) % self.cfg.save_freq_epochs == 0:
            saved = f"checkpoint_{self.iteration}.pth"  # before validating: a late failure loses no epoch
            self.save(saved, rotate=True)
        if self.cfg.valid_splits:
            metrics = self.evaluate(self.cfg.valid_splits)
            first = next(iter(metrics.values()))  # the first validation loader picks the best checkpoint
            if self.cfg.best_metric not in first:
                raise ConfigError(f"run.best_metric={self.cfg.best_metric!r} is not among the metrics {sorted(first)}")
            if first[self.cfg.best_metric] > self.best_metric:
                self.best_metric, self.best_iteration = first[self.cfg.best_metric], self.iteration
                self.save("checkpoint_best.pth", *([saved] if saved else []))  # the epoch's file learns the best too

    def _progress_bar(self):
        if not (self.cfg.progress_bar and dist.is_main_process()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_iters, initial=self.iteration, unit="it", dynamic_ncols=True)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, splits: list[str]) -> dict[str, dict]:
        """Evaluate every configured loader whose name is (or ends with) one of ``splits``."""
        self.model.eval()
        results = {}
        for name, loader in self.eval_loaders.items():
            if name in splits or name.rsplit("/", 1)[-1] in splits:
                with self.strategy.full_weights():
                    results[name] = self.task.evaluation(self.model, loader, name, str(self.output_dir))
                self.last_metrics[name] = results[name]
                self._fire("after_eval", name, results[name])
        missing = [s for s in splits if not any(n == s or n.endswith("/" + s) for n in results)]
        if missing:
            raise ConfigError(f"no evaluation data for split(s) {missing}; the data sets provide "
                              f"{sorted(self.eval_loaders)}")
        self.model.train()
        return results

    # --------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "model": self.strategy.full_tensors(self.model.trainable_state_dict()),  # every rank: FSDP gathers
            "optim": self.strategy.full_tensors(self.optim.state_dict()) if self.optim else None,
            "iteration": self.iteration,
            "data_epoch": self.data_epoch,
            "data_position": self.data_position,
            "best": {"metric": self.best_metric, "iteration": self.best_iteration},
            "run_checkpoints": list(self.run_checkpoints),
            "nonfinite_steps": self.nonfinite_steps,
            "rng": dist.all_gather_object(checkpoint.rng_state()),
            "world_size": dist.get_world_size(),
            "config": self.config_yaml,
        }

    def save(self, *names: str, rotate: bool = False) -> None:
        """Write the state to each of ``names``; ``rotate`` then removes this run's oldest step checkpoints
        beyond ``keep_last_k`` (never a file another run wrote)."""
        for name in names:
            if checkpoint.step_of(name) is not None and name not in self.run_checkpoints:
                self.run_checkpoints.append(name)
        state = self.state()  # every rank: gathers RNG states
        self._fire("before_save", state)
        if dist.is_main_process():
            for name in names:
                checkpoint.save_atomic(state, self.output_dir / name)
            if rotate:
                self.run_checkpoints = checkpoint.rotate(self.output_dir, self.run_checkpoints, self.cfg.keep_last_k)
        dist.barrier()

    def resume(self, path: str | Path) -> None:
        state = checkpoint.load(path)
        expected = self.model.trainable_state_dict()
        checkpoint.check_trainable_keys(state["model"], expected, str(path))
        self.model.load_state_dict(self.strategy.local_tensors(state["model"]), strict=False)
        if self.optim is not None and state["optim"] is not None:
            optimizer = self.strategy.local_optimizer_state(state["optim"]["optimizer"], self.optim.optimizer)
            self.optim.load_state_dict({**state["optim"], "optimizer": optimizer})
        self.iteration = state["iteration"]
        self.data_epoch, self.data_position = state["data_epoch"], state["data_position"]
        self.best_metric, self.best_iteration = state["best"]["metric"], state["best"]["iteration"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        if Path(path).resolve().parent == self.output_dir.resolve():  # the same run goes on in its folder
            self.run_checkpoints = [n for n in state.get("run_checkpoints", []) if (self.output_dir / n).is_file()]
        if state["world_size"] == dist.get_world_size():
            checkpoint.set_rng_state(state["rng"][dist.get_rank()])
        else:
            logger.warning("resuming on %d processes from a checkpoint of %d: RNG streams restart from the seed",
                           dist.get_world_size(), state["world_size"])
        logger.info("resumed from %s at iteration %d", path, self.iteration)
        # log.jsonl may hold lines past this iteration from the interrupted run: mark where this one resumes
        append_jsonl(self.output_dir / "log.jsonl", {"resumed_from": str(path), "iteration": self.iteration})

    def _fire(self, point: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, point)(self, *args)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, cfg: DictConfig, sources: Sources | None = None) -> "Runner":
        """Validate every section, then build data, model, optimizer and loaders."""
        run_cfg, task_cfg = validate(cfg, sources)
        task, model_cls = TASKS.get(run_cfg.task)(task_cfg), MODELS.get(cfg.model.arch)
        eval_splits = list(run_cfg.valid_splits) + list(run_cfg.test_splits)
        if eval_splits:
            task.check_ready()
        previous = [] if run_cfg.evaluate else check_output_dir(run_cfg)

        device = dist.init_distributed(run_cfg.dist_timeout_minutes, run_cfg.device)
        moved = None
        if previous and run_cfg.overwrite and dist.is_main_process():
            moved = checkpoint.move_previous_run(run_cfg.output_dir)
        dist.barrier()
        seed_everything(run_cfg.seed + dist.get_rank())
        setup_logging(run_cfg.output_dir, dist.get_rank())
        if moved is not None:
            logger.warning("run.overwrite=true: the previous run's files in %s were moved to %s",
                           run_cfg.output_dir, moved)
        logger.info("world_size=%d, device %s", dist.get_world_size(), device)
        amp = None if run_cfg.evaluate else amp_dtype(run_cfg.amp, run_cfg.amp_dtype, device)
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        logger.info("resolved config:\n%s", config_yaml)
        if dist.is_main_process():
            Path(run_cfg.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_cfg.output_dir) / "config.yaml").write_text(config_yaml)

        datasets = build_datasets(cfg.datasets, sources)
        check_eval_splits(datasets, run_cfg)
        model = model_cls.from_config(cfg.model)
        if getattr(model, "image_feature_cache", None) is not None and not run_cfg.evaluate:
            check_unaugmented(datasets, run_cfg.train_splits)
        if run_cfg.freeze:
            model.freeze(run_cfg.freeze)

        train_loader = optim = None
        strategy = Strategy(model, device) if run_cfg.evaluate else STRATEGIES.get(run_cfg.strategy)(model, device, amp)
        if not run_cfg.evaluate:
            train_loader = build_train_loader(datasets, run_cfg)
            if len(train_loader) == 0:
                raise ConfigError(f"run.batch_size_train={run_cfg.batch_size_train} on {dist.get_world_size()} "
                                  f"process(es) is larger than the {len(train_loader.dataset)} training samples "
                                  "(incomplete batches are dropped): lower run.batch_size_train")
            steps_per_epoch = run_cfg.iters_per_inner_epoch if run_cfg.runner == "runner_iter" else len(train_loader)
            total = run_cfg.max_iters if run_cfg.runner == "runner_iter" else run_cfg.max_epoch * steps_per_epoch
            schedule = LR_SCHEDULERS.get(run_cfg.lr_sched)(
                init_lr=run_cfg.init_lr, min_lr=run_cfg.min_lr, warmup_lr=run_cfg.warmup_lr,
                warmup_steps=run_cfg.warmup_steps, total_steps=total, steps_per_epoch=steps_per_epoch,
                decay_rate=run_cfg.decay_rate,
            )
            optim = OptimWrapper(
                build_adamw(model, run_cfg.weight_decay, run_cfg.beta2, run_cfg.fused_adamw, device), schedule,
                run_cfg.accum_grad_iters, run_cfg.max_grad_norm, amp, device.type,
            )
        eval_loaders = build_eval_loaders(datasets, eval_splits, run_cfg)
        hooks: list[Hook] = [JsonLogHook(run_cfg.output_dir, run_cfg.log_freq)]
        if run_cfg.sample_captions_every:
            hooks.append(caption_samples_hook(datasets, run_cfg, device))
        return cls(model, task, run_cfg, optim, train_loader, eval_loaders, hooks=hooks,
                   device=device, config_yaml=config_yaml, strategy=strategy)


def validate(cfg: DictConfig, sources: Sources | None = None) -> tuple[RunConfig, Any]:
    """Check every section against its dataclass before any heavy work; return (run, task) configs."""
    task_cls = TASKS.get(OmegaConf.select(cfg, "run.task", default=RunConfig.task))
    run_cfg, task_cfg = split_run_config(cfg.run, task_cls.config_class, sources)
    metrics = task_cls.metric_names(task_cfg)
    if run_cfg.valid_splits and not run_cfg.evaluate and metrics is not None and run_cfg.best_metric not in metrics:
        origin = sources.origin("run.best_metric") if sources else "the config"
        raise ConfigError(f"run.best_metric={run_cfg.best_metric!r} (set in {origin}) is not a metric of task "
                          f"{run_cfg.task!r}{did_you_mean(run_cfg.best_metric, metrics) or '.'} It reports "
                          f"{', '.join(sorted(metrics))}")
    merge_onto(MODELS.get(cfg.model.arch).config_class, cfg.model, "model", sources)
    for name, node in cfg.datasets.items():
        merge_onto(DATASETS.get(name).config_class, node, f"datasets.{name}", sources)
    return run_cfg, task_cfg


def check_output_dir(cfg: RunConfig) -> list[Path]:
    """A new training run may not mix its log and checkpoints with another run's: return that run's files
    when ``run.overwrite`` moves them aside or ``run.resume_ckpt_path`` continues it, else refuse."""
    found = checkpoint.previous_run_files(cfg.output_dir)
    if cfg.overwrite and cfg.resume_ckpt_path:
        raise ConfigError("run.overwrite=true moves the output folder's previous run aside and run.resume_ckpt_path "
                          "continues a run: set only one of them")
    if found and not (cfg.overwrite or cfg.resume_ckpt_path):
        steps = sorted((s, p) for p in found if (s := checkpoint.step_of(p.name)) is not None)
        resume = steps[-1][1] if steps else Path(cfg.output_dir) / "checkpoint_<iteration>.pth"
        raise ConfigError(f"run.output_dir={cfg.output_dir} already holds a run ({', '.join(p.name for p in found)}): "
                          f"continue it with run.resume_ckpt_path={resume}, choose another run.output_dir, or set "
                          f"run.overwrite=true (its files are moved to {Path(cfg.output_dir) / 'previous'}/<time>/, "
                          "nothing is deleted)")
    return found


def check_eval_splits(datasets: dict[str, dict[str, Dataset]], cfg: RunConfig) -> None:
    """Every split named in ``run.valid_splits`` / ``run.test_splits`` exists in some data set and is not empty."""
    have = {f"{name}/{split}": data for name, splits in datasets.items() for split, data in splits.items()}
    for key in ("valid_splits", "test_splits"):
        for split in getattr(cfg, key):
            found = {name: data for name, data in have.items() if name.endswith("/" + split)}
            if not found:
                raise ConfigError(f"run.{key} names split {split!r} but no data set has it (they have "
                                  f"{sorted(have)}): fix run.{key} or the data sets' build_info.annotations")
            for name, data in found.items():
                if len(data) == 0:
                    raise ConfigError(f"run.{key}: {name} has no samples; check its annotation file")


def caption_samples_hook(datasets: dict[str, dict[str, Dataset]], cfg: RunConfig, device: torch.device) -> Hook:
    """The first ``sample_captions_count`` images of the first validation split, captioned as training goes."""
    split = cfg.valid_splits[0] if cfg.valid_splits else None
    data = next((splits[split] for splits in datasets.values() if split in splits), None)
    if data is None:
        raise ConfigError("run.sample_captions_every needs run.valid_splits naming a split of the data sets")
    samples = [data[i] for i in range(min(cfg.sample_captions_count, len(data)))]
    return CaptionSamplesHook(cfg.output_dir, move_to_device(data.collater(samples), device), cfg.sample_captions_every)


def check_unaugmented(datasets: dict[str, dict[str, Dataset]], train_splits: list[str]) -> None:
    """Cached image features are only reused when every training image gives the same tensor each time."""
    for name, splits in datasets.items():
        for split in train_splits:
            processor = getattr(splits.get(split), "vis_processor", None)
            if processor is not None and getattr(processor, "augments", True):
                raise ConfigError(
                    f"model.cache_image_features=true but datasets.{name}.vis_processor.train "
                    f"({type(processor).__name__}) augments images, so no cached feature would be reused: set it "
                    "to {name: blip_image_eval, image_size: ...} or set model.cache_image_features=false")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_train_loader(datasets: dict[str, dict[str, Dataset]], cfg: RunConfig) -> DataLoader:
    """One loader over every data set's training splits, mixed by their ``sample_ratio``."""
    parts, ratios = [], []
    for name, splits in datasets.items():
        for split in cfg.train_splits:
            if split in splits:
                parts.append(splits[split])
                ratios.append(getattr(splits[split], "sample_ratio", 1.0))
    if not parts:
        raise ConfigError(f"run.train_splits={list(cfg.train_splits)}: no configured data set has these splits "
                       f"(have {[f'{n}/{s}' for n, sp in datasets.items() for s in sp]})")
    loader_args = dict(batch_size=cfg.batch_size_train, num_workers=cfg.num_workers, collate_fn=_collater(parts[0]),
                       drop_last=True, pin_memory=torch.cuda.is_available(), generator=torch.Generator(),
                       persistent_workers=False)  # workers must see each epoch's set_epoch
    if any(isinstance(p, IterableDataset) for p in parts):
        if len(parts) > 1:
            raise ConfigError("webdataset shards cannot be mixed with other training data sets yet; "
                              "train on the shards alone or convert the others to shards")
        return DataLoader(parts[0], **loader_args)
    data = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    sampler = TrainSampler(len(data), dist.get_rank(), dist.get_world_size(), cfg.seed,
                           mixing_weights([len(p) for p in parts], ratios))
    return DataLoader(data, sampler=sampler, **loader_args)


def build_eval_loaders(datasets: dict[str, dict[str, Dataset]], splits: list[str], cfg: RunConfig) -> dict[str, DataLoader]:
    """Loaders named ``<split>`` (one data set) or ``<data set>/<split>`` (several)."""
    loaders = {}
    for name, by_split in datasets.items():
        for split in splits:
            if split not in by_split:
                continue
            data = by_split[split]
            key = split if len(datasets) == 1 else f"{name}/{split}"
            loaders[key] = DataLoader(
                data, batch_size=cfg.batch_size_eval, num_workers=cfg.num_workers, collate_fn=_collater(data),
                sampler=EvalSampler(len(data), dist.get_rank(), dist.get_world_size()),
            )
    return loaders


def _collater(data: Dataset):
    return getattr(data, "collater", None)
