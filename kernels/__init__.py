"""nanofast.kernels: drop-in kernels, each beside its plain-torch reference.

This package imports nothing from the rest of nanofast, so other projects can take it alone.
"""
from .newton_schulz import newton_schulz

__all__ = ["newton_schulz"]
