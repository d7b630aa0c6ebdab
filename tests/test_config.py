"""Config loading: presets, overrides, and one-line errors for bad keys and values."""

from pathlib import Path

import pytest

from mocov3.cli import main
from mocov3.config import Config, load_config, parse_override
from mocov3.errors import ConfigError

PRESETS = sorted(Path("configs").glob("*.yaml"))


def test_defaults_are_the_papers_vit_recipe():
    config = Config()
    assert config.optim.base_lr == 1.5e-4 and config.optim.weight_decay == 0.1
    assert config.optim.warmup_epochs == 40 and config.train.epochs == 300
    assert config.train.batch_size == 4096
    assert config.moco.momentum == 0.99 and config.moco.temperature == 0.2
    assert config.model.proj_hidden_dim == 4096 and config.model.out_dim == 256
    assert config.model.proj_layers == 3 and config.model.pred_layers == 2
    assert config.model.pos_embed == "sincos" and config.model.freeze_patch_embed
    assert config.augment.crop_scale == (0.08, 1.0)
    assert config.augment.blur_p == (1.0, 0.1) and config.augment.solarize_p == (0.0, 0.2)
    assert config.eval.knn_k == (20, 200) and config.eval.knn_temperature == 0.07


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads(preset):
    load_config(preset)


def test_overrides_are_typed():
    config = load_config(
        "configs/tiny.yaml",
        [
            "optim.base_lr=2e-4",
            "augment.crop_scale=[0.3, 1]",
            "model.freeze_patch_embed=false",
            "eval.knn_k=10",
        ],
    )
    assert config.optim.base_lr == 2e-4
    assert config.augment.crop_scale == (0.3, 1.0)
    assert config.model.freeze_patch_embed is False
    assert config.eval.knn_k == (10,)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.bogus=1", "unknown config key 'optim.bogus'"),
        ("nonsense.key=1", "unknown config key 'nonsense'"),
        ("optim.base_lr=-1", "optim.base_lr -1.0 must be positive"),
        ("optim.base_lr=fast", "'optim.base_lr' must be a number"),
        ("train.batch_size=1", "train.batch_size 1 must be at least 2"),
        ("train.batch_size=2.5", "'train.batch_size' must be an integer"),
        (
            "data.image_size=30",
            "data.image_size 30 must be a positive multiple of model.patch_size",
        ),
        ("moco.momentum=1.5", "moco.momentum 1.5 must be in [0, 1]"),
        ("model.pos_embed=rope", "model.pos_embed 'rope' must be sincos, learned or none"),
        ("model.arch=vit_gigantic", "model.arch 'vit_gigantic' is unknown"),
        ("augment.crop_scale=[0.5]", "must have 2 values"),
        ("train.precision=fp8", "train.precision 'fp8' must be auto, bf16, fp32 or fp16"),
        ("optim.base_lr=.nan", "'optim.base_lr' must be a finite number"),
        ("train.epochs=1e400", "'train.epochs' must be a finite number"),
        ("train.batch_size=1e400", "'train.batch_size' must be an integer"),
        ("train.seed=-1", "train.seed -1 must be in [0, 2**32)"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1"),
        ("train.checkpoint_every_steps=-2", "train.checkpoint_every_steps must be >= 0"),
        ("train.milestones=[0, 5]", "train.milestones [0, 5] must be epoch numbers >= 1"),
        ("train.skip_nonfinite=maybe", "'train.skip_nonfinite' must be true or false"),
        ("data.strict=2", "'data.strict' must be true or false"),
        ('model.pos_embed="a\\nb"', "model.pos_embed 'a\\nb' must be"),  # line break escaped
        ("model.mlp_norm=rmsnorm", "model.mlp_norm 'rmsnorm' must be layernorm or batchnorm"),
        ("model.mlp_norm=batchnorm", "moco.concat_views must be false with model.mlp_norm"),
    ],
)
def test_bad_values_refused_with_one_line(override, message):
    with pytest.raises(ConfigError, match=None) as error:
        load_config("configs/tiny.yaml", [override])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_vit_bn_takes_views_separately_and_is_a_vit_option():
    config = load_config(
        "configs/tiny.yaml", ["model.mlp_norm=batchnorm", "moco.concat_views=false"]
    )
    assert config.model.mlp_norm == "batchnorm"
    with pytest.raises(ConfigError, match="model.mlp_norm is a ViT option"):
        load_config("configs/resnet18_demo.yaml", ["model.mlp_norm=batchnorm"])


def test_cli_reports_bad_config_as_one_line_and_status_2(capsys, tmp_path):
    status = main(
        [
            "pretrain",
            "--config",
            "configs/tiny.yaml",
            "--out",
            str(tmp_path / "run"),
            "--set",
            "optim.bogus=1",
        ]
    )
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key 'optim.bogus'")
    assert not (tmp_path / "run").exists()  # refused before any compute or output


def test_cli_missing_config_file(capsys):
    assert main(["pretrain", "--config", "configs/nope.yaml", "--out", "/tmp/x"]) == 2
    assert "config file configs/nope.yaml not found" in capsys.readouterr().err


def _keys(values, prefix=""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_configuration_reference_lists_every_key():
    reference = Path("docs/configuration.md").read_text()
    missing = [key for key in _keys(Config().to_dict()) if f"`{key}`" not in reference]
    assert not missing, f"docs/configuration.md lacks {missing}"


def _flat(config: Config) -> dict[str, object]:
    return {
        f"{section}.{key}": value
        for section, values in config.to_dict().items()
        for key, value in values.items()
    }


def test_paper_small_departs_from_the_paper_only_in_scale():
    # the comparison curve of the accuracy-at-budget plot: the paper's recipe with only the
    # model, image size, batch, run length and monitoring scaled to 28 px on a CPU budget
    paper, small = _flat(Config()), _flat(load_config("configs/paper_small.yaml"))
    changed = {key for key in paper if paper[key] != small[key]}
    scale = {"model.arch", "model.embed_dim", "model.depth", "model.num_heads"}
    scale |= {"model.patch_size", "data.image_size", "train.batch_size", "train.epochs"}
    scale |= {"optim.warmup_epochs", "train.budget_minutes", "train.log_every"}
    scale |= {"eval.knn_init", "eval.monitor_every"}
    assert changed == scale
    # the warmup keeps the paper's share of the run (40 of 300 epochs)
    assert small["optim.warmup_epochs"] / small["train.epochs"] == pytest.approx(40 / 300)
    # and the backbone is the demo's, so the two curves differ only in the recipe
    demo = _flat(load_config("configs/demo.yaml"))
    for key in ("model.embed_dim", "model.depth", "model.num_heads", "model.patch_size"):
        assert small[key] == demo[key]


def test_text_keys_take_the_value_as_written():
    """A dataset spec or path is no YAML: ``wds:`` would be a mapping, `` #1`` a comment."""
    assert parse_override("data.name=wds:") == ("data.name", "wds:")
    assert parse_override("data.name=folder:/data/run #1") == ("data.name", "folder:/data/run #1")
    assert parse_override("data.name=wds:/s/{000..009}.tar") == (
        "data.name",
        "wds:/s/{000..009}.tar",
    )
    assert parse_override("data.data_dir=null") == ("data.data_dir", None)
    assert parse_override("data.name='a: b'") == ("data.name", "a: b")  # quoted: YAML
    assert parse_override("train.epochs=3") == ("train.epochs", 3)  # other keys: YAML
    assert parse_override("augment.crop_scale=[0.2, 1]") == ("augment.crop_scale", [0.2, 1])
