"""Typed configuration: nested dataclasses, YAML presets and ``key=value`` overrides.

Every default is the paper's ViT recipe (Chen, Xie, He, ICCV 2021, Sec. 4 and the
reference code's ViT-S/B settings); presets (:mod:`mocov3.presets`) override what they must and
say why. Unknown keys and bad values raise :class:`ConfigError` with one line naming the
key and the fix, before any compute starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mocov3 import presets
from mocov3.errors import ConfigError

# the model section lives in model_config; its public names are re-exported (X as X)
from mocov3.model_config import RESNET_SIZES as RESNET_SIZES
from mocov3.model_config import VIT_SIZES as VIT_SIZES
from mocov3.model_config import ModelConfig as ModelConfig
from mocov3.model_config import is_resnet_arch as is_resnet_arch
from mocov3.model_config import resolve_model_dims as resolve_model_dims
from mocov3.model_config import validate_model


@dataclass
class DataConfig:
    """What to train on. ``name``: fashion-mnist | folder:PATH | wds:PATTERN | hf:PATH |
    synthetic."""

    name: str = "fashion-mnist"
    # fashion-mnist: the folder of the idx files (None: $FASHION_MNIST_DIR, the Debian
    # package's folder, the download cache); download: fetch them there with torchvision
    data_dir: str | None = None
    download: bool = False
    image_size: int = 224  # model input size; images are stored at this size as uint8
    channels: int | None = None  # None: take the dataset's own (1 for Fashion-MNIST, 3 for RGB)
    subset: int | None = None  # use the first N training images (tests, quick tries)
    synthetic_size: int = 2048  # number of generated training images for ``synthetic``
    strict: bool = False  # unreadable image files stop the run instead of being skipped
    # memory: decode every training image once into a uint8 tensor; stream: cut each batch's
    # views from the full-resolution images in DataLoader workers (folders, shards, Hugging
    # Face datasets too large for memory); auto: memory unless such a dataset's decoded
    # images would exceed data.memory_limit_gb
    loader: str = "auto"
    memory_limit_gb: float = 8.0
    workers: int | None = None  # stream: DataLoader worker processes (None: per machine)
    # stream: where JPEGs are decoded: cpu (the workers) or gpu (nvJPEG on the training GPU,
    # the workers only read bytes and draw the crop boxes)
    decode: str = "cpu"
    reduced_decode: bool = True  # stream: decode JPEGs at 1/2-1/8 size where every crop allows


@dataclass
class AugmentConfig:
    """The paper's asymmetric two-view BYOL recipe. Two-element lists are (view 1, view 2)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: tuple[float, float] = (0.0, 0.2)


@dataclass
class OptimConfig:
    """lr = base_lr * global_batch / 256, linear warmup then half-cosine to 0.

    ``adamw`` (ViT, with ``betas``) or ``lars`` (ResNet, with ``momentum`` and
    ``trust_coefficient``; 1-d tensors get no weight decay and no trust ratio).
    """

    name: str = "adamw"  # adamw | lars
    base_lr: float = 1.5e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)  # torch defaults, as the reference code
    warmup_epochs: float = 40.0
    min_lr: float = 0.0
    momentum: float = 0.9  # LARS only (the reference's value)
    trust_coefficient: float = 0.001  # LARS only: lr scale = coef * |w| / |g + wd * w|


@dataclass
class MocoConfig:
    """Momentum encoder and contrastive loss."""

    momentum: float = 0.99  # m0 of the cosine schedule to 1.0
    momentum_cosine: bool = True
    temperature: float = 0.2  # tau for ViT (1.0 for ResNet)
    # one backbone call on both views; heads keep per-view BN. ViT only: a ResNet's BN would
    # mix the two views' statistics, so ResNet configs must set it false
    concat_views: bool = True


