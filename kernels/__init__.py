"""nanofast.kernels: drop-in kernels, each beside its plain-torch reference.

This package imports nothing from the rest of nanofast, so other projects can take it alone.
"""
from .newton_schulz import CLASSIC_NS_COEFFS, POLAR_EXPRESS_COEFFS, newton_schulz, newton_schulz_reference

__all__ = ["newton_schulz", "newton_schulz_reference", "POLAR_EXPRESS_COEFFS", "CLASSIC_NS_COEFFS"]
