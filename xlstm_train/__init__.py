"""xlstm-train: Megatron-style training for xLSTM language models."""

__version__ = "0.1.0"
