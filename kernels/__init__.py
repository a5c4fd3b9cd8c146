"""Triton kernels and their launchers. Installed as ``fp8conv.kernels`` (never as a top-level
``kernels`` module: that import name is taken on PyPI)."""
