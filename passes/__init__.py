"""Passes over models and graphs: permutation, S²FT, pruning, N:M masks, adapters."""
