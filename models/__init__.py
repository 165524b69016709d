"""Parametrised models: Flax Linen modules and pure functions over pytrees (no file I/O, no absl)."""
