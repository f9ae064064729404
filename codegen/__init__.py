"""Code generation: the ``"sparsify"`` torch.compile backend and its Triton kernels."""
