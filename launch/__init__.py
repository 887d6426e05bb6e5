"""Cluster launch helpers: where a job runs (env.py), and the checks that must pass before
it spends accelerator time (preflight.py). Used by slurm/*.sh."""
