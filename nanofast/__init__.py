"""nanofast: a nanochat-compatible GPT training and inference stack built on fast kernels."""
