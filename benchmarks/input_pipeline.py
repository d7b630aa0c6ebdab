"""The streamed input pipeline on full-size JPEGs: decode+crop speed per core, folder vs
shards, and the resident memory of a streamed run.

    python benchmarks/imagenet_like.py --out /tmp/in-like --train 20000 --val 1000
    python benchmarks/input_pipeline.py decode --folder /tmp/in-like --stride 39
    python benchmarks/input_pipeline.py decode --folder /tmp/in-like --stride 390 \
        --images 48 --resize 2000x1500 --batch 16
    python benchmarks/input_pipeline.py io --folder /tmp/in-like --shards /tmp/in-like-shards
    python benchmarks/input_pipeline.py memory --folder /tmp/in-like-50k --subsets 5000 50000

``decode`` times, on one thread and from bytes already in memory (no I/O), what one worker
does per image: today's in-memory decode (resize the shorter side, centre crop), and the
streamed path's two full-resolution crops with full-size decoding and with reduced-size
decoding where the boxes allow. Rows run interleaved in rounds (A B C A B C ...) so that a
shared machine's drift hits every row alike; each prints its median and min-max.
``io`` lists and reads a folder and its shards (page cache warm: the software's cost; with
``--cold``, as root, from the disk). ``memory`` runs ``mocov3 pretrain`` on a streamed folder
at two sizes and prints each run's peak resident memory.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from mocov3.data.decode import decode_image, one_thread
from mocov3.data.records import FolderRecords, ShardRecords, expand_shards
from mocov3.data.sampling import StepSampler
from mocov3.data.stream import BatchDecoder, CropSettings, request_for
from mocov3.data.tar_index import sidecar_path

SCALE, RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)


class BytesRecords:
    """Encoded images held in memory: the decode rows time decoding, not the disk."""

    def __init__(self, blobs: list[bytes]) -> None:
        self.blobs, self.source, self.classes, self.labels = blobs, "memory", [], None

    def __len__(self) -> int:
        return len(self.blobs)

    def read(self, i: int) -> bytes:
        return self.blobs[i]

    def name(self, i: int) -> str:
        return f"#{i}"


def interleaved(rows: dict[str, Callable[[], int]], rounds: int) -> dict[str, dict[str, float]]:
    """Images/s of each row over ``rounds`` rounds run A B C A B C ...: median, min, max."""
    rates: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, run in rows.items():
            start = time.perf_counter()
            images = run()
            rates[name].append(images / (time.perf_counter() - start))
    return {
        name: {"median": statistics.median(r), "min": min(r), "max": max(r)}
        for name, r in rates.items()
    }


def decode_rows(blobs: list[bytes], size: int, batch: int) -> dict[str, Callable[[], int]]:
    records = BytesRecords(blobs)
    sampler = StepSampler(len(blobs), batch, seed=0)
    steps = iter(range(10**9))

    def crops(reduce: bool) -> Callable[[], int]:
        decoder = BatchDecoder(records, CropSettings(size, 3, SCALE, RATIO, 0, reduce), False)
        return lambda: len(decoder[request_for(sampler, next(steps))].indices)

    def centre() -> int:
        for i in sampler.indices(next(steps)).tolist():
            decode_image(blobs[i], size, 3)
        return batch

    return {
        "centre crop (in-memory path)": centre,
        "2 crops, full decode": crops(False),
        "2 crops, reduced decode": crops(True),
    }


def _resized(path: Path, size: tuple[int, int]) -> bytes:
    """The image scaled (bicubic) to ``size`` and saved again at quality 90: megapixel
    photos, for the sizes where reduced decoding pays (upscaled, so smoother than real
    camera photos: libjpeg decodes them somewhat faster)."""
    buffer = io.BytesIO()
    Image.open(path).resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def cmd_decode(args: argparse.Namespace) -> None:
    files = sorted((args.folder / "train").rglob("*.jpg"))[:: args.stride][: args.images]
    blobs = [
        path.read_bytes() if args.resize is None else _resized(path, args.resize) for path in files
    ]
    print(f"{len(blobs)} JPEGs, mean {sum(map(len, blobs)) / len(blobs) / 1e3:.0f} KB")
    torch.set_num_threads(1)
    with one_thread():
        for size in args.sizes:
            result = interleaved(decode_rows(blobs, size, args.batch), args.rounds)
            for name, rate in result.items():
                print(
                    f"{size:>4} px  {name:<30} {rate['median']:7.1f} img/s per core "
                    f"(min {rate['min']:.1f}, max {rate['max']:.1f})"
                )
            print(json.dumps({"size": size, "rows": result}))


def _read_all(records: FolderRecords | ShardRecords, order: list[int]) -> tuple[float, float]:
    start, total = time.perf_counter(), 0
    for i in order:
        total += len(records.read(i))
    seconds = time.perf_counter() - start
    return len(order) / seconds, total / seconds / 1e6


def _open_shards(urls: list[str], hide_sidecars: bool) -> tuple[ShardRecords, float]:
    """ShardRecords over ``urls`` and the seconds it took to index them; ``hide_sidecars``
    renames the converter's index files away for the call (shards made by other tools)."""
    sidecars = [sidecar_path(url) for url in urls]
    if hide_sidecars:
        for sidecar in sidecars:
            sidecar.rename(sidecar.with_suffix(".hidden"))
    try:
        start = time.perf_counter()
        shards = ShardRecords(urls)
        return shards, time.perf_counter() - start
    finally:
        if hide_sidecars:
            for sidecar in sidecars:
                sidecar.with_suffix(".hidden").rename(sidecar)


