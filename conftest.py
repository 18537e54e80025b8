"""Collection settings for the whole repository (doctests of src/ included)."""

import importlib.util
import os

HAS_TRITON = importlib.util.find_spec("triton") is not None

# The Triton kernels are tested on CPU tensors in triton's interpreter. The variable must be set
# before anything imports triton (lightning and transformers do, at collection): triton decorates
# its own standard library (tl.max, tl.sum, ...) when imported, and compiled-mode versions of
# those cannot run inside an interpreted kernel.
if HAS_TRITON:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The Triton kernels' module imports triton; without it there is nothing to collect there.
collect_ignore = [] if HAS_TRITON else ["src/encouraging_loss/ops/triton_kernels.py"]
