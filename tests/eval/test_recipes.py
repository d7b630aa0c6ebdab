"""Protocol files: each shipped recipe loads into its command's settings; a bad one is
refused in one line naming the setting."""

from __future__ import annotations

import pytest

from mocov3.errors import ConfigError
from mocov3.eval.finetune_model import FineTuneSettings
from mocov3.eval.linear import ProbeSettings
from mocov3.eval.linear_reference import ReferenceProbeSettings
from mocov3.eval.recipes import merged_settings, read_recipe

SHIPPED = [
    ("configs/eval/linear_fast.yaml", "linear", ProbeSettings, "fast"),
    ("configs/eval/linear_reference.yaml", "linear", ReferenceProbeSettings, "reference"),
    ("configs/eval/finetune_deit_vit_small.yaml", "finetune", FineTuneSettings, "deit-vit-small"),
    ("configs/eval/finetune_deit_vit_base.yaml", "finetune", FineTuneSettings, "deit-vit-base"),
]


@pytest.mark.parametrize(("path", "command", "kind", "protocol"), SHIPPED)
def test_every_shipped_recipe_loads_and_flags_override_it(path, command, kind, protocol):
    recipe = read_recipe(path, command, kind)
    assert recipe["protocol"] == protocol
    settings = merged_settings(kind, recipe, {"epochs": 3, "batch_size": None})
    assert settings.epochs == 3  # a flag given wins
    assert settings.batch_size == recipe.get("batch_size", kind().batch_size)  # None: the recipe


def _write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("command: finetune\nsettings: {}\n", "is for 'mocov3 finetune', not 'mocov3 linear'"),
        ("command: linear\nsettings: {epochz: 3}\n", "unknown setting 'epochz'"),
        ("command: linear\nsettings: {epochs: ten}\n", "setting epochs: 'ten' is not valid"),
        ("command: linear\nsettings: {crop_scale: [0.1, 0.2, 0.3]}\n", "setting crop_scale"),
        ("command: linear\nsettings: {epochs: 90.5}\n", "setting epochs: 90.5"),
        ("command: linear\nextra: 1\n", "must be a mapping of command, protocol, settings"),
        ("command: linear\nsettings: [1, 2]\n", "settings must be a mapping"),
        ("command: [linear\n", "cannot be read as YAML"),
    ],
)
def test_a_bad_recipe_is_refused_in_one_line(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as error:
        merged_settings(
            ReferenceProbeSettings,
            read_recipe(path, "linear", ReferenceProbeSettings),
            {},
        )
    assert "\n" not in str(error.value)


def test_a_missing_recipe_names_the_packaged_protocols(tmp_path):
    with pytest.raises(ConfigError, match="not found.*linear_fast, linear_reference"):
        read_recipe(tmp_path / "nope.yaml", "linear", ProbeSettings)
    by_name = read_recipe("linear_reference", "linear", ReferenceProbeSettings)
    assert by_name["protocol"] == "reference"  # a packaged recipe by its name
