"""How the model is spread over the processes of a torchrun job (``run.strategy``).

- ``ddp``: every process holds the whole model; gradients are averaged (DistributedDataParallel).
- ``fsdp``: torch's FSDP2 (``fully_shard``) shards the weights over the processes: each transformer block
  of the LLM and of the image encoder is one unit, gathered just for its forward and backward, as are the
  LLM's input embedding and its lm_head (unless the two are tied), and the rest (Q-Former, projections,
  norms) one more. With ``run.amp`` the units compute in ``run.amp_dtype`` and reduce gradients in float32
  (``MixedPrecisionPolicy``); the trainable weights and the AdamW state stay float32 shards.

A strategy hands the runner the module to train, syncs or skips gradient reduction on accumulating
micro-batches, and converts between its parameters and full (unsharded) tensors: checkpoints always hold
full tensors, so a run written under one strategy resumes under the other, on any number of processes.
One process needs no process group: both strategies then train the bare model.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lavis_lite import dist
from lavis_lite.registry import STRATEGIES

logger = logging.getLogger(__name__)


class Strategy:
    """Bare model: one process (and the base of the others)."""

    def __init__(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None):
        self.model = model.to(device)

    @property
    def train_module(self) -> nn.Module:
        """What the training step calls."""
        return self.model

    def sync_gradients(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-batch's forward and backward; ``sync=False``: an accumulating one whose
        gradients need not be reduced across processes yet."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """Every process holds the full weights inside (evaluation, caption samples); enter on every rank."""
        yield

    def full_tensors(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """Checkpoint tensors (a state dict or optimizer state) as full tensors; every rank must call it."""
        return tensors

    def local_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full tensors of a checkpoint (model keys) in this strategy's layout, for ``load_state_dict``."""
        return tensors

    def local_optimizer_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """A full optimizer state dict in this strategy's layout, for ``optimizer.load_state_dict``."""
        return state


@STRATEGIES.register("ddp")
class DDPStrategy(Strategy):
    def __init__(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None):
        super().__init__(model, device, amp_dtype)
        self.ddp = (DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
                    if dist.is_dist() else None)

    @property
    def train_module(self) -> nn.Module:
        return self.ddp or self.model

    def sync_gradients(self, sync: bool) -> contextlib.AbstractContextManager:
        return self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()


@STRATEGIES.register("fsdp")
class FSDPStrategy(Strategy):
    def __init__(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None):
        if not dist.is_dist():
            logger.info("run.strategy=fsdp on one process: nothing to shard, the model trains whole")
            super().__init__(model, device, amp_dtype)
            self.units: list[nn.Module] = []
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from lavis_lite.models.blocks import transformer_blocks

        self.model = model.to(device)
        # every rank starts from rank 0's weights, as DDP makes it (ranks seed differently, so randomly
        # initialised parts such as the query tokens would differ); then each keeps its shards
        dist.broadcast_tensors_([*model.parameters(), *model.buffers()])
        policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32 if amp_dtype else None)
        blocks = transformer_blocks(model)
        vision = blocks["vision"]
        if getattr(model, "image_feature_cache", None) is not None:
            # the encoder then runs only on the images a process has not seen: its weights must not need
            # the other processes in its forward, so they join the last unit, gathered at every step
            logger.info("run.strategy=fsdp with model.cache_image_features: the image encoder is gathered "
                        "whole each step instead of block by block")
            vision = []
        mesh = dist.device_mesh(device)
        self.units = []
        for block in blocks["llm"] + vision + _llm_embeddings(model):
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
            self.units.append(block)
        # scalars (stage 1's ITC temperature) cannot be split: every process keeps them whole and averages
        # their gradients itself, as DDP would
        self.scalars = [p for p in model.parameters() if p.ndim == 0]
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False, ignored_params=set(self.scalars))
        self.units.append(model)
        self.syncing = True
        for param in self.scalars:
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(self._average_scalar)
        logger.info("run.strategy=fsdp: %d LLM blocks, %d image-encoder blocks and the rest sharded over %d "
                    "processes", len(blocks["llm"]), len(vision), dist.get_world_size())

    def sync_gradients(self, sync: bool) -> contextlib.AbstractContextManager:
        if self.units:
            self.model.set_requires_gradient_sync(sync)
            self.syncing = sync
        return contextlib.nullcontext()

    def _average_scalar(self, param: torch.Tensor) -> None:
        if self.syncing:  # the gradient accumulated over this step's micro-batches
            param.grad.copy_(dist.all_reduce_mean(param.grad))

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """Gather every unit once and keep it gathered (no collective inside, so ranks may run different
        numbers of forward passes, e.g. generation of different lengths); reshard after."""
        if not self.units:
            yield
            return
        for unit in self.units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in self.units:
                unit.reshard()
                unit.set_reshard_after_forward(unit is not self.model, recurse=False)

    def full_tensors(self, tensors: Any) -> Any:
        from torch.distributed.tensor import DTensor

        if isinstance(tensors, dict):
            return {k: self.full_tensors(v) for k, v in tensors.items()}
        if isinstance(tensors, list):
            return [self.full_tensors(v) for v in tensors]
        return tensors.full_tensor() if isinstance(tensors, DTensor) else tensors

    def local_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        own = dict(self.model.named_parameters(remove_duplicate=False))
        return {k: _like(own[k], v) if k in own else v for k, v in tensors.items()}

    def local_optimizer_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        ids = [i for group in state["param_groups"] for i in group["params"]]
        by_id = dict(zip(ids, params))
        per_param = {i: {k: _like(by_id[i], v) if torch.is_tensor(v) and v.shape == by_id[i].shape else v
                         for k, v in s.items()} for i, s in state["state"].items()}
        return {**state, "state": per_param}


def _llm_embeddings(model: nn.Module) -> list[nn.Module]:
    """The LLM's input embedding and lm_head, each its own FSDP unit: in the last unit they would stay
    gathered for the whole step (InternLM2-7B: 1.45 GB per process). Tied ones (OPT: lm_head.weight is
    embed_tokens.weight) stay in the last unit: one parameter cannot be sharded by two units."""
    llm = getattr(model, "llm_model", None)
    if llm is None:  # stage 1
        return []
    embed, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    if head is None:
        return [embed]
    if head.weight is embed.weight:
        logger.info("run.strategy=fsdp: the LLM's lm_head is tied to its input embedding: both stay in the last "
                    "unit, gathered for the whole step")
        return []
    return [embed, head]


def _like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``param`` (this rank's shard of a DTensor parameter; itself otherwise)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return full
    # every rank read the same file: each keeps its own shard, no communication
    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
