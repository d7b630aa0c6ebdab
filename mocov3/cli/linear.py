"""``mocov3 linear``: linear probe of a checkpoint's frozen backbone, by one of two protocols:
``fast`` (default; cached features, an lr sweep in one pass, :mod:`mocov3.eval.linear`) or
``reference`` (``main_lincls.py``: augmented views every epoch, streamed, distributed and
resumable, :mod:`mocov3.eval.linear_reference`). ``--recipe NAME`` (a packaged recipe or a
YAML file) loads a protocol's settings; flags given override them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from mocov3 import presets
from mocov3.cli.common import (
    add_checkpoint_arg,
    add_data_args,
    add_device_arg,
    add_set_arg,
    data_overrides,
    report_preempted,
)
from mocov3.errors import ConfigError
from mocov3.eval import linear
from mocov3.eval.features import FEATURE_KINDS
from mocov3.eval.linear import (
    AUG_SCALE,
    DEFAULT_LRS_BN,
    DEFAULT_LRS_NO_BN,
    ProbeSettings,
    probe_run,
    write_result,
)
from mocov3.eval.linear_reference import ReferenceProbeSettings, probe_reference
from mocov3.eval.recipes import merged_settings, read_recipe
from mocov3.models.checkpoint import open_checkpoint
from mocov3.models.moco import ENCODERS
from mocov3.runtime.device import launched_processes
from mocov3.runtime.distributed import launched_info

PROTOCOLS = ("fast", "reference")
# flags that only one protocol reads: given to the other, they are refused, not ignored
FAST_ONLY = {
    "lrs": "--lrs",
    "val_fraction": "--val-fraction",
    "no_batchnorm": "--no-batchnorm",
    "augmented": "--augmented",
}
REFERENCE_ONLY = {
    "base_lr": "--base-lr",
    "eval_every": "--eval-every",
    "seed": "--seed",
    "resume": "--resume",
}


def _recipe_protocol(path: str) -> str | None:
    """The ``protocol`` a recipe names (None when it names none or cannot be read: the
    full read, :func:`read_recipe`, then says why in one line)."""
    try:
        file = presets.resolve(Path(path).expanduser(), "recipe")
        values = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError):
        return None
    protocol = values.get("protocol") if isinstance(values, dict) else None
    return str(protocol) if protocol is not None else None


def chosen_protocol(args: argparse.Namespace) -> str:
    """``--protocol``, else the recipe's, else ``fast``; a flag and a recipe that disagree
    are refused, as is a flag of the other protocol."""
    from_recipe = _recipe_protocol(args.recipe) if args.recipe else None
    if args.protocol and from_recipe and args.protocol != from_recipe:
        raise ConfigError(
            f"--protocol {args.protocol} contradicts recipe {args.recipe} (protocol "
            f"{from_recipe}): drop one"
        )
    protocol = args.protocol or from_recipe or "fast"
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    other = REFERENCE_ONLY if protocol == "fast" else FAST_ONLY
    given = [flag for name, flag in other.items() if getattr(args, name) not in (None, False)]
    if given:
        raise ConfigError(
            f"{given[0]} does not apply to the {protocol} linear probe "
            f"({'--protocol reference' if protocol == 'fast' else '--protocol fast'} reads it)"
        )
    return protocol


def _recipe(args: argparse.Namespace, settings_type: type) -> dict[str, Any]:
    return read_recipe(args.recipe, "linear", settings_type) if args.recipe else {}


def fast_settings(args: argparse.Namespace) -> ProbeSettings:
    """The fast probe's settings: defaults, then the recipe's, then the flags given."""
    recipe = _recipe(args, ProbeSettings)
    flags = {
        "base_lrs": args.lrs,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "weight_decay": args.weight_decay,
        "val_fraction": args.val_fraction,
        "batchnorm": False if args.no_batchnorm else None,
        "augmented": True if args.augmented else None,
        "crop_scale": args.crop_scale,
        "features": args.features,
        "encoder": args.encoder,
        "device": args.device,
    }
    settings = merged_settings(ProbeSettings, recipe, flags)
    if not settings.batchnorm and args.lrs is None and "base_lrs" not in recipe:
        # without the BatchNorm the good lrs lie elsewhere: the sweep follows
        settings = dataclasses.replace(settings, base_lrs=DEFAULT_LRS_NO_BN)
    return settings


def reference_settings(args: argparse.Namespace) -> ReferenceProbeSettings:
    """The reference probe's settings: ``main_lincls.py``'s defaults, the recipe's, flags."""
    flags = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "base_lr": args.base_lr,
        "weight_decay": args.weight_decay,
        "crop_scale": args.crop_scale,
        "features": args.features,
        "encoder": args.encoder,
        "device": args.device,
        "seed": args.seed,
        "eval_every": args.eval_every,
    }
    return merged_settings(ReferenceProbeSettings, _recipe(args, ReferenceProbeSettings), flags)


def cmd_linear(args: argparse.Namespace) -> int:
    if chosen_protocol(args) == "reference":
        return _cmd_reference(args)
    return _cmd_fast(args)


