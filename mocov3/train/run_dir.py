"""The run directory: where a run's files live, which checkpoint a resume continues from,
and which files a new run may not silently replace.

A run directory holds ``checkpoint-STEP.pt`` (the newest ``train.keep_checkpoints``),
``checkpoint.pt`` (always the newest; a hard link, or a copy where links are not possible)
and ``milestone-epochE.pt`` for each epoch in ``train.milestones`` (kept for good), beside
``config.yaml`` (the resolved config), ``metrics.jsonl``, ``summary.json`` and the plots.
Every file appears by an atomic rename (:mod:`mocov3.runtime.checkpoint`); what a killed
write leaves behind (a hidden ``.NAME.*.tmp``) is removed at the next start.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mocov3.config import Config, config_from_dict, resolve_model_dims
from mocov3.errors import CheckpointError, ConfigError, TrainingError
from mocov3.runtime.checkpoint import (
    LATEST,
    link_atomically,
    load_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from mocov3.runtime.loggers import flatten

_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pt$")
_TEMP_GLOBS = (
    ".checkpoint*.tmp",
    ".milestone*.tmp",
    ".config.yaml.*.tmp",
    ".metrics.jsonl.*.tmp",
    ".summary.json.*.tmp",
)
# what fixes the shapes and the trainable set of the model a config builds
_ARCH_KEYS = (
    "arch",
    "small_stem",
    "stem",
    "resnet_width",
    "pred_last_bn",
    "patch_size",
    "mlp_ratio",
    "mlp_norm",
    "pos_embed",
    "freeze_patch_embed",
    "proj_hidden_dim",
    "proj_layers",
    "pred_hidden_dim",
    "pred_layers",
    "out_dim",
)
# settings a resumed run may change without a note: where it runs and what it logs to, not
# what it computes
_MACHINE_KEYS = ("train.device", "train.threads", "train.loggers")


def numbered_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-STEP.pt`` in ``run_dir``, oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for entry in run_dir.iterdir():
        if (match := _NUMBERED.match(entry.name)) and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def resume_candidates(run_dir: Path) -> list[Path]:
    """Where ``--resume auto`` looks, best first: numbered checkpoints newest first, then
    ``checkpoint.pt``. Milestones are history (possibly of a run since replaced): resume
    from one with ``--resume PATH``."""
    candidates = [path for _, path in reversed(numbered_checkpoints(run_dir))]
    if (run_dir / LATEST).is_file():
        candidates.append(run_dir / LATEST)
    return candidates


def latest_checkpoint(
    run_dir: Path, warn: Callable[[str], None]
) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint of ``run_dir`` that loads and can be resumed from; unusable
    ones are skipped with a one-line warning each. None when the directory holds none;
    :class:`CheckpointError` when it holds some but none is usable."""
    candidates = resume_candidates(run_dir)
    for path in candidates:
        try:
            state = load_checkpoint(path)
            check_resumable(state, path)
        except CheckpointError as error:
            warn(f"warning: skipping {path}: {error}")
            continue
        return state, path
    if candidates:
        raise CheckpointError(
            f"none of the {len(candidates)} checkpoint file(s) in {run_dir} can be resumed "
            "from (see the warnings above); choose another --out or --resume PATH"
        )
    return None


RESUME_KEYS = ("model", "optimizer", "scaler", "step", "rng", "steps_per_epoch")


def check_resumable(state: dict[str, Any], path: Path) -> None:
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{path} lacks {', '.join(missing)} (written by an older mocov3 or not by "
            "pretraining), so training cannot continue from it exactly"
        )


def remove_temporary_files(run_dir: Path) -> list[Path]:
    """Delete what an interrupted atomic write left behind (``.checkpoint*.tmp``)."""
    removed = []
    if run_dir.is_dir():
        for pattern in _TEMP_GLOBS:
            for path in run_dir.glob(pattern):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def save_run_checkpoint(
    state: dict[str, Any], run_dir: Path, step: int, keep: int, milestone: int | None = None
) -> Path:
    """Write ``checkpoint-STEP.pt``, point ``checkpoint.pt`` (and the milestone, if any) at
    it, then delete numbered checkpoints beyond the newest ``keep`` (only those at or below
    ``step``: numbered files from beyond it are never touched here)."""
    path = run_dir / f"checkpoint-{step}.pt"
    save_checkpoint(state, path)
    if milestone is not None:
        link_atomically(path, run_dir / f"milestone-epoch{milestone}.pt")
    link_atomically(path, run_dir / LATEST)
    older = [p for s, p in numbered_checkpoints(run_dir) if s <= step]
    for stale in older[: max(len(older) - keep, 0)]:
        stale.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- architecture


