"""mocov3 embed: one row per readable image, names aligned with rows, labels for splits."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mocov3.cli import main
from mocov3.data.datasets import load_split
from mocov3.eval.embed import load_embeddings

FILES = {  # name -> (size, mode); sizes differ so resize/crop runs, one is colour
    "cats/a.png": ((28, 28), "L"),
    "cats/b.png": ((40, 30), "RGB"),
    "dogs/c.png": ((17, 50), "L"),
    "dogs/d.png": ((64, 64), "L"),
    "dogs/e.png": ((33, 33), "RGB"),
}


def _embed(capsys, *args: str) -> dict:
    assert main(["embed", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name, ((w, h), mode) in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name)
    (root / "dogs" / "broken.png").write_bytes(b"not a png at all")  # skipped, counted
    (root / "notes.txt").write_text("not an image")  # ignored
    return root


def _embed_folder(capsys, checkpoint: str, folder, out) -> dict:
    """Every image file under ``folder``: ``--data folder:DIR --split all``."""
    flags = ["--data", f"folder:{folder}", "--split", "all", "--out", str(out)]
    return _embed(capsys, "--checkpoint", checkpoint, *flags)


def test_embed_folder_rows_names_and_determinism(tiny_run, image_folder, tmp_path, capsys):
    ckpt = str(tiny_run / "checkpoint.pt")
    out1, out2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    result = _embed_folder(capsys, ckpt, image_folder, out1)
    features, labels, names = load_embeddings(out1)
    assert result["count"] == 5 and result["skipped"] == 1 and result["out"] == str(out1)
    assert names == sorted(FILES)
    assert labels is None
    assert features.dtype == torch.float32 and features.shape == (5, result["dim"])
    assert result["dim"] == 64  # tiny.yaml embed_dim
    assert torch.isfinite(features).all()
    assert torch.cdist(features, features).fill_diagonal_(1.0).min() > 1e-4  # distinct rows

    _embed_folder(capsys, ckpt, image_folder, out2)
    assert torch.equal(load_embeddings(out2)[0], features)

    # Rows belong to their names: one image alone gives the same row.
    single = tmp_path / "single"
    single.mkdir()
    (single / "c.png").write_bytes((image_folder / "dogs" / "c.png").read_bytes())
    _embed_folder(capsys, ckpt, single, out2)
    alone, _, alone_names = load_embeddings(out2)
    assert alone_names == ["c.png"]
    torch.testing.assert_close(alone[0], features[names.index("dogs/c.png")])

    from safetensors import safe_open

    with safe_open(str(out1), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["encoder"] == "query" and meta["image_size"] == "28"
    assert meta["checkpoint"] == ckpt and json.loads(meta["names"]) == names


def test_embed_split_has_labels_and_momentum_differs(tiny_run, tmp_path, capsys):
    out = tmp_path / "test.safetensors"
    result = _embed(
        capsys,
        "--checkpoint",
        str(tiny_run),
        "--split",
        "test",
        "--out",
        str(out),
        "--set",
        "data.name=synthetic",
        "--set",
        "data.synthetic_size=64",
    )
    features, labels, names = load_embeddings(out)
    expected = load_split("synthetic", "test", image_size=28, channels=1, synthetic_size=64)
    assert result["count"] == len(expected) == features.shape[0] == 512
    assert torch.equal(labels, expected.labels)
    assert names[:2] == ["test/0", "test/1"] and len(names) == 512

    momentum = tmp_path / "m.safetensors"
    _embed(
        capsys,
        "--checkpoint",
        str(tiny_run),
        "--split",
        "test",
        "--out",
        str(momentum),
        "--encoder",
        "momentum",
        "--set",
        "data.name=synthetic",
        "--set",
        "data.synthetic_size=64",
    )
    assert not torch.equal(load_embeddings(momentum)[0], features)


def test_embed_empty_folder_is_one_line_error(tiny_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(
        [
            "embed",
            "--checkpoint",
            str(tiny_run),
            "--data",
            f"folder:{tmp_path / 'empty'}",
            "--split",
            "all",
            "--out",
            str(tmp_path / "x.safetensors"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "holds no images" in err
    assert len(err.splitlines()) == 1
