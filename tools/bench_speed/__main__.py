"""`python -m tools.bench_speed`: see the package's docstring (tools/bench_speed/__init__.py)."""

import sys

from .cli import main

sys.exit(main())
