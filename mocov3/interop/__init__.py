"""Moving backbones across the library's edge: export directories (safetensors plus an
exact architecture, timm-loadable) and imports of the reference implementation's files."""

from mocov3.interop.pretrained import ExportError, from_pretrained, save_pretrained

__all__ = ["ExportError", "from_pretrained", "save_pretrained"]
