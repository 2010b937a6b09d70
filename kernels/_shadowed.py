"""`import kernels` from a nanofast checkout's root: find the installed package of that name."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(init_file: str) -> None:
    """Replace sys.modules["kernels"] (this folder, imported under the wrong name) by the `kernels`
    package found on sys.path without the checkout's root, so `import kernels` returns that; raise
    ImportError naming nanofast.kernels when there is none."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        del sys.modules["kernels"]
        raise ImportError("`kernels` here is the folder of nanofast.kernels (import it as nanofast.kernels); "
                          "no other package named `kernels` is installed")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    sys.modules.pop("kernels._shadowed", None)  # this file: not a module of the package handed to
    spec.loader.exec_module(module)
