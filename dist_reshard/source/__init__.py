"""A checkpoint as source tensors, from its metadata alone: an HF folder, or Megatron rank files and DCP
chunks as logical HF-named tensors."""
