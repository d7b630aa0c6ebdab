"""End to end: real MoCo v3 training on a Fashion-MNIST subset lifts kNN above random init."""

import json
from pathlib import Path

import torch

from mocov3.cli import main
from mocov3.data.records import FolderRecords
from mocov3.data.shards import write_shards
from mocov3.runtime.checkpoint import load_checkpoint


def tiny_pretrain(out, *extra: str) -> list[str]:
    """``mocov3 pretrain`` arguments for the tiny preset into ``out``, plus ``extra``."""
    return ["pretrain", "--config", "configs/tiny.yaml", "--out", str(out), *extra]


def test_pretrain_lifts_knn_and_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["--set", "train.log_every=20", "--set", "eval.monitor_every=64"]
    status = main(tiny_pretrain(out, "--epochs", "8", *extra))
    assert status == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "knn_top1_init",
        "knn_top1",
        "images_per_second",
        "wall_seconds",
        "epochs",
        "final_loss",
    ):
        assert key in summary and key in result
    assert summary["steps"] == 8 * (2048 // 64)
    # measured on the 2-core CPU (seed 0, 2026-11-26): init 61.8 -> final 71.4 (k=20)
    assert summary["knn_top1"] >= summary["knn_top1_init"] + 5.0, summary
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "checkpoint.pt",
        "loss.png",
        "lr.png",
        "momentum.png",
        "knn.png",
    ):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").iterdir())
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["step"] == summary["steps"]
    assert load_checkpoint(out)["config"]["train"]["epochs"] == 8.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert (
        {"train", "knn", "knn_monitor", "grad"}
        <= kinds
        <= {
            "train",
            "knn",
            "knn_monitor",
            "grad",
            "instability",
        }
    )
    assert "stability.png" in {Path(p).name for p in summary["plots"]}
    # the dense monitor: every 64 steps from 0 but the last (that gets the full evaluation), on a
    # subset sized for ~5% of training time: 0.4 * 64 * 64 images split 4:1
    monitor = [r for r in records if r["kind"] == "knn_monitor"]
    assert [r["step"] for r in monitor] == [0, 64, 128, 192]
    assert monitor[0]["train_images"] == 1310 and monitor[0]["test_images"] == 327
    assert summary["knn_monitor_share"] < 0.15


