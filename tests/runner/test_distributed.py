"""DDP training and distributed evaluation with 2 gloo processes on CPU."""
import json

import torch
import torch.multiprocessing as mp

from lavis_lite import dist
from tests.runner.toys import ToyCaptions, free_port, make_runner, run_in_process_group


def _train(out_dir):
    runner = make_runner(out_dir / f"rank{dist.get_rank()}", batch_size_train=4, max_epoch=2)
    assert runner.strategy.train_module is not runner.model  # DDP-wrapped
    runner.train()
    torch.save(runner.model.state_dict(), out_dir / f"params_rank{dist.get_rank()}.pt")


def test_ddp_equals_one_process_on_combined_batch(tmp_path):
    mp.spawn(run_in_process_group, args=(2, free_port(), _train, (tmp_path,)), nprocs=2)
    rank0 = torch.load(tmp_path / "params_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "params_rank1.pt", weights_only=True)

    single = make_runner(tmp_path / "single", batch_size_train=8, max_epoch=2)
    initial = {k: v.clone() for k, v in single.model.state_dict().items()}
    single.train()
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=f"ranks differ: {key}")
        torch.testing.assert_close(rank0[key], value, rtol=0, atol=1e-5, msg=f"DDP != one process: {key}")
        if key == "head.weight":
            assert not torch.allclose(value, initial[key])


def _evaluate(out_dir, size):
    runner = make_runner(out_dir, eval_data=ToyCaptions(size=size), batch_size_eval=2)
    metrics = runner.evaluate(["val"])["val"]
    ids = []
    original = runner.task.aggregate

    def capture(results, *args):
        ids.extend(r["id"] for r in results)
        return original(results, *args)

    runner.task.aggregate = capture
    runner.evaluate(["val"])
    if dist.is_main_process():
        (out_dir / "eval.json").write_text(json.dumps({"metrics": metrics, "ids": ids}))


def test_distributed_eval_sees_each_sample_once(tmp_path):
    size = 7  # uneven across 2 ranks: 4 + 3, no padding duplicates
    mp.spawn(run_in_process_group, args=(2, free_port(), _evaluate, (tmp_path, size)), nprocs=2)
    two = json.loads((tmp_path / "eval.json").read_text())
    assert sorted(two["ids"]) == sorted(f"toy_{i}" for i in range(size))
    single = make_runner(tmp_path / "single", eval_data=ToyCaptions(size=size)).evaluate(["val"])["val"]
    assert two["metrics"]["num_samples"] == size
    assert abs(two["metrics"]["agg_metrics"] - single["agg_metrics"]) < 1e-9
