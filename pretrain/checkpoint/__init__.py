"""Sharded, atomic, exactly resumable checkpoints that reshard across TP/PP/DP/ZeRO: the
Checkpointer over a registry of parts (manager.py, parts.py, tensor_parts.py), the on-disk
protocol (store.py), Adam state in model space (optimizer_state.py, zero3_state.py) and the
stop signals that trigger a final save (signals.py)."""
