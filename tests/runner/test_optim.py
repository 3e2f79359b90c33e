import math
import os

import pytest
import torch
from torch import nn

from lavis_lite.config import ConfigError
from lavis_lite.runner import optim
from lavis_lite.runner.optim import LinearWarmupCosineLR, LinearWarmupStepLR, OptimWrapper, param_groups


def test_cosine_schedule_matches_formula():
    sched = LinearWarmupCosineLR(init_lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=10,
                                 total_steps=110, steps_per_epoch=50, decay_rate=0.9)
    # warm-up: straight line from warmup_lr (step 0) towards init_lr (step 10)
    assert sched(0) == pytest.approx(1e-6)
    assert sched(5) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 5 / 10)
    # after warm-up: min + (init - min) * (1 + cos(pi * t)) / 2, t = (step - 10) / 100
    assert sched(10) == pytest.approx(1e-3)
    assert sched(60) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert sched(35) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert sched(110) == pytest.approx(1e-5)
    assert sched(500) == pytest.approx(1e-5)  # never below min_lr


def test_step_schedule_matches_formula():
    sched = LinearWarmupStepLR(init_lr=1e-4, min_lr=2e-5, warmup_lr=0.0, warmup_steps=4,
                               total_steps=1000, steps_per_epoch=100, decay_rate=0.5)
    assert sched(2) == pytest.approx(0.5e-4)
    assert sched(50) == pytest.approx(1e-4)  # epoch 0
    assert sched(150) == pytest.approx(0.5e-4)  # epoch 1: 1e-4 * 0.5
    assert sched(250) == pytest.approx(2.5e-5)  # epoch 2: 1e-4 * 0.25
    assert sched(350) == pytest.approx(2e-5)  # 1.25e-5 is below min_lr


class WithQueries(nn.Module):
    def __init__(self):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, 4, 8))
        self.proj = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def no_decay_names(self):
        return {"query_tokens"}


def test_param_groups_exclude_bias_norm_queries_and_frozen():
    model = WithQueries()
    decay, no_decay = param_groups(model, weight_decay=0.05)
    name_of = {id(p): n for n, p in model.named_parameters()}
    assert {name_of[id(p)] for p in decay["params"]} == {"proj.weight"}
    assert {name_of[id(p)] for p in no_decay["params"]} == {"query_tokens", "proj.bias", "ln.weight", "ln.bias"}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_clipping_bounds_the_update():
    lin = nn.Linear(4, 1, bias=False)
    lin.weight.data.zero_()
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    wrapper = OptimWrapper(opt, lambda step: 1.0, max_grad_norm=0.5)
    wrapper.backward((lin(torch.full((1, 4), 100.0))).sum())
    stats = wrapper.step(0)
    assert stats["grad_norm"] == pytest.approx(200.0)  # |(100,100,100,100)|
    assert lin.weight.norm().item() == pytest.approx(0.5, rel=1e-5)  # SGD moved by the clipped gradient


# ------------------------------------------------------------------------------ run.amp on CPU
def cpuinfo_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the processor's flags from /proc/cpuinfo")
def test_cpu_bf16_detection_agrees_with_the_processor_flags():
    flags = cpuinfo_flags()
    assert optim.cpu_has_bf16_matmuls() == bool({"avx512_bf16", "amx_tile"} & flags)


def test_amp_on_a_cpu_with_bf16_matmuls_trains_under_bf16_autocast_with_float32_weights(monkeypatch):
    monkeypatch.setattr(optim, "cpu_has_bf16_matmuls", lambda: True)
    dtype = optim.amp_dtype(True, "bfloat16", torch.device("cpu"))
    assert dtype is torch.bfloat16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2), lambda step: 1e-2, amp_dtype=dtype)
    seen = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    with wrapper.autocast():
        loss = model(torch.randn(4, 8)).float().pow(2).mean()
    wrapper.backward(loss)
    assert seen == [torch.bfloat16]  # the product ran in bf16
    assert all(p.dtype is torch.float32 and p.grad.dtype is torch.float32 for p in model.parameters())
    wrapper.step(0)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_amp_on_a_cpu_without_bf16_matmuls_trains_in_float32_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(optim, "cpu_has_bf16_matmuls", lambda: False)
    with caplog.at_level("WARNING"):
        assert optim.amp_dtype(True, "bfloat16", torch.device("cpu")) is None
    assert "run.amp=true has no effect on cpu" in caplog.text and "float32" in caplog.text
    assert optim.amp_dtype(False, "bfloat16", torch.device("cpu")) is None


def test_amp_dtype_per_device(monkeypatch):
    monkeypatch.setattr(optim, "cpu_has_bf16_matmuls", lambda: True)
    with pytest.raises(ConfigError, match="run.amp_dtype=float16 on CPU"):
        optim.amp_dtype(True, "float16", torch.device("cpu"))
    assert optim.amp_dtype(True, "float16", torch.device("cuda")) is torch.float16  # no GPU needed to decide
    assert optim.amp_dtype(True, "bfloat16", torch.device("cuda")) is torch.bfloat16
