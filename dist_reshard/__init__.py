"""dist_reshard: distributed, read-only-your-bytes conversion between HF safetensors and Megatron-Core."""

from .base.version import VERSION as __version__