@dataclass
class TrainConfig:
    epochs: float = 300.0
    batch_size: int = 4096  # global batch
    seed: int = 0
    # auto: bf16 where it is fast (CUDA, CPUs with AVX-512-BF16/AMX), else fp32 (see
    # runtime/precision.py); bf16 | fp32 | fp16 (CUDA only, with a grad scaler)
    precision: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch intra-op threads; None: leave torch's default
    log_every: int = 10  # steps between metric lines
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always saves)
    checkpoint_every_steps: int = 0  # steps between checkpoints; > 0 replaces checkpoint_every
    keep_checkpoints: int = 3  # checkpoint-STEP.pt files kept (the newest K)
    milestones: tuple[int, ...] = ()  # epochs whose checkpoints are kept for good
    skip_nonfinite: bool = False  # skip steps with a non-finite loss or gradient (else stop)
    plot_every: int = 1  # epochs between plot refreshes
    tf32: bool = True  # CUDA, Ampere or newer: fp32 matmuls/convolutions in TF32 (ignored on CPU)
    channels_last: bool = False  # NHWC memory layout for convolutional backbones (ResNet)
    compile: bool = False  # torch.compile the backbones (1-2 min to compile; ~8% on CPU)
    dist_timeout_minutes: float = 30.0  # how long a process waits for the others (DDP)
    # size the run to wall-clock minutes, evaluation included (train/budget.py): the step
    # count is measured, train.epochs then only sets the warmup's share (warmup_epochs/epochs)
    budget_minutes: float | None = None
    loggers: tuple[str, ...] = ("tensorboard",)  # mirrors of metrics.jsonl: see LOGGERS


@dataclass
class EvalConfig:
    """Weighted kNN (InstDisc/DINO voting) on L2-normalised class-token features."""

    knn_k: tuple[int, ...] = (20, 200)
    knn_temperature: float = 0.07
    knn_init: bool = True  # evaluate the random-init backbone before training
    knn_final: bool = True
    batch_size: int = 512
    train_subset: int | None = None  # memory bank size (None: the whole train split)
    test_subset: int | None = None
    monitor_every: int = 0  # steps between kNN monitor evaluations during training (0: off)
    monitor_images: int | None = None  # memory + queries of the monitor (None: ~5% of time)


@dataclass
class StabilityConfig:
    """The gradient monitor and instability detector (paper Sec. 5, Fig. 4; see
    train/stability.py). Norms come from the step's own gradients: no extra backward."""

    grad_norms: bool = True  # per-group gradient norms (patch projection, blocks, heads)
    grad_every: int = 1  # steps between gradient-norm records in metrics.jsonl
    spike_factor: float = 5.0  # a spike: a group's norm above this x its running median
    window: int = 100  # steps in the running medians
    warmup: int = 20  # values a running median needs before anything is flagged
    loss_rise: float = 0.1  # a loss rise: loss above (1 + this) x its running median
    knn_dip: float = 2.0  # a kNN dip: monitor top-1 this many points below its best so far
    merge_steps: int = 50  # spikes starting within this many steps count as one episode


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- coercion


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert ``value`` to ``annotation`` or raise a one-line ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if origin is tuple:
        if isinstance(value, (int, float)) and args and args[-1] is Ellipsis:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {_short(value)}")
        if args and args[-1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(
                f"config key '{key}' must have {len(args)} values, "
                f"got {len(value)}: {_short(value)}"
            )
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}' must be true or false, got {_short(value)}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{key}' must be an integer, got {_short(value)}")
        if isinstance(value, int):
            return value
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise ConfigError(
                f"config key '{key}' must be an integer, got {_short(value)}"
            ) from None
        if not number.is_integer():
            raise ConfigError(f"config key '{key}' must be an integer, got {_short(value)}")
        return int(number)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{key}' must be a number, got {_short(value)}")
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise ConfigError(f"config key '{key}' must be a number, got {_short(value)}") from None
        if not math.isfinite(number):
            raise ConfigError(f"config key '{key}' must be a finite number, got {_short(value)}")
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a string, got {_short(value)}")
        return str(value)
    return value


