"""``mocov3 linear --protocol reference`` and ``--recipe``: the recipe files are the
protocols' defaults, flags override them, flags of the other protocol are refused in one
line, and a real SIGTERM stops the streamed probe after one step, which ``--resume auto``
then finishes bit for bit like the run that was never stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mocov3.cli import main
from mocov3.eval.features import ProbeFeatures
from mocov3.eval.linear import ProbeSettings
from mocov3.eval.linear_reference import ReferenceProbeSettings, file_names
from mocov3.eval.recipes import merged_settings, read_recipe

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = str(ROOT / "configs/eval/linear_reference.yaml")
FAST = str(ROOT / "configs/eval/linear_fast.yaml")
CKPT, RESULT = file_names("cls")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    """train/ (2 classes x 12) and val/ (2 x 6) of 28 px PNGs; and a folder without
    classes."""
    root = tmp_path_factory.mktemp("reference_cli")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOCOV3_CACHE", str(root / "cache"))
        for split, count in (("train", 12), ("val", 6)):
            for label in (0, 1):
                directory = root / "images" / split / f"class{label}"
                directory.mkdir(parents=True)
                for i in range(count):
                    rng = np.random.default_rng(100 * label + i + (50 if split == "val" else 0))
                    pixels = rng.normal(70 + 120 * label, 30, (28, 28, 3)).clip(0, 255)
                    Image.fromarray(pixels.astype(np.uint8)).save(directory / f"{i}.png")
                    flat = root / "unlabelled" / split
                    flat.mkdir(parents=True, exist_ok=True)
                    shutil.copy(directory / f"{i}.png", flat / f"{label}-{i}.png")
        yield root


@pytest.fixture
def run_dir(tiny_run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    target.mkdir()
    shutil.copy(tiny_run / "checkpoint.pt", target / "checkpoint.pt")
    return target


def argv(run_dir: Path, folder: Path, *extra: str, streamed: bool = False) -> list[str]:
    sets = ["train.precision=fp32", "train.threads=1"]
    if streamed:
        sets += ["data.memory_limit_gb=0.00001", "data.workers=1"]
    return [
        "linear", "--checkpoint", str(run_dir), "--data", f"folder:{folder / 'images'}",
        "--epochs", "2", "--batch-size", "8", "--device", "cpu",
        *[a for s in sets for a in ("--set", s)], *extra,
    ]  # fmt: skip


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_recipes_are_the_protocols_defaults():
    reference = read_recipe(REFERENCE, "linear", ReferenceProbeSettings)
    assert reference.pop("protocol") == "reference"
    assert merged_settings(ReferenceProbeSettings, reference, {}) == ReferenceProbeSettings()
    assert reference["epochs"] == 90 and reference["batch_size"] == 1024
    assert reference["weight_decay"] == 0.0 and reference["crop_scale"] == [0.08, 1.0]
    fast = read_recipe(FAST, "linear", ProbeSettings)
    assert fast.pop("protocol") == "fast"
    assert merged_settings(ProbeSettings, fast, {}) == ProbeSettings()


def test_reference_probe_from_its_recipe_with_flags_over_it(run_dir, folder, capsys):
    assert main(argv(run_dir, folder, "--recipe", REFERENCE, "--eval-every", "1")) == 0
    result = last_json(capsys)
    assert result["protocol"] == "reference" and result["epochs"] == 2
    assert result["batch_size"] == 8 and result["lr"] == pytest.approx(3.0 * 8 / 256)
    assert result["crop_scale"] == [0.08, 1.0] and result["features"] == "cls"
    assert set(result["test_top1_per_epoch"]) == {"1"}  # the last epoch is the final test
    assert result["train_images"] == 24 and result["test_images"] == 12
    assert result["backbone_unchanged"] is True and result["processes"] == 1
    assert json.loads((run_dir / RESULT).read_text()) == result
    for key in ("linear_top1", "linear_top5", "base_lr", "weight_decay", "streamed",
                "images_per_second", "wall_seconds"):  # fmt: skip
        assert key in result


def test_fast_protocol_still_the_default_and_reads_its_recipe(run_dir, folder, capsys):
    assert main(argv(run_dir, folder, "--recipe", FAST, "--lrs", "1")) == 0
    result = last_json(capsys)
    assert "best_lr" in result and result["batchnorm"] is True and result["epochs"] == 2
    assert main(argv(run_dir, folder, "--no-batchnorm", "--epochs", "1")) == 0
    other = last_json(capsys)
    assert other["batchnorm"] is False and "10.0" in other["val_top1_per_lr"]
    assert (run_dir / "linear.json").is_file() and not (run_dir / RESULT).exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--protocol", "reference", "--lrs", "1"], "--lrs does not apply to the reference"),
        (["--protocol", "reference", "--val-fraction", "0.2"], "--val-fraction does not"),
        (["--protocol", "reference", "--no-batchnorm"], "--no-batchnorm does not"),
        (["--recipe", REFERENCE, "--augmented"], "--augmented does not"),
        (["--base-lr", "1"], "--base-lr does not apply to the fast"),
        (["--resume", "auto"], "--resume does not apply to the fast"),
        (["--eval-every", "2"], "--eval-every does not"),
        (["--protocol", "fast", "--recipe", REFERENCE], "contradicts recipe"),
        (["--recipe", "nowhere.yaml"], "not found"),
        (["--protocol", "reference", "--features", "last4"], "at least 4 blocks"),
        (["--protocol", "reference", "--crop-scale", "0.9", "0.1"], "--crop-scale"),
    ],
)
def test_refusals_are_one_line(run_dir, folder, capsys, extra, words):
    assert main(argv(run_dir, folder, *extra)) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and words in error, error
    assert not (run_dir / CKPT).exists()


def test_unlabelled_data_and_another_backbones_probe_are_refused(run_dir, folder, capsys):
    args = argv(run_dir, folder, "--protocol", "reference")
    args[args.index("--data") + 1] = f"folder:{folder / 'unlabelled'}"
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "needs labels" in error

    other = run_dir.parent / "other"
    other.mkdir()
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, other / "checkpoint.pt")
    assert main(argv(run_dir, folder, "--protocol", "reference", "--epochs", "1")) == 0
    capsys.readouterr()
    shutil.copy(run_dir / CKPT, other / CKPT)
    assert main(argv(other, folder, "--protocol", "reference", "--epochs", "1",
                     "--resume", "auto")) == 2  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "probes another backbone" in error


def test_sigterm_stops_the_streamed_probe_and_resume_auto_finishes_it_bit_for_bit(
    run_dir, folder, tmp_path, capsys
):
    """A real SIGTERM to this process, sent from inside the 3rd forward pass of the frozen
    features (the first is the width probe: so during training step 2 of 3 per epoch)."""
    straight = tmp_path / "straight"
    shutil.copytree(run_dir, straight)
    assert main(argv(straight, folder, "--protocol", "reference", streamed=True)) == 0
    expected = torch.load(straight / CKPT, weights_only=True)["classifier"]
    assert last_json(capsys)["streamed"] is True

    calls = {"n": 0}

    def sigterm_at_third(module, inputs, output):
        if isinstance(module, ProbeFeatures):
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    handle = torch.nn.modules.module.register_module_forward_hook(sigterm_at_third)
    try:
        assert main(argv(run_dir, folder, "--protocol", "reference", streamed=True)) == 0
    finally:
        handle.remove()
    captured = capsys.readouterr()
    assert "stopped by SIGTERM after step 2/6" in captured.err
    assert "--resume auto" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["preempted"] is True
    assert not (run_dir / RESULT).exists()

    args = argv(run_dir, folder, "--protocol", "reference", "--resume", "auto", streamed=True)
    assert main(args) == 0
    assert last_json(capsys)["resumed_from"] == str(run_dir / CKPT)
    got = torch.load(run_dir / CKPT, weights_only=True)["classifier"]
    assert torch.equal(got["weight"], expected["weight"])
    assert torch.equal(got["bias"], expected["bias"])
