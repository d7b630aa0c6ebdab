"""Linear probe: accuracy on separable data, honest lr selection, side-by-side training
equal to training alone (and to a plain torch loop), the CLI, and the backbone check."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mocov3.cli import main
from mocov3.data.images import ImageDataset
from mocov3.data.labelled import EvalSplit
from mocov3.eval.features import snapshot, unchanged
from mocov3.eval.linear import (
    augmented_features,
    linear_probe,
    probe_backbone,
    standardise,
    train_linear_probes,
)
from mocov3.models.checkpoint import open_checkpoint


def blobs(n: int, seed: int, classes: int = 4, dim: int = 16, spread: float = 0.5):
    """Gaussian blobs around fixed, well separated class centres (the same for every seed)."""
    centres = 3.0 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=generator)
    return centres[labels] + spread * torch.randn(n, dim, generator=generator), labels


def test_separable_blobs_are_classified_almost_perfectly():
    train_x, train_y = blobs(800, seed=1)
    test_x, test_y = blobs(400, seed=2)
    result = linear_probe(train_x, train_y, test_x, test_y, lrs=[0.1, 1.0], epochs=20,
                          batch_size=128)
    assert result["linear_top1"] >= 99.0
    assert result["val_top1"] >= 99.0
    assert result["train_samples"] == 720 and result["val_samples"] == 80
    assert set(result["val_top1_per_lr"]) == {0.1, 1.0}


def test_lr_is_chosen_on_val_never_on_test():
    train_x, train_y = blobs(600, seed=3)
    test_x, test_y = blobs(300, seed=4)
    lrs = (1.0, 1e-6)  # a good lr; one that leaves the classifier at its random init
    kwargs = dict(lrs=lrs, epochs=10, batch_size=128, seed=5)
    first = linear_probe(train_x, train_y, test_x, test_y, **kwargs)
    assert first["best_lr"] == 1.0 and first["val_top1_per_lr"][1.0] >= 99.0
    # Relabel the test split with what the barely trained classifier predicts: on the test
    # split it is now perfect, so anything that looked at test accuracy would pick it.
    fooled = first["probes"].logits(test_x, index=1).argmax(dim=1)
    probes = first["probes"]
    assert probes.accuracy(test_x, fooled, index=1).item() == 100.0
    good_on_fooled = probes.accuracy(test_x, fooled, index=0).item()
    assert good_on_fooled < 50.0

    second = linear_probe(train_x, train_y, test_x, fooled, **kwargs)
    assert second["val_top1_per_lr"] == first["val_top1_per_lr"]  # test data changed nothing
    assert torch.equal(second["probes"].weight, first["probes"].weight)
    val = second["val_top1_per_lr"]
    assert second["best_lr"] == max(val, key=val.get) == 1.0
    assert second["linear_top1"] == pytest.approx(good_on_fooled)
    # the test split is reported once, for the chosen lr: no per-lr test numbers anywhere
    assert not [key for key in second if "test" in key]


def reference_probe(x, y, num_classes, lr, epochs, batch_size, weight_decay, batchnorm, seed):
    """One classifier with plain torch modules: nn.Linear, optim.SGD, BatchNorm1d."""
    generator = torch.Generator().manual_seed(seed)
    w0 = torch.randn(x.shape[1], num_classes, generator=generator) * 0.01
    linear = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        linear.weight.copy_(w0.T)
        linear.bias.zero_()
    bn = nn.BatchNorm1d(x.shape[1], affine=False) if batchnorm else nn.Identity()
    optimizer = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9,
                                weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for index in order.split(batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(linear(bn(x[index])), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return linear, bn


@pytest.mark.parametrize("batchnorm, weight_decay", [(True, 0.0), (False, 1e-3)])
def test_side_by_side_equals_each_lr_alone_and_plain_torch(batchnorm, weight_decay):
    x, y = blobs(300, seed=6, spread=2.0)  # overlapping: the lr matters
    val_x, val_y = blobs(100, seed=7, spread=2.0)
    lrs = [0.01, 0.3, 3.0]
    kwargs = dict(epochs=4, batch_size=64, weight_decay=weight_decay, batchnorm=batchnorm,
                  seed=8)
    together = train_linear_probes(x, y, val_x, val_y, 4, lrs, **kwargs)
    weights = together["probes"].weight
    assert not torch.allclose(weights[0], weights[2], atol=1e-2)  # the lrs did differ
    for i, lr in enumerate(lrs):
        alone = train_linear_probes(x, y, val_x, val_y, 4, [lr], **kwargs)
        torch.testing.assert_close(alone["probes"].weight[0], weights[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone["probes"].bias[0], together["probes"].bias[i],
                                   atol=1e-5, rtol=1e-5)
        assert alone["val_top1"][0] == pytest.approx(together["val_top1"][i])
        linear, bn = reference_probe(x, y, 4, lr, **kwargs)
        torch.testing.assert_close(weights[i].T, linear.weight.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(together["probes"].bias[i], linear.bias.detach(),
                                   atol=1e-5, rtol=1e-4)
        if batchnorm:
            torch.testing.assert_close(together["probes"].bn.running_var, bn.running_var)


def test_cli_probes_tiny_run_and_leaves_backbone_unchanged(tiny_run, capsys):
    argv = ["linear", "--checkpoint", str(tiny_run / "checkpoint.pt"), "--epochs", "5",
            "--set", "eval.test_subset=500"]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(line)
    assert result["backbone_unchanged"] is True
    assert 40.0 < result["linear_top1"] <= 100.0  # 10 classes: chance is 10%
    assert set(result["val_top1_per_lr"]) == {"0.03", "0.1", "0.3", "1.0", "3.0"}
    val = result["val_top1_per_lr"]
    assert str(result["best_lr"]) == max(val, key=val.get)
    assert result["epochs"] == 5 and result["test_images"] == 500
    assert result["train_images"] + result["val_images"] == 2048
    assert result["wall_seconds"] > 0
    assert json.loads((tiny_run / "linear.json").read_text()) == result

    # --no-batchnorm with explicit lrs, --augmented: both change what runs
    argv += ["--no-batchnorm", "--lrs", "0.1", "1", "--augmented", "--epochs", "1"]
    assert main(argv) == 0
    other = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert other["batchnorm"] is False and other["augmented"] is True
    assert other["crop_scale"] == [0.08, 1.0] and result["crop_scale"] is None
    assert set(other["val_top1_per_lr"]) == {"0.1", "1.0"} and other["lr_scale"] == 4.0
    assert other["backbone_unchanged"] is True
    # the augmented probe is another protocol: its result goes beside the cached probe's
    assert json.loads((tiny_run / "linear-augmented.json").read_text()) == other
    assert json.loads((tiny_run / "linear.json").read_text()) == result


def test_cli_says_when_the_best_lr_is_at_the_edge_of_the_sweep(tiny_run, capsys):
    argv = ["linear", "--checkpoint", str(tiny_run), "--epochs", "1", "--features", "cls",
            "--set", "eval.test_subset=200"]
    assert main([*argv, "--lrs", "0.1", "1"]) == 0  # of two lrs, the best is always an edge
    captured = capsys.readouterr()
    best = json.loads(captured.out.strip().splitlines()[-1])["best_lr"]
    assert f"note: the best lr {best} is at the edge of the sweep [0.1, 1.0]" in captured.err
    assert main([*argv, "--lrs", "0.3"]) == 0  # a single lr is no sweep: nothing to say
    assert "edge" not in capsys.readouterr().err


def test_cli_rejects_val_fraction_zero_with_a_sweep(capsys):
    assert main(["linear", "--checkpoint", "nowhere.pt", "--val-fraction", "0"]) == 2
    assert "val-fraction" in capsys.readouterr().err


def test_a_changed_backbone_tensor_is_flagged(tiny_run):
    backbone = open_checkpoint(tiny_run / "checkpoint.pt").backbone()
    before = snapshot(backbone)
    assert unchanged(backbone, before)
    name, tensor = next(iter(backbone.state_dict().items()))
    with torch.no_grad():
        tensor.view(-1)[0] += 1e-3
    assert not unchanged(backbone, before), name


class MutatingBackbone(nn.Module):
    """Flattens the image, and (wrongly) changes one of its own tensors on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.flatten(1)


