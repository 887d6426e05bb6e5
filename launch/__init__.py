"""Launch-side helpers (environment detection, preflight); never imports the trainer."""
