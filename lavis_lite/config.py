"""Configuration: OmegaConf layers merged in a fixed order and validated against dataclasses.

Order (later wins): model defaults (configs/models/<arch>/<model_type>.yaml) < data set defaults
(configs/datasets/<name>.yaml) < project yaml < ``--options key=value`` from the command line.
Each default lives once, in a dataclass beside the code that uses it; YAML holds only overrides.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

logger = logging.getLogger(__name__)

# configs/ sits beside the package in a checkout and is shipped inside it as package data.
_PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_ROOT = next(
    (p for p in (_PACKAGE_DIR.parent / "configs", _PACKAGE_DIR / "configs") if p.is_dir()),
    _PACKAGE_DIR.parent / "configs",
)

T = TypeVar("T")


def cache_dir() -> Path:
    """Where generated data and small models live: ``$LAVIS_LITE_CACHE``, else ``~/.cache/lavis_lite``."""
    cache = os.environ.get("LAVIS_LITE_CACHE")
    return Path(cache) if cache else Path.home() / ".cache" / "lavis_lite"


# YAML says ``${lavis_cache:}/...``; resolved on access, so the variable is read at run time.
OmegaConf.register_resolver("lavis_cache", lambda: str(cache_dir()), replace=True)


class ConfigError(ValueError):
    """A config key is unknown, mistyped or points at something missing."""


@dataclasses.dataclass
class RunConfig:
    """The runner's keys under ``run:``; task-specific keys are validated by the task's own dataclass."""

    task: str = "image_text_pretrain"
    runner: str = "runner_base"  # RUNNERS name: runner_base (epochs) or runner_iter (iterations)
    # optimisation (LAVIS key names)
    lr_sched: str = "linear_warmup_cosine_lr"
    init_lr: float = 1e-4
    min_lr: float = 0.0
    warmup_lr: float = 0.0
    warmup_steps: int = 0
    decay_rate: float = 0.9
    weight_decay: float = 0.05
    beta2: float = 0.999
    accum_grad_iters: int = 1
    max_grad_norm: Optional[float] = None
    # steps whose loss or gradients are inf/nan that may be skipped (each logged) before the run stops
    max_nonfinite_steps: int = 0
    amp: bool = False  # autocast on GPU; on CPU bf16 where it has bf16 matmuls (else a warning: float32)
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"  # float16 adds a GradScaler
    fused_adamw: bool = True  # fused AdamW kernels (CUDA and CPU)
    # ddp: whole model per process; fsdp: weights sharded per LLM / image-encoder block (lavis_lite/runner/strategy.py)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # loop
    max_epoch: int = 1  # runner_base
    max_iters: int = 0  # runner_iter: total iterations ...
    iters_per_inner_epoch: int = 0  # ... split into inner epochs of this many
    batch_size_train: int = 8  # per process
    batch_size_eval: int = 8
    num_workers: int = 0
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    train_splits: list[str] = dataclasses.field(default_factory=lambda: ["train"])
    valid_splits: list[str] = dataclasses.field(default_factory=list)
    test_splits: list[str] = dataclasses.field(default_factory=list)
    evaluate: bool = False  # evaluation only
    freeze: list[str] = dataclasses.field(default_factory=list)  # parameter-name prefixes to freeze
    # output and checkpoints
    output_dir: str = "output/run"
    # a new run into an output_dir that holds another run's log or checkpoints is refused; true moves
    # that run's files into <output_dir>/previous/<time>/ first (nothing is deleted)
    overwrite: bool = False
    log_freq: int = 10
    save_freq_epochs: int = 1  # 0: no per-epoch checkpoint
    save_every_n_steps: int = 0  # 0: off
    keep_last_k: int = 2
    best_metric: str = "agg_metrics"  # eval metric that picks checkpoint_best.pth
    resume_ckpt_path: Optional[str] = None
    dist_timeout_minutes: float = 30.0
    progress_bar: bool = True
    sample_captions_every: int = 0  # > 0: caption a few val images every this many iterations (stage 2)
    sample_captions_count: int = 4


def merge_onto(schema: type[T], node: Any, where: str, sources: "Sources | None" = None) -> T:
    """Validate ``node`` against dataclass ``schema`` and return the dataclass instance.

    A misspelled key or wrong type raises ConfigError naming ``where.key`` and the file that set it.
    """
    node = OmegaConf.create({} if node is None else node)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = f"{where}.{err.full_key}" if getattr(err, "full_key", None) else where
        origin = sources.origin(key) if sources else "the given config"
        known = ", ".join(f.name for f in dataclasses.fields(schema))  # type: ignore[arg-type]
        detail = str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"{key} (set in {origin}): {detail} Valid keys for {where}: {known}.") from None


class Sources:
    """The layers a config was merged from, to tell which file set a key."""

    def __init__(self) -> None:
        self.layers: list[tuple[str, DictConfig]] = []

    def add(self, name: str, cfg: DictConfig) -> None:
        self.layers.append((name, cfg))

    def origin(self, dotted_key: str) -> str:
        for name, cfg in reversed(self.layers):
            if OmegaConf.select(cfg, dotted_key, default=_MISSING) is not _MISSING:
                return name
        return "no config file (a default)"


_MISSING = object()


def load_yaml(path: str | Path, what: str) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: no file at {path}; check the path")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml parser errors carry the line
        raise ConfigError(f"{what}: {path} is not valid YAML: {err}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{what}: {path} must hold a mapping at top level")
    return cfg


def model_config_path(arch: str, model_type: str) -> Path:
    return CONFIG_ROOT / "models" / arch / f"{model_type}.yaml"


def dataset_config_path(name: str) -> Path:
    return CONFIG_ROOT / "datasets" / f"{name}.yaml"


def load_config(cfg_path: str | Path, options: list[str] | None = None) -> tuple[DictConfig, Sources]:
    """Merge the config layers for a run; returns the merged config and its sources.

    Structure is checked here (top-level sections, model arch/type, data set names); key-level
    validation happens in ``validate`` against the dataclasses of the registered components.
    """
    project = load_yaml(cfg_path, "--cfg-path")
    try:
        cli = OmegaConf.from_dotlist(list(options or []))
    except Exception as err:
        raise ConfigError(f"--options {options}: {err}; write them as key=value") from None
    unknown = set(project) - {"model", "datasets", "run"}
    unknown |= set(cli) - {"model", "datasets", "run"}
    if unknown:
        raise ConfigError(
            f"unknown top-level section(s) {sorted(unknown)} in {cfg_path} or --options; "
            "use model, datasets, run"
        )
    head = OmegaConf.merge(project, cli)  # decides which defaults to load
    sources = Sources()
    layers: list[DictConfig] = []

    model = head.get("model")
    if model is None or "arch" not in model:
        raise ConfigError(f"model.arch is missing in {cfg_path}; name a registered model arch")
    if "model_type" in model:
        path = model_config_path(model.arch, model.model_type)
        if not path.is_file():
            raise ConfigError(
                f"model.model_type={model.model_type!r} (in {cfg_path}): no default config at {path}; "
                f"choose one of {available_model_types(model.arch)}"
            )
        defaults = load_yaml(path, "model defaults")
        defaults.pop("preprocess", None)  # used by load_model_and_preprocess; data sets name their own
        layer = OmegaConf.create({"model": defaults})
        sources.add(str(path), layer)
        layers.append(layer)

    for name in head.get("datasets") or {}:
        path = dataset_config_path(name)
        if path.is_file():
            layer = OmegaConf.create({"datasets": {name: load_yaml(path, "data set defaults")}})
            sources.add(str(path), layer)
            layers.append(layer)

    sources.add(str(cfg_path), project)
    sources.add("--options", cli)
    cfg = OmegaConf.create({})
    for layer in [*layers, project, cli]:
        cfg = OmegaConf.merge(_drop_renamed(cfg, layer), layer)
    if "run" not in cfg:
        cfg.run = {}
    if "datasets" not in cfg:
        cfg.datasets = {}
    return cfg, sources


def _drop_renamed(base: DictConfig, layer: DictConfig) -> DictConfig:
    """Remove from ``base`` every node that ``layer`` rebuilds under another registered ``name``
    (e.g. a processor switched from blip_image_train to blip_image_eval), so the old class's keys
    are replaced rather than merged into the new one."""
    base = base.copy()

    def walk(base_node: Any, layer_node: Any) -> None:
        for key, value in layer_node.items_ex(resolve=False) if isinstance(layer_node, DictConfig) else []:
            old = base_node.get(key) if isinstance(base_node, DictConfig) else None
            if not isinstance(value, DictConfig) or not isinstance(old, DictConfig):
                continue
            if "name" in value and "name" in old and value.name != old.name:
                base_node.pop(key)
            else:
                walk(old, value)

    walk(base, layer)
    return base


def available_model_types(arch: str) -> list[str]:
    folder = CONFIG_ROOT / "models" / arch
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def split_run_config(run_node: Any, task_schema: type | None, sources: Sources | None) -> tuple[RunConfig, Any]:
    """Validate ``run:``: runner keys against RunConfig, the rest against the task's dataclass."""
    run_node = OmegaConf.create({} if run_node is None else run_node)
    runner_keys = {f.name for f in dataclasses.fields(RunConfig)}
    task_keys = {f.name for f in dataclasses.fields(task_schema)} if task_schema is not None else set()
    for key in run_node:
        if key not in runner_keys | task_keys:
            origin = sources.origin(f"run.{key}") if sources else "the given config"
            task = run_node.get("task", RunConfig.task)
            raise ConfigError(f"run.{key} (set in {origin}) is not a key of the runner or of task {task!r}"
                              f"{did_you_mean(str(key), runner_keys | task_keys, 'run.') or '.'} Runner keys: "
                              f"{', '.join(sorted(runner_keys))}; task keys: {', '.join(sorted(task_keys)) or 'none'}.")
    runner_part = {k: v for k, v in run_node.items() if k in runner_keys}
    task_part = {k: v for k, v in run_node.items() if k not in runner_keys}
    run_cfg = merge_onto(RunConfig, runner_part, "run", sources)
    check_run_config(run_cfg, sources)
    if task_schema is None:
        return run_cfg, None
    return run_cfg, merge_onto(task_schema, task_part, "run", sources)


