"""``mocov3 bench --data``: the streamed input pipeline timed beside the step, and which of
the two bounds training (:mod:`mocov3.tools.pipeline`)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mocov3.cli import main
from mocov3.config import load_config
from mocov3.tools.pipeline import bound, measure_input

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
IMAGES = 40
# small settings: the tiny preset, batch 16, one round of steps
BENCH = [
    "bench",
    "--config",
    str(ROOT / "configs/tiny.yaml"),
    "--set",
    "train.batch_size=16",
    "--set",
    "data.image_size=14",
    "--steps",
    "1",
    "--warmup",
    "0",
    "--seconds",
    "1",
    "--peak-seconds",
    "0.05",
    "--precision",
    "fp32",
    "--device",
    "cpu",
    "--json",
    "--quiet",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 smooth RGB JPEGs of sizes 40x30 .. 70x50 in classes a and b."""
    root = tmp_path_factory.mktemp("pipeline_images")
    for i in range(IMAGES):
        small = np.random.default_rng(i).integers(0, 256, (4, 5, 3), dtype=np.uint8)
        size = (40 + (i * 7) % 31, 30 + (i * 3) % 21)
        image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        (root / "ab"[i % 2]).mkdir(exist_ok=True)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        (root / "ab"[i % 2] / f"{i:02d}.jpg").write_bytes(buf.getvalue())
    return root


def test_bench_with_data_reports_the_input_rate_and_the_bound(folder: Path, capsys) -> None:
    assert main([*BENCH, "--data", f"folder:{folder}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    # the step part is the ordinary bench, on the preset with data.name set
    assert [row["name"] for row in result["rows"]] == [
        "reference (mirrored)",
        "straightforward fp32",
        "training path fp32",
        "+ fused AdamW",
        "+ class token only",
        "+ concat views",
    ]
    assert f"data.name=folder:{folder}" in result["overrides"]
    # the input part
    assert result["input_dataset"] == f"folder:{folder}"
    assert result["input_images"] == IMAGES and result["input_batch"] == 16
    assert result["input_workers"] == 0  # the trainer's default when training on the CPU
    assert result["input_decode"] == "cpu"
    assert result["input_images_per_second"] > 0
    assert result["input_images_per_second_per_worker"] > 0
    # the bound: the slower of the two, by the ratio of the rates
    step, rate = result["step_images_per_second"], result["input_images_per_second"]
    assert step > 0 and step == result["images_per_second"]
    assert result["bound"] in ("input", "step")
    assert result["bound"] == ("input" if rate < step else "step")
    assert result["bound_ratio"] == pytest.approx(max(rate, step) / min(rate, step))
    assert result["bound_ratio"] >= 1.0
    # and the table says it in words
    table = "\n".join(out[:-1])
    assert f"input: folder:{folder} ({IMAGES} images, decode cpu)" in table
    assert f"bound by the {result['bound']}" in table


def test_bench_with_data_that_does_not_exist_is_one_line(tmp_path: Path, capsys) -> None:
    assert main([*BENCH, "--data", f"folder:{tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "does not exist" in err


def test_measure_input_fields_are_consistent(folder: Path) -> None:
    config = load_config(
        ROOT / "configs/tiny.yaml",
        [f"data.name=folder:{folder}", "data.image_size=14", "train.batch_size=16"],
    )
    lines: list[str] = []
    result = measure_input(config, CPU, seconds=0.2, workers=1, batch=8, progress=lines.append)
    assert result == {
        "input_dataset": f"folder:{folder}",
        "input_images": IMAGES,
        "input_batch": 8,
        "input_workers": 1,
        "input_channels": 3,
        "input_decode": "cpu",
        "input_images_per_second_per_worker": result["input_images_per_second_per_worker"],
        "input_images_per_second": result["input_images_per_second"],
    }
    for key in ("input_images_per_second_per_worker", "input_images_per_second"):
        assert isinstance(result[key], float) and 0 < result[key] < 1e7, key
    assert lines == [
        f"input: {IMAGES} images of folder:{folder}, batch 8, one worker",
        "input: 1 worker(s), copying to cpu",
    ]
    # the batch defaults to train.batch_size, and never exceeds the dataset
    assert measure_input(config, CPU, seconds=0.05, workers=0)["input_batch"] == 16
    assert measure_input(config, CPU, seconds=0.05, workers=0, batch=64)["input_batch"] == IMAGES


def test_bound_names_the_slower_side() -> None:
    assert bound(100.0, 400.0) == {
        "step_images_per_second": 400.0,
        "bound": "input",
        "bound_ratio": 4.0,
    }
    assert bound(300.0, 100.0)["bound"] == "step"
    assert bound(300.0, 100.0)["bound_ratio"] == 3.0
    assert bound(0.0, 10.0)["bound"] == "input"  # no division by zero


def test_negative_input_workers_are_refused_by_the_parser(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--data", "folder:/nowhere", "--input-workers", "-1"])
    assert exit_.value.code == 2
    assert "negative" in capsys.readouterr().err
