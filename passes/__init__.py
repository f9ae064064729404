"""The passes: S²FT, adapters, pruning, N:M/block sparsity, co-permutation, and the surgery toolkit they share."""

from sparsify_fx.passes.copermute import permute

__all__ = ["permute"]
