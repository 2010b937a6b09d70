import os

# The Triton interpreter executes @triton.jit kernels on CPU tensors; it must be chosen before
# triton is imported anywhere. The fp-fusion default changes in triton 3.10: pin it.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
