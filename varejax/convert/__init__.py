"""Checkpoint conversion from upstream PyTorch files: safe readers, strict key tables, CLI."""
