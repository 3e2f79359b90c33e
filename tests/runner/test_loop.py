"""Accumulation, resume and checkpoint behaviour of the training loop."""
import json

import pytest
import torch

from lavis_lite.runner import checkpoint
from lavis_lite.runner.hooks import Hook

from tests.runner.toys import ToyCaptions, make_runner


def params(runner):
    return {k: v.detach().clone() for k, v in runner.model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture
def float64():
    """Adam divides by sqrt(v): float32 rounding in near-zero gradients shows up at 1e-5, so compare
    the two accumulation schedules in float64."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_accumulation_equals_large_batch(tmp_path, float64):
    big = make_runner(tmp_path / "big", batch_size_train=8, accum_grad_iters=1, max_epoch=1, warmup_steps=0,
                      lr_sched="constant_lr")
    small = make_runner(tmp_path / "small", batch_size_train=4, accum_grad_iters=2, max_epoch=1, warmup_steps=0,
                        lr_sched="constant_lr")
    before = params(big)
    big.train()
    small.train()
    assert big.iteration == 3 and small.iteration == 6  # 24 samples
    assert_same(params(big), params(small))
    assert not torch.allclose(params(big)["head.weight"], before["head.weight"])  # it did train
    # a third run without accumulation diverges: the check can fail
    plain = make_runner(tmp_path / "plain", batch_size_train=4, accum_grad_iters=1, max_epoch=1,
                        warmup_steps=0, lr_sched="constant_lr")
    plain.train()
    assert not torch.allclose(params(plain)["head.weight"], params(big)["head.weight"], atol=1e-3)


class StopAt(Hook):
    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self, runner, iteration, outputs):
        if iteration == self.iteration:
            raise KeyboardInterrupt


@pytest.mark.parametrize("mid_epoch", [False, True])
def test_resume_matches_uninterrupted(tmp_path, mid_epoch):
    options = dict(max_epoch=3, save_every_n_steps=2 if mid_epoch else 0)
    full = make_runner(tmp_path / "full", ToyCaptions(noise=True), **options)
    full.train()

    part = make_runner(tmp_path / "part", ToyCaptions(noise=True), **options)
    stop_after = 4 if mid_epoch else 3  # 3 iterations per epoch; checkpoint_4 is mid-epoch 2
    part.hooks.append(StopAt(stop_after))  # dies in the step after the checkpoint
    with pytest.raises(KeyboardInterrupt):
        part.train()
    ckpt = tmp_path / "part" / f"checkpoint_{stop_after}.pth"
    assert ckpt.is_file()

    resumed = make_runner(tmp_path / "part", ToyCaptions(noise=True), model_seed=123,
                          resume_ckpt_path=str(ckpt), **options)
    assert resumed.iteration == stop_after
    resumed.train()
    assert_same(params(resumed), params(full))
    # optimizer state matches too
    for a, b in zip(resumed.optim.optimizer.state.values(), full.optim.optimizer.state.values()):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=0, atol=1e-6)


def test_checkpoint_rotation_atomicity_and_contents(tmp_path):
    runner = make_runner(tmp_path, max_epoch=4, keep_last_k=2)
    runner.train()
    names = sorted(p.name for p in tmp_path.glob("checkpoint_*.pth"))
    assert names == ["checkpoint_12.pth", "checkpoint_9.pth"]
    assert not list(tmp_path.glob(".*.tmp"))
    state = checkpoint.load(tmp_path / "checkpoint_12.pth")
    assert set(state["model"]) == {"encoder.0.weight", "encoder.0.bias", "head.weight", "head.bias"}
    assert state["iteration"] == 12 and "exp_avg" in next(iter(state["optim"]["optimizer"]["state"].values()))


def test_checkpoint_holds_only_trainable_weights_and_resume_checks_them(tmp_path):
    runner = make_runner(tmp_path / "a", max_epoch=1)
    runner.model.freeze(["encoder."])
    runner.train()
    state = checkpoint.load(tmp_path / "a" / "checkpoint_3.pth")
    assert set(state["model"]) == {"head.weight", "head.bias"}
    # a model with everything trainable expects the encoder too: resume refuses with the key names
    with pytest.raises(KeyError, match="encoder.0.weight"):
        make_runner(tmp_path / "b", resume_ckpt_path=str(tmp_path / "a" / "checkpoint_3.pth"))


def test_json_log_has_lavis_keys(tmp_path):
    make_runner(tmp_path, max_epoch=1).train()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert {"train_loss", "train_lr", "iteration", "epoch", "samples_per_s"} <= set(records[0])
    assert records[0]["train_lr"] == pytest.approx(0.0)  # warm-up from warmup_lr=0
    assert records[1]["train_lr"] == pytest.approx(0.025)  # half way to init_lr=0.05


def test_iteration_runner_cycles_data(tmp_path):
    runner = make_runner(tmp_path, runner="runner_iter", max_iters=7, iters_per_inner_epoch=5, save_freq_epochs=1)
    runner.train()
    assert runner.iteration == 7
    assert runner.data_epoch == 2 and runner.data_position == 1  # 3 batches per pass
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")) == ["checkpoint_5.pth", "checkpoint_7.pth"]


def test_best_checkpoint_follows_metric(tmp_path):
    runner = make_runner(tmp_path, max_epoch=2, valid_splits=["val"], best_metric="agg_metrics",
                         eval_data=ToyCaptions(size=10))
    runner.train()
    assert (tmp_path / "checkpoint_best.pth").is_file()
    evals = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines() if "val_agg_metrics" in l]
    assert len(evals) == 2 and evals[0]["val_num_samples"] == 10
    best = checkpoint.load(tmp_path / "checkpoint_best.pth")
    assert best["best"]["metric"] == pytest.approx(max(e["val_agg_metrics"] for e in evals))


def test_skipped_bad_images_are_reported_at_epoch_end(tmp_path, caplog):
    class WithBadCounts(ToyCaptions):
        def collater(self, samples):
            return {**super().collater(samples), "bad_images": 1}  # as if each batch replaced one image

    runner = make_runner(tmp_path, WithBadCounts(), max_epoch=2)
    with caplog.at_level("WARNING"):
        runner.train()
    reports = [r.getMessage() for r in caplog.records if "unreadable images" in r.getMessage()]
    assert reports == ["epoch 0: skipped 3 unreadable images (see the warnings above for their paths)",
                       "epoch 1: skipped 3 unreadable images (see the warnings above for their paths)"]


def test_resume_on_webdataset_shards(tmp_path):
    """Shards (an IterableDataset) resume mid-pass at the same sample, like map-style data."""
    from torchvision.transforms.functional import pil_to_tensor

    from lavis_lite.data.webdataset import ImageTextShards, expand_shards
    from tests.data.test_webdataset import write_shards

    pattern = write_shards(tmp_path / "shards", shards=4, per_shard=6)

    def shards():
        to_image = lambda image: pil_to_tensor(image.resize((32, 32))).float() / 255
        return ImageTextShards(expand_shards(pattern), to_image, str.lower, num_samples=24, shuffle_buffer=4)

    options = dict(max_epoch=2, batch_size_train=4, save_every_n_steps=4, num_workers=2)
    full = make_runner(tmp_path / "full", shards(), **options)
    full.train()
    part = make_runner(tmp_path / "part", shards(), **options)
    part.hooks.append(StopAt(8))
    with pytest.raises(KeyboardInterrupt):
        part.train()
    resumed = make_runner(tmp_path / "part", shards(), model_seed=5,
                          resume_ckpt_path=str(tmp_path / "part" / "checkpoint_8.pth"), **options)
    resumed.train()
    assert full.iteration == resumed.iteration == 12
    assert_same(params(resumed), params(full))


def test_mixing_ratios_draw_data_sets_in_proportion():
    from lavis_lite.data.samplers import TrainSampler, mixing_weights

    sizes, ratios = [100, 900], [3.0, 1.0]  # the small set should make up 3/4 of every epoch
    sampler = TrainSampler(sum(sizes), seed=1, weights=mixing_weights(sizes, ratios))
    drawn = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        drawn += list(sampler)
    share = sum(i < 100 for i in drawn) / len(drawn)
    assert abs(share - 0.75) < 0.02  # binomial std over 4000 draws is ~0.007
    assert mixing_weights(sizes, [1.0, 1.0]) is None  # equal ratios: plain shuffling, each sample once
    sampler = TrainSampler(10, rank=1, world_size=3, seed=0)
    sampler.set_epoch(0)
    assert len(list(sampler)) == len(sampler) == 4  # 10 padded to 12, dealt to 3 ranks