def test_knn_command_on_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_pretrain(str(out), "--epochs", "1", "--set", "eval.knn_init=false")) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert (
        main(
            [
                "knn",
                "--checkpoint",
                str(out / "checkpoint.pt"),
                "--k",
                "20",
                "--set",
                "eval.test_subset=1000",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(result["knn_top1"] - summary["knn_top1"]) < 1e-6
    assert main(["knn", "--checkpoint", str(out), "--encoder", "momentum", "--k", "20"]) == 0
    momentum = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert momentum["features"] == "momentum" and 10.0 < momentum["knn_top1"] <= 100.0


def _write_folder(root, classes=2, per_class=24, size=20):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 255, (size, size, 3), generator=generator)
                pixels[:, :, c] = 255  # class c has a saturated channel c
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{i}.png")


def test_pretrain_on_a_folder_of_images(tmp_path, capsys):
    _write_folder(tmp_path / "images")
    out = tmp_path / "run"
    status = main(
        tiny_pretrain(
            str(out),
            "--data",
            f"folder:{tmp_path / 'images'}",
            "--epochs",
            "2",
            "--set",
            "data.image_size=14",
            "--set",
            "train.batch_size=16",
            "--set",
            "data.subset=null",
            "--set",
            "eval.knn_k=[5]",
        )
    )
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    state = load_checkpoint(out)
    assert state["in_chans"] == 3 and state["step"] == 2 * (48 // 16)
    assert 0.0 <= summary["knn_top1"] <= 100.0


def test_folder_without_val_trains_and_skips_knn(tmp_path, capsys):
    _write_folder(tmp_path / "images")
    (tmp_path / "images" / "val").rename(tmp_path / "elsewhere")
    out = tmp_path / "run"
    assert (
        main(
            tiny_pretrain(
                str(out),
                "--data",
                f"folder:{tmp_path / 'images'}",
                "--epochs",
                "1",
                "--set",
                "data.image_size=14",
                "--set",
                "train.batch_size=16",
            )
        )
        == 0
    )
    assert "kNN evaluation is skipped" in capsys.readouterr().err
    assert "knn_top1" not in json.loads((out / "summary.json").read_text())


def test_missing_dataset_is_one_clear_line(tmp_path, capsys):
    status = main(tiny_pretrain(str(tmp_path / "run"), "--data-dir", str(tmp_path)))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "apt-get install dataset-fashion-mnist" in err[0] and "--data-dir" in err[0]


def test_new_run_never_replaces_an_earlier_run_silently(tmp_path, capsys):
    out = tmp_path / "run"
    off = ["eval.knn_init=false", "eval.knn_final=false", "data.subset=256"]
    argv = tiny_pretrain(out, "--epochs", "1", *[arg for key in off for arg in ("--set", key)])
    assert main(argv) == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "--resume auto" in err[0]
    assert (out / "checkpoint.pt").read_bytes() == before
    assert main([*argv, "--overwrite"]) == 0


def _train_record(out) -> tuple[list[float], dict[str, torch.Tensor]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    return losses, load_checkpoint(out)["model"]


def _save_hf_dataset(folder: Path, out: Path) -> None:
    """The folder's training images, in its order, as a Hugging Face dataset on disk."""
    import datasets

    records = FolderRecords(folder)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=records.classes)}
    )
    assert records.labels is not None
    rows = {
        "image": [str(records.path(i)) for i in range(len(records))],
        "label": records.labels.tolist(),
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(out))


def test_a_streamed_folder_its_shards_and_a_hf_dataset_train_identically(tmp_path, capsys):
    """data.loader=stream cuts each view from the full-resolution image in a DataLoader
    worker. The shards `mocov3 shards` writes from a folder, and a Hugging Face dataset of
    its files, hold the same bytes in the same order, so a run on them is the folder's run
    bit for bit: same losses, same weights."""
    _write_folder(tmp_path / "images", size=20)
    summary = write_shards(f"folder:{tmp_path / 'images'}", tmp_path / "shards", max_count=20)
    _save_hf_dataset(tmp_path / "images", tmp_path / "hf")
    sources = {
        "folder": f"folder:{tmp_path / 'images'}",
        "shards": summary["splits"]["train"]["pattern"],
        "hf": f"hf:{tmp_path / 'hf'}",
    }
    runs = {}
    for name, spec in sources.items():
        out = tmp_path / name
        args = tiny_pretrain(str(out), "--data", spec, "--epochs", "2")
        for item in (
            "data.image_size=14",
            "train.batch_size=16",
            "data.subset=null",
            "eval.knn_k=[5]",
            "train.log_every=1",
            "data.loader=stream",
            "data.workers=1",
        ):
            args += ["--set", item]  # fmt: skip
        assert main(args) == 0
        runs[name] = _train_record(out)
        assert json.loads((out / "summary.json").read_text())["steps"] == 6
    losses_folder, weights_folder = runs.pop("folder")
    assert len(losses_folder) == 6
    for losses, weights in runs.values():
        assert losses == losses_folder
        for name, tensor in weights_folder.items():
            assert torch.equal(weights[name], tensor), name
    summary = json.loads((tmp_path / "folder" / "summary.json").read_text())
    assert "knn_top1" in summary  # the streamed folder evaluates on in-memory subsets


def test_stream_is_refused_for_a_dataset_that_is_not_a_folder(tmp_path, capsys):
    assert main(tiny_pretrain(str(tmp_path / "run"), "--set", "data.loader=stream")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.loader=stream reads image folders, shards" in err[0]


def test_gpu_decoding_on_in_memory_data_says_it_does_nothing(tmp_path, capsys):
    """data.decode=gpu concerns streamed data; an in-memory run says so instead of
    silently ignoring it."""
    args = tiny_pretrain(str(tmp_path / "run"), "--set", "data.decode=gpu", "--epochs", "1")
    assert main([*args, "--set", "eval.knn_init=false", "--set", "eval.knn_final=false"]) == 0
    assert "data.decode=gpu decodes streamed data" in capsys.readouterr().err
