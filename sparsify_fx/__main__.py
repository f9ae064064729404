"""``python -m sparsify_fx``: the ``sparsify-fx`` command (see :mod:`sparsify_fx.cli`)."""

from sparsify_fx.cli import main

raise SystemExit(main())
