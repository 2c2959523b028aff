"""Byte-level formats, with no model knowledge: safetensors headers, the allow-list unpickler, MXFP4, our manifest."""
