"""Prompt sources: erasure prompt pairs (JSONL/CSV), template generator, evaluation prompt sets."""
