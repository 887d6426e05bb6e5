"""Process groups, megatron parallel_state, DeepSpeed ZeRO glue and the pipeline schedule."""

# DeepSpeed's default reduce bucket is 5e8 elements: a 2 GB fp32 (1 GB bf16) scratch buffer
# per rank, and at ZeRO-2 any model below 5e8 parameters would stage all its gradients at
# full size during backward. 5e7 keeps communication efficient and the peak sharded.
# (Here, not in zero.py, so the dry-run estimate can read it without importing megatron.)
REDUCE_BUCKET_ELEMENTS = 50_000_000
