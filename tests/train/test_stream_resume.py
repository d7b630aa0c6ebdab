"""A streamed run (``data.loader=stream``, one decode worker) stopped by SIGTERM mid-epoch
and resumed with ``resume="auto"`` ends bit-identical to the run that was never stopped,
on an image folder and on the shards written from it: the resumed pipeline restarts at
the checkpoint's step and cuts the very views the uninterrupted one cut there.

The tiny preset at 21 px (3 x 3 patches of 7), batch 16 on 64 images: 4 steps per epoch,
2 epochs; one thread and fp32, so that every run computes the same bits."""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mocov3.config import load_config
from mocov3.data.shards import write_shards
from mocov3.runtime.checkpoint import load_checkpoint
from mocov3.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
IMAGES, BATCH, EPOCHS = 64, 16, 2
STEPS_PER_EPOCH = IMAGES // BATCH
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH  # 8
STOP_AT = 6  # the signal arrives during step 6: epoch 1, its second step
BASE = [
    "data.loader=stream",
    "data.workers=1",
    "data.image_size=21",
    "data.subset=null",
    f"train.batch_size={BATCH}",
    f"train.epochs={EPOCHS}",
    "train.precision=fp32",
    "train.threads=1",
    "train.log_every=1",
    "train.plot_every=1000",
    "train.checkpoint_every_steps=3",
    "eval.knn_init=false",
    "eval.knn_final=false",
]


def write_folder(root: Path) -> Path:
    """64 smooth RGB images of sizes 30x24 .. 60x50 in two classes, JPEG and PNG mixed, and
    one 1200x900 JPEG (over a megapixel: its views come from a DCT-reduced decode)."""
    for i in range(IMAGES):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        size = (1200, 900) if i == 11 else (30 + (i * 7) % 31, 24 + (i * 5) % 27)
        image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        fmt, ext = ("PNG", "png") if i % 4 == 0 else ("JPEG", "jpg")
        image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        (folder / f"{i:02d}.{ext}").write_bytes(buf.getvalue())
    return root


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory):
    """The folder's spec and its shards' (20 samples per shard: 4 shards)."""
    root = tmp_path_factory.mktemp("stream_resume")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOCOV3_CACHE", str(root / "cache"))  # not the user's ~/.cache
        folder = write_folder(root / "images")
        summary = write_shards(f"folder:{folder}", root / "shards", max_count=20)
        assert summary["splits"]["train"]["shards"] == 4
        yield {"folder": f"folder:{folder}", "shards": summary["splits"]["train"]["pattern"]}


def make_config(spec: str):
    return load_config(ROOT / "configs/tiny.yaml", [*BASE, f"data.name={spec}"])


def run(spec: str, out: Path, resume: str | None = None, stop_at: int | None = None) -> dict:
    trainer = Trainer(make_config(spec), out, resume=resume)
    try:
        assert trainer.data.kind == "stream"
        if stop_at is not None:
            _signal_at_forward(trainer.model, stop_at, signal.SIGTERM)
        return trainer.run()
    finally:
        trainer.close()


def _signal_at_forward(model: torch.nn.Module, call: int, sig: int):
    """Send ``sig`` to this process from inside the ``call``-th training forward pass of
    the backbone (as tests/train/test_reliability.py does)."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += module.training
        if calls["n"] == call:
            os.kill(os.getpid(), sig)
        return output

    return model.backbone.register_forward_hook(hook)


def train_losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for index, values in opt_a.items():
        for key, value in values.items():
            assert torch.equal(value, opt_b[index][key]), (index, key)


@pytest.fixture(scope="module")
def straight(specs, tmp_path_factory) -> Path:
    """The uninterrupted run on the folder."""
    out = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    try:
        summary = run(specs["folder"], out)
    finally:
        torch.set_num_threads(threads)
    assert summary["steps"] == TOTAL_STEPS and not summary.get("preempted")
    return out


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_sigterm_mid_epoch_then_resume_is_bit_identical(kind, specs, straight, tmp_path):
    out = tmp_path / kind
    stopped = run(specs[kind], out, stop_at=STOP_AT)
    assert stopped["preempted"] and stopped["signal"] == "SIGTERM"
    assert stopped["step"] == STOP_AT and STOP_AT % STEPS_PER_EPOCH  # mid-epoch
    assert load_checkpoint(out)["step"] == STOP_AT
    assert not (out / "summary.json").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored

    final = run(specs[kind], out, resume="auto")
    assert not final.get("preempted") and final["steps"] == TOTAL_STEPS
    assert final["resumed_from"].endswith(f"checkpoint-{STOP_AT}.pt")
    reference, resumed = load_checkpoint(straight), load_checkpoint(out)
    assert_same_weights(resumed, reference)
    # the metrics continue where the checkpoint stopped: no step twice, none missing
    losses = train_losses(out)
    assert [step for step, _ in losses] == list(range(1, TOTAL_STEPS + 1))
    assert losses == train_losses(straight)
    # the loss moved: the comparison is of a run that trained, not of a constant
    assert len({loss for _, loss in losses}) > 1
