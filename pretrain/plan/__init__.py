"""Plan a run from a compute budget: scaling laws (published or fitted on a ladder of runs),
compute-optimal size and tokens, a model shape and a layout that fits memory."""