def _cmd_fast(args: argparse.Namespace) -> int:
    settings = fast_settings(args)
    settings.check()  # before the checkpoint is read
    run = open_checkpoint(args.checkpoint, [*data_overrides(args), *args.set])
    device_name = settings.device or run.config.train.device
    with launched_processes(device_name, run.config.train.threads) as (_, process):
        summary = probe_run(run, settings)  # each process extracts its share of features
    if not process.is_main:  # under torchrun only the main process reports
        return _backbone_status(summary, quiet=True)
    write_result(run, settings, summary)
    lrs = settings.base_lrs
    if len(lrs) > 1 and summary["best_lr"] in (min(lrs), max(lrs)):
        # the val optimum may lie beyond the sweep: say so rather than report it silently
        print(
            f"note: the best lr {summary['best_lr']} is at the edge of the sweep "
            f"{sorted(lrs)}; widen --lrs past it to be sure it is the optimum",
            file=sys.stderr,
        )
    print(json.dumps(summary))
    return _backbone_status(summary)


def _cmd_reference(args: argparse.Namespace) -> int:
    settings = reference_settings(args)
    settings.check()  # before the checkpoint is read
    run = open_checkpoint(args.checkpoint, [*data_overrides(args), *args.set])
    summary = probe_reference(run, settings, resume=args.resume)
    if launched_info().rank != 0:  # under torchrun only the main process reports
        return 0 if summary.get("preempted") else _backbone_status(summary, quiet=True)
    if summary.get("preempted"):
        return report_preempted(summary, getattr(args, "argv", None))
    print(json.dumps(summary))
    return _backbone_status(summary)


def _backbone_status(summary: dict[str, Any], quiet: bool = False) -> int:
    """Exit status 1 (with one line) when a backbone tensor changed during the probe."""
    if summary["backbone_unchanged"]:
        return 0
    if not quiet:
        print("error: a backbone tensor changed during linear probing", file=sys.stderr)
    return 1


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``linear`` sub-command."""

    parser = commands.add_parser(
        "linear",
        help="linear probe top-1 of a frozen checkpoint backbone (fast sweep, or the "
        "reference main_lincls.py protocol)",
        description=linear.__doc__.split("\n\n")[0] if linear.__doc__ else None,
    )
    add_checkpoint_arg(parser, "probe")
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        help="fast (default): cached features, lrs swept side by side, lr chosen on a "
        "held-out part of train; reference: main_lincls.py (augmented views every epoch, "
        "one lr, 90 epochs, streamed, torchrun, --resume)",
    )
    parser.add_argument(
        "--recipe",
        metavar="RECIPE",
        help="a protocol's settings: a packaged recipe (linear_fast, linear_reference) or a "
        "YAML file; flags given override it (default: the --protocol's built-in settings)",
    )
    add_data_args(parser)
    parser.add_argument("--encoder", choices=ENCODERS, help="query (default) or momentum")
    parser.add_argument(
        "--features",
        choices=FEATURE_KINDS,
        help="what the probe reads: the class token (the paper's probe, default), or, for "
        "comparison with DINO-style results, the class token + mean patch token "
        "(cls+avgpool), the class tokens of the last 4 blocks (last4), or those and the "
        "last block's mean patch token (last4+avgpool)",
    )
    _add_shared_recipe_flags(parser)
    _add_fast_flags(parser)
    _add_reference_flags(parser)
    add_device_arg(parser)
    add_set_arg(parser)
    parser.set_defaults(handler=cmd_linear)


def _add_shared_recipe_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, help="default 90")
    parser.add_argument("--batch-size", type=int, help="the global batch (default 1024)")
    parser.add_argument("--weight-decay", type=float, help="default 0")
    parser.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help=f"the training crop's area range (default {AUG_SCALE[0]} {AUG_SCALE[1]}, the "
        "reference's; e.g. the pretraining preset's augment.crop_scale); fast: with --augmented",
    )


def _add_fast_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        help="fast: base lrs to sweep, each scaled by batch/256 (default "
        f"{' '.join(map(str, DEFAULT_LRS_BN))}; without BatchNorm "
        f"{' '.join(map(str, DEFAULT_LRS_NO_BN))})",
    )
    parser.add_argument(
        "--no-batchnorm",
        action="store_true",
        help="fast: drop the parameter-free BatchNorm before the classifier (the paper's "
        "ViT probe)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        help="fast: part of the train split held out to choose the lr (default 0.1)",
    )
    parser.add_argument(
        "--augmented",
        action="store_true",
        help="fast: recompute features every epoch from RandomResizedCrop + flip views "
        "(slow on a CPU; --protocol reference is the full reference probe)",
    )


def _add_reference_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-lr",
        type=float,
        help="reference: the base lr, scaled by batch/256 (default 3.0 for a ViT, 0.1 for "
        "a ResNet, the reference's)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        metavar="N",
        help="reference: also report test top-1 after every N-th epoch (default: after the "
        "last only)",
    )
    parser.add_argument("--seed", type=int, help="reference: default the run's train.seed")
    parser.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="reference: continue a stopped probe: 'auto' from the probe checkpoint beside "
        "the probed one (none: start afresh), or from PATH (default: a new probe)",
    )
