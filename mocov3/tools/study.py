"""``mocov3 study FILE.yaml --out DIR``: a declared set of short pretraining runs, each
evaluated alike, with one report comparing them.

A study file names a base preset, settings shared by every run, and either a ``grid``
(every combination of the listed values) or explicit ``runs``::

    title: Frozen vs learned patch projection
    question: Does a frozen random patch projection make training more stable?
    budget: 6 runs of about 3 minutes on a 2-core CPU (about 20 minutes)
    base: ../configs/demo.yaml            # a preset, relative to the study file
    set: {train.epochs: 0.4, eval.monitor_every: 10}
    grid:
      model.freeze_patch_embed: [true, false]
      optim.base_lr: [1.0e-3, 3.0e-3, 1.0e-2]
    linear: {epochs: 30, train_subset: 10000, test_subset: 5000}   # or false; features: last4
    paper: what the paper reports, quoted in the report

Each run lives in ``DIR/runs/NAME``. The study is resumable: a run whose pretraining and
probe are done is skipped, one cut short continues from its last checkpoint, and a run
directory made with other settings is refused rather than reused. ``DIR/report.md`` holds
the results table (kNN and linear top-1, instability events, wall time) and the curves of
all runs overlaid (``curves.png``, ``gradients.png``); ``DIR/results.json`` the same rows.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mocov3.config import (
    Config,
    StabilityConfig,
    config_from_dict,
    is_resnet_arch,
    load_config,
    resolve_model_dims,
)
from mocov3.errors import ConfigError, TrainingError
from mocov3.eval.features import FEATURE_KINDS, kind_refusal
from mocov3.eval.linear import ProbeSettings, probe_run, result_file_name, write_result
from mocov3.models.checkpoint import open_checkpoint
from mocov3.tools.plots import plot_run, plot_study
from mocov3.tools.study_tables import clearest_pair_plot, pairs_table, run_instability, seeds_table
from mocov3.train.trainer import pretrain

STUDY_KEYS = ("title", "question", "budget", "base", "set", "grid", "runs", "linear", "paper")
LINEAR_DEFAULTS: dict[str, Any] = {
    "epochs": 30,
    "train_subset": 10000,
    "test_subset": 5000,
    "features": "cls",
}


@dataclass
class StudyRun:
    """One run of a study: its directory name, the values it varies, all its overrides."""

    name: str
    values: dict[str, Any]
    overrides: list[str]


@dataclass
class Study:
    path: Path
    title: str
    base: Path | None
    runs: list[StudyRun]
    varied: list[str]
    linear: dict[str, Any] | None
    text: dict[str, str] = field(default_factory=dict)  # question, budget, paper


def _override(key: str, value: Any) -> str:
    """``key=value`` with the value written as YAML, as ``--set`` reads it."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def run_name(values: dict[str, Any]) -> str:
    """A directory name from the varied values: ``freeze_patch_embed-false_base_lr-0.01``
    (the last part of each key; characters other than letters, digits, ``.``, ``-`` and
    ``_`` dropped)."""
    parts = []
    for key, value in values.items():
        shown = json.dumps(value) if not isinstance(value, str) else value
        parts.append(f"{key.rsplit('.', 1)[-1]}-{shown}")
    name = re.sub(r"[^A-Za-z0-9._-]+", "", "_".join(parts).replace(", ", "-"))
    return name or "run"


def _mapping(value: Any, what: str, path: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"study {path}: '{what}' must be a mapping of config keys to values")
    return value


def _grid_runs(grid: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"study {path}: grid key '{key}' must list one or more values")
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def _explicit_runs(runs: Any, path: Path) -> list[tuple[str | None, dict[str, Any]]]:
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"study {path}: 'runs' must be a list of mappings (config key: value)")
    found = []
    for entry in runs:
        if not isinstance(entry, dict):
            raise ConfigError(f"study {path}: each entry of 'runs' must be a mapping")
        entry = dict(entry)
        name = entry.pop("name", None)
        found.append((str(name) if name is not None else None, entry))
    return found


