"""Collection settings for the whole repository (doctests of src/ included)."""

import importlib.util

# The Triton kernels' module imports triton; without it there is nothing to collect there.
collect_ignore = (
    [] if importlib.util.find_spec("triton") else ["src/encouraging_loss/ops/triton_kernels.py"]
)
