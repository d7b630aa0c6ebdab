"""mocov3: MoCo v3 self-supervised pretraining of Vision Transformers (Chen, Xie, He, ICCV 2021).

The public API (:mod:`mocov3.api`) is imported on first use, so ``import mocov3`` and the
command line stay fast and free of import cycles.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "build_model", "from_pretrained", "load_backbone", "save_pretrained"]

_API = ("build_model", "from_pretrained", "load_backbone", "save_pretrained")


def __getattr__(name: str) -> Any:
    if name in _API:
        from mocov3 import api

        return getattr(api, name)
    raise AttributeError(f"module 'mocov3' has no attribute {name!r}")
