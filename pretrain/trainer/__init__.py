"""The training loop (loop.py) and what it calls each step: the optimizer and LR schedule
(optim.py), guards against non-finite steps, spikes and hangs (guards.py), and the hooks that
watch it (hooks.py; TensorBoard and W&B in trackers.py)."""
