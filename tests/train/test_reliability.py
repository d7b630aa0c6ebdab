"""Reliability: exact resume, kill -9 at random points, preemption by signals, the non-finite
guard, one-line errors for bad input, and refusal of checkpoint files that would run code.

Every run here is the tiny model on 192 Fashion-MNIST images, batch 32: 6 steps per epoch,
24 steps, one thread and fp32 so that runs in this process and in subprocesses compute the
same bits."""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mocov3.cli import main
from mocov3.config import load_config
from mocov3.errors import CheckpointError, TrainingError
from mocov3.runtime.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mocov3.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
TOTAL_STEPS = 24
BASE = [
    "data.subset=192",
    "train.batch_size=32",
    "train.epochs=4",
    "train.precision=fp32",
    "train.threads=1",
    "train.log_every=1",
    "train.plot_every=1000",
    "train.checkpoint_every_steps=2",
    "train.milestones=[2]",
    "eval.knn_init=false",
    "eval.knn_final=false",
]


def make_config(*extra: str):
    return load_config(ROOT / "configs/tiny.yaml", [*BASE, *extra])


def cli(out: Path, *extra: str) -> list[str]:
    args = ["pretrain", "--config", str(ROOT / "configs/tiny.yaml"), "--out", str(out)]
    for override in [*BASE, *extra]:
        args += ["--set", override]
    return args


def numbered(out: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in out.glob("checkpoint-*.pt"))


def checkpoint_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.pt"))}


def assert_same_training_state(a: dict, b: dict) -> None:
    """Every tensor of the model and the optimiser, bit for bit, and the schedule position."""
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index, values in opt_a["state"].items():
        assert values.keys() == opt_b["state"][index].keys()
        for key, value in values.items():
            assert torch.equal(value, opt_b["state"][index][key]), (index, key)


def train_losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def grad_records(out: Path) -> list[dict]:
    """The per-step gradient-norm records, without their wall-clock time."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in records if r["kind"] == "grad"]


def one_error_line(err: str) -> str:
    errors = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted reference run."""
    out = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    try:
        summary = Trainer(make_config(), out).run()
    finally:
        torch.set_num_threads(threads)
    assert summary["steps"] == TOTAL_STEPS and summary["skipped_steps"] == 0
    return out


