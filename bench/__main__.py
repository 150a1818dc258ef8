"""``python -m bench``: the benchmark runner (see :mod:`bench.runner`)."""

from .runner import main

raise SystemExit(main())
