"""Output writers, one per Megatron checkpoint format."""
