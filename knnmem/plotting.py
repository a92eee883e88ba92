"""Matplotlib for files, not screens: every plot knnmem writes goes through `pyplot()`."""

from __future__ import annotations


def pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend (no display needed, nothing pops up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
