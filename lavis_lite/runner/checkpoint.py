"""Checkpoints: trainable weights, optimizer, scaler, loop position, RNG states and the config.

Files are written atomically (temp file, then rename) and load with ``weights_only=True``.
The frozen image encoder and LLM are not stored: resume rebuilds them from their sources.
"""
from __future__ import annotations

import logging
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

_STEP_FILE = re.compile(r"checkpoint_(\d+)\.pth$")


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as plain lists: safe for ``weights_only`` loading and for
    gathering across ranks."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _as_tuple(obj: Any) -> Any:
    return tuple(_as_tuple(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    logger.info("saved checkpoint %s", path)
    return path


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run.resume_ckpt_path: no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def step_of(name: str) -> int | None:
    """The iteration of a ``checkpoint_<iteration>.pth`` file name, else None."""
    match = _STEP_FILE.search(name)
    return int(match.group(1)) if match else None


def rotate(output_dir: str | Path, names: list[str], keep_last_k: int) -> list[str]:
    """Delete all but the ``keep_last_k`` newest of ``names`` (step checkpoints the current run wrote into
    ``output_dir``; no other file is touched); return the names kept."""
    ordered = sorted(names, key=step_of)
    cut = max(len(ordered) - keep_last_k, 0)
    for name in ordered[:cut]:
        path = Path(output_dir) / name
        if path.is_file():
            path.unlink()
            logger.info("removed old checkpoint %s", path)
    return ordered[cut:]


# What marks a folder as holding a run: a new run there would mix its log and checkpoints with these.
RUN_FILES = ("log.jsonl", "checkpoint_*.pth")


def previous_run_files(output_dir: str | Path) -> list[Path]:
    """The files in ``output_dir`` that show another run was written there."""
    folder = Path(output_dir)
    return sorted(p for pattern in RUN_FILES for p in folder.glob(pattern)) if folder.is_dir() else []


def move_previous_run(output_dir: str | Path) -> Path:
    """Move every file and folder of ``output_dir`` (but ``previous/``) into ``previous/<time>/``; nothing is
    deleted. Returns the new folder."""
    folder = Path(output_dir)
    target = folder / "previous" / time.strftime("%Y%m%d-%H%M%S")
    while target.exists():
        target = target.with_name(target.name + "_")
    target.mkdir(parents=True)
    for path in sorted(folder.iterdir()):
        if path.name != "previous":
            path.rename(target / path.name)
    return target


def check_trainable_keys(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """A resumed checkpoint must hold exactly the trainable tensors of the freshly built model."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"{source}: the checkpoint's weights are not this model's trainable ones: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}. Was it written with other model or run.freeze settings?"
        )
    for key, value in saved.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, model has {tuple(expected[key].shape)}")
