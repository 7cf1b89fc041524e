"""The benchmark (`make bench`, `python -m tests.perf`): see tests/perf/bench.py."""
