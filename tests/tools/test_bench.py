"""Tests for ``mocov3 bench``: the JSON it emits, and the counters its numbers rest on."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mocov3.cli import main
from mocov3.config import AugmentConfig, load_config, resolve_model_dims
from mocov3.tools import bench, measure

TINY = [
    "bench",
    "--config",
    "configs/tiny.yaml",
    "--set",
    "train.batch_size=16",
    "--steps",
    "1",
    "--warmup",
    "1",
    "--peak-seconds",
    "0.05",
    "--device",
    "cpu",
    "--quiet",
]


def test_bench_runs_on_a_tiny_preset_and_emits_the_json_fields(capsys) -> None:
    assert main([*(flag for flag in TINY if flag != "--quiet"), "--json"]) == 0
    printed = capsys.readouterr()
    out = printed.out.strip().splitlines()
    # progress on stderr: each row with its place and, after the first, an ETA
    assert "[row 1/5]" in printed.err and "[row 5/5, eta 00:0" in printed.err
    result = json.loads(out[-1])
    assert "baseline fp32 per-view tv" in "\n".join(out[:-1])  # the table comes first
    for key in ("images_per_second", "mfu", "speedup_vs_baseline", "augmentation_share"):
        assert isinstance(result[key], float), key
    assert result["images_per_second"] > 0 and result["mfu"] > 0
    assert result["speedup_vs_baseline"] > 0
    assert 0.0 <= result["augmentation_share"] <= 1.0
    for key in ("rows", "peaks", "flops_per_image", "device", "config", "date"):
        assert key in result, key
    names = [row["name"] for row in result["rows"]]
    assert names == [
        "baseline fp32 per-view tv",
        "fp32 per-view",
        "fp32 concat",
        "bf16 per-view",
        "bf16 concat",
    ]
    assert result["rows"][0]["speedup_vs_baseline"] == 1.0
    assert result["best_row"] in names
    best = next(row for row in result["rows"] if row["name"] == result["best_row"])
    full_batch = [row for row in result["rows"] if not row["reduced_batch"]]
    assert best["images_per_second"] == max(row["images_per_second"] for row in full_batch)
    assert set(result["peaks"]) == {"fp32", "bf16"}
    assert all(peak["gflops"] > 0 for peak in result["peaks"].values())
    for row in result["rows"]:
        assert row["batch"] == 16 and row["steps"] == 1
        assert 0 < row["augmentation_ms"] < row["step_ms"]
        assert row["mfu_vs_best_peak"] <= row["mfu"] + 1e-9


def test_flop_counter_counts_a_linear_layer_forward_and_backward_by_hand() -> None:
    layer = nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    # forward 2 N in out; backward the same twice (input and weight gradients)
    assert measure.count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 5 * 8 * 4
    assert measure.count_flops(lambda: layer(x.detach()).sum().backward()) == 2 * 2 * 5 * 8 * 4


def test_flops_per_image_grow_by_a_hand_counted_block_per_unit_of_depth() -> None:
    """A block's matmuls, per image: 24 T d^2 forward for qkv, proj and the MLP, 4 T^2 d for
    attention; the query encoder adds twice the linears and 2.5x the attention backward
    (scores recomputed), the momentum encoder runs forward only; two views."""
    counts = []
    for depth in (1, 2, 3):
        config = load_config("configs/tiny.yaml", [f"model.depth={depth}"])
        counts.append(bench.step_flops_per_image(config, 1, torch.device("cpu"), batch=4))
    dim = resolve_model_dims(config.model)[0]
    tokens = (28 // 7) ** 2 + 1
    linear, attention = 24 * tokens * dim**2, 4 * tokens**2 * dim
    per_view = (3 * linear + 3.5 * attention) + (linear + attention)
    assert counts[1] - counts[0] == pytest.approx(2 * per_view, rel=1e-6)
    assert counts[2] - counts[1] == pytest.approx(2 * per_view, rel=1e-6)


def test_peak_memory_sees_an_allocation_on_the_cpu() -> None:
    probe = measure.PeakMemory(torch.device("cpu"))
    with probe:
        block = torch.ones(16 * 2**20)  # 64 MiB, touched
        del block
    if measure.resident_bytes() is None:
        pytest.skip("no /proc/self/statm here")
    assert probe.mib is not None and probe.mib > 50


def _stub(fp32: float, bf16: float, flops: float, batch: int = 256) -> bench.Bench:
    config = load_config("configs/tiny.yaml", [f"train.batch_size={batch}"])
    images = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    result = bench.Bench(config, torch.device("cpu"), 1, images, images, flops_per_image=flops)
    result.peaks = {"fp32": {"gflops": fp32}, "bf16": {"gflops": bf16}}
    result.max_row_seconds = 10.0
    return result


def test_slow_precision_gets_a_batch_that_fits_the_row_budget() -> None:
    slow = _stub(fp32=100.0, bf16=1.0, flops=1e9)
    assert bench.is_slow("bf16", slow)
    # 10 s budget, warm-up + 1 timed step: at 2 s per image 2.5 images fit, at 0.1 s 50
    assert bench.fitted_batch(slow, seconds_per_image=2.0) == 2
    assert bench.fitted_batch(slow, seconds_per_image=0.1) == 32
    assert bench.fitted_batch(slow, seconds_per_image=100.0) == 2  # never below 2
    assert bench.fitted_batch(slow, seconds_per_image=1e-3) == 256  # fits: the preset's
    assert not bench.is_slow("bf16", _stub(fp32=100.0, bf16=400.0, flops=1e6))


@pytest.mark.parametrize("channels", [1, 3])
def test_torchvision_baseline_view_outputs_normalised_float_images(channels: int) -> None:
    view = bench.torchvision_view(AugmentConfig(), 1, 16, (0.5,) * channels, (0.25,) * channels)
    image = torch.randint(0, 256, (channels, 20, 20), dtype=torch.uint8)
    out = view(image)
    assert out.shape == (channels, 16, 16) and out.dtype == torch.float32
    assert -2.0 - 1e-6 <= float(out.min()) and float(out.max()) <= 2.0 + 1e-6


def test_default_preset_is_the_target_configuration() -> None:
    config = load_config(bench.DEFAULT_CONFIG)
    assert resolve_model_dims(config.model) == (192, 12, 3)
    assert (config.model.patch_size, config.data.image_size, config.data.channels) == (4, 32, 3)
    assert config.train.batch_size == 256 and config.data.name == "synthetic"
    model = config.model
    assert (model.proj_hidden_dim, model.pred_hidden_dim, model.out_dim) == (4096, 4096, 256)


@pytest.mark.parametrize(
    "extra",
    [["--steps", "0"], ["--config", "configs/missing.yaml"], ["--set", "model.depth=0"]]
    + ([] if torch.cuda.is_available() else [["--precision", "fp16"]]),
)
def test_user_errors_are_one_line(extra: list[str], capsys) -> None:
    assert main([*TINY, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
