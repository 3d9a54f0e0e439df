"""Per-family Optuna search spaces (YAML)."""
