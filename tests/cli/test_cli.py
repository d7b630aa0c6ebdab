"""The command line itself: every sub-command is registered, user errors are one line with
status 2, and the resume command a stopped run prints."""

from __future__ import annotations

import sys

import pytest

from mocov3.cli import build_parser, main
from mocov3.cli.common import resume_command

COMMANDS = [
    "pretrain", "knn", "linear", "finetune", "embed", "report", "bench", "export",
    "import-reference", "study",
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_its_help(command: str, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([command, "--help"])
    assert stop.value.code == 0 and f"usage: mocov3 {command}" in capsys.readouterr().out


def test_a_user_error_is_one_line_and_status_2(tmp_path, capsys):
    assert main(["pretrain", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config file") and "\n" not in err


def test_the_resume_command_repeats_the_arguments_with_resume_auto(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mocov3"])
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    argv = ["pretrain", "--out", "runs/a b", "--resume", "runs/a b/c.pt", "--epochs", "3"]
    assert resume_command(argv) == "mocov3 pretrain --out 'runs/a b' --epochs 3 --resume auto"
    assert resume_command(["pretrain", "--resume=auto"]) == "mocov3 pretrain --resume auto"
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resume_command(["pretrain"]).startswith(
        "torchrun --nnodes 2 <the same rendezvous flags> --nproc-per-node 8 -m mocov3 pretrain"
    )
