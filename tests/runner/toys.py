"""Toy data and a runner factory for loop tests (no files, no downloads)."""
from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import Dataset

from lavis_lite.config import RunConfig
from lavis_lite.models.bow_tagger import BowTagger, BowTaggerConfig
from lavis_lite.runner.optim import LR_SCHEDULERS, OptimWrapper, build_adamw
from lavis_lite.runner.runner import Runner, build_eval_loaders, build_train_loader
from lavis_lite.tasks.base import ImageTextPretrainTask

WORDS = ["red", "blue", "green", "circle", "square", "triangle", "left", "right", "big", "small"]


class ToyCaptions(Dataset):
    """Deterministic images and captions; ``noise`` adds augmentation drawn from torch's global RNG
    (as a random crop would), so resume tests see whether RNG state is restored."""

    def __init__(self, size: int = 24, noise: bool = False):
        self.size, self.noise = size, noise

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(index)
        image = torch.rand(3, 32, 32, generator=g)
        if self.noise:
            image = image + 0.1 * torch.rand(3, 32, 32)
        words = [WORDS[i] for i in torch.randperm(len(WORDS), generator=g)[:3].tolist()]
        return {"image": image, "text_input": " ".join(words), "image_id": f"toy_{index}"}

    def collater(self, samples: list[dict]) -> dict:
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "text_input": [s["text_input"] for s in samples],
            "image_id": [s["image_id"] for s in samples],
        }


def make_runner(tmp_path, data: Dataset | None = None, model_seed: int = 0, eval_data: Dataset | None = None,
                **run_options) -> Runner:
    """A Runner over BowTagger and toy data, built the way Runner.from_config builds one."""
    defaults = dict(output_dir=str(tmp_path), max_epoch=2, batch_size_train=8, init_lr=0.05, warmup_steps=2,
                    min_lr=0.001, weight_decay=0.01, log_freq=1, progress_bar=False, save_freq_epochs=1)
    cfg = dataclasses.replace(RunConfig(), **{**defaults, **run_options})
    torch.manual_seed(model_seed)
    model = BowTagger(BowTaggerConfig(width=8, num_buckets=64))
    data = data if data is not None else ToyCaptions()
    loader = build_train_loader({"toy": {"train": data}}, cfg)
    steps = len(loader) if cfg.runner == "runner_base" else cfg.iters_per_inner_epoch
    total = cfg.max_epoch * steps if cfg.runner == "runner_base" else cfg.max_iters
    schedule = LR_SCHEDULERS.get(cfg.lr_sched)(
        init_lr=cfg.init_lr, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr, warmup_steps=cfg.warmup_steps,
        total_steps=total, steps_per_epoch=steps, decay_rate=cfg.decay_rate)
    optim = OptimWrapper(build_adamw(model, cfg.weight_decay, cfg.beta2, False, torch.device("cpu")), schedule,
                         cfg.accum_grad_iters, cfg.max_grad_norm)
    eval_loaders = build_eval_loaders({"toy": {"val": eval_data}}, ["val"], cfg) if eval_data is not None else {}
    return Runner(model, ImageTextPretrainTask(), cfg, optim, loader, eval_loaders)



def run_in_process_group(rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    """torch.multiprocessing.spawn target: join a gloo group, run ``fn(*args)``, leave."""
    import os

    import torch.distributed as torch_dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(*args)
    finally:
        torch_dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
