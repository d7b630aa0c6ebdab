"""Distributed training: sharding, SyncBatchNorm1d, and world-size invariance, all checked
with real gloo process groups on the CPU."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mocov3.config import load_config
from mocov3.data.sampling import StepSampler, per_process_batch
from mocov3.errors import ConfigError
from mocov3.models.heads import SyncBatchNorm1d, SyncBatchNorm2d
from mocov3.models.moco import build_moco
from mocov3.models.vit import TokenBatchNorm
from mocov3.runtime.distributed import ProcessInfo
from mocov3.train.trainer import Trainer, pretrain


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_sample_is_seen_once_per_epoch_across_processes(world):
    num_images, global_batch = 103, 12  # 8 steps per epoch, 7 images dropped per epoch
    samplers = [
        StepSampler(num_images, global_batch, seed=5, rank=r, world_size=world)
        for r in range(world)
    ]
    alone = StepSampler(num_images, global_batch, seed=5)
    spe = alone.steps_per_epoch
    for epoch in range(3):
        seen = []
        for step in range(epoch * spe, (epoch + 1) * spe):
            shards = [s.indices(step) for s in samplers]
            assert all(len(shard) == global_batch // world for shard in shards)
            # the processes' shards, in rank order, are exactly one process's batch
            assert torch.equal(torch.cat(shards), alone.indices(step))
            seen += torch.cat(shards).tolist()
        assert len(seen) == len(set(seen)) == spe * global_batch
    # a different epoch is a different order
    assert not torch.equal(alone.indices(0), alone.indices(spe))


def test_a_global_batch_that_does_not_divide_is_refused():
    assert per_process_batch(12, 4) == 3
    with pytest.raises(ConfigError, match="not divisible by the 5 processes"):
        per_process_batch(12, 5)


def test_trainer_refuses_an_indivisible_batch_before_loading_data(tmp_path):
    config = load_config("configs/tiny.yaml", ["train.batch_size=63", "data.name=missing"])
    with pytest.raises(ConfigError, match="multiple of 2"):
        Trainer(config, tmp_path, process=ProcessInfo(rank=0, world_size=2))


# --------------------------------------------------------------------- SyncBatchNorm1d


class _PlainTokenBatchNorm(nn.BatchNorm1d):
    """torch's BatchNorm1d over the channels of [B, N, D] tokens: the one-process answer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


# (shape of the whole batch, our synchronised BN, torch's BN); half the batch per process
BATCH_NORMS = {
    "1d": ((16, 6), SyncBatchNorm1d, nn.BatchNorm1d),
    "2d": ((8, 6, 5, 5), SyncBatchNorm2d, nn.BatchNorm2d),
    "tokens": ((8, 5, 6), TokenBatchNorm, _PlainTokenBatchNorm),  # ViT-BN: 6 channels
}


def _batch_norm_case(kind: str, ours: bool) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """The same input, upstream gradient and affine parameters for every process."""
    shape, sync_bn, plain_bn = BATCH_NORMS[kind]
    torch.manual_seed(0)
    x, upstream = torch.randn(shape) * 3 + 1, torch.randn(shape)
    channels = shape[-1] if kind == "tokens" else shape[1]
    bn = (sync_bn if ours else plain_bn)(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2, channels))
        bn.bias.copy_(torch.linspace(-1, 1, channels))
    return x, upstream, bn


def _sync_bn_worker(rank: int, world: int, kind: str, store_path: str, out_dir: str) -> None:
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        x, upstream, bn = _batch_norm_case(kind, ours=True)
        part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        local = x[part].clone().requires_grad_(True)
        out = bn(local)
        # each process's loss is its rows' share of the one-process loss
        (out * upstream[part]).sum().backward()
        torch.save(
            {
                "out": out.detach(),
                "grad_x": local.grad,
                "grad_w": bn.weight.grad,
                "grad_b": bn.bias.grad,
                "running_mean": bn.running_mean,
                "running_var": bn.running_var,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["1d", "2d", "tokens"])
def test_sync_batchnorm_over_two_processes_equals_batchnorm_over_the_whole_batch(kind, tmp_path):
    """The heads' SyncBatchNorm1d, the ResNet's SyncBatchNorm2d and ViT-BN's TokenBatchNorm,
    on 2 gloo processes."""
    mp.spawn(_sync_bn_worker, args=(2, kind, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    x, upstream, bn = _batch_norm_case(kind, ours=False)
    x.requires_grad_(True)
    out = bn(x)
    (out * upstream).sum().backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach(), **close)
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in ranks]), x.grad, **close)
    # parameter gradients: DDP sums (then averages) what each process computed
    torch.testing.assert_close(ranks[0]["grad_w"] + ranks[1]["grad_w"], bn.weight.grad, **close)
    torch.testing.assert_close(ranks[0]["grad_b"] + ranks[1]["grad_b"], bn.bias.grad, **close)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], bn.running_mean, **close)
        torch.testing.assert_close(r["running_var"], bn.running_var, **close)


