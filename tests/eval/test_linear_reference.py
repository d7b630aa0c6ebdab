"""The reference linear probe (``main_lincls.py``): its recipe against hand-computed values,
its training against a plain torch loop, one process against two real gloo processes, the
streamed split against the in-memory one, and a stop + ``resume="auto"`` against the run
that was never stopped (bit for bit).

The tiny pretrained ViT (tests/conftest.py) probed on a folder of 45 + 24 small PNGs of
three classes, whose size is the preset's image size (28 px), so that the in-memory and
streamed crops cut the same pixels up to resampling; batch 16: 3 steps per epoch, the last
one partial (13 images, 7 + 6 on two processes). fp32 and one thread, so runs repeat bit for
bit."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from mocov3.config import load_config
from mocov3.data.labelled import Views
from mocov3.data.sampling import epoch_order
from mocov3.errors import CheckpointError, ConfigError
from mocov3.eval.features import ProbeFeatures
from mocov3.eval.linear_reference import (
    EVAL_VIEWS,
    ReferenceProbeSettings,
    default_base_lr,
    epoch_lr,
    file_names,
    init_classifier,
    local_batches,
    probe_reference,
    resolve_settings,
    scaled_lr,
    steps_per_epoch,
    train_views,
)
from mocov3.eval.splits import labelled_splits
from mocov3.models.checkpoint import open_checkpoint
from mocov3.models.moco import build_moco
from mocov3.runtime.checkpoint import save_checkpoint

TRAIN_PER_CLASS, TEST_PER_CLASS, CLASSES = 15, 8, ("a", "b", "c")
SETTINGS = ReferenceProbeSettings(epochs=2, batch_size=16, device="cpu", seed=3)
STEPS = 2 * 3  # 45 images at batch 16: 16, 16, 13
CKPT, RESULT = file_names("cls")


# --------------------------------------------------------------------------- data


def _image(label: int, i: int) -> Image.Image:
    """A 28x28 RGB image whose class shows: a bright, dark or striped pattern, plus noise."""
    rng = np.random.default_rng(1000 * label + i)
    base = np.full((28, 28, 3), (200, 60, 128)[label], dtype=np.float64)
    if label == 2:
        base[:, ::4] = 250
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("reference_probe")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOCOV3_CACHE", str(root / "cache"))  # never the user's ~/.cache
        for split, count in (("train", TRAIN_PER_CLASS), ("val", TEST_PER_CLASS)):
            for label, name in enumerate(CLASSES):
                directory = root / "images" / split / name
                directory.mkdir(parents=True)
                for i in range(count):
                    offset = 0 if split == "train" else 500
                    _image(label, i + offset).save(directory / f"{i:02d}.png")
        yield root / "images"


@pytest.fixture
def run_dir(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run's checkpoint in a directory of its own (the probe writes
    beside it)."""
    target = tmp_path / "run"
    target.mkdir()
    shutil.copy(tiny_run / "checkpoint.pt", target / "checkpoint.pt")
    return target


def overrides(folder: Path, streamed: bool = False) -> list[str]:
    extra = ["data.memory_limit_gb=0.00001", "data.workers=1"] if streamed else []
    return [f"data.name=folder:{folder}", "train.precision=fp32", "train.threads=1", *extra]


def open_run(run_dir: Path, folder: Path, streamed: bool = False):
    return open_checkpoint(run_dir / "checkpoint.pt", overrides(folder, streamed))


def final_classifier(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / CKPT, weights_only=True)["classifier"]


# --------------------------------------------------------------------------- the recipe


def test_cosine_is_set_per_epoch_as_main_lincls():
    assert epoch_lr(4.0, 0, 90) == 4.0
    assert epoch_lr(4.0, 30, 90) == pytest.approx(3.0)  # 4 * 0.5 * (1 + cos(pi / 3))
    assert epoch_lr(4.0, 45, 90) == pytest.approx(2.0)
    assert epoch_lr(4.0, 60, 90) == pytest.approx(1.0)
    assert epoch_lr(4.0, 90, 90) == pytest.approx(0.0, abs=1e-12)
    values = [epoch_lr(1.0, e, 10) for e in range(10)]
    assert values == sorted(values, reverse=True) and values[-1] > 0


def test_lr_is_base_lr_times_batch_over_256_by_backbone(tiny_run):
    assert default_base_lr("vit_small") == 3.0 and default_base_lr("vit_custom") == 3.0
    assert default_base_lr("resnet50") == 0.1 and default_base_lr("resnet18") == 0.1
    assert scaled_lr(3.0, 1024) == 12.0 and scaled_lr(0.1, 512) == pytest.approx(0.2)
    run = open_checkpoint(tiny_run)
    resolved = resolve_settings(run, ReferenceProbeSettings())
    assert resolved.base_lr == 3.0 and resolved.seed == run.config.train.seed
    assert resolve_settings(run, ReferenceProbeSettings(base_lr=0.5)).base_lr == 0.5
    defaults = ReferenceProbeSettings()
    assert (defaults.epochs, defaults.batch_size, defaults.weight_decay) == (90, 1024, 0.0)


