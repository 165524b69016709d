"""ml_collections config files: `get_config(arg)` presets and `get_sweep()` sweeps."""
