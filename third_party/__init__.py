"""Adapters to other people's formats: official PyTorch checkpoints, coefficient files."""
