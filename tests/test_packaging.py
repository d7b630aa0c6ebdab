"""The package as users install it: a wheel carries the presets, the core install needs none
of the extras, and the installed ``mocov3`` command works from an empty directory.

The wheel goes into a fresh venv outside the clone. That venv reuses the torch this test
runs with (a ``.pth`` file naming this interpreter's site-packages, what
``--system-site-packages`` does for a system interpreter), so the test installs no
multi-GB torch and needs no network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from mocov3 import presets

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "--set", "data.subset=512", "--set", "train.batch_size=64", "--set", "train.epochs=1",
    "--set", "optim.warmup_epochs=0.5", "--set", "eval.train_subset=512",
    "--set", "eval.test_subset=200", "--set", "train.precision=fp32",
]  # fmt: skip
OPTIONAL = ("matplotlib", "tensorboard", "timm", "webdataset", "braceexpand", "datasets")
OPTIONAL += ("wandb", "mlflow", "huggingface_hub")


def _run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{command[:3]} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the clone stays free of build files)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "mocov3", source / "mocov3", ignore=shutil.ignore_patterns("__pycache__")
    )
    dist = tmp_path_factory.mktemp("dist")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), "."], source)
    (built,) = dist.glob("mocov3-*.whl")
    return built


def test_the_wheel_carries_every_preset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind in ("config", "recipe"):
        for preset in presets.catalogue(kind):
            assert preset.path.relative_to(ROOT).as_posix() in names


def test_the_core_install_needs_no_extra():
    metadata = (ROOT / "pyproject.toml").read_text()
    core = metadata.split("dependencies = [", 1)[1].split("]", 1)[0]
    required = {line.strip().strip('",').split(">")[0] for line in core.splitlines()}
    assert required - {""} == {"torch", "torchvision", "numpy", "pyyaml", "safetensors", "pillow"}


def test_installed_wheel_runs_from_an_empty_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                tmp_path).stdout.strip()  # fmt: skip
    # torch and the rest from this interpreter, after the venv's own packages
    (Path(site) / "reuse_torch.pth").write_text(sysconfig.get_path("purelib") + "\n")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python)]
    _run([*pip, "install", "--no-deps", "--no-index", "--quiet", str(wheel)], tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    # the installed package, its presets and bench's default preset and the recipes found by
    # name, not in the working directory (one process: each start imports torch)
    check = (
        "import mocov3; print(mocov3.__file__);"
        "from mocov3.config import load_config; from mocov3.tools.bench import DEFAULT_CONFIG;"
        "from mocov3.eval.recipes import read_recipe; from mocov3.eval.linear_reference import"
        " ReferenceProbeSettings as S; load_config(DEFAULT_CONFIG);"
        "print(read_recipe('linear_reference', 'linear', S)['protocol']);"
        "from mocov3.cli import main; main(['presets'])"
    )
    where, protocol, *listed = _run([str(python), "-c", check], empty).stdout.splitlines()
    assert Path(where).is_relative_to(venv), "the clone's mocov3 was imported"
    assert protocol == "reference" and any(line.split()[0] == "tiny" for line in listed[1:])
    mocov3 = str(venv / "bin" / "mocov3")
    pretrain = _run([mocov3, "pretrain", "--config", "tiny", "--out", "run", *QUICK], empty)
    summary = json.loads(pretrain.stdout.strip().splitlines()[-1])
    assert summary["steps"] > 0 and (empty / "run" / "checkpoint.pt").is_file()
    assert pretrain.stderr.splitlines()[0].startswith("length:")
    bench = _run([mocov3, "bench", "--config", "tiny", "--steps", "2", "--precision", "fp32",
                  "--peak-seconds", "0.1", "--json", "--quiet"], empty)  # fmt: skip
    assert json.loads(bench.stdout.strip().splitlines()[-1])["rows"]
    assert sorted(p.name for p in empty.iterdir()) == ["run"]  # nothing else written here


def test_the_core_install_trains_exports_and_loads_without_extras(tmp_path):
    """The optional packages made unimportable: the command line starts, pretraining runs
    (no plots, no TensorBoard: each said in one line), and a backbone loads."""
    script = textwrap.dedent(
        f"""
        import sys
        for name in {OPTIONAL!r}:
            sys.modules[name] = None  # import fails as if not installed
        from mocov3.cli import main
        code = main(["pretrain", "--config", "tiny", "--out", {str(tmp_path / "run")!r},
                     "--set", "train.loggers=[]", *{QUICK!r}])
        assert code == 0, code
        from mocov3 import load_backbone
        backbone = load_backbone({str(tmp_path / "run")!r})
        print("features", backbone.num_features if hasattr(backbone, "num_features") else "?")
        code = main(["pretrain", "--config", "tiny", "--out", {str(tmp_path / "run2")!r},
                     *{QUICK!r}])
        print("default loggers exit", code)
        code = main(["pretrain", "--config", "tiny", "--out", {str(tmp_path / "run3")!r},
                     "--set", "train.loggers=[wandb]", *{QUICK!r}])
        print("wandb exit", code)
        """
    )
    done = _run([sys.executable, "-c", script], tmp_path)
    assert "plots: none (matplotlib is not installed" in done.stderr
    # TensorBoard, the default logger, is left out with a note; W&B asked for is an error
    assert "default loggers exit 0" in done.stdout and "wandb exit 2" in done.stdout
    assert "note: no TensorBoard logs" in done.stderr
    assert "pip install 'mocov3[wandb]'" in done.stderr
    assert not (tmp_path / "run2" / "tensorboard").exists()
