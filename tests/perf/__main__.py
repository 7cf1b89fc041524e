"""`python -m tests.perf`: the benchmark (see tests/perf/bench.py; `--help` for the options)."""

from __future__ import annotations

import sys

from tests.perf.bench import main

if __name__ == "__main__":
    sys.exit(main())