def _short(value: Any) -> str:
    """``repr`` on one line, at most 80 characters (values can be long or multi-line)."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(section: Any, values: dict[str, Any], prefix: str) -> None:
    hints = _field_types(type(section))
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"unknown config key '{name}' (known in this section: {known})")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{name}' is a section; give it a mapping")
            _apply(current, value, f"{name}.")
        else:
            setattr(section, key, _coerce(value, hints[key], name))


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value``; the value is read as YAML (``[0.2, 1]``, ``true``),
    except for a text key (``data.name``, ``model.arch``, ...), whose value is taken as
    written unless quoted: a path or spec such as ``wds:/data/a #1/{0..9}.tar`` is no YAML
    mapping or comment."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    literal = raw.strip() not in ("", "null", "~") and raw.strip()[:1] not in ("'", '"')
    if literal and _is_text_key(key):
        return key, raw.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):  # e.g. 2021-02-30 is not a date
        value = raw
    return key, value


def _is_text_key(key: str) -> bool:
    """Whether ``section.key`` is a field of type ``str`` (or ``str | None``)."""
    section, _, name = key.partition(".")
    section_type = _field_types(Config).get(section)
    if section_type is None or not dataclasses.is_dataclass(section_type):
        return False
    return _field_types(section_type).get(name) in (str, str | None)


def _nest(key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Build a :class:`Config` from a YAML preset and ``key=value`` overrides, then validate."""
    config = Config()
    if path is not None:
        path = presets.resolve(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise ConfigError(f"config file {path} cannot be read ({reason})") from None
        try:
            values = yaml.safe_load(text) or {}
        except (yaml.YAMLError, ValueError, RecursionError) as error:
            line = getattr(getattr(error, "problem_mark", None), "line", None)
            where = f" line {line + 1}" if line is not None else ""
            raise ConfigError(f"config file {path}{where} is not valid YAML") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        _apply(config, values, "")
    return apply_overrides(config, overrides)


def apply_overrides(config: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``section.key=value`` strings in order, then validate the result."""
    for text in overrides:
        key, value = parse_override(text)
        _apply(config, _nest(key, value), "")
    validate(config)
    return config


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a config saved in a checkpoint or run directory."""
    config = Config()
    _apply(config, values, "")
    validate(config)
    return config


# --------------------------------------------------------------------------- validation

LOGGERS = ("tensorboard", "wandb", "mlflow")  # train.loggers' trackers (runtime/loggers.py)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: Config) -> None:
    """Range checks that need no data; raise ConfigError with the key and the fix."""
    s = config.stability
    _require(s.grad_every >= 1, "stability.grad_every must be >= 1")
    _require(s.spike_factor > 1, "stability.spike_factor must be > 1 (a multiple of the median)")
    _require(s.window >= 1 and 1 <= s.warmup <= s.window, "stability: need 1 <= warmup <= window")
    _require(s.loss_rise > 0, "stability.loss_rise must be positive (a fraction, e.g. 0.1)")
    _require(s.knn_dip > 0, "stability.knn_dip must be positive (points of kNN top-1)")
    _require(s.merge_steps >= 0, "stability.merge_steps must be >= 0")
    m, d, a, o, mc, t, e = (
        config.model,
        config.data,
        config.augment,
        config.optim,
        config.moco,
        config.train,
        config.eval,
    )
    validate_model(m, d.image_size, config.moco.concat_views)
    _require(d.channels in (None, 1, 3), "data.channels must be 1, 3 or null")
    _require(d.subset is None or d.subset >= 2, "data.subset must be at least 2 images")
    lo, hi = a.crop_scale
    _require(
        0.0 < lo <= hi <= 1.0, f"augment.crop_scale {a.crop_scale} must satisfy 0 < min <= max <= 1"
    )
    _require(0.0 < a.crop_ratio[0] <= a.crop_ratio[1], "augment.crop_ratio must be increasing > 0")
    for name in ("flip_p", "jitter_p", "grayscale_p"):
        value = getattr(a, name)
        _require(0.0 <= value <= 1.0, f"augment.{name} {value} must be a probability in [0, 1]")
    for name in ("blur_p", "solarize_p"):
        for value in getattr(a, name):
            _require(0.0 <= value <= 1.0, f"augment.{name} {value} must be probabilities in [0, 1]")
    _require(0.0 < a.blur_sigma[0] <= a.blur_sigma[1], "augment.blur_sigma must be 0 < min <= max")
    for name in ("brightness", "contrast", "saturation"):
        _require(0.0 <= getattr(a, name) < 1.0, f"augment.{name} must be in [0, 1)")
    _require(0.0 <= a.hue <= 0.5, "augment.hue must be in [0, 0.5]")
    _require(o.name in ("adamw", "lars"), f"optim.name '{o.name}' must be adamw or lars")
    _require(0.0 <= o.momentum < 1.0, f"optim.momentum {o.momentum} must be in [0, 1)")
    _require(o.trust_coefficient > 0, "optim.trust_coefficient must be positive")
    _require(o.base_lr > 0, f"optim.base_lr {o.base_lr} must be positive")
    _require(o.weight_decay >= 0, f"optim.weight_decay {o.weight_decay} must be >= 0")
    _require(all(0.0 <= b < 1.0 for b in o.betas), "optim.betas must be in [0, 1)")
    _require(o.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0")
    _require(0.0 <= mc.momentum <= 1.0, f"moco.momentum {mc.momentum} must be in [0, 1]")
    _require(mc.temperature > 0, f"moco.temperature {mc.temperature} must be positive")
    _require(t.epochs > 0, f"train.epochs {t.epochs} must be positive")
    _require(
        o.warmup_epochs <= t.epochs,
        f"optim.warmup_epochs {o.warmup_epochs} exceeds train.epochs {t.epochs}",
    )
    _require(
        t.batch_size >= 2,
        f"train.batch_size {t.batch_size} must be at least 2 "
        "(the other images of the batch are the negatives)",
    )
    _require(
        t.precision in ("auto", "bf16", "fp32", "fp16"),
        f"train.precision '{t.precision}' must be auto, bf16, fp32 or fp16",
    )
    _require(
        t.log_every >= 1 and t.checkpoint_every >= 1 and t.plot_every >= 1,
        "train.log_every, checkpoint_every and plot_every must be >= 1",
    )
    _require(0 <= t.seed < 2**32, f"train.seed {t.seed} must be in [0, 2**32)")
    _require(
        t.checkpoint_every_steps >= 0,
        "train.checkpoint_every_steps must be >= 0 (0: use train.checkpoint_every epochs)",
    )
    _require(t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
    _require(
        all(epoch >= 1 for epoch in t.milestones),
        f"train.milestones {list(t.milestones)} must be epoch numbers >= 1",
    )
    _require(
        t.threads is None or t.threads >= 0,
        "train.threads must be >= 0 (0 or null: torch's default)",
    )
    _require(
        d.loader in ("auto", "memory", "stream"),
        f"data.loader '{d.loader}' must be auto, memory or stream",
    )
    _require(d.memory_limit_gb > 0, "data.memory_limit_gb must be positive")
    _require(d.workers is None or d.workers >= 0, "data.workers must be >= 0 (or null: auto)")
    _require(d.decode in ("cpu", "gpu"), f"data.decode '{d.decode}' must be cpu or gpu")
    _require(t.dist_timeout_minutes > 0, "train.dist_timeout_minutes must be positive")
    _require(
        t.budget_minutes is None or t.budget_minutes > 0,
        f"train.budget_minutes {t.budget_minutes} must be positive (or null: no budget)",
    )
    _require(  # their packages are checked when a run starts: reading a config needs none
        len(set(t.loggers)) == len(t.loggers) and set(t.loggers) <= set(LOGGERS),
        f"train.loggers {_short(list(t.loggers))} may name each of {', '.join(LOGGERS)} once",
    )
    _require(len(e.knn_k) >= 1 and all(k >= 1 for k in e.knn_k), "eval.knn_k must be positive")
    _require(e.knn_temperature > 0, "eval.knn_temperature must be positive")
    _require(e.batch_size >= 1, "eval.batch_size must be >= 1")
    _require(e.monitor_every >= 0, "eval.monitor_every must be >= 0 (0 turns it off)")
    _require(
        e.monitor_images is None or e.monitor_images >= 100,
        "eval.monitor_images must be at least 100",
    )
