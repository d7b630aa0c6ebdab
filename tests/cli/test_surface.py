"""The command line's conventions: every flag explained with its default, one way to name a
checkpoint, --version, presets by name, --print-config, and the epochs-vs-budget rule."""

from __future__ import annotations

import argparse
import struct

import numpy as np
import pytest
import yaml

from mocov3 import __version__, presets
from mocov3.cli import build_parser, main
from mocov3.config import load_config
from mocov3.data.datasets import FASHION_MNIST_ENV, load_fashion_mnist

CHECKPOINT_COMMANDS = ("knn", "linear", "finetune", "embed", "report", "export")


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(command: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in command._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_flag_has_help_and_says_its_default(name):
    command = _commands()[name]
    text = " ".join(command.format_help().split())
    for action in _options(command):
        assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        if action.default == []:  # a repeatable flag: none given, none applied
            continue
        if action.default is not None and action.default is not False:  # 0 is shown too
            shown = action.default
            if isinstance(shown, list | tuple):
                shown = " ".join(map(str, shown))
            assert f"default: {shown}" in text or "default" in action.help, action.dest
        elif action.option_strings and action.nargs != 0 and not action.required:
            # a value flag without a default says what happens when it is left out
            assert "default" in action.help or "required" in action.help, (
                f"{name} {action.option_strings}: say what its absence means"
            )


@pytest.mark.parametrize("name", CHECKPOINT_COMMANDS)
def test_every_command_takes_its_checkpoint_as_an_option(name):
    command = _commands()[name]
    assert any("--checkpoint" in a.option_strings for a in _options(command))
    positional = [a.dest for a in _options(command) if not a.option_strings]
    assert positional == [], f"{name} takes {positional} positionally"


def test_embed_reads_images_through_data_like_every_command(tmp_path, capsys):
    flags = {s for a in _options(_commands()["embed"]) for s in a.option_strings}
    assert "--images" not in flags and "--data" in flags
    code = main(
        ["embed", "--checkpoint", str(tmp_path), "--split", "all", "--out", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --split all") and "\n" not in err


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"mocov3 {__version__}"


def test_presets_are_listed_one_line_each(capsys):
    assert main(["presets", "--recipes"]) == 0
    out = capsys.readouterr().out
    for kind in ("config", "recipe"):
        listed = presets.catalogue(kind)
        assert {"demo", "hour", "tiny", "vit_small_imagenet"} <= set(presets.names()) or (
            kind == "recipe"
        )
        for preset in listed:
            assert preset.summary and len(preset.summary) <= 100, preset.path
            assert f"{preset.name}  " in out and preset.summary in out


def test_config_by_name_is_the_packaged_file():
    assert presets.resolve("demo") == presets.PRESET_DIR / "demo.yaml"
    assert presets.resolve("linear_reference", "recipe").parent == presets.PRESET_DIR / "eval"
    assert load_config("tiny").to_dict() == load_config(presets.PRESET_DIR / "tiny.yaml").to_dict()


def test_unknown_preset_name_lists_the_names(capsys):
    assert main(["pretrain", "--config", "demoo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config 'demoo' not found") and "demo, " in err
    assert "\n" not in err


def test_pretrain_without_config_asks_for_one(capsys, tmp_path):
    assert main(["pretrain", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: pretrain needs --config") and "demo" in err
    assert not (tmp_path / "run").exists()


def _printed_config(capsys, *flags: str) -> dict:
    assert main(["pretrain", *flags, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_is_the_resolved_config_and_writes_nothing(capsys, tmp_path):
    printed = _printed_config(
        capsys, "--config", "demo", "--out", str(tmp_path / "r"), "--set", "optim.base_lr=5e-4"
    )
    assert printed == load_config("demo", ["optim.base_lr=5e-4"]).to_dict()
    assert not (tmp_path / "r").exists()


def test_epochs_turn_the_presets_budget_off_unless_a_budget_is_given(capsys):
    assert load_config("demo").train.budget_minutes == 14  # the preset has a budget
    only_epochs = _printed_config(capsys, "--config", "demo", "--epochs", "8")["train"]
    assert only_epochs["epochs"] == 8 and only_epochs["budget_minutes"] is None
    by_set = _printed_config(capsys, "--config", "demo", "--set", "train.epochs=8")["train"]
    assert by_set["budget_minutes"] is None
    both = _printed_config(capsys, "--config", "demo", "--epochs", "8", "--budget-minutes", "5")
    assert both["train"]["epochs"] == 8 and both["train"]["budget_minutes"] == 5
    untouched = _printed_config(capsys, "--config", "demo")["train"]
    assert untouched["budget_minutes"] == 14


def _write_idx(path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def _tiny_fashion(folder, count: int) -> None:
    folder.mkdir()
    for prefix in ("train", "t10k"):
        images = np.full((count, 28, 28), 7, dtype=np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(count, dtype=np.uint8))


def test_fashion_mnist_dir_environment_variable_is_honoured(tmp_path, monkeypatch):
    _tiny_fashion(tmp_path / "env", 5)
    _tiny_fashion(tmp_path / "flag", 3)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "env"))
    assert len(load_fashion_mnist("train").images) == 5
    # --data-dir (data.data_dir) names the folder outright
    assert len(load_fashion_mnist("train", str(tmp_path / "flag")).images) == 3


def test_missing_fashion_mnist_names_every_fix(tmp_path):
    from mocov3.errors import DatasetError

    with pytest.raises(DatasetError) as error:
        load_fashion_mnist("train", str(tmp_path / "nowhere"))
    message = str(error.value)
    for fix in ("apt-get install dataset-fashion-mnist", "--data-dir", FASHION_MNIST_ENV):
        assert fix in message
    assert "data.download=true" in message and "\n" not in message
