"""run.strategy=fsdp with 2 gloo processes on CPU: a tiny BLIP-2 stage 2 (tiny vision encoder, Q-Former,
a 2-layer InternLM2 in its official format) trains to the same weights as one process on the combined
batch, with gradient accumulation and clipping, and with activation checkpointing in the sharded blocks;
checkpoints move between FSDP and DDP both ways; the gathered weights generate as the unsharded model
does; stage 1 (its scalar temperature kept whole) trains under FSDP as under DDP; so does stage 2 with a
tiny OPT, whose lm_head is tied to its input embedding (both then stay in the last unit)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from lavis_lite import dist
from lavis_lite.config import RunConfig, load_yaml, model_config_path
from lavis_lite.models.base import BaseModel
from lavis_lite.registry import LR_SCHEDULERS, MODELS, STRATEGIES
from lavis_lite.runner.optim import OptimWrapper, build_adamw
from lavis_lite.runner.runner import Runner, build_train_loader
from lavis_lite.runner.strategy import FSDPStrategy
from lavis_lite.tasks.base import ImageTextPretrainTask
from tests.runner.toys import free_port, run_in_process_group

pytestmark = pytest.mark.slow

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "star")
TOLERANCE = dict(rtol=0, atol=1e-6)  # float32 sums reduced in another order (all-reduce vs reduce-scatter)
# A key bias adds the same score to every key of a query, which softmax ignores: its gradient is zero up to
# rounding, and AdamW scales that rounding noise up to steps of the learning rate. Compared by size only.
NOISE_ONLY = "self.key.bias"


class Captions(Dataset):
    """Images and two-word captions; every caption has as many tokens as the others (checked in the test),
    so the mean token loss of 2 processes averaged equals one process's mean over the combined batch."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, index: int) -> dict:
        image = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(index))
        return {"image": image, "text_input": f"{COLORS[index % 4]} {SHAPES[index // 4 % 4]}", "image_id": index}

    def collater(self, samples: list[dict]) -> dict:
        return {"image": torch.stack([s["image"] for s in samples]),
                "text_input": [s["text_input"] for s in samples], "image_id": [s["image_id"] for s in samples]}


def build_model(llm_path: str | None, **overrides) -> BaseModel:
    """Stage 2 with the tiny LLM at ``llm_path``, or (None) stage 1. Each rank seeds differently, as
    Runner.from_config does: the strategies must start every rank from rank 0's weights."""
    arch = "blip2_internlm" if llm_path else "blip2"
    node = load_yaml(model_config_path(arch, "tiny"), "tiny")
    node.pop("preprocess")
    torch.manual_seed(dist.get_rank())
    overrides = {"llm_path": llm_path, **overrides} if llm_path else overrides
    return MODELS.get(arch).from_config(OmegaConf.merge(node, overrides))


def make_runner(out_dir, llm_path: str | None, strategy: str, batch_size: int, max_epoch: int, resume=None,
                model_overrides: dict | None = None) -> Runner:
    """As Runner.from_config builds: model, strategy (before the optimizer), optimizer, loader."""
    cfg = dataclasses.replace(
        RunConfig(), output_dir=str(out_dir), strategy=strategy, batch_size_train=batch_size, max_epoch=max_epoch,
        accum_grad_iters=2, max_grad_norm=0.05, lr_sched="constant_lr", init_lr=1e-3, weight_decay=0.05,
        log_freq=1, progress_bar=False, resume_ckpt_path=str(resume) if resume else None)
    model = build_model(llm_path, **(model_overrides or {}))
    device = torch.device("cpu")
    wrapped = STRATEGIES.get(strategy)(model, device)
    loader = build_train_loader({"toy": {"train": Captions()}}, cfg)
    schedule = LR_SCHEDULERS.get(cfg.lr_sched)(init_lr=cfg.init_lr, min_lr=0.0, warmup_lr=0.0, warmup_steps=0,
                                               total_steps=cfg.max_epoch * len(loader), steps_per_epoch=len(loader),
                                               decay_rate=1.0)
    optim = OptimWrapper(build_adamw(model, cfg.weight_decay, cfg.beta2, False, device), schedule,
                         cfg.accum_grad_iters, cfg.max_grad_norm)
    return Runner(model, ImageTextPretrainTask(), cfg, optim, loader, strategy=wrapped)


def trained(runner: Runner) -> dict[str, torch.Tensor]:
    runner.train()
    return runner.strategy.full_tensors(runner.model.trainable_state_dict())


