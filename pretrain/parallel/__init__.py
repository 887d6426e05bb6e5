"""Process groups, megatron parallel_state, DeepSpeed ZeRO glue and the pipeline schedule."""