def test_sync_batchnorm_alone_is_plain_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(10, 4)
    ours, plain = SyncBatchNorm1d(4), nn.BatchNorm1d(4)
    assert torch.equal(ours(x), plain(x))
    assert ours.state_dict().keys() == plain.state_dict().keys()


# ------------------------------------------------------------- world-size invariance

RUN = [
    # fp32: the invariance is of the DDP arithmetic. Under bf16 autocast (what `auto` picks on a
    # CPU with AVX-512-BF16) a 32-image and a 64-image matmul round differently: the first
    # loss differed by 2e-5 between 1 and 2 processes there.
    "train.precision=fp32",
    "data.subset=512",
    "train.epochs=1",
    "train.log_every=1",
    "eval.knn_init=false",
    "eval.knn_final=false",
]


def _train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def test_two_gloo_processes_train_exactly_like_one(tmp_path):
    """Same config, seed and global batch (64) on 1 process and on 2 under torchrun: the
    same loss curve and the same final weights, to floating-point tolerance."""
    one, two = tmp_path / "one", tmp_path / "two"
    pretrain(load_config("configs/tiny.yaml", RUN), one)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "mocov3", "pretrain", "--config", "configs/tiny.yaml", "--out", str(two),
        *[arg for item in RUN for arg in ("--set", item)],
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # only rank 0 prints it
    assert summary["processes"] == 2 and summary["steps"] == 8
    # only the main process writes: one metrics line per step, one checkpoint set
    losses_one, losses_two = _train_losses(one), _train_losses(two)
    assert len(losses_two) == len(losses_one) == 8
    assert losses_one[0] != losses_one[-1]
    torch.testing.assert_close(losses_two, losses_one, rtol=0, atol=1e-5)

    weights_one, weights_two = _final_model(one), _final_model(two)
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        if tensor.dim() >= 2:  # every weight matrix and the class token
            torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=1e-5)
    # Some bias vectors are in the null space of the loss (the final LayerNorm bias is
    # removed by the projector's first BatchNorm; a key bias cancels in the softmax): their
    # exact gradient is 0, and Adam turns the rounding noise of 0 into steps of size lr.
    # So compare what the model computes: the query encoder, BN in training mode.
    config = load_config("configs/tiny.yaml", RUN)
    outputs = []
    for weights in (weights_one, weights_two):
        model = build_moco(config, in_chans=1)
        model.load_state_dict(weights)
        torch.manual_seed(1)
        x = torch.randn(32, 1, 28, 28)
        with torch.no_grad():
            outputs.append(model.predictor(model.projector(model.backbone(x))))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-3, atol=1e-3)


def _torchrun(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "mocov3", "pretrain", "--config", "configs/tiny.yaml", "--out", str(out),
        *[arg for item in RUN for arg in ("--set", item)], "--set", "train.epochs=3", *extra,
    ]  # fmt: skip


def test_sigterm_to_torchrun_stops_every_process_after_one_checkpoint(tmp_path):
    """torchrun forwards SIGTERM to its workers, which may see it at different steps: they
    agree on one step, the main process checkpoints it, every process exits, and the run
    finishes with --resume auto (here on one process)."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    agent = subprocess.Popen(
        _torchrun(out),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: we can tell when all are gone
    )
    lines = []
    for line in agent.stdout:  # wait for rank 0's progress line of step 3 (no polling)
        lines.append(line)
        if "] 3/24 " in line:
            break
    else:
        pytest.fail("the run ended before step 3: " + "".join(lines)[-2000:])
    agent.send_signal(signal.SIGTERM)
    rest, _ = agent.communicate(timeout=120)
    output = "".join(lines) + rest
    with pytest.raises(ProcessLookupError):
        os.killpg(agent.pid, 0)  # no worker outlived the agent
    stopped = re.search(r"stopped by SIGTERM after step (\d+)/24", output)
    assert stopped, output[-2000:]
    step = int(stopped.group(1))
    assert 3 <= step < 24
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == step
    assert "torchrun --nproc-per-node 2 -m mocov3 pretrain" in output
    assert "--resume auto" in output

    # resume on one process: the data order and augmentation do not depend on the world size
    alone = [sys.executable, *_torchrun(out, "--resume", "auto")[6:]]
    assert alone[1:3] == ["-m", "mocov3"]
    done = subprocess.run(alone, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 24 and summary["resumed_from"].endswith(f"checkpoint-{step}.pt")
