"""GPT pretraining on megatron-core (TP/PP) with DeepSpeed ZeRO, from one CPU to many GPUs."""

__version__ = "0.1.0"
