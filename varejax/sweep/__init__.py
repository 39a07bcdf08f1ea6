"""Erasure sweeps: many runs of one base model, stacked where they can share a compiled step."""