def _drop_page_cache() -> None:
    """Empty the kernel's page cache (root only), so that reads come from the disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cmd_io(args: argparse.Namespace) -> None:
    shutil.rmtree(args.cache, ignore_errors=True)  # the first open scans every shard
    os.environ["MOCOV3_CACHE"] = str(args.cache)
    urls = expand_shards(str(args.shards / "train-*.tar"))
    rows: list[tuple[str, Callable[[], FolderRecords | ShardRecords]]] = [
        ("folder (listing)", lambda: FolderRecords(args.folder)),
        ("shards (sidecar index)", lambda: _open_shards(urls, False)[0]),
        ("shards, no sidecar (scan)", lambda: _open_shards(urls, True)[0]),
        ("shards, no sidecar (cached)", lambda: _open_shards(urls, True)[0]),
    ]
    order: list[int] | None = None
    for label, open_records in rows:
        if args.cold:
            _drop_page_cache()
        start = time.perf_counter()
        records = open_records()
        seconds = time.perf_counter() - start
        if order is None:
            generator = torch.Generator().manual_seed(0)
            order = torch.randperm(len(records), generator=generator).tolist()
        if args.cold:
            _drop_page_cache()
        per_second, megabytes = _read_all(records, order)
        print(
            f"{label:<28} {len(records)} images: listed/indexed in {seconds:.2f} s, random "
            f"reads {per_second:,.0f} images/s ({megabytes:,.0f} MB/s)"
        )


RSS_SCRIPT = (
    "import resource, sys; from mocov3.cli import main; status = main(sys.argv[1:]); "
    "print('peak_rss_mib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
    "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(status)"
)


def cmd_memory(args: argparse.Namespace) -> None:
    for subset in args.subsets:
        out = args.out / f"rss-{subset}"
        command = [
            sys.executable, "-c", RSS_SCRIPT, "pretrain", "--config", "configs/tiny.yaml",
            "--data", f"folder:{args.folder}", "--out", str(out), "--overwrite",
            "--set", f"data.subset={subset}", "--set", "data.loader=stream",
            "--set", "data.image_size=64", "--set", "model.patch_size=8",
            "--set", "train.batch_size=64", "--set", f"train.epochs={args.steps * 64 / subset}",
            "--set", "optim.warmup_epochs=0",
            "--set", "eval.knn_init=false", "--set", "eval.knn_final=false",
            "--set", "eval.monitor_every=0", "--set", f"data.workers={args.workers}",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        peak = [line for line in done.stdout.splitlines() if line.startswith("peak_rss_mib")]
        if done.returncode or not peak:
            sys.exit(done.stderr[-2000:])
        main_mib, worker_mib = (float(value) for value in peak[0].split()[1:])
        print(
            f"{subset} images, {args.workers} worker(s): peak resident memory {main_mib:.0f} "
            f"MiB in the training process, {worker_mib:.0f} MiB in its largest worker"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    decode = commands.add_parser("decode", help="decode+crop images/s per core")
    decode.add_argument("--folder", type=Path, required=True)
    decode.add_argument("--images", type=int, default=512)
    decode.add_argument("--sizes", type=int, nargs="+", default=[224, 112])
    decode.add_argument("--batch", type=int, default=64)
    decode.add_argument("--rounds", type=int, default=5)
    decode.add_argument("--stride", type=int, default=1, help="take every N-th file (classes)")
    decode.add_argument(
        "--resize",
        type=lambda text: tuple(map(int, text.split("x"))),
        metavar="WxH",
        help="re-encode every image at this size first (megapixel photos)",
    )
    decode.set_defaults(handler=cmd_decode)
    io = commands.add_parser("io", help="folder vs shards: listing and reading")
    io.add_argument("--folder", type=Path, required=True)
    io.add_argument("--shards", type=Path, required=True)
    io.add_argument("--cache", type=Path, default=Path("/tmp/mocov3-bench-cache"))
    io.add_argument(
        "--cold", action="store_true", help="empty the page cache before each step (root)"
    )
    io.set_defaults(handler=cmd_io)
    memory = commands.add_parser("memory", help="peak resident memory of streamed runs")
    memory.add_argument("--folder", type=Path, required=True)
    memory.add_argument("--subsets", type=int, nargs="+", default=[5000, 50000])
    memory.add_argument("--steps", type=int, default=40)
    memory.add_argument("--workers", type=int, default=1)
    memory.add_argument("--out", type=Path, default=Path("/tmp/mocov3-rss"))
    memory.set_defaults(handler=cmd_memory)
    args = parser.parse_args()
    args.handler(args)


if __name__ == "__main__":
    main()
