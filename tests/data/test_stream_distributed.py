"""The streamed pipeline across processes: two real gloo processes see, between them, the
very views one process sees; a pipeline restarted mid-run sees the continuous run's views;
and a folder and the shards written from it give the same views, byte for byte.

Each view is cut in a DataLoader worker from the full-resolution image, with boxes drawn
from counter-based streams keyed by (seed, epoch, sample index), so none of this may depend
on the world size, on where the pipeline started or on how the bytes are stored."""

from __future__ import annotations

import io
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from mocov3.data.counters import sample_keys
from mocov3.data.crops import decode_views
from mocov3.data.records import FolderRecords, ShardRecords
from mocov3.data.sampling import StepSampler
from mocov3.data.shards import write_shards
from mocov3.data.stream import CropSettings, StreamIndex, StreamingBatches

SIZE = 16
SEED = 11
GLOBAL_BATCH = 8
IMAGES = 24  # 3 steps per epoch at batch 8
STEPS = 5  # steps 0-2 are epoch 0, steps 3-4 epoch 1: the run crosses an epoch boundary
SCALE, RATIO = (0.2, 1.0), (3.0 / 4.0, 4.0 / 3.0)
CPU = torch.device("cpu")
KINDS = ("folder", "shards")

Steps = list[tuple[torch.Tensor, torch.Tensor]]  # per step: (views, indices)


# --------------------------------------------------------------------------- data


def _image(seed: int, width: int, height: int) -> Image.Image:
    """A smooth random RGB image (JPEG-friendly) of the given size."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


LARGE = (5, 17)  # 1200x900 JPEGs: over a megapixel, so decoded at a DCT-reduced size


def write_folder(root: Path) -> Path:
    """24 images of sizes 40x30 .. 90x60 (and two of 1200x900) in classes a and b, JPEG
    and PNG mixed."""
    for i in range(IMAGES):
        width, height = (1200, 900) if i in LARGE else (40 + (i * 7) % 51, 30 + (i * 5) % 31)
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        if i % 3:
            _image(i, width, height).save(buf, format="JPEG", quality=90)
            ext = "jpg"
        else:
            _image(i, width, height).save(buf, format="PNG")
            ext = "png"
        (folder / f"{i:02d}.{ext}").write_bytes(buf.getvalue())
    return root


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The folder's spec and the spec of its shards (10 samples per shard: 3 shards)."""
    root = tmp_path_factory.mktemp("stream_distributed")
    with pytest.MonkeyPatch.context() as patch:
        # shard indexes go to the test's folder, never to the user's ~/.cache; the spawned
        # ranks inherit the variable
        patch.setenv("MOCOV3_CACHE", str(root / "cache"))
        folder = write_folder(root / "images")
        summary = write_shards(f"folder:{folder}", root / "shards", max_count=10)
        assert summary["splits"]["train"]["shards"] == 3
        yield {"folder": f"folder:{folder}", "shards": summary["splits"]["train"]["pattern"]}


def settings_for(index: StreamIndex) -> CropSettings:
    return CropSettings(SIZE, index.channels, SCALE, RATIO, SEED)


def run_pipeline(
    spec: str, rank: int = 0, world: int = 1, start: int = 0, stop: int = STEPS
) -> Steps:
    """Steps ``start .. stop - 1`` of one process's streamed pipeline (one decode worker)."""
    index = StreamIndex.from_spec(spec, "train", SIZE)
    assert len(index) == IMAGES
    sampler = StepSampler(len(index), GLOBAL_BATCH, SEED, rank, world)
    with StreamingBatches(
        index, sampler, CPU, settings_for(index), workers=1, start_step=start, stop_step=stop
    ) as batches:
        return [batches(step) for step in range(start, stop)]


