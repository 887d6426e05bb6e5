"""Token sources and the loader that turns them into per-rank micro-batches."""
