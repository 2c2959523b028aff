"""dist_reshard: distributed, read-only-your-bytes conversion between HF safetensors and Megatron-Core.

`dist_reshard.convert(src=..., dst=..., load=..., save=..., tp=..., ...)` runs a conversion from Python (api.py);
`python -m dist_reshard.launch` is the command line over it. docs/design.md shows how the package is laid out.
"""

from .base.version import VERSION as __version__

__all__ = ["__version__", "convert", "ConversionError"]


def __getattr__(name: str):
    # Imported on first use: `python -m dist_reshard.inspect` and friends need not load the converter.
    if name in ("convert", "ConversionError"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'dist_reshard' has no attribute {name!r}")