# --------------------------------------------------------------------------- two processes


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str, specs: dict) -> None:
    # a process started by mp.spawn inherits the spawn start method, so its DataLoader
    # workers would be spawned too (seconds of imports each); torchrun's processes fork
    # them, as this one now does
    multiprocessing.set_start_method("fork", force=True)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mine = {kind: run_pipeline(spec, rank, world) for kind, spec in specs.items()}
        everyone: list[dict[str, Steps] | None] = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            torch.save(everyone, Path(out_dir) / "gathered.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single(specs: dict[str, str]) -> dict[str, Steps]:
    """One process (world 1), continuous, for both sources."""
    return {kind: run_pipeline(spec) for kind, spec in specs.items()}


@pytest.fixture(scope="module")
def two_ranks(specs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What two real gloo processes saw, gathered: ``[rank0, rank1]``, each ``{kind: steps}``."""
    out = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(_rank_worker, args=(2, str(out / "init"), str(out), specs), nprocs=2)
    return torch.load(out / "gathered.pt", weights_only=True)


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_together_see_the_single_process_views(
    kind: str, single: dict[str, Steps], two_ranks: list[dict[str, Steps]]
) -> None:
    alone = single[kind]
    rank0, rank1 = two_ranks[0][kind], two_ranks[1][kind]
    assert len(alone) == len(rank0) == len(rank1) == STEPS
    sampler = StepSampler(IMAGES, GLOBAL_BATCH, SEED)
    for step in range(STEPS):
        (v0, i0), (v1, i1), (views, indices) = rank0[step], rank1[step], alone[step]
        assert views.shape == (GLOBAL_BATCH, 2, 3, SIZE, SIZE) and views.dtype == torch.uint8
        assert v0.shape == v1.shape == (GLOBAL_BATCH // 2, 2, 3, SIZE, SIZE)
        assert torch.equal(indices, sampler.indices(step)), step
        # rank r holds the r-th contiguous half of the global batch, views and indices
        assert torch.equal(torch.cat([i0, i1]), indices), step
        assert torch.equal(torch.cat([v0, v1]), views), step
        assert set(i0.tolist()).isdisjoint(i1.tolist())
    # the views are real crops, not a constant: two views of a sample differ, and so do
    # the same sample's views in two epochs (the key holds the epoch)
    first = alone[0][0]
    assert not torch.equal(first[:, 0], first[:, 1])
    assert first.float().std() > 5
    by_index = [dict(zip(idx.tolist(), views, strict=True)) for views, idx in alone]
    epoch0 = by_index[0] | by_index[1] | by_index[2]
    epoch1 = by_index[3] | by_index[4]
    shared = sorted(set(epoch0) & set(epoch1))
    assert shared and all(not torch.equal(epoch0[i], epoch1[i]) for i in shared)
    # every epoch covers each image at most once, and epoch 0 covers them all
    seen = torch.cat([alone[step][1] for step in range(3)]).tolist()
    assert sorted(seen) == list(range(IMAGES))


def test_a_sample_views_follow_from_its_bytes_and_key_alone(
    specs: dict[str, str], two_ranks: list[dict[str, Steps]]
) -> None:
    """Rank 1's views in epoch 1, recomputed one sample at a time from (seed, epoch, index)."""
    records = FolderRecords(specs["folder"].removeprefix("folder:"))
    step = 4
    views, indices = two_ranks[1]["folder"][step]
    keys = sample_keys(SEED, step // 3, indices)
    for n, i in enumerate(indices.tolist()):
        alone = decode_views(records.read(i), keys[n : n + 1], SIZE, 3, SCALE, RATIO)
        assert torch.equal(views[n], alone), i


# --------------------------------------------------------------------------- restart


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("start", [1, 3])  # mid-epoch, and at the epoch boundary
def test_a_restarted_pipeline_continues_the_run_exactly(
    kind: str, start: int, specs: dict[str, str], single: dict[str, Steps]
) -> None:
    resumed = run_pipeline(specs[kind], start=start)
    assert len(resumed) == STEPS - start
    for step, (views, indices) in zip(range(start, STEPS), resumed, strict=True):
        expected_views, expected_indices = single[kind][step]
        assert torch.equal(indices, expected_indices), step
        assert torch.equal(views, expected_views), step


def test_a_restarted_rank_continues_its_share_exactly(
    specs: dict[str, str], two_ranks: list[dict[str, Steps]]
) -> None:
    """Rank 1 of 2 resumed at step 2 (mid-epoch) sees what it saw in the continuous run."""
    resumed = run_pipeline(specs["shards"], rank=1, world=2, start=2)
    for step, (views, indices) in zip(range(2, STEPS), resumed, strict=True):
        expected_views, expected_indices = two_ranks[1]["shards"][step]
        assert torch.equal(indices, expected_indices) and torch.equal(views, expected_views)


# --------------------------------------------------------------------------- folder = shards


def test_folder_and_its_shards_give_the_same_views(
    specs: dict[str, str], single: dict[str, Steps]
) -> None:
    folder = FolderRecords(specs["folder"].removeprefix("folder:"))
    index = StreamIndex.from_spec(specs["shards"], "train", SIZE)
    shards = index.records
    assert isinstance(shards, ShardRecords) and len(shards.urls) == 3
    # the same bytes at the same index, and the same labels
    assert [shards.read(i) for i in range(IMAGES)] == [folder.read(i) for i in range(IMAGES)]
    assert folder.labels is not None and shards.labels is not None
    assert torch.equal(folder.labels, shards.labels) and shards.classes == folder.classes
    assert index.mean == StreamIndex.from_spec(specs["folder"], "train", SIZE).mean
    for step in range(STEPS):
        (fv, fi), (sv, si) = single["folder"][step], single["shards"][step]
        assert torch.equal(fi, si), step
        assert torch.equal(fv, sv), step
