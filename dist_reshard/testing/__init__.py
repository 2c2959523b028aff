"""Test and demo support, never imported by the converter: real Megatron-Core models on CPU, tiny seeded HF models."""
