"""`python -m rfm_fast` is the `rfm-fast` command."""

import sys

from .cli import main

sys.exit(main())