def test_classifier_starts_at_n_0_001_with_zero_bias_the_same_for_a_seed():
    linear = init_classifier(384, 1000, seed=7)
    assert linear.weight.shape == (1000, 384) and torch.equal(linear.bias, torch.zeros(1000))
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.01)
    assert abs(linear.weight.mean().item()) < 1e-4
    by_hand = torch.randn(1000, 384, generator=torch.Generator().manual_seed(7)) * 0.01
    assert torch.equal(linear.weight, by_hand)
    assert torch.equal(init_classifier(384, 1000, seed=7).weight, linear.weight)
    assert not torch.equal(init_classifier(384, 1000, seed=8).weight, linear.weight)


def test_train_and_validation_views():
    assert train_views(ReferenceProbeSettings(), 5, 2) == Views("crop", (0.08, 1.0), 5, 2)
    custom = ReferenceProbeSettings(crop_scale=(0.2, 1.0))
    assert train_views(custom, 0, 9) == Views("crop", (0.2, 1.0), 0, 9)
    assert EVAL_VIEWS == Views("centre")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_global_batches_keep_the_last_partial_one_and_shard_in_rank_order(world):
    order = epoch_order(0, 1, 45)
    assert steps_per_epoch(45, 16) == 3 and steps_per_epoch(48, 16) == 3
    shares = [local_batches(order, 16, rank, world) for rank in range(world)]
    for step, expected in enumerate(order.split(16)):
        assert torch.equal(torch.cat([share[step] for share in shares]), expected)


# --------------------------------------------------------------------------- training


def plain_reference_loop(run, settings: ReferenceProbeSettings) -> torch.nn.Linear:
    """main_lincls.py written plainly: nn.Linear, optim.SGD, mean cross-entropy, the lr set
    at each epoch's start; the same views, read one global batch at a time."""
    settings = resolve_settings(run, settings)
    features = ProbeFeatures(run.backbone(), "cls").eval()
    train, _ = labelled_splits(
        run.config, "test", run.in_chans, (run.state["mean"], run.state["std"])
    )
    classifier = init_classifier(64, 3, settings.seed)
    lr = scaled_lr(settings.base_lr, settings.batch_size)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=0)
    for epoch in range(settings.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / settings.epochs))
        order = epoch_order(settings.seed, epoch, len(train))
        views = Views("crop", (0.08, 1.0), settings.seed, epoch)
        for x, kept in train.batches(order, settings.batch_size, torch.device("cpu"), views):
            with torch.no_grad():
                f = features(x)
            loss = F.cross_entropy(classifier(f), train.labels[kept])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return classifier


def test_training_equals_a_plain_main_lincls_loop(run_dir, folder):
    summary = probe_reference(open_run(run_dir, folder), SETTINGS)
    plain = plain_reference_loop(open_run(run_dir, folder), SETTINGS)
    ours = final_classifier(run_dir)
    torch.testing.assert_close(ours["weight"], plain.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["bias"], plain.bias.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours["weight"], init_classifier(64, 3, 3).weight)  # it trained
    assert summary["backbone_unchanged"] is True
    assert summary["train_images"] == 45 and summary["test_images"] == 24
    assert summary["lr"] == pytest.approx(3.0 * 16 / 256) and summary["base_lr"] == 3.0
    assert summary["linear_top1"] >= 60.0  # 3 easy classes, chance 33%
    assert summary["linear_top5"] == 100.0  # 3 classes: the top 5 hold every class
    assert summary["streamed"] is False and summary["processes"] == 1
    assert summary["images_per_second"] > 0
    assert (run_dir / RESULT).read_text().count("\n") == 1


