"""Triton kernels, each beside its PyTorch reference and its test."""
