"""The model and the layout asked for: HF configs and Megatron-LM args read into model facts (one table both
ways), and the target TP/PP/EP layout."""