def test_rotation_latest_and_milestones(straight):
    assert numbered(straight) == [20, 22, 24]  # train.keep_checkpoints: 3
    latest = load_checkpoint(straight / "checkpoint.pt")
    assert latest["step"] == TOTAL_STEPS and latest["epoch_index"] == 4
    assert (straight / "checkpoint.pt").read_bytes() == (straight / "checkpoint-24.pt").read_bytes()
    milestone = load_checkpoint(straight / "milestone-epoch2.pt")
    assert milestone["step"] == 12 and milestone["step_in_epoch"] == 0
    assert latest["config"]["train"]["milestones"] == [2] and latest["version"]
    assert {"python", "numpy", "torch", "cuda"} <= latest["rng"].keys()
    assert not list(straight.glob(".*.tmp"))


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1)
    torch.manual_seed(2)
    import numpy as np

    np.random.seed(3)
    np.random.normal()  # leaves a cached gaussian behind
    save_checkpoint({"model": {}, "config": {}, "rng": rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def _signal_at_forward(model: torch.nn.Module, call: int, signals: list[int]):
    """Send real signals to this process from inside the ``call``-th training forward pass
    (kNN feature extraction runs the backbone in eval mode and is not counted)."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += module.training
        if calls["n"] == call:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return output

    return model.backbone.register_forward_hook(hook)


def test_sigterm_then_resume_is_bit_identical(straight, tmp_path, capsys):
    out = tmp_path / "run"
    # with the random-init kNN on (it reads no RNG): the resumed summary keeps its result
    with_knn = ("eval.knn_init=true", "eval.train_subset=192", "eval.test_subset=100")
    trainer = Trainer(make_config(*with_knn), out)
    _signal_at_forward(trainer.model, 9, [signal.SIGTERM])  # during step 9
    summary = trainer.run()
    assert summary["preempted"] and summary["step"] == 9 and summary["signal"] == "SIGTERM"
    assert "resume with: mocov3 pretrain" in capsys.readouterr().err
    assert numbered(out) == [6, 8, 9] and load_checkpoint(out)["step"] == 9
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    assert not (out / "summary.json").exists()

    # resume from an older checkpoint into another directory, and automatically in place
    other = tmp_path / "other"
    resumed = Trainer(make_config(), other, resume=out / "checkpoint-6.pt").run()
    assert resumed["resumed_from"].endswith("checkpoint-6.pt")
    final = Trainer(make_config(*with_knn), out, resume="auto").run()
    assert final["steps"] == TOTAL_STEPS
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    init = [r for r in records if r["kind"] == "knn"]
    assert len(init) == 1 and init[0]["step"] == 0  # computed once, before step 1
    assert final["knn_top1_init"] == init[0]["knn_top1"]
    reference = load_checkpoint(straight)
    for run in (out, other):
        assert_same_training_state(load_checkpoint(run), reference)
    assert train_losses(out) == train_losses(straight)  # metrics continue, no duplicates
    # the gradient monitor's records and the instability detector's state continue too
    assert grad_records(out) == grad_records(straight)
    progress = load_checkpoint(out)["progress"]["stability"]
    assert progress == load_checkpoint(straight)["progress"]["stability"]
    assert len(progress["history"]["loss"]) == TOTAL_STEPS


def test_new_run_in_an_old_directory_is_refused_unless_overwrite(straight, tmp_path, capsys):
    """Without --resume a directory holding a run is refused (nothing touched); with
    --overwrite the run starts afresh: the old run's numbered checkpoints and checkpoint.pt
    go (a later --resume auto must not mix the two runs), milestones stay."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = {path.name: path.read_bytes() for path in out.glob("*.pt")}
    with pytest.raises(TrainingError, match="already holds a run"):
        Trainer(make_config(), out)
    assert {path.name: path.read_bytes() for path in out.glob("*.pt")} == before
    Trainer(make_config(), out, overwrite=True)
    assert "removed 4 checkpoint file(s) of an earlier run" in capsys.readouterr().err
    assert numbered(out) == [] and not (out / "checkpoint.pt").exists()
    assert (out / "milestone-epoch2.pt").is_file()


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError("timed out waiting for the training subprocess")


def _spawn(out: Path, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "mocov3", *cli(out), "--resume", "auto"]
    with log.open("ab") as stream:
        return subprocess.Popen(command, cwd=ROOT, stdout=stream, stderr=stream)


def _every_checkpoint_loads(out: Path) -> None:
    for path in [*out.glob("checkpoint*.pt"), *out.glob("milestone-*.pt")]:
        state = load_checkpoint(path)
        assert state["step"] <= TOTAL_STEPS
    assert len(numbered(out)) <= 4  # keep 3, plus one between its write and the pruning


def _temp_files(out: Path) -> set[str]:
    return {p.name for p in out.glob(".checkpoint*.tmp")}


def _train_records(out: Path) -> list[dict]:
    """The train records of metrics.jsonl as it is being written (a cut line is skipped)."""
    records = []
    if (out / "metrics.jsonl").is_file():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("kind") == "train":
                records.append(record)
    return records


def _trained(out: Path) -> int:
    return max((r["step"] for r in _train_records(out)), default=0)


def _step_seconds(out: Path) -> float:
    times = [r["time"] for r in _train_records(out)[-2:]]
    return times[1] - times[0] if len(times) == 2 else 0.05


def test_kill_9_at_random_points_and_sigterm_then_resume_is_bit_identical(straight, tmp_path):
    """SIGKILL a real ``python -m mocov3 pretrain --resume auto`` process at seeded random
    moments (one at start-up, at least one while a checkpoint is being written), relaunch it
    each time; after every kill each checkpoint present loads. Then SIGTERM: exit status 0
    and a printed resume command, which finishes the run bit-identical to the straight one.
    Kill points are counted in steps (1-3 past where the last launch got, plus a random part
    of a step), so the schedule fits the run's 24 steps on a slow or a fast machine."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    rng = random.Random(20261126)
    kills, kills_mid_write, launches = 0, 0, 0
    while (kills < 5 or kills_mid_write < 1) and launches < 12:
        launches += 1
        reached = max(_trained(out), max(numbered(out), default=0))
        leftovers = _temp_files(out)
        process = _spawn(out, log)
        if kills == 0:  # during start-up: imports, data, temp-file cleanup
            time.sleep(rng.uniform(0.0, 1.0))
        elif kills < 4 or kills_mid_write:  # a random moment once training has moved on
            target = reached + rng.randint(1, 3)
            if not _wait_for(lambda target=target: _trained(out) >= target, process):
                break
            time.sleep(rng.random() * _step_seconds(out))
        else:  # while an atomic checkpoint write is in flight
            if not _wait_for(lambda reached=reached: _trained(out) > reached, process):
                break
            if not _wait_for(lambda: bool(_temp_files(out)), process):
                break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        if process.returncode == 0:
            break  # finished before the kill landed; the loop's budget is sized to avoid it
        assert process.returncode == -signal.SIGKILL
        kills += 1
        kills_mid_write += bool(_temp_files(out) - leftovers)
        _every_checkpoint_loads(out)
    assert kills >= 5 and kills_mid_write >= 1, (kills, kills_mid_write, log.read_text()[-2000:])

    # then a polite stop: SIGTERM finishes the step, checkpoints, prints how to resume, exit 0
    before = max(numbered(out), default=0)
    process = subprocess.Popen(
        [sys.executable, "-m", "mocov3", *cli(out), "--resume", "auto"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _wait_for(lambda: max(numbered(out), default=0) > before, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    lines = [line for line in stderr.splitlines() if "resume with:" in line]
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGTERM after step "), stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["preempted"] and before < result["step"] < TOTAL_STEPS
    assert load_checkpoint(out)["step"] == result["step"]
    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command[:3] == [sys.executable, "-m", "mocov3"] and command[-2:] == ["--resume", "auto"]

    assert main(command[3:]) == 0  # the printed command, run in this process, finishes
    assert not list(out.glob(".*.tmp"))  # the leftovers of killed writes were cleaned
    assert_same_training_state(load_checkpoint(out), load_checkpoint(straight))
    assert train_losses(out) == train_losses(straight)
    assert load_checkpoint(out / "milestone-epoch2.pt")["step"] == 12


def test_second_sigint_exits_at_once_leaving_checkpoints_alone(tmp_path, capsys, monkeypatch):
    # what the handler was before (SIG_IGN, not Python's, when a non-interactive shell
    # started the tests in the background): the run must put it back
    handler = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    trainer = Trainer(make_config(), out)
    seen: dict[str, bytes] = {}

    def hook(module, inputs, output, calls=[0]):  # noqa: B006
        calls[0] += 1
        if calls[0] == 5:  # step 5: checkpoints 2 and 4 exist
            seen.update(checkpoint_bytes(out))
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return output

    trainer.model.backbone.register_forward_hook(hook)
    monkeypatch.setattr("mocov3.train.trainer.Trainer", lambda *a, **k: trainer)
    assert main(cli(out)) == 130
    assert "interrupted" in capsys.readouterr().err
    assert seen and checkpoint_bytes(out) == seen and numbered(out) == [2, 4]
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.mark.parametrize("where", ["activation", "gradient"])
def test_nonfinite_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, where):
    out = tmp_path / "run"
    trainer = Trainer(make_config(), out)
    seen: dict[str, bytes] = {}
    names = dict(trainer.train_step.named_trainable)
    target = "predictor.0.weight" if "predictor.0.weight" in names else next(iter(names))
    calls = [0]
    poisoned_call = 9 if where == "activation" else 5  # the predictor runs once per view

    def poison(value):
        calls[0] += 1
        if calls[0] == poisoned_call:  # step 5; checkpoints 2 and 4 exist
            seen.update(checkpoint_bytes(out))
            return value * float("nan")
        return value

    if where == "activation":
        trainer.model.predictor.register_forward_hook(lambda m, i, o: poison(o))
    else:
        names[target].register_hook(poison)
    with pytest.raises(TrainingError) as error:
        trainer.run()
    message = str(error.value)
    assert "\n" not in message and "at step 5 (lr " in message, message
    assert "train.skip_nonfinite" in message and "checkpoint-4.pt) is untouched" in message
    if where == "activation":
        assert message.startswith("loss became nan")
    else:
        assert message.startswith(f"gradient of {target} (nan) became non-finite")
    assert seen and checkpoint_bytes(out) == seen and numbered(out) == [2, 4]


def test_skip_nonfinite_skips_and_counts(tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(make_config("train.epochs=1", "train.skip_nonfinite=true"), out)
    parameter = trainer.train_step.named_trainable[-1][1]
    calls = [0]

    def poison(grad):
        calls[0] += 1
        return grad * float("inf") if calls[0] == 3 else grad

    parameter.register_hook(poison)
    summary = trainer.run()
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1
    state = load_checkpoint(out)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    # the optimiser stepped 5 times of 6
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {5}
    records = (out / "metrics.jsonl").read_text()
    assert '"kind": "skipped", "step": 3' in records


def test_nonfinite_from_an_absurd_lr_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(out, "train.epochs=1")) == 0
    before = checkpoint_bytes(out)
    capsys.readouterr()
    status = main(
        [*cli(out, "optim.base_lr=1e30", "train.checkpoint_every_steps=100"), "--resume", "auto"]
    )
    line = one_error_line(capsys.readouterr().err)
    assert status == 2
    assert re.search(r"(loss|gradient of \S+ \(\w+\)) became .* at step \d+ \(lr [0-9.e+]+\)", line)
    assert checkpoint_bytes(out) == before


# --------------------------------------------------------------------------- bad input


def test_unwritable_output_directory_fails_before_the_data(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "run"
    status = main([*cli(out), "--data-dir", str(tmp_path / "no-data-here")])
    line = one_error_line(capsys.readouterr().err)
    assert status == 2
    assert f"cannot write to the output directory {out}" in line and "--out" in line


def test_checkpoint_of_another_architecture(straight, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*cli(out, "model.embed_dim=32"), "--resume", str(straight / "checkpoint.pt")]
    status = main([*argv, "--data-dir", str(tmp_path / "no-data-here")])  # refused before data
    line = one_error_line(capsys.readouterr().err)
    assert status == 2
    assert "another architecture" in line
    assert "model.embed_dim 64 in the checkpoint, 32 in the config" in line


@pytest.mark.parametrize(
    "content",
    [b"e.", b"", b"PK\x03\x04 cut short", b"\x80\x02}q\x00(X\x01\x00\x00\x00a"],
    ids=["pop-mark-indexerror", "empty", "zip-cut-short", "pickle-cut-short"],
)
def test_damaged_bytes_are_a_one_line_checkpoint_error(tmp_path, content):
    # garbage reaches torch's legacy unpickler, which fails with IndexError and the like;
    # once, random bytes in the resume test below did exactly that
    path = tmp_path / "checkpoint-3.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(path)


def test_resume_auto_skips_corrupt_and_partial_checkpoints(straight, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(straight / "milestone-epoch2.pt", out / "checkpoint-12.pt")
    (out / "checkpoint-20.pt").write_bytes(os.urandom(4096))  # garbage
    whole = (straight / "checkpoint-22.pt").read_bytes()
    (out / "checkpoint-22.pt").write_bytes(whole[: len(whole) // 2])  # cut short
    assert main([*cli(out), "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if line.startswith("warning: skipping")]
    assert len(skipped) == 2 and "checkpoint-22.pt" in skipped[0]
    assert "resuming from" in err and "checkpoint-12.pt at step 12" in err
    assert_same_training_state(load_checkpoint(out), load_checkpoint(straight))


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A real 256 KiB tmpfs (needs root, as on this project's machines and CI)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_full_disk_during_a_checkpoint_write(tiny_filesystem):
    """A real full filesystem (ENOSPC): one line, previous checkpoint intact, no temp file."""
    path = tiny_filesystem / "checkpoint.pt"
    save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    before = path.read_bytes()
    too_big = {"model": {"w": torch.ones(200_000)}, "config": {}}  # 800 kB > 256 KiB
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(too_big, path)
    message = str(error.value)
    assert "No space left on device" in message and "ENOSPC" in message
    assert "previous checkpoint is intact" in message and "\n" not in message
    assert path.read_bytes() == before and os.listdir(tiny_filesystem) == ["checkpoint.pt"]


def test_file_size_limit_stops_a_run_with_one_line(straight, tmp_path, capsys):
    """A real failing write: with RLIMIT_FSIZE below the checkpoint size the kernel refuses
    the write (EFBIG), as it would a full disk (ENOSPC)."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(straight / "milestone-epoch2.pt", out / "checkpoint-12.pt")
    before = checkpoint_bytes(out)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
    try:
        status = main([*cli(out), "--resume", "auto"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    line = one_error_line(capsys.readouterr().err)
    assert status == 2 and "cannot write checkpoint" in line, line
    assert "(File too large, EFBIG)" in line and "previous checkpoint is intact" in line
    assert checkpoint_bytes(out) == before and not list(out.glob(".*.tmp"))


def test_strict_data_flag_refuses_an_unreadable_image(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    argv = [*cli(tmp_path / "run", "data.image_size=14", "data.subset=null")]
    status = main([*argv, "--data", f"folder:{images}", "--strict-data"])
    line = one_error_line(capsys.readouterr().err)
    assert status == 2 and "cannot read image" in line and "broken.png" in line
    assert not list((tmp_path / "run").glob("*.pt"))


# --------------------------------------------------------------------------- unsafe files


class _Payload:
    """Unpickling this creates ``target``: the stand-in for code a checkpoint could run."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    control, target = tmp_path / "control-ran", tmp_path / "payload-ran"
    torch.save({"model": _Payload(str(control)), "config": {}}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)  # an unsafe load runs it ...
    assert control.exists()
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Payload(str(target)), "config": {}}, evil)
    with pytest.raises(CheckpointError) as error:  # ... ours refuses it
        load_checkpoint(evil)
    assert "refused to load" in str(error.value) and "\n" not in str(error.value)
    assert main(["knn", "--checkpoint", str(evil)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "refused to load" in line and "nothing in it was run" in line
    assert main([*cli(tmp_path / "run"), "--resume", str(evil)]) == 2
    assert "refused to load" in one_error_line(capsys.readouterr().err)
    assert not target.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    for path in (ROOT / "mocov3").rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.end() : text.find(")", match.end())]
            assert "weights_only=True" in call, f"{path}: torch.load({call})"
        for unsafe in ("pickle.load", "weights_only=False", "allow_pickle=True"):
            assert unsafe not in text, f"{path} uses {unsafe}"
