"""Algorithms that act on models: fitting, posteriors, samplers, bases, estimators (no file I/O, no absl)."""
