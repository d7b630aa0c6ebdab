"""``mocov3 finetune`` with a recipe: flags over the recipe over the defaults, the DeiT run
end to end, one-line refusals, and SIGTERM -> checkpoint -> the printed resume command."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mocov3.cli import build_parser, main
from mocov3.cli.finetune import settings_from_args
from mocov3.errors import ConfigError
from mocov3.eval.finetune import FineTuneSettings, check_backbone
from mocov3.models.checkpoint import open_checkpoint

DEIT_SMALL = "configs/eval/finetune_deit_vit_small.yaml"
TINY = ["--set", "data.subset=256", "--set", "eval.test_subset=64", "--batch-size", "64"]


def parse(*argv: str):
    return build_parser().parse_args(["finetune", "--checkpoint", "x", *argv])


def test_omitted_flags_change_nothing_and_given_ones_win():
    assert settings_from_args(parse())[0] == FineTuneSettings()
    settings, protocol = settings_from_args(parse("--recipe", DEIT_SMALL, "--mixup", "0"))
    assert protocol == "deit-vit-small" and settings.mixup == 0.0
    assert (settings.cutmix, settings.lr_batch, settings.epochs) == (1.0, 512, 300)
    settings, _ = settings_from_args(parse("--recipe", DEIT_SMALL, "--rand-augment", "none"))
    assert settings.rand_augment is None and settings.random_erasing == 0.25
    assert settings_from_args(parse("--from-scratch"))[0].from_scratch


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default 10.0)", "(default 256; DeiT 512)", "(default 0.0; DeiT 0.8)"):
        assert shown in text


def test_deit_recipe_end_to_end(tiny_run, capsys):
    argv = ["finetune", "--checkpoint", str(tiny_run), "--recipe", DEIT_SMALL, "--epochs", "1"]
    argv += ["--warmup-epochs", "0.25"]
    assert main([*argv, *TINY]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["protocol"] == "deit-vit-small" and result["steps"] == 4
    assert result["lr"] == pytest.approx(5e-4 * 64 / 512)
    assert (result["mixup"], result["cutmix"], result["layer_decay"]) == (0.8, 1.0, 1.0)
    assert result["rand_augment"] == "rand-m9-mstd0.5-inc1" and result["eval_view"] == "centre"
    assert 0 <= result["finetune_top1"] <= result["finetune_top5"] <= 100
    assert result["images_per_second"] > 0 and "step_losses" not in result
    written = json.loads((tiny_run / "finetune.json").read_text())
    assert written["finetune_top5"] == result["finetune_top5"]


def _unlabelled_folder(root: Path) -> Path:
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (28, 28), 40 * i).save(root / split / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--recipe", "configs/eval/linear_fast.yaml"], "is for 'mocov3 linear'"),
        (["--rand-augment", "rand-q9"], "not a timm RandAugment string"),
        (["--resume", "CHECKPOINT"], "is not a fine-tuning checkpoint"),
        (["--data", "folder:UNLABELLED"], "needs labels"),
    ],
)
def test_refusals_are_one_line(tiny_run, tmp_path, capsys, extra, message):
    folder = _unlabelled_folder(tmp_path / "unlabelled")
    extra = [
        e.replace("CHECKPOINT", str(tiny_run / "checkpoint.pt")).replace("UNLABELLED", str(folder))
        for e in extra
    ]
    assert main(["finetune", "--checkpoint", str(tiny_run), "--epochs", "1", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_deit_recipe_on_a_resnet_says_what_does_not_fit(tiny_run):
    run = open_checkpoint(tiny_run)
    model = dataclasses.replace(run.config.model, arch="resnet18")
    resnet = dataclasses.replace(run, config=dataclasses.replace(run.config, model=model))
    deit, _ = settings_from_args(parse("--recipe", DEIT_SMALL))
    with pytest.raises(ConfigError, match="no stochastic depth; add --drop-path 0"):
        check_backbone(resnet, deit)
    check_backbone(resnet, dataclasses.replace(deit, drop_path=0.0))  # the rest fits


def test_sigterm_checkpoints_and_the_printed_command_resumes(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes((tiny_run / "checkpoint.pt").read_bytes())
    argv = [
        "finetune", "--checkpoint", str(run_dir), "--epochs", "4", "--batch-size", "16",
        "--warmup-epochs", "1", "--set", "data.subset=64", "--set", "eval.test_subset=32",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    command = [sys.executable, "-m", "mocov3", *argv]
    agent = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert agent.stderr is not None
    for line in agent.stderr:  # the first epoch's loss line: the run is under way
        if line.startswith("epoch 1.00"):
            break
    agent.send_signal(signal.SIGTERM)
    out, err = agent.communicate(timeout=120)
    assert agent.returncode == 0, err[-2000:]
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["preempted"] and stopped["signal"] == "SIGTERM" and 4 <= stopped["step"] < 16
    assert torch.load(run_dir / "finetune.ckpt.pt", weights_only=True)["step"] == stopped["step"]
    resume = err.strip().splitlines()[-1].split("resume with: ")[1]
    assert resume.startswith(f"{sys.executable} -m mocov3 finetune")
    assert resume.endswith("--resume auto")
    again = shlex.split(resume)
    done = subprocess.run(again, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["resumed_from"].endswith("finetune.ckpt.pt") and result["steps"] == 16
    assert np.isfinite(result["final_loss"]) and len(result["loss_curve"]) == 4