def architecture(config: Config) -> dict[str, Any]:
    """What fixes the shapes and the trainable set of the model a config builds."""
    dims = resolve_model_dims(config.model)
    arch: dict[str, Any] = dict(
        zip(("model.embed_dim", "model.depth", "model.num_heads"), dims, strict=True)
    )
    arch.update({f"model.{key}": getattr(config.model, key) for key in _ARCH_KEYS})
    arch["data.image_size"] = config.data.image_size
    return arch


def checkpoint_config(state: dict[str, Any], path: Path) -> Config:
    """The config a checkpoint was written with (CheckpointError when unreadable)."""
    try:
        if not isinstance(state.get("config"), dict):
            raise ConfigError("no config mapping")
        return config_from_dict(state["config"])
    except ConfigError as error:
        raise CheckpointError(f"{path} holds a config this version cannot read ({error})") from None


def check_architecture(state: dict[str, Any], config: Config, path: Path) -> None:
    """One-line CheckpointError when the checkpoint's model is not the one ``config`` builds."""
    saved, wanted = architecture(checkpoint_config(state, path)), architecture(config)
    differ = [
        f"{key} {saved[key]} in the checkpoint, {wanted[key]} in the config"
        for key in wanted
        if saved[key] != wanted[key]
    ]
    if differ:
        raise CheckpointError(
            f"checkpoint {path} has another architecture than the config ({'; '.join(differ[:4])})"
            ": resume with the config it was trained with (config.yaml in its run directory) "
            "or start a new run in another --out"
        )


def check_restorable(
    state: dict[str, Any], path: Path, channels: int, steps_per_epoch: int, total_steps: int
) -> None:
    """One-line CheckpointError when this run cannot continue ``state`` exactly: other
    image channels, another epoch length, or a step beyond the run's end."""
    if int(state["in_chans"]) != channels:
        raise CheckpointError(
            f"checkpoint {path} was trained on {state['in_chans']}-channel images, the "
            f"data gives {channels}: set data.channels to match"
        )
    if int(state["steps_per_epoch"]) != steps_per_epoch:
        raise CheckpointError(
            f"checkpoint {path} was written with {state['steps_per_epoch']} steps per "
            f"epoch, this data and train.batch_size give {steps_per_epoch}: resume with the "
            "same data, data.subset and train.batch_size"
        )
    if int(state["step"]) > total_steps:
        raise CheckpointError(
            f"checkpoint {path} is at step {state['step']}, beyond the {total_steps} steps this "
            "config trains: raise train.epochs"
        )


def config_changes(state: dict[str, Any], config: Config) -> list[str]:
    """``"key old -> new"`` for each setting ``config`` changes against the checkpoint's."""
    saved, now = flatten(state["config"]), flatten(config.to_dict())
    return [
        f"{key} {saved.get(key)!r} -> {value!r}"
        for key, value in now.items()
        if saved.get(key) != value and key not in _MACHINE_KEYS
    ]


# --------------------------------------------------------------------------- metrics


def truncate_metrics(path: Path, step: int | None) -> None:
    """Keep the records of ``metrics.jsonl`` a run resumed at ``step`` has already made:
    train and skip records up to ``step``, others before it (kNN records at ``step`` are
    made again; so are kNN-dip events, while the gradient norms and events of the train
    step at ``step`` are kept). ``None``: a new run, which starts an empty file."""
    if not path.is_file():
        return
    kept = []
    if step is not None:
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                at = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
            if at < step or (at == step and _made_by_the_step(record)):
                kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


def _made_by_the_step(record: dict[str, Any]) -> bool:
    """Whether a record at a checkpoint's step was made by the train step before it (not by
    the kNN monitor after it, which a resumed run evaluates again)."""
    kind = record.get("kind")
    return kind in ("train", "skipped", "grad", "budget") or (
        kind == "instability" and record.get("series") != "knn"
    )


# --------------------------------------------------------------------------- the directory


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


