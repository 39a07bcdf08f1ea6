"""Sampling: the KV-cache CFG sampler and the (cached) T5 text features it conditions on."""
