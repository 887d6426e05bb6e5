"""Sharded, atomic, exactly resumable checkpoints that reshard across TP/PP/DP/ZeRO
(manager.py), their on-disk protocol (store.py), Adam state in model space
(optimizer_state.py) and the stop signals that trigger a final save (signals.py)."""
