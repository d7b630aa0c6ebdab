"""``mocov3 finetune``: fine-tune a checkpoint's backbone end to end, or train the same
network from random init (:mod:`mocov3.eval.finetune`); ``--recipe`` picks a protocol by
name (``finetune_deit_vit_small``: the paper's DeiT recipe) or file; flags override it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from mocov3.cli.common import (
    add_data_args,
    add_device_arg,
    add_set_arg,
    data_overrides,
    report_preempted,
)
from mocov3.errors import ConfigError
from mocov3.eval.deit import DEIT_RAND_AUGMENT, ERASING_MODES, MIXUP_MODES
from mocov3.eval.finetune import (
    FineTuneSettings,
    check_overrides,
    default_drop_path,
    finetune,
)
from mocov3.eval.finetune_model import EVAL_VIEWS
from mocov3.eval.recipes import merged_settings, read_recipe
from mocov3.models.checkpoint import LoadedRun, open_checkpoint
from mocov3.models.moco import ENCODERS
from mocov3.runtime.distributed import launched_info

# flag dest -> FineTuneSettings field, for the flags that map one to one
FLAG_FIELDS = {
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "base_lr",
    "lr_batch": "lr_batch",
    "layer_decay": "layer_decay",
    "weight_decay": "weight_decay",
    "drop_path": "drop_path",
    "label_smoothing": "label_smoothing",
    "warmup_epochs": "warmup_epochs",
    "crop_min": "crop_min",
    "mixup": "mixup",
    "cutmix": "cutmix",
    "mixup_prob": "mixup_prob",
    "mixup_switch_prob": "mixup_switch_prob",
    "mixup_mode": "mixup_mode",
    "rand_augment": "rand_augment",
    "random_erasing": "random_erasing",
    "erasing_mode": "erasing_mode",
    "eval_view": "eval_view",
    "seed": "seed",
    "encoder": "encoder",
}


def settings_from_args(
    args: argparse.Namespace, run: LoadedRun | None = None
) -> tuple[FineTuneSettings, str | None]:
    """The dataclass defaults, then ``--recipe``'s settings, then every flag given; and the
    recipe's protocol name. Drop path left unset by both is the backbone's default (0 for a
    ResNet)."""
    recipe: dict[str, Any] = {}
    if args.recipe:
        recipe = read_recipe(args.recipe, "finetune", FineTuneSettings)
    flags = {field: getattr(args, dest) for dest, field in FLAG_FIELDS.items()}
    flags["from_scratch"] = True if args.from_scratch else None
    if flags["drop_path"] is None and "drop_path" not in recipe and run is not None:
        flags["drop_path"] = default_drop_path(run)
    settings = merged_settings(FineTuneSettings, recipe, flags)
    settings.validate()
    return settings, recipe.get("protocol")


def cmd_finetune(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.from_scratch and args.encoder is not None:
        raise ConfigError(
            "--encoder picks the pretrained weights; it means nothing with --from-scratch"
        )
    check_overrides(args.set)
    settings_from_args(args)  # refuse a bad recipe or flag before the checkpoint is read
    run = open_checkpoint(args.checkpoint, [*args.set, *data_overrides(args)])
    settings, protocol = settings_from_args(args, run)
    device = args.device or run.config.train.device
    result, _ = finetune(run, settings, device, resume=args.resume, protocol=protocol)
    if not launched_info().is_main:
        return 0
    if result.get("preempted"):
        return report_preempted(result, getattr(args, "argv", None))
    result.pop("step_losses", None)  # one number per step: the checkpoint keeps them
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    out = Path(run.run_dir) / ("scratch.json" if settings.from_scratch else "finetune.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    print(json.dumps(result))
    return 0


def _add_recipe_args(p: argparse.ArgumentParser, d: FineTuneSettings) -> None:
    """The optimisation flags: each defaults to None (the recipe's or the default value)."""
    p.add_argument("--epochs", type=float, help=f"(default {d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"the global batch (default {d.batch_size})")
    p.add_argument(
        "--lr",
        type=float,
        help=f"base lr; the lr is base * batch / --lr-batch (default {d.base_lr})",
    )
    p.add_argument(
        "--lr-batch",
        type=int,
        help=f"the batch the base lr is given for (default {d.lr_batch}; DeiT 512)",
    )
    p.add_argument(
        "--layer-decay",
        type=float,
        help=f"layer-wise lr decay (default {d.layer_decay}; 1 turns it off)",
    )
    p.add_argument("--weight-decay", type=float, help=f"(default {d.weight_decay})")
    p.add_argument(
        "--drop-path",
        type=float,
        help=f"stochastic depth rate of the last block (default {d.drop_path}; 0 for ResNet)",
    )
    p.add_argument("--label-smoothing", type=float, help=f"(default {d.label_smoothing})")
    p.add_argument("--warmup-epochs", type=float, help=f"(default {d.warmup_epochs})")
    p.add_argument(
        "--crop-min",
        type=float,
        help=f"RandomResizedCrop scale lower bound (default {d.crop_min}: flip only)",
    )


def _add_deit_args(p: argparse.ArgumentParser, d: FineTuneSettings) -> None:
    """The DeiT regularisers (timm's), off by default."""
    p.add_argument("--mixup", type=float, help=f"Mixup alpha, 0 off (default {d.mixup}; DeiT 0.8)")
    p.add_argument("--cutmix", type=float, help=f"CutMix alpha (default {d.cutmix}; DeiT 1.0)")
    p.add_argument(
        "--mixup-prob", type=float, help=f"chance a batch is mixed (default {d.mixup_prob})"
    )
    p.add_argument(
        "--mixup-switch-prob",
        type=float,
        help=f"chance of CutMix over Mixup when both are on (default {d.mixup_switch_prob})",
    )
    p.add_argument("--mixup-mode", choices=MIXUP_MODES, help=f"(default {d.mixup_mode})")
    p.add_argument(
        "--rand-augment",
        metavar="CONFIG",
        help=f"timm RandAugment string, none: off (default {d.rand_augment}; DeiT "
        f"{DEIT_RAND_AUGMENT})",
    )
    p.add_argument(
        "--random-erasing",
        type=float,
        help=f"random-erasing probability (default {d.random_erasing}; DeiT 0.25)",
    )
    p.add_argument("--erasing-mode", choices=ERASING_MODES, help=f"(default {d.erasing_mode})")
    p.add_argument(
        "--eval-view",
        choices=EVAL_VIEWS,
        help=f"test images whole or resized by 256/224 and centre-cropped (default "
        f"{d.eval_view}; DeiT centre)",
    )


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``mocov3 finetune``."""
    d = FineTuneSettings()
    p = commands.add_parser(
        "finetune",
        help="fine-tune the whole network (or, --from-scratch, train it from random init)",
        description="End-to-end fine-tuning: AdamW, layer-wise lr decay, drop path, label "
        "smoothing, RandomResizedCrop + flip by default; --recipe "
        "finetune_deit_vit_{small,base} is the paper's DeiT recipe (Mixup/CutMix, "
        "RandAugment, random erasing). Runs under torchrun; SIGTERM/Ctrl-C checkpoint, "
        "--resume auto continues. Prints one JSON line (finetune_top1/top5 or scratch_top1/"
        "top5) and writes finetune.json / scratch.json beside the checkpoint.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="what to fine-tune: a checkpoint file, a run directory (its newest checkpoint) "
        "or an export directory; --from-scratch uses its architecture and data only",
    )
    p.add_argument(
        "--recipe",
        metavar="RECIPE",
        help="a packaged protocol (finetune_deit_vit_small, finetune_deit_vit_base: the "
        "paper's) or a YAML file; flags given override it (default: the small-data recipe)",
    )
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="same architecture and recipe from random init (the baseline)",
    )
    p.add_argument(
        "--encoder", choices=ENCODERS, help="pretrained backbone to start from (default query)"
    )
    _add_recipe_args(p, d)
    _add_deit_args(p, d)
    p.add_argument(
        "--seed",
        type=int,
        help=f"data order, augmentation, drop path, head init, scratch init (default {d.seed})",
    )
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue a stopped run: auto takes finetune.ckpt.pt (scratch.ckpt.pt) beside "
        "the checkpoint when it is there (default: a new run)",
    )
    add_device_arg(p)
    add_data_args(p)
    add_set_arg(
        p,
        "config overrides: data.*, train.precision|device|threads, eval.batch_size|test_subset",
    )
    p.set_defaults(handler=cmd_finetune)
