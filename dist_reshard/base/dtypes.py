"""safetensors dtype names to torch dtypes (one table for the reader, writers, verifier and inspector)."""

import torch

TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}  # torch dtype -> safetensors name
# config.json's torch_dtype / dtype -> the --dtype flag
HF_DTYPE_FLAGS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16",
                  "fp32": "fp32", "float": "fp32", "half": "fp16"}
