"""Make the shared test models importable as ``models`` (only tests/ goes on sys.path, never the
repository root, so ``passes`` and ``codegen`` stay importable only as sparsify_fx sub-packages)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
