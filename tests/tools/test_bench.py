"""Tests for ``mocov3 bench``: the JSON it emits, and the counters its numbers rest on."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from mocov3.cli import main
from mocov3.config import load_config, resolve_model_dims
from mocov3.tools import bench, bench_rows, measure

VERDICTS = ("faster", "slower", "within noise", "too few steps")

TINY = [
    "bench",
    "--config",
    "configs/tiny.yaml",
    "--set",
    "train.batch_size=16",
    "--warmup",
    "1",
    "--peak-seconds",
    "0.05",
    "--device",
    "cpu",
    "--quiet",
]


def test_bench_runs_on_a_tiny_preset_and_emits_the_json_fields(capsys) -> None:
    assert main([*(flag for flag in TINY if flag != "--quiet"), "--steps", "2", "--json"]) == 0
    printed = capsys.readouterr()
    out = printed.out.strip().splitlines()
    # progress on stderr: each row built with its place, then the interleaved rounds
    assert "[row 1/8]" in printed.err and "round 2/2 done" in printed.err
    result = json.loads(out[-1])
    table = "\n".join(out[:-1])  # the table comes first
    assert "reference (mirrored)" in table and "ranking: " in table
    assert "training path vs straightforward step (same math): " in table
    for key in ("images_per_second", "mfu", "speedup_vs_baseline", "augmentation_share"):
        assert isinstance(result[key], float), key
    assert result["images_per_second"] > 0 and result["mfu"] > 0
    assert result["images_per_second_min"] <= result["images_per_second"]
    assert result["images_per_second"] <= result["images_per_second_max"]
    assert 0.0 <= result["augmentation_share"] <= 1.0
    assert result["flops_per_image_every_token"] > result["flops_per_image"]
    for key in ("rows", "peaks", "flops_per_image", "device", "config", "date", "ranking"):
        assert key in result, key
    names = [row["name"] for row in result["rows"]]
    assert names == [
        "reference (mirrored)",
        "straightforward fp32",
        "training path fp32",
        "+ fused AdamW",
        "+ class token only",
        "+ bf16",
        "+ explicit attention",
        "+ concat views",
    ]
    assert result["baseline_row"] == "reference (mirrored)" and result["rounds"] == 2
    assert result["rows"][0]["speedup_vs_baseline"] == 1.0
    assert result["training_path_vs_straightforward"]["verdict"] in VERDICTS
    best = next(row for row in result["rows"] if row["name"] == result["best_row"])
    assert best["rank"] == 1 and result["ranking"][0].startswith(best["name"])
    assert set(result["peaks"]) == {"fp32", "bf16"}
    assert all(peak["gflops"] > 0 for peak in result["peaks"].values())
    for row in result["rows"]:
        assert row["batch"] == 16 and row["steps"] == 2 and len(row["step_seconds"]) == 2
        low, high = min(row["step_seconds"]), max(row["step_seconds"])
        assert row["images_per_second_min"] == pytest.approx(16 / high, rel=1e-2)
        assert row["images_per_second_max"] == pytest.approx(16 / low, rel=1e-2)
        assert 0 < row["augmentation_ms"] < row["step_ms"]
        assert row["mfu_vs_best_peak"] <= row["mfu"] + 1e-9
        assert row["vs_previous"] in VERDICTS and row["vs_baseline"] in VERDICTS
    first, lever = result["rows"][0], result["rows"][5]
    by_round = [
        (16 / mine) / (16 / theirs)
        for mine, theirs in zip(lever["step_seconds"], first["step_seconds"], strict=True)
    ]
    low, high = lever["speedup_vs_baseline_by_round"]  # (step_seconds are rounded to 0.1 ms)
    assert low == pytest.approx(min(by_round), rel=0.02)
    assert high == pytest.approx(max(by_round), rel=0.02)
    # bf16, compared with the fp32 row before it
    assert lever["base"] == "+ class token only" and lever["precision"] == "bf16"
    ratio = lever["images_per_second"] / result["rows"][4]["images_per_second"]
    assert lever["vs_previous_ratio"] == pytest.approx(ratio, abs=1e-3)


def _bench(device: str = "cpu", config: str = "configs/tiny.yaml", precisions=("fp32", "bf16")):
    loaded = load_config(config)
    images = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    result = bench_rows.Bench(loaded, torch.device(device), 1, images, images)
    result.precisions = list(precisions)
    return result


def test_the_ladder_adds_one_lever_per_row_on_top_of_its_base() -> None:
    rows = bench_rows.ladder(_bench(), compiled=True, channels_last=False)
    assert [(row.name, row.base) for row in rows] == [
        ("reference (mirrored)", ""),
        ("straightforward fp32", "reference (mirrored)"),
        ("training path fp32", "straightforward fp32"),
        ("+ fused AdamW", "training path fp32"),
        ("+ class token only", "+ fused AdamW"),
        ("+ compile fp32", "+ class token only"),
        ("+ bf16", "+ class token only"),  # on the best eager fp32 row
        ("+ explicit attention", "+ bf16"),
        ("+ concat views", "+ explicit attention"),
        ("+ compile", "+ concat views"),
    ]
    by_name = {row.name: row for row in rows}
    assert [row.step for row in rows[:3]] == ["reference", "straightforward", "training"]
    # the straightforward and training rows compute the same math
    assert replace(by_name["training path fp32"], name="", step="", lever="", base="") == (
        replace(by_name["straightforward fp32"], name="", step="", lever="", base="")
    )
    compiled = by_name["+ compile"]
    assert (compiled.precision, compiled.concat, compiled.fused) == ("bf16", True, True)
    assert (compiled.attention, by_name["+ bf16"].attention) == ("auto", "sdpa")
    assert by_name["+ compile fp32"].precision == "fp32"
    assert not by_name["training path fp32"].class_token_only and by_name["+ bf16"].class_token_only


def test_the_ladder_on_a_gpu_and_for_a_resnet() -> None:
    gpu = bench_rows.ladder(_bench("cuda", precisions=("fp32", "bf16", "fp16")), False, False)
    assert gpu[0].precision == "fp16"  # the reference's mixed precision
    names = [row.name for row in gpu]
    assert names[-3:] == ["+ bf16", "+ concat views", "+ fp16"] and "+ compile fp32" not in names
    assert gpu[-1].base == "+ class token only"  # fp16: an alternative to bf16, same base
    assert all(row.attention == "auto" for row in gpu[1:])
    resnet = bench_rows.ladder(_bench(config="configs/resnet18_demo.yaml"), False, True)
    assert [row.name for row in resnet] == [  # LARS (no fused kernel), no ViT levers
        "straightforward fp32",
        "training path fp32",
        "+ bf16",
        "+ channels_last",
    ]
    vit_bn = _bench(config="configs/tiny.yaml")
    vit_bn.config.model.mlp_norm, vit_bn.config.moco.concat_views = "batchnorm", False
    names = [row.name for row in bench_rows.ladder(vit_bn, False, False)]
    assert names == [  # no reference (it has no ViT-BN), no class-token shortcut
        "straightforward fp32",
        "training path fp32",
        "+ fused AdamW",
        "+ bf16",
        "+ explicit attention",
    ]
    fp32_only = bench_rows.ladder(_bench(precisions=("fp32",)), False, False)
    assert fp32_only[-1].name == "+ concat views" and fp32_only[-1].precision == "fp32"


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


def test_the_class_token_only_last_block_saves_the_hand_counted_flops() -> None:
    """Per view, the last block skips the other T - 1 tokens' query, attention output, proj
    and MLP: 20 (T - 1) d^2 of linears and 4 (T - 1) T d of attention forward; the query
    encoder counts them 3x and 3.5x (backward), the momentum encoder once."""
    config = load_config("configs/tiny.yaml")
    cpu = torch.device("cpu")
    every = bench.step_flops_per_image(config, 1, cpu, batch=4, every_token=True)
    short = bench.step_flops_per_image(config, 1, cpu, batch=4)
    dim, tokens = resolve_model_dims(config.model)[0], (28 // 7) ** 2 + 1
    linear, attention = 20 * (tokens - 1) * dim**2, 4 * (tokens - 1) * tokens * dim
    saved = 2 * ((3 + 1) * linear + (3.5 + 1) * attention)
    assert every - short == pytest.approx(saved, rel=1e-6)


def test_peak_memory_sees_an_allocation_on_the_cpu() -> None:
    probe = measure.PeakMemory(torch.device("cpu"))
    with probe:
        block = torch.ones(16 * 2**20)  # 64 MiB, touched
        del block
    if measure.resident_bytes() is None:
        pytest.skip("no /proc/self/statm here")
    assert probe.mib is not None and probe.mib > 50


def _stub(fp32: float, bf16: float, flops: float, batch: int = 256) -> bench_rows.Bench:
    config = load_config("configs/tiny.yaml", [f"train.batch_size={batch}"])
    images = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    result = bench_rows.Bench(config, torch.device("cpu"), 1, images, images, flops_per_image=flops)
    result.peaks = {"fp32": {"gflops": fp32}, "bf16": {"gflops": bf16}}
    result.max_row_seconds = 10.0
    return result


def test_slow_precision_gets_a_batch_that_fits_the_row_budget() -> None:
    slow = _stub(fp32=100.0, bf16=1.0, flops=1e9)
    assert bench_rows.is_slow("bf16", slow)
    # 10 s budget, warm-up + the 5 rounds at least: at 2 s per image 0.8 images fit, at 0.1 s
    # 16.7, and with --steps 1 (2 steps in all) 50
    assert bench_rows.fitted_batch(slow, seconds_per_image=2.0) == 2
    assert bench_rows.fitted_batch(slow, seconds_per_image=0.1) == 16
    assert bench_rows.fitted_batch(replace(slow, steps=1), seconds_per_image=0.1) == 32
    assert bench_rows.fitted_batch(slow, seconds_per_image=100.0) == 2  # never below 2
    assert bench_rows.fitted_batch(slow, seconds_per_image=1e-3) == 256  # fits: the preset's
    assert not bench_rows.is_slow("bf16", _stub(fp32=100.0, bf16=400.0, flops=1e6))


def test_default_preset_is_the_target_configuration() -> None:
    config = load_config(bench.DEFAULT_CONFIG)
    assert resolve_model_dims(config.model) == (192, 12, 3)
    assert (config.model.patch_size, config.data.image_size, config.data.channels) == (4, 32, 3)
    assert config.train.batch_size == 256 and config.data.name == "synthetic"
    model = config.model
    assert (model.proj_hidden_dim, model.pred_hidden_dim, model.out_dim) == (4096, 4096, 256)


@pytest.mark.parametrize(
    "extra",
    [
        ["--steps", "0"],
        ["--config", "configs/missing.yaml"],
        ["--set", "model.depth=0"],
        ["--reference-workers", "-1"],
    ]
    + ([] if torch.cuda.is_available() else [["--precision", "fp16"]]),
)
def test_user_errors_are_one_line(extra: list[str], capsys) -> None:
    assert main([*TINY, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
