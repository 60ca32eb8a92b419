"""``python -m rfm_fast.nn [options]``: the same as ``rfm-fast nn-collapse [options]``."""

from .cli import main

raise SystemExit(main())