def _rank_worker(rank: int, world: int, store: str, run_dir: str, folder: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank,
                            world_size=world)  # fmt: skip
    try:
        probe_reference(open_run(Path(run_dir), Path(folder)), SETTINGS)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_train_and_evaluate_like_one(run_dir, folder, tmp_path):
    alone = probe_reference(open_run(run_dir, folder), SETTINGS)
    one = final_classifier(run_dir)
    two_dir = tmp_path / "two"
    shutil.copytree(run_dir, two_dir)
    (two_dir / CKPT).unlink()
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "store"), str(two_dir), str(folder)),
             nprocs=2, join=True)  # fmt: skip
    two = final_classifier(two_dir)
    torch.testing.assert_close(two["weight"], one["weight"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(two["bias"], one["bias"], rtol=1e-4, atol=1e-6)
    import json

    together = json.loads((two_dir / RESULT).read_text())
    assert together["processes"] == 2
    assert together["linear_top1"] == alone["linear_top1"]
    assert together["test_images"] == alone["test_images"] == 24


def test_streamed_split_trains_like_the_one_in_memory(run_dir, folder, tmp_path):
    memory = probe_reference(open_run(run_dir, folder), SETTINGS)
    in_memory = final_classifier(run_dir)
    streamed = probe_reference(open_run(run_dir, folder, streamed=True), SETTINGS)
    assert streamed["streamed"] is True and memory["streamed"] is False
    weights = final_classifier(run_dir)
    # the same crop boxes, resampled by two code paths: close, not equal
    torch.testing.assert_close(weights["weight"], in_memory["weight"], rtol=0.05, atol=2e-3)
    assert abs(streamed["linear_top1"] - memory["linear_top1"]) <= 100 / 24 + 1e-6


@pytest.mark.parametrize("stop_after", [2, 3, 4])  # mid-epoch, at an epoch end, mid-epoch 1
def test_stop_and_resume_auto_is_bit_identical(run_dir, folder, tmp_path, stop_after):
    uninterrupted = probe_reference(open_run(run_dir, folder), SETTINGS)
    expected = final_classifier(run_dir)
    (run_dir / CKPT).unlink()
    stopped = probe_reference(open_run(run_dir, folder), SETTINGS, stop_after_steps=stop_after)
    assert stopped["preempted"] is True and stopped["step"] == stop_after
    state = torch.load(run_dir / CKPT, weights_only=True)
    assert (state["epoch"], state["step"]) == divmod(stop_after, 3)
    resumed = probe_reference(open_run(run_dir, folder), SETTINGS, resume="auto")
    got = final_classifier(run_dir)
    assert torch.equal(got["weight"], expected["weight"])
    assert torch.equal(got["bias"], expected["bias"])
    assert resumed["linear_top1"] == uninterrupted["linear_top1"]
    assert resumed["resumed_from"] == str(run_dir / CKPT)


def test_resume_of_another_backbone_or_other_settings_is_refused(run_dir, folder, tmp_path):
    probe_reference(open_run(run_dir, folder), SETTINGS, stop_after_steps=1)
    other = tmp_path / "other"
    other.mkdir()
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    name = next(k for k in state["model"] if k.startswith("backbone.") and "weight" in k)
    state["model"][name] = state["model"][name] + 0.01  # the same file name, other weights
    save_checkpoint(state, other / "checkpoint.pt")
    shutil.copy(run_dir / CKPT, other / CKPT)
    with pytest.raises(CheckpointError, match="probes another backbone") as error:
        probe_reference(open_run(other, folder), SETTINGS, resume="auto")
    assert "\n" not in str(error.value)
    changed = dataclasses.replace(SETTINGS, epochs=3)
    with pytest.raises(CheckpointError, match=r"other settings \(epochs\)"):
        probe_reference(open_run(run_dir, folder), changed, resume="auto")
    with pytest.raises(CheckpointError, match="no checkpoint at .*none.pt"):
        probe_reference(open_run(run_dir, folder), SETTINGS, resume=tmp_path / "none.pt")


def test_a_backbone_that_moves_is_reported(run_dir, folder):
    run = open_run(run_dir, folder)
    backbone = run.backbone()
    parameter = next(backbone.parameters())

    def nudge(module, inputs, output):  # a probe that leaked into the backbone
        parameter.data.add_(1e-3)

    backbone.register_forward_hook(nudge)
    assert probe_reference(run, SETTINGS)["backbone_unchanged"] is False


def test_refusals_are_one_line(tiny_run, tmp_path):
    run = open_checkpoint(tiny_run)
    for bad, words in (
        (ReferenceProbeSettings(features="last4"), "at least 4 blocks"),
        (ReferenceProbeSettings(epochs=0), "--epochs"),
        (ReferenceProbeSettings(base_lr=-1.0), "--base-lr"),
        (ReferenceProbeSettings(crop_scale=(0.5, 0.2)), "--crop-scale"),
        (ReferenceProbeSettings(eval_every=0), "--eval-every"),
    ):
        with pytest.raises(ConfigError, match=words) as error:
            probe_reference(run, bad)
        assert "\n" not in str(error.value)
    config = load_config("configs/resnet18_demo.yaml", ["model.resnet_width=8"])
    state = {"model": build_moco(config, 1).state_dict(), "config": config.to_dict(),
             "in_chans": 1, "mean": [0.5], "std": [0.25]}  # fmt: skip
    save_checkpoint(state, tmp_path / "resnet" / "checkpoint.pt")
    resnet = open_checkpoint(tmp_path / "resnet")
    assert resolve_settings(resnet, ReferenceProbeSettings()).base_lr == 0.1
    with pytest.raises(ConfigError, match="use features 'cls'"):
        probe_reference(resnet, ReferenceProbeSettings(features="cls+avgpool"))
