"""Out-of-bounds store detection shared by the kernel tests: an allocator to monkeypatch over a
kernel module's `_alloc`, handing out NaN-filled output views inside bigger buffers whose margins
hold a finite sentinel. A store outside an output's rows / columns changes a sentinel, and an
element never written stays NaN; the sentinel differs from the NaN that poisons the inputs'
surroundings, so a stray store of a value computed from a stray read is caught too."""
from __future__ import annotations

import torch


class GuardedAlloc:
    """`alloc(shape, dtype, device)` for 2-D, 1-D and 0-D outputs; `check()` after the kernel ran.

    sentinel: a value exact in every dtype the module allocates and far from any real output.
    require_finite: `check` demands finite outputs (not merely written ones)."""

    def __init__(self, sentinel: float, require_finite: bool = False):
        self.sentinel, self.require_finite = sentinel, require_finite
        self.buffers = []

    def __call__(self, shape, dtype, device):
        if len(shape) == 2:
            rows, cols = shape
            buf = torch.full((rows + 2, cols + 5), self.sentinel, dtype=dtype, device=device)
            view = buf[1:rows + 1, 2:2 + cols]
        else:
            n = shape[0] if shape else 1
            buf = torch.full((n + 8,), self.sentinel, dtype=dtype, device=device)
            view = buf[4:4 + n] if shape else buf[4]
        view.fill_(float("nan"))
        self.buffers.append((buf, view))
        return view

    def check(self) -> None:
        assert self.buffers
        for buf, view in self.buffers:
            values = view.float()
            if self.require_finite:
                assert torch.isfinite(values).all(), "an output element was never written"
            else:
                assert not torch.isnan(values).any(), "an output element was never written"
            guard = torch.ones(buf.shape, dtype=torch.bool)
            if buf.ndim == 2:
                guard[1:view.shape[0] + 1, 2:2 + view.shape[1]] = False
            else:
                guard[4:4 + max(view.numel(), 1)] = False
            assert (buf.float()[guard] == self.sentinel).all(), "a store landed outside its output's rows/columns"
