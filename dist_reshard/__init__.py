"""dist_reshard: distributed, read-only-your-bytes conversion between HF safetensors and Megatron-Core."""

__version__ = "0.1.0"
