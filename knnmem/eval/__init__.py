"""Measuring memory: pass keys, exact-against-approximate comparisons, retrieval quality, explanations, the demo."""
