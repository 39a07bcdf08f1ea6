"""varejax: surgical concept erasure for visual autoregressive models (Infinity), in JAX."""

__version__ = "0.1.0"
