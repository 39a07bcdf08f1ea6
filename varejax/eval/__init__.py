"""Evaluation: detectors' outputs -> erasure rate, preservation, Frechet distance; reports."""