def toy_split(n: int, seed: int) -> EvalSplit:
    """:func:`toy_dataset` as an evaluation split."""
    return EvalSplit.of_dataset(toy_dataset(n, seed))


def toy_dataset(n: int, seed: int) -> ImageDataset:
    """Two classes of 8x8 grey images: bright left half or bright right half."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (n,), generator=generator)
    images = torch.randint(0, 60, (n, 1, 8, 8), generator=generator, dtype=torch.uint8)
    images[labels == 0, :, :, :4] += 150
    images[labels == 1, :, :, 4:] += 150
    return ImageDataset(images, labels, ["left", "right"], (0.4,), (0.3,))


def test_probe_flags_a_backbone_that_changes_itself():
    train_set, test_set = toy_split(200, 1), toy_split(100, 2)
    kwargs = dict(lrs=[0.1], device=torch.device("cpu"), epochs=3, batch_size=64)
    result = probe_backbone(MutatingBackbone(), train_set, test_set, **kwargs)
    assert result["backbone_unchanged"] is False
    clean = probe_backbone(nn.Flatten(), train_set, test_set, **kwargs)
    assert clean["backbone_unchanged"] is True and clean["linear_top1"] > 90.0


def test_augmented_features_are_new_views_every_epoch():
    data = toy_dataset(16, 3)
    indices = torch.arange(16)
    split, cpu = EvalSplit.of_dataset(data), torch.device("cpu")
    epoch0 = augmented_features(nn.Flatten(), split, indices, 0, 0, cpu)
    again = augmented_features(nn.Flatten(), split, indices, 0, 0, cpu)
    epoch1 = augmented_features(nn.Flatten(), split, indices, 1, 0, cpu)
    clean = (data.images.float() / 255 - 0.4) / 0.3
    assert torch.equal(epoch0, again)
    assert not torch.allclose(epoch0, epoch1)
    assert not torch.allclose(epoch0, clean.flatten(1))
    assert epoch0.shape == (16, 64)


def test_augmented_features_follow_the_crop_scale():
    data = toy_dataset(32, 4)
    indices = torch.arange(32)
    split, cpu = EvalSplit.of_dataset(data), torch.device("cpu")
    clean = (data.images.float() / 255 - 0.4) / 0.3
    # area 100%: on 8x8 images the only crop that fits is the whole image (any other aspect
    # ratio in [3/4, 4/3] rounds to 9 pixels on a side), so each view is the image or its flip
    whole = augmented_features(nn.Flatten(), split, indices, 0, 0, cpu, crop_scale=(1.0, 1.0))
    as_is = (whole - clean.flatten(1)).abs().amax(dim=1) < 1e-5
    flipped = (whole - clean.flip(-1).flatten(1)).abs().amax(dim=1) < 1e-5
    assert bool((as_is | flipped).all()) and as_is.any() and flipped.any()
    # the reference's 8-100% crops change the pixels of almost every view
    reference = augmented_features(nn.Flatten(), split, indices, 0, 0, cpu)
    assert not torch.allclose(reference, whole)


class RecordingFlatten(nn.Flatten):
    """Flattens the image, keeping every batch it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return super().forward(x)


