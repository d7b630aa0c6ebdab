"""The DeiT fine-tuning recipe (the paper's protocol): the recipe files, timm's pieces as
configured, RandAugment's per-sample determinism, one process vs two gloo processes, the
streamed vs the in-memory path, and stop + resume bit for bit."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy

from mocov3.data.counters import sample_keys
from mocov3.data.images import ImageDataset
from mocov3.data.labelled import EvalSplit, Views, _rand_augment_op, rand_augment
from mocov3.errors import ConfigError
from mocov3.eval.deit import build_criterion, build_erasing, build_mixup, step_seed
from mocov3.eval.finetune import FineTuneSettings, finetune, make_plan
from mocov3.eval.recipes import merged_settings, read_recipe
from mocov3.models.checkpoint import open_checkpoint

RECIPES = {
    "small": "configs/eval/finetune_deit_vit_small.yaml",
    "base": "configs/eval/finetune_deit_vit_base.yaml",
}
# everything world-size dependent off: the runs must agree step for step
QUIET = dict(drop_path=0.0, mixup=0.0, cutmix=0.0, random_erasing=0.0, label_smoothing=0.1)


def deit(name: str, **flags) -> FineTuneSettings:
    return merged_settings(
        FineTuneSettings, read_recipe(RECIPES[name], "finetune", FineTuneSettings), flags
    )


# ----------------------------------------------------------------------------- the recipe


@pytest.mark.parametrize(("name", "epochs"), [("small", 300), ("base", 150)])
def test_the_recipe_files_are_deits_numbers(name, epochs):
    recipe = read_recipe(RECIPES[name], "finetune", FineTuneSettings)
    assert recipe["protocol"] == f"deit-vit-{name}"
    s = deit(name)
    s.validate()
    assert (s.epochs, s.batch_size, s.base_lr, s.lr_batch) == (epochs, 1024, 5e-4, 512)
    assert (s.weight_decay, s.warmup_epochs, s.layer_decay, s.drop_path) == (0.05, 5, 1.0, 0.1)
    assert (s.label_smoothing, s.mixup, s.cutmix) == (0.1, 0.8, 1.0)
    assert (s.mixup_prob, s.mixup_switch_prob, s.mixup_mode) == (1.0, 0.5, "batch")
    assert (s.rand_augment, s.random_erasing, s.erasing_mode) == (
        "rand-m9-mstd0.5-inc1",
        0.25,
        "pixel",
    )
    assert (s.crop_min, s.eval_view) == (0.08, "centre")
    # lr = 5e-4 x batch / 512, at the recipe's batch and at another one
    assert make_plan(s, 1_281_167, 8).peak_lr == pytest.approx(1e-3)
    assert make_plan(deit(name, batch_size=256), 10_000, 1).peak_lr == pytest.approx(2.5e-4)
    assert deit(name, epochs=3).epochs == 3  # a flag overrides the recipe
    assert FineTuneSettings().lr_batch == 256  # the default recipe keeps the paper's /256


def test_timm_pieces_are_configured_as_the_recipe_says():
    s = deit("base")
    mixup = build_mixup(
        s.mixup, s.cutmix, s.mixup_prob, s.mixup_switch_prob, s.mixup_mode,
        s.label_smoothing, 10,
    )  # fmt: skip
    assert isinstance(mixup, Mixup)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob) == (0.8, 1.0, 1.0)
    assert (mixup.switch_prob, mixup.mode, mixup.label_smoothing) == (0.5, "batch", 0.1)
    assert mixup.num_classes == 10
    erasing = build_erasing(s.random_erasing, s.erasing_mode, torch.device("cpu"))
    assert isinstance(erasing, RandomErasing)
    assert (erasing.probability, erasing.mode, erasing.per_pixel) == (0.25, "pixel", True)
    assert (erasing.max_count, erasing.num_splits, erasing.device) == (1, 0, "cpu")
    assert isinstance(build_criterion(0.1, soft_targets=True), SoftTargetCrossEntropy)
    assert isinstance(build_criterion(0.1), torch.nn.CrossEntropyLoss)
    assert build_mixup(0, 0, 1, 0.5, "batch", 0.1, 10) is None
    assert build_erasing(0.0, "pixel", torch.device("cpu")) is None
    op = _rand_augment_op(s.rand_augment, 28, (128,))
    assert isinstance(op, RandAugment) and op.num_layers == 2
    assert {o.magnitude for o in op.ops} == {9} and {o.magnitude_std for o in op.ops} == {0.5}
    assert "SolarizeIncreasing" in {o.name for o in op.ops}  # inc1: the increasing ops
    # magnitude 10 (9 + noise, clipped) posterizes to 0 bits: black, as DeiT's Pillow did
    posterize = next(o for o in op.ops if o.name == "PosterizeIncreasing")
    assert posterize.aug_fn(Image.new("L", (8, 8), 200), 0).getextrema() == (0, 0)


def test_bad_settings_are_refused_in_one_line():
    for bad in (dict(rand_augment="rand-q9"), dict(mixup_mode="odd"), dict(random_erasing=2.0)):
        with pytest.raises(ConfigError) as error:
            FineTuneSettings(**bad).validate()
        assert "\n" not in str(error.value)
    assert FineTuneSettings(rand_augment="none").rand_augment is None
    with pytest.raises(ConfigError, match="must be even"):
        make_plan(FineTuneSettings(batch_size=6, mixup=0.8), 100, 2)


# ----------------------------------------------------------------------------- RandAugment


def _images(n: int, channels: int = 3, size: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    small = torch.randint(0, 256, (1, channels, 4, 4), generator=generator, dtype=torch.uint8)
    image = torch.nn.functional.interpolate(small.float(), size=size, mode="bilinear")
    return image.round().to(torch.uint8).expand(n, -1, -1, -1).contiguous()  # n copies


@pytest.mark.parametrize("channels", [1, 3])
def test_rand_augment_is_a_function_of_seed_epoch_and_index(channels):
    images = _images(12, channels)
    config = "rand-m9-mstd0.5-inc1"
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    first = rand_augment(images, sample_keys(0, 0, torch.arange(12)), config)
    again = rand_augment(images, sample_keys(0, 0, torch.arange(12)), config)
    assert torch.equal(first, again)
    # the global generators are left as they were
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
    # the same image under other indices, another epoch or seed: other augmentations
    distinct = {first[i].numpy().tobytes() for i in range(12)}
    assert len(distinct) >= 8
    epoch1 = rand_augment(images, sample_keys(0, 1, torch.arange(12)), config)
    assert not torch.equal(first, epoch1)
    # one image alone gets what it got in the batch
    alone = rand_augment(images[5:6], sample_keys(0, 0, torch.tensor([5])), config)
    assert torch.equal(alone[0], first[5])


def test_in_memory_crop_with_rand_augment_is_deterministic():
    images = _images(8)
    labels = torch.zeros(8, dtype=torch.long)
    split = EvalSplit.of_dataset(ImageDataset(images, labels, ["a"], (0.5,) * 3, (0.25,) * 3))
    views = Views("crop", (0.5, 1.0), seed=1, epoch=2, rand_augment="rand-m9-mstd0.5-inc1")
    cpu = torch.device("cpu")
    (a, _), (b, _) = (next(split.batches(torch.arange(8), 8, cpu, views)) for _ in range(2))
    assert torch.equal(a, b)
    plain = next(split.batches(torch.arange(8), 8, cpu, Views("crop", (0.5, 1.0), 1, 2)))[0]
    assert not torch.equal(a, plain)
    with pytest.raises(ValueError, match="crop"):
        Views("centre", rand_augment="rand-m9")


def test_step_seeds_depend_on_seed_step_and_rank():
    seeds = {step_seed(s, t, r) for s in range(2) for t in range(3) for r in range(2)}
    assert len(seeds) == 12 and step_seed(1, 2, 1) == step_seed(1, 2, 1)


# ----------------------------------------------------------------------------- whole runs


def _copy_run(tiny_run: Path, where: Path) -> Path:
    """A run directory of its own (fine-tuning checkpoints are written beside it)."""
    where.mkdir(parents=True)
    shutil.copy(tiny_run / "checkpoint.pt", where / "checkpoint.pt")
    return where / "checkpoint.pt"


SMALL = ["data.subset=256", "eval.test_subset=64"]


def _rank(rank: int, world: int, init: str, checkpoint: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        run = open_checkpoint(checkpoint, SMALL)
        settings = FineTuneSettings(
            epochs=1, batch_size=32, rand_augment="rand-m9-mstd0.5-inc1", **QUIET
        )
        result, _ = finetune(run, settings)
        if rank == 0:
            torch.save({k: result[k] for k in ("step_losses", "finetune_top1")}, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_follow_one_process_loss_curve(tiny_run, tmp_path):
    checkpoint = _copy_run(tiny_run, tmp_path / "two")
    out = tmp_path / "two.pt"
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(checkpoint), str(out)), nprocs=2)
    two = torch.load(out, weights_only=True)
    run = open_checkpoint(_copy_run(tiny_run, tmp_path / "one"), SMALL)
    settings = FineTuneSettings(
        epochs=1, batch_size=32, rand_augment="rand-m9-mstd0.5-inc1", **QUIET
    )
    one, _ = finetune(run, settings)
    assert len(one["step_losses"]) == len(two["step_losses"]) == 8
    assert np.allclose(one["step_losses"], two["step_losses"], rtol=0, atol=1e-3)
    assert abs(one["finetune_top1"] - two["finetune_top1"]) <= 100 / 64 + 1e-9
    assert one["processes"] == 1


def _write_folder(root: Path, size: int = 28) -> Path:
    """train/ and val/ of 3 classes of smooth grayscale PNGs, ``size`` pixels square."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 66), ("val", 24)):
        for i in range(count):
            folder = root / split / f"c{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, (4, 4), dtype=np.uint8) // (1 + i % 3)
            image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
            image.save(folder / f"{i:03d}.png")
    return root