def load_study(path: str | Path, extra: list[str] | tuple[str, ...] = ()) -> Study:
    """Read and check a study file; every run's config is built (and so validated) here,
    before any run starts. ``extra``: ``key=value`` overrides applied to every run last."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} not found (shipped studies live in studies/)")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError):
        raise ConfigError(f"study file {path} is not readable YAML") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"study file {path} must hold a mapping (title, base, set, grid...)")
    unknown = sorted(set(spec) - set(STUDY_KEYS))
    if unknown:
        raise ConfigError(
            f"study {path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(STUDY_KEYS)})"
        )
    if ("grid" in spec) == ("runs" in spec):
        raise ConfigError(f"study {path}: give either 'grid' or 'runs' (exactly one)")
    base = (path.parent / str(spec["base"])).resolve() if spec.get("base") else None
    if base is not None and not base.is_file():
        raise ConfigError(f"study {path}: base preset {base} not found")
    common = [_override(k, v) for k, v in _mapping(spec.get("set"), "set", path).items()]
    if "grid" in spec:
        named = [
            (None, values) for values in _grid_runs(_mapping(spec["grid"], "grid", path), path)
        ]
    else:
        named = _explicit_runs(spec["runs"], path)
    varied = list(dict.fromkeys(key for _, values in named for key in values))
    linear = _linear_settings(spec.get("linear", True), path)
    runs = []
    for name, values in named:
        overrides = [*common, *(_override(k, v) for k, v in values.items()), *extra]
        try:
            config = load_config(base, overrides)
            if linear is not None:
                _check_probe_features(config, linear["features"])
        except ConfigError as error:
            raise ConfigError(f"study {path}, run {name or run_name(values)}: {error}") from None
        runs.append(StudyRun(name or run_name(values), values, overrides))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"study {path}: two runs share a name; give the runs distinct names")
    return Study(
        path=path,
        title=str(spec.get("title") or path.stem),
        base=base,
        runs=runs,
        varied=varied,
        linear=linear,
        text={k: str(spec[k]).strip() for k in ("question", "budget", "paper") if spec.get(k)},
    )


def _linear_settings(value: Any, path: Path) -> dict[str, Any] | None:
    if value is False or value is None:
        return None
    settings = dict(LINEAR_DEFAULTS)
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(LINEAR_DEFAULTS))
        if unknown:
            raise ConfigError(
                f"study {path}: unknown linear key(s) {', '.join(unknown)} "
                f"(known: {', '.join(LINEAR_DEFAULTS)})"
            )
        settings.update(value)
    elif value is not True:
        raise ConfigError(f"study {path}: 'linear' must be true, false or a mapping")
    counts = [settings[k] for k in ("epochs", "train_subset", "test_subset")]
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in counts):
        raise ConfigError(f"study {path}: linear epochs and subsets must be positive integers")
    if settings["features"] not in FEATURE_KINDS:
        raise ConfigError(
            f"study {path}: linear features must be one of {', '.join(FEATURE_KINDS)}, "
            f"got {settings['features']!r}"
        )
    return settings


def _check_probe_features(config: Config, features: str) -> None:
    """Refuse, before any run trains, probe features this run's backbone cannot give (the
    refusal :class:`mocov3.eval.features.ProbeFeatures` would make, from the config alone)."""
    arch = config.model.arch
    depth = None if is_resnet_arch(arch) else resolve_model_dims(config.model)[1]
    refusal = kind_refusal(features, arch, depth)
    if refusal:
        raise ConfigError(f"linear {refusal}")


def linear_file(settings: dict[str, Any]) -> str:
    """The run's probe result: ``linear.json`` for the class token, as ``mocov3 linear``
    names it (``linear-last4.json``... for other features), so that a study whose probe
    features change probes again rather than reusing a result of other features."""
    return result_file_name(settings["features"])


# --------------------------------------------------------------------------- running


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _claim(run_dir: Path, config: dict[str, Any]) -> None:
    """Record the resolved config a run directory is for, or refuse one made for another
    (the config itself, not the file names it came from, so a moved study still resumes)."""
    marker = run_dir / "study_run.json"
    existing = _read_json(marker)
    if (
        existing is not None
        and "config" in existing
        and _with_defaults(existing["config"]) != config
    ):
        raise ConfigError(
            f"{run_dir} was made with other settings than the study now gives: delete it to "
            "rerun it, or use another --out"
        )
    if existing is None and any(run_dir.glob("checkpoint*.pt")):
        raise ConfigError(f"{run_dir} holds a run that is not this study's: use another --out")
    if existing is None or "config" not in existing:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"config": config}, indent=2) + "\n")


def _with_defaults(recorded: dict[str, Any]) -> dict[str, Any] | None:
    """A recorded config with the keys a later version added at their defaults (a study
    begun before an upgrade resumes); None when it no longer reads as a config."""
    try:
        return config_from_dict(recorded).to_dict()
    except ConfigError:
        return None


def pretrain_done(run_dir: Path) -> bool:
    summary = _read_json(run_dir / "summary.json")
    return summary is not None and not summary.get("preempted")


def linear_probe_run(run_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The study's linear probe: ``mocov3 linear``'s (:func:`mocov3.eval.linear.probe_run`,
    BN probe, lr swept on a held-out tenth) at batch 256 for ``epochs``, on the first
    ``train_subset`` / ``test_subset`` images, reading ``features``; writes
    :func:`linear_file`."""
    subsets = [
        f"data.subset={settings['train_subset']}",
        f"eval.test_subset={settings['test_subset']}",
    ]
    loaded = open_checkpoint(run_dir / "checkpoint.pt", subsets)
    probe = ProbeSettings(epochs=settings["epochs"], batch_size=256, features=settings["features"])
    summary = probe_run(loaded, probe)
    write_result(loaded, probe, summary)
    return summary