def _two_processes(tmp_path, llm_path: str) -> None:
    rank = dist.get_rank()
    out = {}
    fsdp = make_runner(tmp_path / "fsdp", llm_path, "fsdp", batch_size=4, max_epoch=2)
    # LLM blocks, ViT blocks, the LLM's input embedding and lm_head, the rest
    assert isinstance(fsdp.strategy, FSDPStrategy) and len(fsdp.strategy.units) == 2 + 2 + 2 + 1
    llm = fsdp.model.llm_model
    assert llm.get_input_embeddings() in fsdp.strategy.units and llm.get_output_embeddings() in fsdp.strategy.units
    assert type(llm.model.layers[0].self_attn.q_proj.weight).__name__ == "DTensor"
    out["fsdp"] = trained(fsdp)
    images = Captions().collater([Captions()[i] for i in range(3 + rank)])  # the ranks generate different lengths
    with fsdp.strategy.full_weights():
        out["generated"] = fsdp.model.generate(images, num_beams=2, max_new_tokens=4 + 3 * rank)
    out["ddp"] = trained(make_runner(tmp_path / "ddp", llm_path, "ddp", batch_size=4, max_epoch=2))
    # activation checkpointing inside the sharded LLM blocks (and the Q-Former): the same training
    recomputing = dict(llm_use_checkpoint=True, qformer_use_checkpoint=True)
    out["fsdp_checkpointed"] = trained(make_runner(tmp_path / "fsdp_ac", llm_path, "fsdp", batch_size=4, max_epoch=2,
                                                   model_overrides=recomputing))
    for first, second in (("ddp", "fsdp"), ("fsdp", "ddp")):
        half = make_runner(tmp_path / f"{first}_half", llm_path, first, batch_size=4, max_epoch=1)
        half.train()
        resumed = make_runner(tmp_path / f"{first}_then_{second}", llm_path, second, batch_size=4, max_epoch=2,
                              resume=tmp_path / f"{first}_half" / "checkpoint_4.pth")
        assert resumed.iteration == 4
        out[f"{first}_then_{second}"] = trained(resumed)
    # stage 1: vision blocks sharded, the ITC temperature (a scalar) kept whole with averaged gradients, ITC
    # gathered over ranks; its hard negatives are drawn per rank, so FSDP is compared with DDP on 2 ranks
    for strategy in ("ddp", "fsdp"):
        out[f"stage1_{strategy}"] = trained(make_runner(tmp_path / f"s1_{strategy}", None, strategy, batch_size=4,
                                                        max_epoch=1))
    torch.save(out, tmp_path / f"rank{rank}.pt")


def test_fsdp_trains_as_one_process_and_checkpoints_move_between_strategies(tmp_path, tiny_internlm2_dir):
    llm_path = str(tiny_internlm2_dir)
    probe = build_model(llm_path)
    data = Captions()
    captions = [data[i]["text_input"] for i in range(len(data))]
    queries = torch.zeros(len(captions), probe.num_query_token, probe.llm_proj.out_features)
    labels = probe.build_inputs(queries, [""] * len(captions), captions)[2]
    assert len(set((labels != -100).sum(1).tolist())) == 1, "captions must have equal token counts"

    mp.spawn(_spawned, args=(2, free_port(), str(tmp_path), llm_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = make_runner(tmp_path / "single", llm_path, "ddp", batch_size=8, max_epoch=2)
    initial = {k: v.clone() for k, v in single.model.trainable_state_dict().items()}
    expected = trained(single)
    log = map(json.loads, (tmp_path / "single" / "log.jsonl").read_text().splitlines())
    norms = [r["train_grad_norm"] for r in log if "train_grad_norm" in r]  # optimizer steps: every 2nd iteration
    assert max(norms) > 0.05, norms  # run.max_grad_norm=0.05 clipped some steps
    assert set(ranks[0]["fsdp"]) == set(expected) and any("Qformer" in k for k in expected)
    for key, value in expected.items():
        assert not torch.equal(value, initial[key]) or "bias" in key or "position" in key, f"{key} did not train"
        for run in ("fsdp", "ddp", "fsdp_checkpointed", "ddp_then_fsdp", "fsdp_then_ddp"):
            for rank in ranks:
                if key.endswith(NOISE_ONLY):
                    assert rank[run][key].abs().max() < 1e-4 and value.abs().max() < 1e-4
                else:
                    torch.testing.assert_close(rank[run][key], value, **TOLERANCE, msg=f"{run} != one process: {key}")
    stage1 = ranks[0]["stage1_ddp"]
    assert stage1["temp"].ndim == 0 and any(k.startswith("Qformer.cls.") for k in stage1)
    for key, value in stage1.items():
        for rank in ranks:
            if not key.endswith(NOISE_ONLY):
                torch.testing.assert_close(rank["stage1_fsdp"][key], value, **TOLERANCE, msg=f"stage 1: {key}")
    with torch.no_grad():
        single.model.eval()
        for rank, got in enumerate(r["generated"] for r in ranks):
            images = data.collater([data[i] for i in range(3 + rank)])
            assert got == single.model.generate(images, num_beams=2, max_new_tokens=4 + 3 * rank)


def _spawned(rank: int, world_size: int, port: int, tmp_path: str, llm_path: str, case: str = "main") -> None:
    from pathlib import Path

    torch.set_num_threads(1)
    body = _tied_two_processes if case == "tied" else _two_processes
    run_in_process_group(rank, world_size, port, body, (Path(tmp_path), llm_path))


def _tied_two_processes(tmp_path, llm_path: str) -> None:
    opt = dict(llm="opt", llm_dtype="float32")
    fsdp = make_runner(tmp_path / "fsdp", llm_path, "fsdp", batch_size=4, max_epoch=1, model_overrides=opt)
    llm = fsdp.model.llm_model
    assert len(fsdp.strategy.units) == 2 + 2 + 1  # LLM blocks, ViT blocks, the rest (both embeddings in it)
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight  # still tied
    assert type(llm.get_input_embeddings().weight).__name__ == "DTensor"
    out = {"fsdp": trained(fsdp)}
    out["ddp"] = trained(make_runner(tmp_path / "ddp", llm_path, "ddp", batch_size=4, max_epoch=1, model_overrides=opt))
    torch.save(out, tmp_path / f"rank{dist.get_rank()}.pt")


def test_fsdp_with_tied_llm_embeddings_trains_as_ddp(tmp_path, tiny_opt_dir):
    mp.spawn(_spawned, args=(2, free_port(), str(tmp_path), str(tiny_opt_dir), "tied"), nprocs=2)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(out["fsdp"]) == set(out["ddp"])
        for key, value in out["ddp"].items():
            if not key.endswith(NOISE_ONLY):
                torch.testing.assert_close(out["fsdp"][key], value, **TOLERANCE, msg=f"tied OPT: {key}")