def test_streamed_and_in_memory_runs_follow_the_same_loss_curve(tiny_run, tmp_path):
    folder = _write_folder(tmp_path / "images")
    settings = FineTuneSettings(epochs=2, batch_size=16, crop_min=0.5, warmup_epochs=0.5)
    curves, results = {}, {}
    for kind, limit in (("memory", 4.0), ("stream", 0.00001)):
        checkpoint = _copy_run(tiny_run, tmp_path / kind)
        overrides = [f"data.name=folder:{folder}", f"data.memory_limit_gb={limit}"]
        run = open_checkpoint(checkpoint, overrides)
        results[kind], _ = finetune(run, settings)
        curves[kind] = results[kind]["step_losses"]
    assert results["stream"]["streamed"] and not results["memory"]["streamed"]
    assert results["memory"]["train_images"] == 66 and results["memory"]["num_classes"] == 3
    assert len(curves["memory"]) == 8
    # the same boxes, resampled from the same pixels by two implementations
    assert np.allclose(curves["memory"], curves["stream"], rtol=0, atol=1e-3)
    assert (
        abs(results["memory"]["finetune_top1"] - results["stream"]["finetune_top1"])
        <= 100 / 24 + 1e-9
    )


def test_stop_and_resume_gives_the_uninterrupted_weights_bit_for_bit(tiny_run, tmp_path):
    # the whole DeiT recipe: Mixup/CutMix, erasing, drop path and RandAugment all drawing
    settings = deit("small", epochs=2, batch_size=32, warmup_epochs=0.5)
    overrides = ["data.subset=128", "eval.test_subset=32"]
    whole, whole_model = finetune(
        open_checkpoint(_copy_run(tiny_run, tmp_path / "a"), overrides), settings
    )
    run = open_checkpoint(_copy_run(tiny_run, tmp_path / "b"), overrides)
    stopped, _ = finetune(run, settings, stop_after_steps=3)
    assert stopped["preempted"] and stopped["step"] == 3 and stopped["total_steps"] == 8
    state = torch.load(tmp_path / "b" / "finetune.ckpt.pt", weights_only=True)
    assert state["step"] == 3 and len(state["losses"]) == 3
    resumed, resumed_model = finetune(run, settings, resume="auto")
    assert resumed["resumed_from"].endswith("finetune.ckpt.pt")
    assert resumed["step_losses"] == whole["step_losses"]
    after, expected = resumed_model.state_dict(), whole_model.state_dict()
    assert all(torch.equal(after[k], expected[k]) for k in expected)
    assert resumed["finetune_top1"] == whole["finetune_top1"]
    assert whole["protocol"] == "small-data" and whole["lr"] == pytest.approx(5e-4 * 32 / 512)

    # another recipe, another pretrained checkpoint, or a pretraining file: refused
    with pytest.raises(ConfigError, match="seed=0, this run has seed=1"):
        finetune(
            run, deit("small", epochs=2, batch_size=32, warmup_epochs=0.5, seed=1), resume="auto"
        )
    other = open_checkpoint(_copy_run(tiny_run, tmp_path / "c"), overrides)
    shutil.copy(tmp_path / "b" / "finetune.ckpt.pt", tmp_path / "c" / "finetune.ckpt.pt")
    with pytest.raises(ConfigError, match="fine-tunes .*/b/checkpoint.pt, not"):
        finetune(other, settings, resume="auto")
    with pytest.raises(ConfigError, match="not a fine-tuning checkpoint"):
        finetune(other, settings, resume=tmp_path / "c" / "checkpoint.pt")
