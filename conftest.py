"""Test-wide settings. Triton has no GPU here: its kernels run in the interpreter on CPU tensors,
and the switch must be set before triton is first imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

# Two cores, two xdist workers: one thread each avoids oversubscription.
torch.set_num_threads(1)