@pytest.mark.parametrize(("crop_scale", "only_whole_images"), [((1.0, 1.0), True),
                                                               ((0.08, 1.0), False)])
def test_probe_backbone_passes_the_crop_scale_to_the_augmented_views(crop_scale,
                                                                     only_whole_images):
    train_set, test_set = toy_dataset(64, 5), toy_dataset(32, 6)
    backbone = RecordingFlatten()
    probe_backbone(backbone, EvalSplit.of_dataset(train_set), EvalSplit.of_dataset(test_set),
                   lrs=[0.1], device=torch.device("cpu"), epochs=2, batch_size=32,
                   augmented=True, crop_scale=crop_scale)
    images = torch.cat([train_set.images, test_set.images]).float() / 255
    whole = ((torch.cat([images, images.flip(-1)]) - 0.4) / 0.3).flatten(1)
    seen = torch.cat(backbone.seen).flatten(1)
    assert len(seen) > 64 + 32  # clean train, clean test, then the epochs' views
    distance = torch.cdist(seen, whole, compute_mode="donot_use_mm_for_euclid_dist")
    is_whole = distance.amin(dim=1) < 1e-4
    assert bool(is_whole.all()) == only_whole_images


def test_crop_scale_is_refused_without_augmentation_or_out_of_range(capsys):
    argv = ["linear", "--checkpoint", "nowhere.pt", "--crop-scale", "0.85", "1"]
    assert main(argv) == 2  # refused before the checkpoint is looked for
    assert "--crop-scale applies to the augmented probe: add --augmented" in capsys.readouterr().err
    for low, high in (("0", "1"), ("0.9", "0.5"), ("0.5", "1.5")):
        assert main([*argv[:3], "--augmented", "--crop-scale", low, high]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and "0 < LO <= HI <= 1" in error


def test_standardise_is_batchnorm_in_training_mode():
    """The probe's BatchNorm, written to sum its statistics over processes, computes on one
    process what nn.BatchNorm1d(affine=False) computes, running statistics included."""
    generator = torch.Generator().manual_seed(0)
    reference, mine = nn.BatchNorm1d(6, affine=False), nn.BatchNorm1d(6, affine=False)
    for _ in range(3):
        x = torch.randn(32, 6, generator=generator) * 3 + 1
        torch.testing.assert_close(standardise(x, mine, 32), reference.train()(x))
    torch.testing.assert_close(mine.running_mean, reference.running_mean)
    torch.testing.assert_close(mine.running_var, reference.running_var)
