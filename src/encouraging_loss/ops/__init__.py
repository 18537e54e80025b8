"""Fast paths of the encouraging loss: closed-form autograd Functions (and, later, GPU kernels)."""