def did_you_mean(key: str, known: Any, prefix: str = "") -> str:
    """``"; did you mean run.max_epoch?"`` for the closest of ``known``, or ``""``."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def check_run_config(cfg: RunConfig, sources: Sources | None = None) -> None:
    """Ranges and combinations of ``run:`` keys, checked before any heavy work."""
    def origin(key: str) -> str:
        return f"run.{key}={getattr(cfg, key)!r} (set in {sources.origin(f'run.{key}') if sources else 'the config'})"

    at_least = {"batch_size_train": 1, "batch_size_eval": 1, "accum_grad_iters": 1, "log_freq": 1, "num_workers": 0,
                "save_freq_epochs": 0, "save_every_n_steps": 0, "keep_last_k": 1, "warmup_steps": 0,
                "max_nonfinite_steps": 0, "max_iters": 0, "iters_per_inner_epoch": 0, "sample_captions_every": 0,
                "sample_captions_count": 1}
    for key, low in at_least.items():
        if getattr(cfg, key) < low:
            raise ConfigError(f"{origin(key)}: it must be >= {low}")
    for key in ("init_lr", "dist_timeout_minutes"):
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"{origin(key)}: it must be > 0")
    for key in ("min_lr", "warmup_lr", "weight_decay"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{origin(key)}: it must be >= 0")
    if not 0 <= cfg.beta2 < 1:
        raise ConfigError(f"{origin('beta2')}: it must be in [0, 1)")
    if cfg.max_grad_norm is not None and not cfg.max_grad_norm > 0:
        raise ConfigError(f"{origin('max_grad_norm')}: it must be > 0 (or null for no clipping)")
    if cfg.runner == "runner_iter":
        if cfg.max_iters <= 0 or cfg.iters_per_inner_epoch <= 0:
            raise ConfigError("run.runner=runner_iter needs run.max_iters and run.iters_per_inner_epoch > 0")
    else:
        for key in ("max_iters", "iters_per_inner_epoch"):
            if getattr(cfg, key):
                raise ConfigError(f"{origin(key)} applies to run.runner=runner_iter only, and run.runner is "
                                  f"{cfg.runner!r} (run.max_epoch={cfg.max_epoch} passes): set run.runner=runner_iter "
                                  f"or remove run.{key}")
        if cfg.max_epoch < 1 and not cfg.evaluate:
            raise ConfigError(f"{origin('max_epoch')}: it must be >= 1")
    if cfg.save_every_n_steps % cfg.accum_grad_iters:
        raise ConfigError(f"run.save_every_n_steps={cfg.save_every_n_steps} must be a multiple of "
                          f"run.accum_grad_iters={cfg.accum_grad_iters} so no checkpoint splits an accumulation")
    if cfg.strategy == "fsdp" and cfg.amp and cfg.amp_dtype == "float16":
        raise ConfigError("run.strategy=fsdp with run.amp_dtype=float16 is not supported (float16 needs a gradient "
                          "scaler for sharded gradients): set run.amp_dtype=bfloat16")
    if not cfg.evaluate:
        check_writable(cfg.output_dir)


def check_writable(output_dir: str) -> None:
    """``run.output_dir`` is, or can be created as, a folder this process may write into."""
    path = Path(output_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run.output_dir={output_dir}: that is a file, not a folder; choose another run.output_dir")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError(f"run.output_dir={output_dir}: {existing} is not writable by this user; choose a "
                          "run.output_dir you can write to")


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg))