def run_study(study: Study, out_dir: Path, command: str, shard: tuple[int, int] = (0, 1)) -> bool:
    """Run what is not done yet; False when a signal stopped a run (resume: ``command``).
    ``shard`` (i, n): only runs i, i + n, i + 2n, ... (several processes or machines
    sharing one study directory)."""
    for index, run in enumerate(study.runs, 1):
        if (index - 1) % shard[1] != shard[0]:
            continue
        run_dir = out_dir / "runs" / run.name
        config = load_config(study.base, run.overrides)
        _claim(run_dir, config.to_dict())
        done = pretrain_done(run_dir)
        probed = study.linear is None or (run_dir / linear_file(study.linear)).is_file()
        failure = _read_json(run_dir / "failed.json")
        status = "failed before" if failure else "done" if done and probed else "running"
        print(f"[{index}/{len(study.runs)}] {run.name}: {status}", file=sys.stderr, flush=True)
        if failure:
            continue
        if not done:
            started = any(run_dir.glob("checkpoint*.pt"))
            try:
                summary = pretrain(
                    config,
                    run_dir,
                    resume="auto" if started else None,
                    resume_command=command,
                    overwrite=not started,  # files of a run killed before its first checkpoint
                    plot=plot_run,
                )
            except TrainingError as error:  # e.g. a diverging lr: a result, not a stop
                (run_dir / "failed.json").write_text(json.dumps({"error": str(error)}) + "\n")
                print(f"  failed: {error}", file=sys.stderr)
                continue
            if summary.get("preempted"):
                return False
        if not probed and study.linear is not None:
            linear = linear_probe_run(run_dir, study.linear)
            print(f"  linear top-1 {linear['linear_top1']}", file=sys.stderr)
    return True


# --------------------------------------------------------------------------- report


def result_row(
    run: StudyRun,
    run_dir: Path,
    linear_name: str = "linear.json",
    stability: StabilityConfig | None = None,
) -> dict[str, Any]:
    """One run's results; ``stability``: its stability section (default: the defaults)."""
    summary = _read_json(run_dir / "summary.json") or {}
    linear = _read_json(run_dir / linear_name) or {}
    events = summary.get("instability_events", {})
    pretraining = summary.get("run_wall_seconds", summary.get("wall_seconds", 0.0))
    wall = pretraining + linear.get("wall_seconds", 0.0)
    return {
        "run": run.name,
        **{key: run.values.get(key) for key in run.values},
        "knn_top1_init": summary.get("knn_top1_init"),
        "knn_top1": summary.get("knn_top1"),
        "linear_top1": linear.get("linear_top1"),
        "instability_events": events.get("total"),
        "grad_spikes": events.get("grad_spike"),
        "loss_rises": events.get("loss_rise"),
        "knn_dips": events.get("knn_dip"),
        **run_instability(run_dir, stability or StabilityConfig()),
        "final_loss": summary.get("final_loss"),
        "images_per_second": summary.get("images_per_second"),
        "train_seconds": summary.get("train_seconds"),
        "wall_seconds": round(wall, 1),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):  # as the study file writes it
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "\\|")


