"""nanofast: a nanochat-compatible GPT training and inference stack built on fast kernels.

`nanofast.kernels` needs only torch, triton and numpy (`pip install nanofast`); the training
driver (the rest of this package) needs the `train` extra (docs/install.md). Importing this
package imports nothing: the version is written here once, and setup.py reads it as text.
"""
__version__ = "0.1.0"
