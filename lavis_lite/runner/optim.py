"""Optimisation: AdamW parameter groups, the LAVIS LR schedules, and a step wrapper that owns
AMP, gradient accumulation and clipping."""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any
import torch
from torch import nn

from lavis_lite import dist
from lavis_lite.config import ConfigError
from lavis_lite.registry import LR_SCHEDULERS

logger = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and undecayed biases, norms, scalars and the names in
    ``model.no_decay_names()`` (e.g. the learned query tokens)."""
    no_decay_names = model.no_decay_names() if hasattr(model, "no_decay_names") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.endswith(".bias") or name in no_decay_names:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def cpu_has_bf16_matmuls() -> bool:
    """AVX512-BF16 or AMX: processors that multiply bf16 natively. Elsewhere (e.g. AVX2) oneDNN emulates
    bf16 products, several times slower than float32 ones (bench/RESULTS.md)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def amp_dtype(amp: bool, dtype_name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``run.amp`` / ``run.amp_dtype`` mean on ``device``; None: train in float32.
    CUDA: ``run.amp_dtype``. CPU: bfloat16 where the processor has bf16 matmuls, else float32 with a
    warning (emulated bf16 would be slower, not faster)."""
    if not amp:
        return None
    if device.type == "cuda":
        return getattr(torch, dtype_name)
    if device.type == "cpu" and cpu_has_bf16_matmuls():
        if dtype_name != "bfloat16":
            raise ConfigError(f"run.amp_dtype={dtype_name} on CPU: CPU autocast trains in bfloat16 here; "
                              "set run.amp_dtype=bfloat16")
        return torch.bfloat16
    logger.warning("run.amp=true has no effect on %s: this processor has no native bf16 matmuls (AVX512-BF16 "
                   "or AMX), where autocast would be slower than float32, so this run trains in float32",
                   device.type)
    return None


def build_adamw(model: nn.Module, weight_decay: float, beta2: float, fused: bool, device: torch.device) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    if not any(group["params"] for group in groups):
        raise ValueError("no trainable parameters: check run.freeze and the model's freeze flags")
    use_fused = fused and device.type in ("cuda", "cpu")  # fused kernels exist for both (bench/RESULTS.md)
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, beta2), fused=use_fused or None)


class LRSchedule:
    """LR as a pure function of the iteration, so resuming needs no scheduler state.

    Linear warm-up from ``warmup_lr`` to ``init_lr`` over the first ``warmup_steps`` iterations
    (LAVIS warms up only inside epoch 0; here warm-up may span epochs).
    """

    def __init__(self, init_lr: float, min_lr: float, warmup_lr: float, warmup_steps: int,
                 total_steps: int, steps_per_epoch: int, decay_rate: float):
        self.init_lr, self.min_lr, self.warmup_lr = init_lr, min_lr, warmup_lr
        self.warmup_steps, self.total_steps = warmup_steps, max(total_steps, 1)
        self.steps_per_epoch, self.decay_rate = max(steps_per_epoch, 1), decay_rate

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.init_lr - self.warmup_lr) * step / self.warmup_steps
        return self.after_warmup(step)

    def after_warmup(self, step: int) -> float:
        raise NotImplementedError


@LR_SCHEDULERS.register("linear_warmup_cosine_lr")
class LinearWarmupCosineLR(LRSchedule):
    """Cosine from ``init_lr`` down to ``min_lr`` over the iterations after warm-up (LAVIS's
    cosine moves once per epoch; per iteration is smoother and equal at epoch boundaries)."""

    def after_warmup(self, step: int) -> float:
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr + (self.init_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@LR_SCHEDULERS.register("linear_warmup_step_lr")
class LinearWarmupStepLR(LRSchedule):
    """``init_lr * decay_rate ** epoch``, never below ``min_lr`` (as LAVIS)."""

    def after_warmup(self, step: int) -> float:
        epoch = step // self.steps_per_epoch
        return max(self.min_lr, self.init_lr * self.decay_rate**epoch)


@LR_SCHEDULERS.register("constant_lr")
class ConstantLR(LRSchedule):
    def after_warmup(self, step: int) -> float:
        return self.init_lr


class OptimWrapper:
    """Backward and optimizer step with AMP, accumulation over ``accum_grad_iters`` micro-batches
    and gradient clipping. The LR is set from ``schedule`` at every optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: LRSchedule, accum_grad_iters: int = 1,
                 max_grad_norm: float | None = None, amp_dtype: torch.dtype | None = None,
                 device_type: str = "cpu"):
        self.optimizer, self.schedule = optimizer, schedule
        self.accum_grad_iters, self.max_grad_norm = accum_grad_iters, max_grad_norm
        self.amp_dtype, self.device_type = amp_dtype, device_type
        use_scaler = amp_dtype == torch.float16 and device_type == "cuda"
        self.scaler = torch.amp.GradScaler(device_type, enabled=use_scaler)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accum_grad_iters).backward()

    def step(self, iteration: int) -> dict[str, Any]:
        """Apply the accumulated gradients; ``iteration`` picks the LR. Returns lr and grad norm, and
        ``skipped: True`` (nothing applied) when the gradients hold inf/nan. With float16's GradScaler
        such steps are the scaler's business (it skips them and lowers the scale), not divergence."""
        lr = self.schedule(iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        stats: dict[str, Any] = {"lr": lr}
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            stats["grad_norm"] = clip_grad_norm(params, self.max_grad_norm)
        elif not self.scaler.is_enabled():
            stats["grad_norm"] = grad_norm([p.grad for p in params])
        if not self.scaler.is_enabled() and not math.isfinite(stats["grad_norm"]):
            self.optimizer.zero_grad(set_to_none=True)
            return {**stats, "skipped": True}
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def _sharded(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "to_local")  # a DTensor: this process's shard of an FSDP gradient


def grad_norm(grads: list[torch.Tensor]) -> float:
    """The L2 norm of all ``grads`` together. FSDP shards (DTensors) count each process's part once, summed
    over processes; plain tensors are the same on every process (replicated) and count once."""
    if not any(_sharded(g) for g in grads):
        return float(torch.nn.utils.get_total_norm(grads))
    zero = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    local = sum((torch.linalg.vector_norm(g.to_local(), dtype=torch.float64) ** 2 for g in grads if _sharded(g)), zero)
    replicated = sum((torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in grads if not _sharded(g)), zero)
    return float((dist.all_reduce_sum(local) + replicated).sqrt())


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients of ``params`` so their total norm is at most ``max_norm`` (as
    ``torch.nn.utils.clip_grad_norm_``, which does it without FSDP); return the norm before clipping."""
    grads = [p.grad for p in params]
    if not any(_sharded(g) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    norm = grad_norm(grads)
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        for grad in grads:
            grad.mul_(scale)
    return norm