def results_table(rows: list[dict[str, Any]], varied: list[str]) -> str:
    columns = [
        ("run", "run"),
        *((key, key.rsplit(".", 1)[-1]) for key in varied),
        ("knn_top1_init", "kNN init"),
        ("knn_top1", "kNN top-1"),
        ("linear_top1", "linear top-1"),
        ("instability_events", "events"),
        ("grad_spikes", "grad spikes"),
        ("ordered_spikes", "ordered spikes"),
        ("first_layer_peak", "first-layer peak"),
        ("loss_rises", "loss rises"),
        ("knn_dips", "kNN dips"),
        ("images_per_second", "img/s"),
        ("wall_seconds", "wall s"),
    ]
    lines = [
        "| " + " | ".join(title for _, title in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def write_report(study: Study, out_dir: Path, command: str) -> Path:
    """``report.md``, ``results.json``, ``curves.png`` and ``gradients.png`` in ``out_dir``
    from whatever runs have finished."""
    finished = [
        (run, out_dir / "runs" / run.name)
        for run in study.runs
        if pretrain_done(out_dir / "runs" / run.name)
    ]
    linear_name = linear_file(study.linear) if study.linear else "linear.json"
    rows = [
        result_row(run, run_dir, linear_name, _stability(study, run)) for run, run_dir in finished
    ]
    failed = {
        run.name: failure["error"]
        for run in study.runs
        if (failure := _read_json(out_dir / "runs" / run.name / "failed.json"))
    }
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    plots = plot_study([(run.name, run_dir) for run, run_dir in finished], out_dir)
    lines = [f"# Study: {study.title}", ""]
    for key, label in (("question", "Question"), ("budget", "Budget")):
        if key in study.text:
            lines += [f"**{label}:** {study.text[key]}", ""]
    lines += [
        f"Command: `{command}`  ",
        f"Base preset: `{_relative(study.base)}`  "
        if study.base
        else "Base preset: the built-in defaults  ",
        f"Runs finished: {len(rows)} of {len(study.runs)}"
        + (f", {len(failed)} failed  " if failed else "  "),
        f"Linear probe: {_linear_text(study.linear)}",
        "",
        results_table(rows, study.varied),
        "",
        "kNN top-1: weighted kNN (the run's eval settings) after training; events: gradient-"
        "spike episodes + loss rises + kNN dips flagged by the instability detector; ordered "
        "spikes: a first-layer spike followed within stability.merge_steps by a last-block "
        "spike (the paper's Fig. 4); first-layer peak: the first layer's largest gradient "
        "norm over its running median (a spike is one above stability.spike_factor); wall s: "
        "pretraining (all its sessions, with its kNN evaluations) plus the linear probe.",
        "",
    ]
    lines += _grid_tables(rows, study, out_dir)
    if failed:
        lines += ["Failed runs (training stopped with an error, e.g. a non-finite loss):", ""]
        lines += [f"- `{name}`: {error}" for name, error in failed.items()] + [""]
    lines += [f"![{path.stem}]({path.name})\n" for path in plots]
    if "paper" in study.text:
        lines += ["## What the paper reports", "", study.text["paper"], ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _stability(study: Study, run: StudyRun) -> StabilityConfig:
    return load_config(study.base, run.overrides).stability


def _grid_tables(rows: list[dict[str, Any]], study: Study, out_dir: Path) -> list[str]:
    """The over-seeds and frozen-vs-learned tables and the clearest pair's plot, where the
    grid has them (mocov3/tools/study_tables.py)."""
    lines: list[str] = []
    seeds = seeds_table(rows, study.varied)
    if seeds:
        lines += [
            "## Over seeds",
            "",
            "Mean (min to max) over the seeds of each setting; counts per seed.",
            "",
            seeds,
            "",
        ]
    pairs = pairs_table(rows, study.varied)
    if pairs:
        lines += [
            "## Frozen vs learned patch projection",
            "",
            "Each learned run beside its frozen twin (same other settings); gains are frozen "
            "minus learned, mean (min to max) over the pairs. A frozen projection has no "
            "gradient: its runs' first layer is the first block.",
            "",
            pairs,
            "",
        ]
    plot = clearest_pair_plot(rows, study.varied, out_dir / "runs", out_dir)
    if plot:
        lines += [
            "The clearest pair: the learned run with the most ordered spikes (without any, the "
            "highest first-layer peak) beside its frozen twin (gradient norms of the first "
            "layer and the last block, triangles: spikes; the kNN monitor beneath; dashed: "
            "instability events):",
            "",
            f"![{plot.stem}]({plot.name})",
            "",
        ]
    return lines


def _relative(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (reports travel)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _linear_text(settings: dict[str, Any] | None) -> str:
    if settings is None:
        return "none"
    features = "" if settings["features"] == "cls" else f" on {settings['features']} features"
    return (
        f"BN + linear classifier{features}, {settings['epochs']} epochs, lr chosen on a "
        f"held-out tenth of "
        f"the first {settings['train_subset']} training images, tested on the first "
        f"{settings['test_subset']} test images"
    )