class RunDirectory:
    """One run's directory. ``is_main``: only the main process changes files; the others
    read (their checkpoint to resume from) and check."""

    def __init__(self, path: str | Path, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main

    def prepare(self, resume: str | Path | None, overwrite: bool) -> None:
        """Before any data is read: the directory is writable, leftovers of killed writes
        are gone, and a new run does not replace an earlier one unless asked to."""
        self.check_writable()
        if self.is_main:
            remove_temporary_files(self.path)
        if resume is None and not overwrite:
            self.refuse_existing_run()

    def check_writable(self) -> None:
        """Create the directory and a temporary file in it: an unwritable run directory
        should fail in the first second, not at the first checkpoint."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise TrainingError(
                f"cannot write to the output directory {self.path} ({reason}): choose a "
                "writable --out, or fix the directory's permissions or free space"
            ) from None

    def refuse_existing_run(self) -> None:
        """A new run never silently replaces an earlier run's checkpoints: continue it with
        ``--resume auto`` or replace it on purpose with ``--overwrite``."""
        found = [path for _, path in numbered_checkpoints(self.path)]
        if (self.path / LATEST).is_file():
            found.append(self.path / LATEST)
        if found:
            raise TrainingError(
                f"{self.path} already holds a run ({found[-1].name}): continue it with "
                "--resume auto, replace it with --overwrite, or choose another --out"
            )

    def find_resume(
        self, resume: str | Path | None, config: Config
    ) -> tuple[dict[str, Any], Path] | None:
        """The checkpoint ``resume`` names, checked against ``config``'s architecture:
        ``"auto"`` (the newest usable one here; none: start afresh), a run directory, or a
        checkpoint file."""
        if resume is None:
            return None
        if str(resume) == "auto" or Path(resume).is_dir():
            directory = self.path if str(resume) == "auto" else Path(resume)
            found = latest_checkpoint(directory, _warn)
            if found is None:
                if str(resume) != "auto":
                    raise CheckpointError(f"{directory} holds no checkpoint to resume from")
                _warn(f"note: no checkpoint in {directory} yet, so training starts at step 0")
                return None
            state, path = found
        else:
            path = Path(resume)
            state = load_checkpoint(path)
            check_resumable(state, path)
        check_architecture(state, config, path)
        return state, path

    def note_config_changes(self, state: dict[str, Any], config: Config, path: Path) -> None:
        changed = config_changes(state, config)
        if changed:
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            _warn(
                f"note: resuming {path} with settings changed since it was written: "
                f"{', '.join(changed[:4])}{more} (the run will differ from an uninterrupted one)"
            )

    def remove_later_checkpoints(self, step: int, resumed_from: Path | None) -> None:
        """Checkpoints of a run this one replaces (a new run in an old directory, or
        --resume from an older checkpoint): numbered ones beyond the step this run starts
        at, and ``checkpoint.pt`` unless it is the file resumed from. Left in place, a
        later --resume auto could pick them up. Milestones stay (auto never uses them)."""
        stale = [path for at, path in numbered_checkpoints(self.path) if at > step]
        latest = self.path / LATEST
        if latest.is_file() and not (resumed_from is not None and latest.samefile(resumed_from)):
            stale.append(latest)
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            _warn(
                f"note: removed {len(stale)} checkpoint file(s) of an earlier run in "
                f"{self.path} (this run starts at step {step}; --resume auto continues a run "
                "instead)"
            )

    def save(
        self, state: dict[str, Any], step: int, keep: int, milestone: int | None = None
    ) -> Path:
        return save_run_checkpoint(state, self.path, step, keep, milestone)

    def write_config(self, config: Config) -> None:
        text = yaml.safe_dump(config.to_dict(), sort_keys=False)
        write_text_atomic(self.path / "config.yaml", text)

    def start_metrics(self, resumed_at: int | None) -> None:
        """``metrics.jsonl`` as a run starting (None) or resumed at a step continues it."""
        truncate_metrics(self.path / "metrics.jsonl", resumed_at)

    def resume_command(self) -> str:
        """The command that continues the run from this directory's own config.yaml."""
        config, out = shlex.quote(str(self.path / "config.yaml")), shlex.quote(str(self.path))
        return f"mocov3 pretrain --config {config} --out {out} --resume auto"

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_text_atomic(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")
